"""The LLM logic study end to end on a tiny random checkpoint: files, numbers, resume, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")


from jaxeif import cli, desiderata, lm, lr_choice  # noqa: E402
from jaxeif.data import domains  # noqa: E402
from jaxeif.experiments import llm_logic  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_lm_ckpt):
    ckpt = tiny_lm_ckpt
    out = tmp_path_factory.mktemp("runs") / "llm"
    argv = [
        "llm",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--domains",
        "bigger_than",
        "--repeats",
        "2",
        "--lr",
        "0.01",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    return argv, out, ckpt


@pytest.mark.slow
def test_study_writes_figures_and_consistent_numbers(study):
    _, out, ckpt = study
    for name in ("heatmaps_bigger_than.png", "histogram.png", "symmetry.png", "scorecard.json", "results.json"):
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
            np.testing.assert_allclose(
                entry["inverse_asymmetry"], desiderata.inverse_asymmetry(mats.mean(0)), rtol=1e-5
            )
            for p, got in zip(probes, entry["probes"]):
                diffs = mats[:, p.train, p.not_implied] - mats[:, p.train, p.implied]
                np.testing.assert_allclose(got["mean"], diffs.mean(), rtol=1e-5)
                assert got["right_direction"] == np.mean(diffs > 0)
    assert not np.allclose(np.load(out / "finetuned_bigger_than_r0.npy"), np.load(out / "finetuned_bigger_than_r1.npy"))
    assert "paper_inverse_asymmetry" not in results["domains"]["bigger_than"]  # the paper has no number for it


@pytest.mark.slow
def test_study_resumes_without_recomputing(study):
    argv, out, _ = study
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_r*.npy")}
    assert cli.main(argv) == 0
    assert before and before == {p.name: p.stat().st_mtime_ns for p in out.glob("*_r*.npy")}


def test_unknown_domain_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["llm", "--domains", "ontology", "--out", str(tmp_path / "x")]) == 2
    assert "valid domains: chain_induces, belongs_to" in capsys.readouterr().err


@pytest.mark.slow
def test_lr_sweep_picks_the_plateau_and_the_study_uses_it(study, tmp_path):
    """--lr-sweep on a tiny model: the sweep file and figure exist, the chosen lr is the plateau rule's
    on the recorded agreements, and with --lr plateau the matrices are those of that lr."""
    _, _, ckpt = study
    out = tmp_path / "sweep"
    argv = [
        "llm",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--domains",
        "bigger_than",
        "squares",
        "--repeats",
        "1",
        "--modes",
        "finetuned",
        "--lr",
        "plateau",
        "--lr-sweep",
        "1e-4,1e-3,1e-2,1e-1,10",
        "--no-progress",
    ]
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


@pytest.fixture(scope="module")
def findings(study, tmp_path_factory):
    """--lr-sweep with every finding on 2 repeats, the study's own lr (0.01) among the swept ones."""
    _, _, ckpt = study
    out = tmp_path_factory.mktemp("runs") / "findings"
    argv = [
        "llm",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--domains",
        "bigger_than",
        "--repeats",
        "2",
        "--lr",
        "0.01",
        "--lr-sweep",
        "1e-3,1e-2,1e-1",
        "--sweep-repeats",
        "2",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    return out, json.loads((out / "lr_findings.json").read_text())


@pytest.mark.slow
def test_lr_findings_equal_separate_single_lr_runs(study, findings, tmp_path):
    """Every point of every curve is the number a separate study at that lr writes into results.json."""
    _, single_out, ckpt = study
    out, found = findings
    assert (out / "lr_findings.png").stat().st_size > 0
    assert found["lrs"] == [1e-3, 1e-2, 1e-1] and found["chosen_lr"] == 0.01 and found["repeats"] == 2
    assert set(found["curves"]) >= {"corr(M, Mᵀ), fine-tuned", "corr(fine-tuned M, prompted M)"}
    for k, lr in enumerate(found["lrs"]):
        if lr == 0.01:
            single = single_out  # the `study` fixture ran exactly this
        else:
            single = tmp_path / f"lr{lr:g}"
            assert (
                cli.main(
                    [
                        "llm",
                        "--model",
                        str(ckpt),
                        "--out",
                        str(single),
                        "--domains",
                        "bigger_than",
                        "--repeats",
                        "2",
                        "--lr",
                        str(lr),
                        "--no-progress",
                    ]
                )
                == 0
            )
        expected = json.loads((single / "results.json").read_text())["domains"]["bigger_than"]
        point = found["per_lr"][k]["bigger_than"]
        for key in ("finetuned", "prompted", "comparison"):
            got, want = point[key], expected[key]
            for field in want:
                if field == "probes":
                    for g, w in zip(got["probes"], want["probes"]):
                        np.testing.assert_allclose(g["per_repeat"], w["per_repeat"], rtol=1e-6)
                        np.testing.assert_allclose(
                            [g["mean"], g["right_direction"]], [w["mean"], w["right_direction"]], rtol=1e-6
                        )
                else:
                    np.testing.assert_allclose(got[field], want[field], rtol=1e-6, err_msg=f"{key}.{field} at lr {lr}")
        curve = found["curves"]["corr(M, Mᵀ), fine-tuned"]["bigger_than"]
        np.testing.assert_allclose(curve[k], expected["finetuned"]["symmetry_corr"], rtol=1e-6)
        np.testing.assert_allclose(
            found["prompted"]["corr(M, Mᵀ), fine-tuned"]["bigger_than"],
            expected["prompted"]["symmetry_corr"],
            rtol=1e-6,
        )  # prompted: no lr
    # the study's lr is one of the swept ones: its matrices are the sweep's, not recomputed
    for r in range(2):
        np.testing.assert_array_equal(
            np.load(out / f"finetuned_bigger_than_r{r}.npy"),
            np.load(out / "lr_sweep" / "lr0.01" / f"finetuned_bigger_than_r{r}.npy"),
        )


def test_sweep_options_need_a_sweep(tmp_path, capsys):
    assert cli.main(["llm", "--sweep-repeats", "2", "--out", str(tmp_path / "x")]) == 2
    assert "need --lr-sweep" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "llm",
                "--repeats",
                "2",
                "--sweep-repeats",
                "3",
                "--lr-sweep",
                "1e-3,1e-2,1e-1",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "--sweep-repeats must be between 1 and --repeats (2)" in capsys.readouterr().err


@pytest.mark.slow
def test_float64_check_against_a_float64_eif(study, tmp_path):
    """--float64-check: the float64 matrices are jaxeif.eif in float64 (logits and loss in float64: lm.NLL), and
    the reported agreement is that of the study's float32 matrices with them."""
    _, _, ckpt = study
    out = tmp_path / "f64"
    assert (
        cli.main(
            [
                "llm",
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--domains",
                "bigger_than",
                "--repeats",
                "1",
                "--modes",
                "finetuned",
                "--lr",
                "1e-2",
                "--lr-sweep",
                "1e-4,1e-3,1e-2",
                "--float64-check",
                "--no-progress",
            ]
        )
        == 0
    )
    check = json.loads((out / "float64_check.json").read_text())
    assert set(check["per_lr"]) == {"0.0001", "0.001", "0.01"} and "difference" in check["per_lr"]["0.0001"]
    for lr, entry in check["per_lr"].items():
        f32 = np.load(out / "lr_sweep" / f"lr{float(lr):g}" / "finetuned_bigger_than_r0.npy")
        f64 = np.load(out / "float64" / f"lr{float(lr):g}" / "finetuned_bigger_than_r0.npy")
        off = ~np.eye(len(f64), dtype=bool)
        assert entry["float32"]["sign_agreement"] == np.mean(np.sign(f32[off]) == np.sign(f64[off]))
        np.testing.assert_allclose(
            entry["float32"]["median_rel_error"], np.median(np.abs(f32[off] - f64[off]) / np.abs(f64[off])), rtol=1e-6
        )
        np.testing.assert_allclose(f32, f64, rtol=0.2, atol=1e-3 * np.abs(f64).max())  # the same matrix, up to rounding


def test_nll_keeps_float64():
    """lm.NLL (the float64 check's loss) keeps float64 logits float64, equal to a float64 log-softmax by hand."""
    logits = jax.random.normal(jax.random.key(0), (1, 6, 11)) * 30
    apply_fn = lambda params, ids, attention: logits.astype(params.dtype) * params  # noqa: E731
    example = lm.Tokens(jnp.array([1, 4, 2, 7, 3, 0]), jnp.array([1, 1, 1, 1, 1, 0]), jnp.array([0.0, 1, 1, 1, 1, 0]))
    with jax.enable_x64(True):
        wide = lm.NLL(apply_fn)(jnp.float64(1), example)
        assert wide.dtype == jnp.float64
        z = np.asarray(logits[0, :-1], np.float64)
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        w = np.array([1.0, 1, 1, 1, 0])
        np.testing.assert_allclose(float(wide), -(w * logp[np.arange(5), [4, 2, 7, 3, 0]]).sum() / w.sum(), rtol=1e-13)
