"""Per-sample lrs toward a hand-drawn target (`jaxeif meta-cnn-toward`): the drawn target and its metrics,
and a tiny end-to-end run whose saved numbers agree with its saved matrices and rates."""

import json

import numpy as np
import pytest

from jaxeif import cli, meta
from jaxeif.experiments import meta_cnn_toward as study
from jaxeif.meta.image_study import Split


def _split(labels, noise_std):
    n = len(labels)
    return Split(
        np.zeros((n, 28, 28, 1), np.float32),
        np.asarray(labels, np.int32),
        np.asarray(noise_std, np.float32),
        np.zeros(n, np.int32),
    )


def test_drawn_target_is_the_sentence_and_its_metrics_read_it_back():
    rows = _split([0, 1, 1, 0, 1, 1], [0, 0, 0, 0.5, 0.5, 0.5])
    cols = _split([1, 0, 2], [0, 0, 0])
    square = study.drawn_target(rows, rows, 0.25, square=True)
    assert square.target[0, 3] == -1 and square.target[3, 0] == -0.25 and square.target[1, 2] == -1
    assert square.target[4, 1] == -0.25 and square.target[0, 1] == 0 and not square.mask.diagonal().any()
    rect = study.drawn_target(rows, cols, 0.25, square=False)
    np.testing.assert_array_equal(rect.target[:, 0], [0, -1, -1, 0, -0.25, -0.25])
    assert rect.mask.all() and not rect.target[:, 2].any()
    m = study.drawn_metrics(3.0 * square.target, rows, square)  # the drawn structure itself, at any scale
    assert m["toward"] == pytest.approx(0.0, abs=1e-6)
    assert m["noisy_to_clean_ratio"] == pytest.approx(0.25) and m["between_class_learning"] == 0
    uniform = study.drawn_metrics(np.where(square.target != 0, -1.0, 0.0), rows, square)
    assert uniform["noisy_to_clean_ratio"] == pytest.approx(1.0) and uniform["toward"] > 0.01


@pytest.mark.slow
def test_quick_run_moves_toward_the_target_and_saves_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "meta-cnn-toward",
        "--out",
        str(out),
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--quick",
        "--no-progress",
        "--train-size",
        "640",
        "--meta-steps",
        "3",
        "--meta-lr",
        "0.3",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "meta.toward objective" in capsys.readouterr().out
    for name in (
        "config.json",
        "history.npy",
        "lr.json",
        "toward.png",
        "results.json",
        *(f"eif_{s}_{k}.npy" for s in ("train", "heldout") for k in ("before", "after")),
    ):
        assert (out / name).is_file(), name
    r = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "lr.json").read_text())
    labels, noise, lr = (np.array(saved[k]) for k in ("labels", "noise_std", "lr"))
    assert len(lr) == 20 and np.ptp(lr) > 0 and (noise > 0).sum() == 10
    rows = _split(labels, noise)
    hist = np.load(out / "history.npy")
    assert r["objective"]["history"] == pytest.approx(hist.tolist()) and r["objective"]["final"] < hist[0]
    drawn = study.drawn_target(rows, rows, 0.5, square=True)
    before, after = np.load(out / "eif_train_before.npy"), np.load(out / "eif_train_after.npy")
    # the fit started at the uniform lr, and its final objective is that of the saved learned-lr matrix
    assert hist[0] == pytest.approx(float(meta.toward(before, drawn.target, drawn.mask)), rel=1e-4)
    assert r["objective"]["final"] == pytest.approx(r["metrics"]["train"]["after"]["toward"], rel=1e-4)
    for name, M in (("before", before), ("after", after)):
        assert r["metrics"]["train"][name] == pytest.approx(study.drawn_metrics(M, rows, drawn), rel=1e-5)
    held = np.load(out / "eif_heldout_after.npy")
    assert held.shape == (20, 20) and not np.allclose(held, np.load(out / "eif_heldout_before.npy"))
    assert r["lr_after"]["noisy_mean"] == pytest.approx(float(lr[noise > 0].mean()), rel=1e-6)
