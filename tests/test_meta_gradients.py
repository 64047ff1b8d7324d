"""Meta-gradients through every inner optimizer are finite and match float64 finite differences,
also with dead ReLU units (exactly-zero gradient entries, where Adam's sqrt(v) has an infinite slope)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif
from jaxeif import meta


def relu_mlp_loss(p, example):
    x, y = example
    return (jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2


def relu_problem(dtype):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k[0], (3, 6), dtype),
        "b1": jnp.array([0.5, 0.5, 0.5, -50.0, -50.0, 0.5], dtype),  # units 3, 4 never fire: dead
        "w2": jax.random.normal(k[1], (6,), dtype),
    }
    train = (jax.random.normal(k[2], (5, 3), dtype), jax.random.normal(k[3], (5,), dtype))
    return params, train


OPTIMIZERS = {
    "sgd": optax.sgd(1.0),
    "momentum": optax.sgd(1.0, momentum=0.9),
    "adam": optax.adam(1.0),
    "adamw": optax.adamw(1.0, weight_decay=1e-2),
    "rmsprop": optax.rmsprop(1.0),
    "rmsprop eps outside the root": optax.rmsprop(1.0, eps_in_sqrt=False),
    "adagrad": optax.adagrad(1.0),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lr_gradient_is_finite_and_matches_finite_differences_with_dead_relus(name):
    with jax.enable_x64(True):
        params, train = relu_problem(jnp.float64)
        opt = OPTIMIZERS[name]

        def trace(lr):
            return jaxeif.eif(relu_mlp_loss, params, train, lr=lr, steps=2, optimizer=opt).trace()

        lr = jnp.linspace(1e-3, 3e-3, 5, dtype=jnp.float64)
        grad = np.asarray(jax.grad(trace)(lr))
        assert np.all(np.isfinite(grad)), grad
        h = 1e-7
        fd = np.array([(trace(lr.at[i].add(h)) - trace(lr.at[i].add(-h))) / (2 * h) for i in range(5)])
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
        assert np.abs(fd).max() > 1e-3  # a real signal, not 0 == 0


def test_params_gradient_through_adam_is_finite_and_matches_finite_differences():
    with jax.enable_x64(True):
        params, train = relu_problem(jnp.float64)

        def total(w2):
            p = {**params, "w2": w2}
            return jaxeif.eif(relu_mlp_loss, p, train, lr=1e-3, steps=2, optimizer=optax.adam(1.0)).sum()

        w2 = params["w2"]
        grad = np.asarray(jax.grad(total)(w2))
        h = 1e-7
        fd = np.array([(total(w2.at[i].add(h)) - total(w2.at[i].add(-h))) / (2 * h) for i in range(w2.size)])
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


def test_fit_stops_on_a_non_finite_meta_gradient_without_stepping():
    seen = []

    def objective(c):  # finite value, NaN gradient (sqrt at 0)
        return jnp.sqrt(c * 0.0).sum() + jnp.sum(c**2)

    with pytest.raises(FloatingPointError, match="meta-gradient.*step 0"):
        meta.fit(
            objective,
            jnp.ones(3),
            optimizer=optax.sgd(0.1),
            steps=3,
            progress=False,
            callback=lambda k, v: seen.append(k),
        )
    assert seen == []
