"""LoRA / low-rank delta paths of the Flax Phi-3 port (no torch needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif.models import lora, phi3

CFG = phi3.Phi3Config(
    vocab_size=53,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def model():
    params = phi3.init_params(jax.random.key(0), CFG)
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.vocab_size)
    return jax.jit(phi3.make_apply_fn(CFG)), params, ids


@jax.jit
def _randomise_b(adapters, key):
    """Every A and B redrawn (B no longer zero), so the adapter changes the model."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


merge = jax.jit(lora.merge)


def test_zero_init_lora_equals_base(model):
    apply_fn, params, ids = model
    adapters = lora.init(jax.random.key(2), params, rank=3, alpha=6)
    assert all(float(jnp.abs(d["b"]).max()) == 0 for d in jax.tree.leaves(adapters.deltas, is_leaf=lambda x: "b" in x))
    np.testing.assert_array_equal(apply_fn(params, ids, delta=adapters), apply_fn(params, ids))


def test_merged_equals_unmerged(model):
    apply_fn, params, ids = model
    adapters = _randomise_b(lora.init(jax.random.key(3), params, rank=3, alpha=6), jax.random.key(4))
    unmerged = apply_fn(params, ids, delta=adapters)
    merged = apply_fn(merge(params, adapters), ids)
    assert float(jnp.abs(unmerged - apply_fn(params, ids)).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)


def test_tied_embedding_delta_is_applied_to_lookup_and_head(model):
    """A raw low-rank delta on embed_tokens (scale 1) equals adding A B to the tied embedding."""
    apply_fn, params, ids = model
    k1, k2 = jax.random.split(jax.random.key(5))
    deltas = {
        "model": {
            "embed_tokens": {
                "a": jax.random.normal(k1, (CFG.vocab_size, 2)),
                "b": 0.1 * jax.random.normal(k2, (2, CFG.hidden_size)),
            }
        }
    }
    np.testing.assert_allclose(
        apply_fn(merge(params, deltas), ids), apply_fn(params, ids, delta=deltas), atol=2e-5, rtol=1e-5
    )


def test_vmap_over_adapters_shares_base(model):
    apply_fn, params, ids = model
    one = lora.init(jax.random.key(8), params, rank=3, alpha=6)  # same structure as the merged test: no recompile
    stacked = jax.vmap(_randomise_b, in_axes=(None, 0))(one, jax.random.split(jax.random.key(9), 2))
    out = jax.vmap(apply_fn, in_axes=(None, None, None, 0))(params, ids, None, stacked)
    for i in range(2):
        ad = jax.tree.map(lambda x: x[i], stacked)
        np.testing.assert_allclose(out[i], apply_fn(params, ids, delta=ad), atol=1e-5)


def test_lowrank_linear_is_the_exact_sgd_step_on_a_dense_layer():
    """W' = W - lr * sum_t g_t x_t^T applied to x equals W x - lr * sum_t g_t (x_t . x)."""
    k = jax.random.split(jax.random.key(6), 4)
    w, xs, gs, x = (
        jax.random.normal(k[0], (5, 7)),
        jax.random.normal(k[1], (3, 7)),
        jax.random.normal(k[2], (3, 5)),
        jax.random.normal(k[3], (4, 7)),
    )
    lr = 0.1
    dense = x @ (w - lr * gs.T @ xs).T
    np.testing.assert_allclose(phi3.lowrank_linear(x, w, {"a": xs.T, "b": -lr * gs}), dense, atol=1e-5)


def test_lora_grads_flow_only_to_adapters(model):
    apply_fn, params, ids = model
    adapters = lora.init(jax.random.key(7), params, rank=3, alpha=6)
    g = jax.grad(lambda ad: apply_fn(params, ids, delta=ad).sum())(adapters)
    assert isinstance(g, lora.Adapters) and g.scale == adapters.scale
    assert float(jnp.abs(g.deltas["model"]["layers"]["mlp"]["down_proj"]["b"]).max()) > 0


def test_bad_lora_arguments(model):
    _, params, _ = model
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora.init(jax.random.key(0), params, targets=("qkv", "attn"))
    with pytest.raises(ValueError, match="rank"):
        lora.init(jax.random.key(0), params, rank=0)
