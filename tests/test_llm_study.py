"""The LLM logic study end to end on a tiny random checkpoint: files, numbers, resume, errors."""
import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")

from tiny_lm import tiny_checkpoint  # noqa: E402

from experiments import llm_logic  # noqa: E402
from jaxeif import cli, desiderata, lr_choice  # noqa: E402
from jaxeif.data import domains  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXEIF_COMPILE_CACHE", "")  # no persistent XLA cache: it would change jax config for later tests
    ckpt = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(ckpt, context=512)
    out = tmp_path_factory.mktemp("runs") / "llm"
    argv = ["llm", "--model", str(ckpt), "--out", str(out), "--domains", "bigger_than",
            "--repeats", "2", "--lr", "0.01", "--no-progress"]
    assert cli.main(argv) == 0
    yield argv, out, ckpt
    mp.undo()


def test_study_writes_figures_and_consistent_numbers(study):
    _, out, ckpt = study
    for name in ("heatmaps_bigger_than.png", "histogram.png", "symmetry.png",
                 "scorecard.json", "results.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lr"] == 0.01 and results["config"]["optimizer"] == "sgd"
    assert results["config"]["model"] == str(ckpt)
    for name in ("bigger_than",):
        probes = domains.DOMAINS[name].probe_rows
        for mode in ("finetuned", "prompted"):
            mats = np.stack([np.load(out / f"{mode}_{name}_r{r}.npy") for r in range(2)])
            entry = results["domains"][name][mode]
            np.testing.assert_allclose(entry["mean_matrix"], mats.mean(0), rtol=1e-6)
            np.testing.assert_allclose(entry["inverse_asymmetry"], desiderata.inverse_asymmetry(mats.mean(0)), rtol=1e-5)
            for p, got in zip(probes, entry["probes"]):
                diffs = mats[:, p.train, p.not_implied] - mats[:, p.train, p.implied]
                np.testing.assert_allclose(got["mean"], diffs.mean(), rtol=1e-5)
                assert got["right_direction"] == np.mean(diffs > 0)
    assert not np.allclose(np.load(out / "finetuned_bigger_than_r0.npy"), np.load(out / "finetuned_bigger_than_r1.npy"))
    assert "paper_inverse_asymmetry" not in results["domains"]["bigger_than"]  # the paper has no number for it


def test_study_resumes_without_recomputing(study):
    argv, out, _ = study
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_r*.npy")}
    assert cli.main(argv) == 0
    assert before and before == {p.name: p.stat().st_mtime_ns for p in out.glob("*_r*.npy")}


def test_unknown_domain_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["llm", "--domains", "ontology", "--out", str(tmp_path / "x")]) == 2
    assert "valid domains: chain_induces, belongs_to" in capsys.readouterr().err


def test_lr_sweep_picks_the_plateau_and_the_study_uses_it(study, tmp_path):
    """--lr-sweep on a tiny model: the sweep file and figure exist, the chosen lr is the plateau rule's
    on the recorded agreements, and with --lr plateau the matrices are those of that lr."""
    _, _, ckpt = study
    out = tmp_path / "sweep"
    argv = ["llm", "--model", str(ckpt), "--out", str(out), "--domains", "bigger_than", "squares", "--repeats", "1",
            "--modes", "finetuned", "--lr", "plateau", "--lr-sweep", "1e-4,1e-3,1e-2,1e-1,10", "--no-progress"]
    assert cli.main(argv) == 0
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert (out / "lr_sweep.png").stat().st_size > 0
    agreement = np.nan_to_num(np.array(sweep["agreement_with_previous"], float), nan=-1)
    assert sweep["chosen"] == lr_choice.choose_lr(sweep["lrs"], agreement, 0.95, rule=llm_logic.RULE)
    assert sweep["agreement_with_previous"][-1] < 0.95  # lr 10 leaves the linear regime
    results = json.loads((out / "results.json").read_text())
    assert results["lr_used"] == sweep["chosen"] and results["config"]["lr"] == "plateau"
    mats = [np.load(out / f"finetuned_{d}_r0.npy") for d in ("bigger_than", "squares")]
    pooled = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in mats])
    at_chosen = sweep["median_abs_eif"][sweep["lrs"].index(sweep["chosen"])]
    np.testing.assert_allclose(np.median(np.abs(pooled)), at_chosen, rtol=1e-6)  # the study ran at the chosen lr


def test_lr_plateau_without_a_sweep_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["llm", "--lr", "plateau", "--out", str(tmp_path / "x")]) == 2
    assert "--lr plateau needs --lr-sweep" in capsys.readouterr().err
