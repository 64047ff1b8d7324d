"""Controls: per-layer multipliers scale exactly the right updates; meta-gradients through
jaxeif.eif agree with central finite differences in float64 for every kind of control."""

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif
from jaxeif import meta
from jaxeif.meta import controls as C


class TinyMLP(nn.Module):
    """Two Dense layers: params {"params": {"Dense_0": ..., "Dense_1": ...}} like any Flax model."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(4)(x)))[..., 0]


def make_problem(dtype=jnp.float32, n=5):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (n, 3), dtype)
    y = jax.random.normal(k[1], (n,), dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), TinyMLP().init(k[2], x[:1]))

    def loss_fn(p, example):
        xi, yi = example
        return (TinyMLP().apply(p, xi[None])[0] - yi) ** 2

    return loss_fn, params, (x, y)


def test_layer_names_look_through_flax_params_collection():
    _, params, _ = make_problem()
    assert C.layer_names(params) == ("Dense_0", "Dense_1")
    assert C.layer_names(params["params"]) == ("Dense_0", "Dense_1")
    with pytest.raises(TypeError, match="dict of layers"):
        C.layer_names([1, 2])


def test_unit_layer_scales_reproduce_plain_eif_exactly():
    loss_fn, params, train = make_problem()
    plain = jaxeif.eif(loss_fn, params, train, lr=0.1, steps=2)
    scaled = jaxeif.eif(
        loss_fn, params, train, lr=0.1, steps=2, optimizer=C.layer_optimizer(C.init_layer_log_scales(params))
    )
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(scaled))


def test_layer_scale_multiplies_only_its_layer():
    loss_fn, params, train = make_problem()
    example = jax.tree.map(lambda a: a[0], train)
    s = {"Dense_0": jnp.log(3.0), "Dense_1": jnp.log(0.5)}
    tuned = jaxeif.finetune(loss_fn, params, example, lr=0.1, steps=1, optimizer=C.layer_optimizer(s))
    g = jax.grad(loss_fn)(params, example)["params"]
    for name, factor in (("Dense_0", 3.0), ("Dense_1", 0.5)):
        expect = jax.tree.map(lambda p, gi: p - 0.1 * factor * gi, params["params"][name], g[name])
        chex.assert_trees_all_close(tuned["params"][name], expect, rtol=1e-5, atol=1e-7)


def test_layer_scales_must_name_every_layer():
    loss_fn, params, train = make_problem()
    with pytest.raises(ValueError, match="Dense_1"):
        jaxeif.eif(loss_fn, params, train, lr=0.1, optimizer=C.layer_optimizer({"Dense_0": jnp.zeros(())}))


def test_amortised_predictor_starts_uniform_and_features_see_noise():
    images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    noisy = images + jax.random.normal(jax.random.key(2), images.shape)
    feats = C.image_features(jnp.concatenate([images, noisy]))
    assert feats.shape == (8, 6)
    assert np.all(np.asarray(feats[4:, 2]) > np.asarray(feats[:4, 2]))  # roughness
    assert np.all(np.asarray(feats[4:, 3]) > 0) and np.all(np.asarray(feats[:4, 3]) == 0)  # out of [0, 1]
    pred = C.amortised(feats, base_lr=0.02)
    phi = pred.init(jax.random.key(0), feats)
    np.testing.assert_array_equal(np.asarray(pred.lr(phi, feats)), np.full(8, np.float32(0.02)))
    big = jax.tree.map(lambda a: a + 100.0, phi)  # bounded: at most exp(max_log_gain) times base
    assert np.all(np.asarray(pred.lr(big, feats)) <= 0.02 * np.exp(3.0) * (1 + 1e-6))
    with pytest.raises(ValueError, match="f\\[n, h, w, c\\]"):
        C.image_features(jnp.zeros((4, 28, 28)))
    with pytest.raises(ValueError, match="> 0"):
        C.init_log_lr(3, 0.0)


def check_meta_gradient(objective, controls, key, eps=1e-5, rtol=1e-6):
    """Reverse-mode derivative along two random directions vs central differences (float64),
    all in one compiled function."""
    flat, unravel = jax.flatten_util.ravel_pytree(controls)
    f = lambda v: objective(unravel(v))

    @jax.jit
    def both(v, directions):
        grad = jax.grad(f)(v)
        fd = jax.vmap(lambda d: (f(v + eps * d) - f(v - eps * d)) / (2 * eps))(directions)
        return directions @ grad, fd

    directions = jax.random.normal(key, (2, flat.size), flat.dtype)
    assert flat.dtype == jnp.float64
    analytic, numeric = both(flat, directions)
    np.testing.assert_allclose(np.asarray(analytic), np.asarray(numeric), rtol=rtol, atol=1e-12)


@pytest.mark.slow  # 10 s: float64 finite differences
def test_meta_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        loss_fn, params, train = make_problem(jnp.float64)
        labels = np.array([0, 0, 1, 1, 1])

        def per_sample(log_lr):
            M = jaxeif.eif(loss_fn, params, train, lr=C.per_sample_lr(log_lr), steps=2)
            return meta.class_blocks(M, labels) + meta.sparsity(M)

        feats = jnp.concatenate([train[0], train[1][:, None]], axis=1)
        pred = C.amortised(feats, base_lr=0.2, hidden=(3,))
        phi = jax.tree.map(
            lambda a: (a + 0.3).astype(jnp.float64), pred.init(jax.random.key(3), feats)
        )  # off zero init

        def amortised(phi):
            M = jaxeif.eif(loss_fn, params, train, lr=pred.lr(phi, feats), steps=2)
            return meta.noise_invariance(M, [0, 1], [2, 3])

        def per_layer(log_scales):
            M = jaxeif.eif(
                loss_fn,
                params,
                train,
                lr=0.2,
                steps=2,
                optimizer=C.layer_optimizer(log_scales, optax.sgd(1.0, momentum=0.9)),
            )
            return meta.symmetry(M)

        key = jax.random.key(7)
        check_meta_gradient(per_sample, jnp.log(jnp.linspace(0.1, 0.3, 5)), key)
        check_meta_gradient(amortised, phi, key)
        check_meta_gradient(per_layer, {"Dense_0": jnp.float64(0.2), "Dense_1": jnp.float64(-0.3)}, key)
