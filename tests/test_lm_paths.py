"""The language-model EIF paths side by side: dense, low-rank and path="auto" equal; each path's
precision=jaxeif.Precision(difference=True) against float64 at the paper's lr; the decoder's `delta=` hook;
the path rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")

from tiny_lm import tiny_checkpoint  # noqa: E402

import jaxeif  # noqa: E402
from jaxeif import lm  # noqa: E402
from jaxeif.lm import dispatch  # noqa: E402
from jaxeif.models import loading, lora, phi3, tokenizer  # noqa: E402

TEXTS = ["Ab is big.", "Cd is big.", "Ab is big.\nCd is big.", "Cd is small.", "Ab is small.", "Ef is Gh."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_paths")
    tiny_checkpoint(path)
    apply_fn, params, config = loading.from_pretrained(path)
    toks = lm.tokenize(tokenizer.load_tokenizer(path), TEXTS, config=config)
    adapters = lora.init(jax.random.key(0), params, rank=4, alpha=8)  # B != 0, so the adapters change the model
    adapters = adapters.replace(
        deltas=jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters.deltas)
    )
    return apply_fn, params, config, toks, adapters, path


def _paths(apply_fn, params, config, toks, adapters):
    return {
        "dense": lambda **kw: lm.finetuned_eif(apply_fn, params, toks, config=config, path="dense", **kw),
        "lowrank": lambda **kw: lm.finetuned_eif(apply_fn, params, toks, config=config, path="lowrank", **kw),
        "lora": lambda **kw: lm.lora_eif(apply_fn, params, toks, adapters=adapters, **kw),
    }


@pytest.mark.slow
def test_dense_lowrank_and_auto_agree_in_default_precision(tiny):
    apply_fn, params, config, toks, _, _ = tiny
    dense = np.asarray(lm.finetuned_eif(apply_fn, params, toks, config=config, lr=0.05, path="dense"))
    low = lm.finetuned_eif(apply_fn, params, toks, config=config, lr=0.05, path="lowrank")
    auto = np.asarray(lm.finetuned_eif(apply_fn, params, toks, config=config, lr=0.05))
    assert isinstance(low, jax.Array) and low.dtype == jnp.float32 and low.shape == (len(TEXTS), len(TEXTS))
    scale = np.abs(dense).max()
    assert scale > 1e-3
    for other in (np.asarray(low), auto):
        np.testing.assert_allclose(other, dense, atol=2e-5 * scale, rtol=0)
    # chunk sizes only group the fine-tunes: every one gives the same matrix
    for chunk in (1, 4, None):
        np.testing.assert_allclose(
            lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=0.05, chunk_size=chunk), low, atol=1e-6 * scale
        )


@pytest.mark.slow
@pytest.mark.parametrize("lr", [1e-6, 1e-3])
def test_difference_mode_of_every_path_matches_float64(tiny, lr):
    """Off-diagonal signs >= 99.9% right and median relative error <= 1e-4 against the same path in float64."""
    apply_fn, params, config, toks, adapters, _ = tiny
    off = ~np.eye(len(TEXTS), dtype=bool)
    for name, path in _paths(apply_fn, params, config, toks, adapters).items():
        ref = np.asarray(path(lr=lr, precision=jaxeif.Precision(dtype="float64")))
        got = np.asarray(path(lr=lr, precision=jaxeif.Precision(difference=True)))
        assert np.all(np.abs(ref[off]) > 0), name
        signs = np.mean(np.sign(got[off]) == np.sign(ref[off]))
        rel = np.median(np.abs(got[off] - ref[off]) / np.abs(ref[off]))
        assert signs >= 0.999 and rel <= 1e-4, (name, lr, signs, rel)


@pytest.mark.slow
def test_float64_is_a_different_computation_than_float32_at_small_lr(tiny):
    """The float64 reference above can fail: at lr 1e-6 direct float32 entries carry visible rounding error."""
    apply_fn, params, config, toks, _, _ = tiny
    ref = np.asarray(
        lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=1e-6, precision=jaxeif.Precision(dtype="float64"))
    )
    direct = np.asarray(lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=1e-6))
    off = ~np.eye(len(TEXTS), dtype=bool)
    assert np.median(np.abs(direct[off] - ref[off]) / np.abs(ref[off])) > 1e-3


@pytest.mark.slow
def test_from_pretrained_float64_gives_float64_logits(tiny):
    apply_fn, params, config, toks, _, path = tiny
    apply64, params64, _ = loading.from_pretrained(path, dtype=jnp.float64)
    assert {x.dtype for x in jax.tree.leaves(params64)} == {jnp.dtype(jnp.float64)}
    logits64 = apply64(params64, toks.ids)
    assert logits64.dtype == jnp.float64 and phi3.attached_config(apply64) == config == phi3.attached_config(apply_fn)
    np.testing.assert_allclose(np.asarray(logits64), np.asarray(apply_fn(params, toks.ids)), atol=1e-4)


@pytest.mark.slow
def test_delta_taps_read_inputs_and_output_gradients(tiny):
    """A zero "read" probe's gradient is the module's input; a zero "out" tap's gradient is dL/d(output)."""
    apply_fn, params, config, toks, _, _ = tiny
    ids = jnp.asarray(toks.ids[:1])
    t, d, v = ids.shape[1], config.hidden_size, config.vocab_size
    taps = {"lm_head": {"out": jnp.zeros((1, t, v)), "read": jnp.zeros((1, t, d))}}
    np.testing.assert_array_equal(apply_fn(params, ids, delta=taps), apply_fn(params, ids))
    loss = lambda logits: jnp.sum(jnp.sin(logits))  # noqa: E731
    g = jax.grad(lambda tp: loss(apply_fn(params, ids, delta=tp)))(taps)
    logits = apply_fn(params, ids)
    np.testing.assert_allclose(g["lm_head"]["out"], jax.grad(loss)(logits), rtol=1e-6)
    embed = params["model"]["embed_tokens"]["weight"]  # tied: logits = H E^T, H the final hidden states read
    np.testing.assert_allclose(jnp.einsum("btd,vd->btv", g["lm_head"]["read"], embed), logits, atol=1e-5)


