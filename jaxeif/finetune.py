"""The inner loop of the EIF: a few optax steps on one example, the update scaled by lr."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def default_optimizer() -> optax.GradientTransformation:
    """Plain SGD with unit rate: the per-sample lr alone sets the step size."""
    return optax.sgd(1.0)


def finetune(
    loss_fn: LossFn,
    params: PyTree,
    example: PyTree,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
) -> PyTree:
    """Params after `steps` optimizer steps on `example` alone; each update is multiplied by lr.

    Pass optimizers with unit learning rate (e.g. `optax.adam(1.0)`): `lr` is the rate.
    Differentiable in `lr` and `params` (the steps are an unrolled `lax.scan`).
    """
    optimizer = default_optimizer() if optimizer is None else optimizer
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        p, state = carry
        grads = grad_fn(p, example)
        updates, state = optimizer.update(grads, state, p)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def losses(loss_fn: LossFn, params: PyTree, examples: PyTree) -> jax.Array:
    """Loss of every example (leading axis m) under one set of params: f32[m]."""
    return jax.vmap(loss_fn, in_axes=(None, 0))(params, examples)


def lr_as_vector(lr: jax.Array | float, n: int) -> jax.Array:
    """Broadcast a scalar or per-sample lr to shape (n,)."""
    lr = jnp.asarray(lr)
    return jnp.broadcast_to(lr, (n,)) if lr.ndim == 0 else lr


def finetune_delta(
    loss_fn: LossFn,
    params: PyTree,
    example: PyTree,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
) -> PyTree:
    """The change of the params that `finetune` makes, as a pytree: the sum of the scaled updates lr * u.

    Accumulated directly rather than as (fine-tuned params) - params, so a small delta keeps full
    relative accuracy (for `jaxeif.difference.loss_difference`). Step k takes its gradient at
    params + delta_k. Differentiable in `lr` and `params`.
    """
    optimizer = default_optimizer() if optimizer is None else optimizer
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        delta, state = carry
        p = jax.tree.map(lambda a, d: (a + d).astype(a.dtype), params, delta)
        updates, state = optimizer.update(grad_fn(p, example), state, p)
        delta = jax.tree.map(lambda d, u: (d + lr * u).astype(d.dtype), delta, updates)
        return (delta, state), None

    delta0 = jax.tree.map(jnp.zeros_like, params)
    (delta, _), _ = jax.lax.scan(step, (delta0, optimizer.init(params)), None, length=steps)
    return delta
