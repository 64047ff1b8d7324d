"""The PEFT study (dense vs LoRA EIF) end to end on a tiny random checkpoint: each saved matrix is what its
path computes directly, and every summary number is recomputed from the saved matrices."""

import json

import jax
import numpy as np
import pytest

from jaxeif import cli, lm, lr_choice
from jaxeif.data import domains
from jaxeif.experiments import llm_logic, llm_peft
from jaxeif.models import loading, lora, tokenizer

DOMAIN = "squares"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_lm_ckpt):
    ckpt = tiny_lm_ckpt
    out = tmp_path_factory.mktemp("runs") / "peft"
    argv = [
        "llm-peft",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--domains",
        DOMAIN,
        "--sweep-domains",
        DOMAIN,
        "--repeats",
        "2",
        "--ranks",
        "2",
        "--lr-grid",
        "1e-3",
        "1e-2",
        "1e-1",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    return argv, out, ckpt, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_matrices_equal_the_paths_called_directly(study):
    """LoRA rank 2 == lm.lora_eif with lora.init(key(seed)); dense == the dense jaxeif.eif path (finetuned_eif).

    The study pads each domain to one length over its repeats, so its programs are compiled for other shapes
    and round the two float32 losses of an entry differently: small entries agree to a few float32 ulps of
    the losses themselves (8 ulps of the largest), larger ones to rtol."""
    _, out, ckpt, results = study
    apply_fn, params, config = loading.from_pretrained(str(ckpt))
    tok = tokenizer.load_tokenizer(str(ckpt))
    adapters = lora.init(jax.random.key(3), params, rank=2, alpha=4.0)
    for r in range(2):
        toks = lm.tokenize(tok, [s.text for s in domains.draw(DOMAIN, 3 + r)], config=config)
        lr = results["lr"]["lora2"]
        ulps = 8 * np.finfo(np.float32).eps * float(np.max(np.abs(lm.nll(apply_fn, params, toks))))
        np.testing.assert_allclose(
            np.load(out / llm_peft.matrix_key("lora2", DOMAIN, r, lr)),
            lm.lora_eif(apply_fn, params, toks, adapters=adapters, lr=lr),
            rtol=1e-4,
            atol=ulps,
        )
        lr = results["lr"]["dense"]
        np.testing.assert_allclose(
            np.load(out / llm_peft.matrix_key("dense", DOMAIN, r, lr)),
            lm.finetuned_eif(apply_fn, params, toks, lr=lr, config=config),
            rtol=1e-3,
            atol=1e-5,
        )


@pytest.mark.slow
def test_summary_numbers_are_recomputed_from_the_matrices(study):
    _, out, _, results = study
    assert (out / "heatmaps.png").stat().st_size > 0
    for method in ("dense", "lora2"):
        sweep = json.loads((out / f"sweep_{method}.json").read_text())
        agreement = np.nan_to_num(np.array(sweep["agreement_with_previous"], float), nan=-1)
        assert (
            results["lr"][method]
            == sweep["chosen"]
            == lr_choice.choose_lr(sweep["lrs"], agreement, 0.95, rule=llm_logic.RULE)
        )
    dense = np.stack([np.load(out / llm_peft.matrix_key("dense", DOMAIN, r, results["lr"]["dense"])) for r in range(2)])
    mats = np.stack([np.load(out / llm_peft.matrix_key("lora2", DOMAIN, r, results["lr"]["lora2"])) for r in range(2)])
    entry = results["domains"][DOMAIN]["lora2"]
    off = ~np.eye(mats.shape[1], dtype=bool)
    corr = [np.corrcoef(d[off], m[off])[0, 1] for d, m in zip(dense, mats)]
    np.testing.assert_allclose(entry["corr_with_dense_per_repeat"], corr, rtol=1e-6)
    assert entry["corr_with_dense"]["mean"] == pytest.approx(np.mean(corr))
    assert entry["corr_with_dense"]["std"] == pytest.approx(np.std(corr, ddof=1))
    assert results["domains"][DOMAIN]["dense"]["corr_with_dense"]["mean"] == pytest.approx(1.0)
    mean = mats.mean(0)
    np.testing.assert_allclose(entry["mean_matrix"], mean, rtol=1e-6)
    assert entry["symmetry_corr"] == pytest.approx(np.corrcoef(mean[off], mean.T[off])[0, 1], rel=1e-5)
    assert entry["inverse_asymmetry"] == pytest.approx(1 / np.linalg.norm(mean - mean.T), rel=1e-5)
    for p, got in zip(domains.domain(DOMAIN).probe_rows, entry["probes"]):
        diffs = mats[:, p.train, p.not_implied] - mats[:, p.train, p.implied]
        assert got["mean"] == pytest.approx(diffs.mean(), rel=1e-5) and got["std"] == pytest.approx(
            diffs.std(ddof=1), rel=1e-5
        )
    assert not np.allclose(mats, dense)  # LoRA is a different fine-tune, not the dense one relabelled


@pytest.mark.slow
def test_resumes_without_recomputing(study):
    argv, out, _, _ = study
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert cli.main(argv) == 0
    assert before and before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}


def test_sweep_domains_outside_domains_is_a_clear_error(tmp_path, capsys):
    assert (
        cli.main(["llm-peft", "--domains", "squares", "--sweep-domains", "bigger_than", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--sweep-domains" in capsys.readouterr().err