@pytest.mark.slow
def test_delta_hook_rejects_unknown_keys(tiny):
    apply_fn, params, config, toks, _, _ = tiny
    ids = jnp.asarray(toks.ids[:1])
    with pytest.raises(ValueError, match="linear entry takes keys"):
        apply_fn(params, ids, delta={"model": {"layers": {"mlp": {"down_proj": {"__jaxeif_tap__": {}}}}}})
    with pytest.raises(ValueError, match="tied embeddings lm_head takes only taps"):
        apply_fn(params, ids, delta={"lm_head": {"a": jnp.zeros((config.hidden_size, 1)), "b": jnp.zeros((1, 260))}})


def test_choose_path_rule():
    cfg = phi3.Phi3Config(
        vocab_size=10,
        hidden_size=576,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
    )
    rule = lambda path="auto", **kw: dispatch.choose_path(
        path,
        **{
            "optimizer": None,
            "steps": 1,
            "backend": "cpu",  # noqa: E731
            "longest": 30,
            "config": cfg,
            **kw,
        },
    )
    assert rule() == "lowrank"
    assert rule(backend="gpu") == rule(backend="tpu") == "dense"  # measured: low-rank 0.45x dense on an H100
    assert rule(steps=2) == rule(optimizer=optax.sgd(1.0)) == rule(config=None) == rule(longest=600) == "dense"
    assert rule("dense") == "dense" and rule("lowrank", backend="gpu") == "lowrank"
    for bad in ({"steps": 2}, {"optimizer": optax.adam(1.0)}):
        with pytest.raises(ValueError, match="path='lowrank' computes exactly one plain SGD step"):
            rule("lowrank", **bad)
    with pytest.raises(ValueError, match="`path` must be one of"):
        rule("fast")


