"""eif_linearized: equals -lr g_i.g_j from a hand loop, and differs from the exact EIF by O(lr^2) (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxeif
from jaxeif.linearized import eif_linearized


def loss(params, example):
    x, y = example
    return (jnp.tanh(x @ params["w"] + params["b"]) @ params["v"] - y) ** 2


def problem(dtype, n=5):
    k = jax.random.split(jax.random.key(1), 5)
    params = {
        "w": jax.random.normal(k[0], (3, 4), dtype),
        "b": jax.random.normal(k[1], (4,), dtype),
        "v": jax.random.normal(k[2], (4,), dtype),
    }
    return params, (jax.random.normal(k[3], (n, 3), dtype), jax.random.normal(k[4], (n,), dtype))


def test_matches_hand_loop_and_chunking():
    params, train = problem(jnp.float32)
    lr = jnp.linspace(0.01, 0.05, 5)
    flat = lambda ex: jnp.concatenate([g.ravel() for g in jax.tree.leaves(jax.grad(loss)(params, ex))])
    grads = [flat((train[0][i], train[1][i])) for i in range(5)]
    hand = np.array([[-float(lr[i]) * float(grads[i] @ grads[j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(eif_linearized(loss, params, train, lr=lr), hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eif_linearized(loss, params, train, lr=lr, chunk_size=2), hand, rtol=1e-5, atol=1e-6)


def test_first_order_agreement_with_exact_eif():
    with jax.enable_x64():
        params, train = problem(jnp.float64)
        errors = []
        for lr in (1e-3, 5e-4):
            exact = np.asarray(jaxeif.eif(loss, params, train, lr=lr))
            errors.append(np.abs(exact - np.asarray(eif_linearized(loss, params, train, lr=lr))).max())
            assert errors[-1] < 1e-2 * np.abs(exact).max()  # close...
        assert 3.5 < errors[0] / errors[1] < 4.5  # ...and the gap is second order in lr


def test_differentiable_in_lr():
    with jax.enable_x64():
        params, train = problem(jnp.float64)
        f = lambda lr: eif_linearized(loss, params, train, lr=lr).sum()
        eps = 1e-6
        np.testing.assert_allclose(jax.grad(f)(0.01), (f(0.01 + eps) - f(0.01 - eps)) / (2 * eps), rtol=1e-6)


def test_bad_lr_is_named():
    params, train = problem(jnp.float32)
    with pytest.raises(ValueError, match="lr"):
        eif_linearized(loss, params, train, lr=jnp.ones(3))


def test_other_optimizer_uses_its_first_update():
    params, train = problem(jnp.float32)
    opt = optax.adam(1.0)
    flat = lambda tree: ravel_pytree(tree)[0]  # noqa: E731
    examples = [(train[0][i], train[1][i]) for i in range(5)]
    updates = [flat(opt.update(jax.grad(loss)(params, ex), opt.init(params), params)[0]) for ex in examples]
    grads = [flat(jax.grad(loss)(params, ex)) for ex in examples]
    hand = np.array([[0.01 * float(updates[i] @ grads[j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(eif_linearized(loss, params, train, lr=0.01, optimizer=opt), hand, rtol=1e-5, atol=1e-7)


def test_one_step_and_no_difference_mode():
    params, train = problem(jnp.float32)
    with pytest.raises(ValueError, match="steps=2"):
        eif_linearized(loss, params, train, lr=0.01, steps=2)
    with pytest.raises(ValueError, match="'difference' applies to the exact EIF only"):
        eif_linearized(loss, params, train, lr=0.01, precision=jaxeif.Precision(difference=True))
