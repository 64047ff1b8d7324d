"""The linear-regime study on a tiny random checkpoint and a tiny CNN: the first-order matrix is
lm.linearized_sgd_eif's (= eif_linearized), the exact one is the dense path's, and their agreement tends
to 1 as lr -> 0."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import cli, lm
from jaxeif.data import domains, noisy_digits
from jaxeif.experiments import llm_linear
from jaxeif.models import cnn, loading, tokenizer

DOMAIN, LRS = "squares", (1e-4, 1e-2, 1.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_lm_ckpt):
    ckpt = tiny_lm_ckpt
    cnn_ckpt = tmp_path_factory.mktemp("cnn") / "ckpt"
    cnn.load_or_train(cnn_ckpt, epochs=1, batch_size=128, train_size=1280, progress=False)
    out = tmp_path_factory.mktemp("runs") / "linear"
    argv = [
        "llm-linear",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--domains",
        DOMAIN,
        "--lrs",
        *map(str, LRS),
        "--cnn-ckpt",
        str(cnn_ckpt),
        "--cnn-per-digit",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    return out, ckpt, cnn_ckpt, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_matrices_equal_the_library_called_directly(study):
    """gram == eif_linearized at lr 1 on all samples; exact == dense eif."""
    out, ckpt, _, _ = study
    apply_fn, params, config = loading.from_pretrained(str(ckpt))
    toks = lm.tokenize(tokenizer.load_tokenizer(str(ckpt)), [s.text for s in domains.draw(DOMAIN, 0)], config=config)
    direct = jaxeif.eif_linearized(lm.NLL(apply_fn), params, lm.Tokens(*map(jnp.asarray, toks)), lr=1.0)
    np.testing.assert_allclose(np.load(out / f"gram_{DOMAIN}.npy"), direct, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.load(out / f"exact_{DOMAIN}_lr0.01.npy"),
        lm.finetuned_eif(apply_fn, params, toks, lr=1e-2, config=config),
        rtol=1e-3,
        atol=1e-6,
    )


@pytest.mark.slow
def test_agreement_tends_to_one_as_lr_goes_to_zero(study):
    out, _, _, results = study
    g = np.load(out / f"gram_{DOMAIN}.npy")
    off = ~np.eye(len(g), dtype=bool)
    curve = results["lm"]["pooled"]
    for lr, a in zip(LRS, curve):
        e, lin = np.load(out / f"exact_{DOMAIN}_lr{lr:g}.npy")[off], lr * g[off]
        assert a["corr"] == pytest.approx(np.corrcoef(e, lin)[0, 1], rel=1e-6)
        assert a["median_rel_error"] == pytest.approx(np.median(np.abs(lin - e) / np.abs(e)), rel=1e-5)
    corr, rel = [a["corr"] for a in curve], [a["median_rel_error"] for a in curve]
    assert corr[0] > 0.999 and rel[0] < 0.01  # first order is exact in the limit
    assert corr[0] > corr[-1] and rel[0] < rel[1] < rel[-1]  # and drifts away as lr grows
    assert results["lm"]["linear_up_to"] == llm_linear.linear_up_to(LRS, corr)
    assert (out / "linear_regime.png").stat().st_size > 0


@pytest.mark.slow
def test_cnn_curve_is_the_cnn_studys_model_and_set(study):
    out, _, cnn_ckpt, results = study
    params = cnn.load_or_train(cnn_ckpt, epochs=1, batch_size=128, train_size=1280, progress=False)
    fs = noisy_digits.finetune_set(per_digit=1)
    train = (jnp.asarray(fs.images), jnp.asarray(fs.labels))
    g = np.asarray(jaxeif.eif_linearized(cnn.loss_fn, params, train, lr=1.0))
    np.testing.assert_allclose(np.load(out / "cnn_gram.npy"), g, rtol=1e-5, atol=1e-7)
    exact = np.load(out / "cnn_exact_difference.npy")
    np.testing.assert_allclose(
        exact[1],
        jaxeif.eif(cnn.loss_fn, params, train, lr=LRS[1], precision=jaxeif.Precision(difference=True)),
        rtol=1e-5,
    )
    curve = results["cnn"]["precisions"]["difference"]["curve"]
    rel = [a["median_rel_error"] for a in curve]
    assert curve[0]["corr"] > 0.999 and rel[0] < 0.05 and rel[0] < min(rel[1:])  # -> exact as lr -> 0


def test_linear_up_to():
    assert llm_linear.linear_up_to([1, 2, 3, 4], [0.99, 0.97, 0.5, 0.99]) == 2
    assert np.isnan(llm_linear.linear_up_to([1, 2], [0.5, 0.99]))
