"""eif_sweep: k learning rates in one program, equal to k separate eif calls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif
from tests.test_influence import make_problem, mlp_loss


@pytest.mark.parametrize("steps, optimizer", [(1, None), (1, "adam"), (3, "adam")])
def test_sweep_equals_separate_calls(steps, optimizer):
    params, train, evals = make_problem(n=5, m=7)
    opt = optax.adam(1.0) if optimizer else None
    lrs = jnp.asarray([1e-3, 3e-2, 0.2])
    S = jaxeif.eif_sweep(mlp_loss, params, train, evals, lrs=lrs, steps=steps, optimizer=opt)
    assert S.shape == (3, 5, 7) and S.dtype == jnp.float32
    for a, lr in enumerate(lrs):
        M = jaxeif.eif(mlp_loss, params, train, evals, lr=lr, steps=steps, optimizer=opt)
        np.testing.assert_allclose(np.asarray(S[a]), np.asarray(M), rtol=1e-6, atol=1e-7)
    assert not np.allclose(S[0], S[1])  # the rates are really different


def test_sweep_with_per_sample_rates_and_chunks():
    params, train, _ = make_problem(n=6)
    lrs = jnp.asarray(np.random.default_rng(0).uniform(0.01, 0.1, size=(2, 6)), jnp.float32)
    S = jaxeif.eif_sweep(mlp_loss, params, train, lrs=lrs, chunk_size=4)
    for a in range(2):
        np.testing.assert_allclose(
            np.asarray(S[a]),
            np.asarray(jaxeif.eif(mlp_loss, params, train, lr=lrs[a], chunk_size=None)),
            rtol=1e-5,
            atol=1e-6,
        )  # another chunking: float32 rounding


def test_sweep_is_differentiable_in_the_rates():
    params, train, evals = make_problem(n=4, m=3)
    f = lambda lrs: jaxeif.eif_sweep(mlp_loss, params, train, evals, lrs=lrs).sum()  # noqa: E731
    g = jax.grad(f)(jnp.asarray([0.01, 0.05]))
    g0 = jax.grad(lambda lr: jaxeif.eif(mlp_loss, params, train, evals, lr=lr).sum())(0.01)
    np.testing.assert_allclose(g[0], g0, rtol=1e-5)


def test_sweep_bad_rates_and_divergence():
    params, train, _ = make_problem(n=4)
    with pytest.raises(ValueError, match="`lrs` has shape"):
        jaxeif.eif_sweep(mlp_loss, params, train, lrs=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="`lrs` has shape"):
        jaxeif.eif_sweep(mlp_loss, params, train, lrs=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        jaxeif.eif_sweep(mlp_loss, params, train, lrs=[0.1, -1.0])
    with pytest.raises(jaxeif.NonFiniteInfluenceError, match="1 of 2 learning rates") as info:
        jaxeif.eif_sweep(mlp_loss, params, train, lrs=[1e-2, 1e38], steps=3)
    assert info.value.matrix.shape == (2, 4, 4) and np.all(np.isfinite(info.value.matrix[0]))
