"""per_token=True: every scored eval token's NLL change, on each language-model path. Each path's tokens are
checked against the straightforward computation (a hand-written SGD step, then every token's -log p), and
their weighted mean over tokens against the M the default call returns (docs/per_token.md's example runs in
tests/test_docs.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import lm
from jaxeif.lm import tokens as lm_tokens
from jaxeif.lm.finetuned import lora_parts
from jaxeif.models import loading, lora, tokenizer

slow = pytest.mark.slow  # a torch-built checkpoint

TRAIN = ["Ab is big.", "Cd is small.", "Ef is Gh.\nGh is Ef."]
EVALS = ["Ab is small.", "Cd is big.", "Gh is Ef.", "Ab is Cd."]
LR = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")
    from tiny_lm import tiny_checkpoint  # imports torch

    path = tmp_path_factory.mktemp("tiny_tokens")
    tiny_checkpoint(path)
    apply_fn, params, config = loading.from_pretrained(path)
    tok = tokenizer.load_tokenizer(path)
    train, evals = lm.tokenize(tok, TRAIN, config=config), lm.tokenize(tok, EVALS, config=config)
    score = np.array(evals.score)
    score[0, 1:4] = 0.0  # a prompt left unscored
    score[1, 3:] *= 0.5  # and unequal weights: the mean over tokens is the weighted one
    evals = lm.Tokens(evals.ids, evals.attention, score)
    adapters = lora.init(jax.random.key(0), params, rank=2, alpha=4)
    adapters = adapters.replace(
        deltas=jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters.deltas)
    )
    return apply_fn, params, config, tok, train, evals, adapters


def _token_nll(logits, ids):
    """-log p(ids[t] | ids[<t]) at every t >= 1 (0 at t = 0): logits f32[m, T, V], ids int[m, T] -> f64[m, T]."""
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
    picked = np.take_along_axis(np.asarray(logp), np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return np.concatenate([np.zeros((ids.shape[0], 1)), -picked], axis=1)


def _reference(loss_fn, trained, logits_of, train, evals):
    """[n, m, T] by hand: one SGD step on each train sample (jax.grad), every eval token's NLL change."""
    before = _token_nll(logits_of(trained), evals.ids)
    out = []
    for i in range(train.ids.shape[0]):
        example = lm.Tokens(*(jnp.asarray(x[i]) for x in train))
        g = jax.grad(loss_fn)(trained, example)
        after = _token_nll(logits_of(jax.tree.map(lambda p, d: p - LR * d, trained, g)), evals.ids)
        out.append(after - before)
    return np.where(np.asarray(evals.score)[None] > 0, np.stack(out), 0)


def _check(inf, default, ref, evals, tol, losses):
    assert isinstance(inf, lm.TokenInfluence)
    n, m, t = len(TRAIN), len(EVALS), evals.ids.shape[1]
    assert inf.per_token.shape == (n, m, t) and inf.per_token.dtype == jnp.float32
    np.testing.assert_array_equal(inf.mask, np.asarray(evals.score) > 0)
    np.testing.assert_array_equal(inf.weight, np.asarray(evals.score))
    got = np.asarray(inf.per_token)
    assert np.all(got[:, ~inf.mask] == 0)
    scale = np.abs(ref).max()
    assert scale > 1e-2
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * scale)
    # each side is a difference of float32 losses: they agree to the losses' rounding, a few ulps of max loss
    np.testing.assert_allclose(np.asarray(inf.matrix()), np.asarray(default), rtol=0, atol=_ULPS * np.max(losses))


_ULPS = 4 * np.finfo(np.float32).eps


@slow
@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_finetuned_per_token_is_each_tokens_change(tiny, path):
    apply_fn, params, config, _, train, evals, _ = tiny
    ref = _reference(lm.NLL(apply_fn), params, lambda p: apply_fn(p, evals.ids, evals.attention), train, evals)
    inf = lm.finetuned_eif(apply_fn, params, train, evals, lr=LR, path=path, config=config, per_token=True)
    _check(
        inf,
        lm.finetuned_eif(apply_fn, params, train, evals, lr=LR, path=path, config=config),
        ref,
        evals,
        2e-5,
        lm.nll(apply_fn, params, evals),
    )


@slow
def test_lowrank_per_token_in_difference_precision_and_without_evals(tiny):
    apply_fn, params, config, _, train, _, _ = tiny
    dense = lm.finetuned_eif(apply_fn, params, train, lr=LR, path="dense", config=config, per_token=True)
    low = lm.lowrank_sgd_eif(
        apply_fn, params, train, lr=LR, config=config, precision=jaxeif.Precision(difference=True), per_token=True
    )
    np.testing.assert_array_equal(low.mask, np.asarray(train.score) > 0)
    scale = np.abs(np.asarray(dense.per_token)).max()
    np.testing.assert_allclose(np.asarray(low.per_token), np.asarray(dense.per_token), rtol=0, atol=2e-5 * scale)


@slow
def test_lora_per_token_is_each_tokens_change(tiny):
    apply_fn, params, _, _, train, evals, adapters = tiny
    deltas, loss_fn = lora_parts(apply_fn, params, adapters)

    def logits_of(d):
        return apply_fn(params, evals.ids, evals.attention, delta=lora.Adapters(d, adapters.scale))

    ref = _reference(loss_fn, deltas, logits_of, train, evals)
    inf = lm.lora_eif(apply_fn, params, train, evals, adapters=adapters, lr=LR, per_token=True)
    _check(
        inf,
        lm.lora_eif(apply_fn, params, train, evals, adapters=adapters, lr=LR),
        ref,
        evals,
        2e-5,
        lm.nll(apply_fn, lora.merge(params, adapters), evals),
    )


