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
        return (optax.apply_updates(p, scale_updates(updates, lr)), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def scale_updates(updates: PyTree, lr: jax.Array | float) -> PyTree:
    """Each update multiplied by lr, in the update's own dtype."""
    return jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)


def losses(loss_fn: LossFn, params: PyTree, examples: PyTree) -> jax.Array:
    """Loss of every example (leading axis m) under one set of params: f32[m]."""
    return jax.vmap(loss_fn, in_axes=(None, 0))(params, examples)


def lr_as_vector(lr: jax.Array | float, n: int) -> jax.Array:
    """Broadcast a scalar or per-sample lr to shape (n,)."""
    lr = jnp.asarray(lr)
    return jnp.broadcast_to(lr, (n,)) if lr.ndim == 0 else lr
