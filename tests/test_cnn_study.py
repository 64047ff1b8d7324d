"""The figure-1 study: its lr rule, its metrics, and an end-to-end run on a tiny subset."""

import json
import subprocess
import sys

import numpy as np
import pytest

import jaxeif
from jaxeif import cli, desiderata, lr_choice
from jaxeif.data import noisy_digits
from jaxeif.experiments import cnn_noise
from jaxeif.models import cnn


def test_study_metrics_on_a_constructed_matrix():
    digits = np.tile(np.repeat(np.arange(10), 2), 2)  # 2 per digit, clean then one noise level
    noise = np.repeat([0.0, 0.5], 20).astype(np.float32)
    source = np.tile(np.arange(20), 2)
    same = digits[:, None] == digits[None, :]
    M = np.where(same, -2.0, 0.5)
    M[20:] *= 0.5  # noisy copies teach half as much
    np.fill_diagonal(M, -9.0)
    m = cnn_noise.study_metrics(M, digits, noise, source)
    assert m["within_class_mean"] == pytest.approx(float(desiderata.within_between(M, digits)[0]))
    assert m["between_class_mean"] == pytest.approx((0.5 * 20 * 36 + 0.25 * 20 * 36) / (40 * 36))
    assert m["within_class_frac_learned"] == 1.0 and m["between_class_frac_unlearned"] == 1.0
    nz = m["noise"]["std_0.5"]
    assert nz["teaching_ratio_same_class_clean"] == pytest.approx(0.5)
    assert nz["eif_noise_mean_on_same_class_clean_evals"] == pytest.approx(1.0)  # -1 - (-2)
    assert m["class_mean_matrix_clean"][3][3] == pytest.approx(-2.0)
    assert m["class_mean_matrix_clean"][3][4] == pytest.approx(0.5)


@pytest.mark.slow
def test_help_works():
    out = subprocess.run(
        [sys.executable, "-m", "jaxeif.experiments.cnn_noise", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--out" in out.stdout and "--quick" in out.stdout and "plateau" in out.stdout


@pytest.mark.slow
def test_end_to_end_quick_run_writes_consistent_results(tmp_path, capsys):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    argv = ["--out", str(out), "--ckpt", str(ckpt), "--quick", "--no-progress", "--train-size", "1280"]
    assert cli.experiment_main(cnn_noise, argv) == 0
    printed = capsys.readouterr().out
    assert "corr(M, M^T)" in printed and "wall time" in printed
    for name in [
        "config.json",
        "lr_sweep.json",
        "lr_sweep.png",
        "eif.npy",
        "metrics.json",
        "eif_heatmap.png",
        "eif_histogram.png",
        "lr_findings.json",
        "lr_findings.png",
    ]:
        assert (out / name).is_file(), name
    M = np.load(out / "eif.npy")
    assert M.shape == (60, 60) and np.all(np.isfinite(M))
    metrics = json.loads((out / "metrics.json").read_text())
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert (
        metrics["lr"]
        == sweep["chosen_lr"]
        == lr_choice.choose_lr(sweep["lrs"], sweep["agreement_with_previous"], 0.95, rule=cnn_noise.RULE)
    )
    fs = noisy_digits.finetune_set(per_digit=2, noise_stds=(0.5, 1.0), seed=0)
    assert metrics["symmetry_corr"] == pytest.approx(float(desiderata.symmetry_corr(M)), abs=1e-6)
    assert metrics["block_symmetry_corr_digit"] == pytest.approx(
        float(desiderata.block_symmetry_corr(M, fs.labels)), abs=1e-6
    )
    assert metrics["base_cnn"]["config"]["train_size"] == 1280
    # the saved matrix is the EIF of the cached CNN at the chosen lr (first 50 rows recomputed directly)
    params = cnn.load_or_train(ckpt, epochs=1, batch_size=128, train_size=1280, progress=False)
    rows = np.arange(50)
    lr = np.full(50, metrics["lr"], np.float32)
    direct = jaxeif.eif(cnn.loss_fn, params, (fs.images[rows], fs.labels[rows]), (fs.images, fs.labels), lr=lr)
    np.testing.assert_allclose(M[rows], np.asarray(direct), rtol=1e-4, atol=1e-5)
    # the findings curves: one point per lr of the sweep, each equal to a single-lr run of the study
    findings = json.loads((out / "lr_findings.json").read_text())
    assert findings["lrs"] == sweep["lrs"] and all(len(v) == len(sweep["lrs"]) for v in findings["curves"].values())
    assert sweep["share_above_noise_floor"][0] < 1.0 or sweep["share_above_noise_floor"][-1] <= 1.0
    at = sweep["lrs"].index(metrics["lr"])
    keys = ("symmetry_corr", "between_class_mean", "within_class_frac_learned_above_floor", "share_below_noise_floor")
    for key in keys:
        assert findings["metrics_per_lr"][at][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    other_lr = sweep["lrs"][0]
    single = cli.experiment_main(cnn_noise, argv[:1] + [str(tmp_path / "single")] + argv[2:] + ["--lr", str(other_lr)])
    assert single == 0
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for key in keys:
        assert findings["metrics_per_lr"][0][key] == pytest.approx(single_metrics[key], rel=1e-4, abs=1e-6), key
    capsys.readouterr()
    # a second run with the same options resumes (same matrix); other options are refused
    assert cli.experiment_main(cnn_noise, argv) == 0
    np.testing.assert_array_equal(np.load(out / "eif.npy"), M)
    capsys.readouterr()
    assert cli.experiment_main(cnn_noise, argv + ["--steps", "2"]) == 2
    assert "another config" in capsys.readouterr().err