@slow
def test_prompted_per_token_is_each_tokens_change_after_the_context(tiny):
    apply_fn, params, config, tok, _, _, _ = tiny
    bos, sep = lm_tokens.bos_token_id(tok, config), lm_tokens.encode(tok, lm_tokens.SEPARATOR)
    bodies = [lm_tokens.encode(tok, e) for e in EVALS]
    length = max(map(len, bodies))
    ref = np.zeros((len(TRAIN), len(EVALS), length))
    for j, body in enumerate(bodies):
        alone = _token_nll(apply_fn(params, np.array([[bos] + body])), np.array([[bos] + body]))[0, 1:]
        for i, text in enumerate(TRAIN):
            ids = np.array([[bos] + lm_tokens.encode(tok, text) + sep + body])
            ref[i, j, : len(body)] = _token_nll(apply_fn(params, ids), ids)[0, -len(body) :] - alone
    inf = lm.prompted_eif(apply_fn, params, tok, config, TRAIN, EVALS, per_token=True)
    assert inf.per_token.shape == ref.shape
    np.testing.assert_array_equal(inf.mask, np.arange(length)[None] < np.array(list(map(len, bodies)))[:, None])
    np.testing.assert_allclose(np.asarray(inf.per_token), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    default = np.asarray(lm.prompted_eif(apply_fn, params, tok, config, TRAIN, EVALS))
    losses = lm.nll(apply_fn, params, lm.tokenize(tok, EVALS, config=config))
    np.testing.assert_allclose(np.asarray(inf.matrix()), default, rtol=0, atol=_ULPS * losses.max())


@slow
def test_per_token_arguments_are_checked(tiny):
    apply_fn, params, config, tok, train, evals, adapters = tiny
    with pytest.raises(TypeError, match="`per_token` must be True or False"):
        lm.finetuned_eif(apply_fn, params, train, evals, lr=LR, config=config, per_token="yes")
    with pytest.raises(TypeError, match="`per_token` must be True or False"):
        lm.lora_eif(apply_fn, params, train, evals, adapters=adapters, lr=LR, per_token=1)
    with pytest.raises(ValueError, match="per_token=True needs every token's: pass base=None"):
        lm.lowrank_sgd_eif(
            apply_fn, params, train, evals, lr=LR, config=config, base=np.zeros(len(EVALS)), per_token=True
        )
    with pytest.raises(ValueError, match="per_token=True needs every token's: pass base=None"):
        lm.prompted_eif(apply_fn, params, tok, config, TRAIN, EVALS, base=np.zeros(len(EVALS)), per_token=True)


# ----------------------------------------------------------------------------- the logic study's per-token stage
@slow
def test_logic_study_per_token_stage(tiny_lm_ckpt, tmp_path):
    """The study's per-token arrays are its fine-tuned matrices token by token (their mean over scored tokens is
    the saved M), the answer tokens decode to each sample's last entity, and results.json's numbers are the
    mean |change| over those tokens."""
    import json

    from jaxeif import cli
    from jaxeif.data import domains
    from jaxeif.experiments import llm_logic

    out = tmp_path / "study"
    names = ["bigger_than", "squares"]
    assert (
        cli.main(
            [
                "llm",
                "--model",
                str(tiny_lm_ckpt),
                "--out",
                str(out),
                "--domains",
                *names,
                "--repeats",
                "1",
                "--modes",
                "finetuned",
                "--lr",
                "0.05",
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert (out / "per_token.png").stat().st_size > 0 and results["config"]["per_token"] is True
    tok = tokenizer.load_tokenizer(tiny_lm_ckpt)
    for name in names:
        per_token = np.load(out / "per_token" / f"finetuned_{name}_r0.npy")
        scored = np.load(out / "per_token" / f"scored_{name}_r0.npy")
        answer = np.load(out / "per_token" / f"answer_{name}_r0.npy")
        matrix = np.load(out / f"finetuned_{name}_r0.npy")
        np.testing.assert_allclose(
            (per_token * scored).sum(-1) / scored.sum(-1), matrix, rtol=0, atol=1e-5 * np.abs(matrix).max()
        )
        samples = domains.draw(name, 0)
        toks = lm.tokenize(
            tok,
            [s.text for s in samples],
            config=loading.from_pretrained(tiny_lm_ckpt)[2],
            pad_multiple=llm_logic.PAD_MULTIPLE,
        )
        for k, s in enumerate(samples):
            span = llm_logic.answer_span(s)
            got = tok.decode(np.asarray(toks.ids)[k, answer[k]].tolist())
            assert got == ("" if span is None else s.text[span[0] : span[1]]), (s.text, got)
        assert answer.any() and not np.any(answer & ~scored)
        size = np.abs(per_token.astype(np.float64))
        entry = results["per_token"][name]
        np.testing.assert_allclose(entry["answer_mean_abs"], size[:, answer].mean(), rtol=1e-12)
        np.testing.assert_allclose(entry["other_mean_abs"], size[:, scored & ~answer].mean(), rtol=1e-12)
        assert entry["answer_tokens"] == answer.sum() and entry["other_tokens"] == (scored & ~answer).sum()