@pytest.mark.slow
def test_bad_arguments_are_named(tiny):
    apply_fn, params, config, toks, _, _ = tiny
    with pytest.raises(TypeError, match="`progress` must be True or False"):
        lm.finetuned_eif(apply_fn, params, toks, config=config, lr=0.1, progress=None)
    with pytest.raises(TypeError, match="pass `config=`"):
        lm.lowrank_sgd_eif(jax.jit(lambda *a, **k: apply_fn(*a, **k)), params, toks, lr=0.1)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=0.1, precision="double")
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=0.1, chunk_size=0)


@pytest.mark.slow
def test_finetuned_eif_refuses_a_run_over_its_memory_estimate(tiny):
    """Refused before it runs, with lm.memory_estimate's number; the optimizer's state counts toward it."""
    apply_fn, params, config, toks, _, _ = tiny
    n, length = toks.ids.shape
    assert [
        lm.memory.optimizer_states(o, params)
        for o in (None, optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adam(1e-3))
    ] == [0, 0, 1, 2]
    low = lm.memory_estimate(config, n, n, path="lowrank", rank=32)  # samples <= 32 tokens: one rank bucket
    lm.finetuned_eif(
        apply_fn, params, toks, lr=0.1, path="lowrank", config=config, memory_budget=low
    )  # exactly fits: runs
    with pytest.raises(jaxeif.MemoryBudgetError, match="the lowrank LM EIF of 6 x 6 needs an estimated"):
        lm.finetuned_eif(apply_fn, params, toks, lr=0.1, path="lowrank", config=config, memory_budget=low - 1)
    sgd = lm.memory_estimate(config, n, n, path="dense", tokens=length, eval_chunk=1)
    assert lm.memory_estimate(config, n, n, path="dense", tokens=length, eval_chunk=1, optimizer=optax.adam(1.0)) > sgd
    with pytest.raises(jaxeif.MemoryBudgetError, match=r"the dense LM EIF of 6 x 6 needs an estimated .* try"):
        lm.finetuned_eif(
            apply_fn, params, toks, lr=0.1, path="dense", optimizer=optax.adam(1e-3), config=config, memory_budget=sgd
        )


@pytest.mark.slow
def test_linearized_sgd_eif_is_eif_linearized_without_weight_gradients(tiny):
    """The low-rank first-order EIF equals jaxeif.eif_linearized on the same loss, with and without evals,
    and is the exact EIF's slope at lr -> 0."""
    apply_fn, params, config, toks, _, _ = tiny
    as_jnp = lambda t: lm.Tokens(*map(jnp.asarray, t))  # noqa: E731
    evals = lm.Tokens(*(x[[4, 0, 2]] for x in toks))
    for ev in (None, evals):
        ref = np.asarray(
            jaxeif.eif_linearized(
                lm.NLL(apply_fn),
                params,
                as_jnp(toks),
                None if ev is None else as_jnp(ev),
                lr=0.3,
                precision=jaxeif.Precision(dtype="float64"),
            )
        )
        got = np.asarray(
            lm.linearized_sgd_eif(
                apply_fn, params, toks, ev, config=config, lr=0.3, precision=jaxeif.Precision(dtype="float64")
            )
        )
        np.testing.assert_allclose(
            got, ref, rtol=2.5e-7, atol=1e-12 * np.abs(ref).max()
        )  # both rounded to float32 at the end
        f32 = np.asarray(lm.linearized_sgd_eif(apply_fn, params, toks, ev, config=config, lr=0.3))
        np.testing.assert_allclose(f32, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    exact = (
        np.asarray(
            lm.lowrank_sgd_eif(
                apply_fn, params, toks, config=config, lr=1e-4, precision=jaxeif.Precision(dtype="float64")
            )
        )
        / 1e-4
    )
    slope = np.asarray(
        lm.linearized_sgd_eif(
            apply_fn, params, toks, config=config, lr=1.0, precision=jaxeif.Precision(dtype="float64")
        )
    )
    np.testing.assert_allclose(exact, slope, rtol=0, atol=1e-3 * np.abs(slope).max())
