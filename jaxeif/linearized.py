"""eif_linearized(): the first-order approximation -lr_i * g_i . g_j of the EIF (opt-in, never a default).

One SGD step of size lr on train[i] changes the loss on evals[j] by -lr * g_i . g_j + O(lr^2),
g = per-example gradient. Cheap (one gradient per example and one matrix product), but only an
approximation: compare with the exact `jaxeif.eif` before trusting it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxeif import influence
from jaxeif.finetune import LossFn, PyTree


def eif_linearized(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float = 1e-3,
    chunk_size: int | None = None,
) -> jax.Array:
    """First-order EIF f32[n, m]: -lr_i * <grad loss(train[i]), grad loss(evals[j])>.

    Gradients are computed `chunk_size` examples at a time (None: all at once); differentiable
    in lr and params. Not the exact EIF: use `jaxeif.eif` for that.
    """
    evals, n, lr = influence.validate(loss_fn, params, train, evals, lr=lr, steps=1, optimizer=None,
                                      chunk_size=chunk_size)
    matrix = _linearized(loss_fn, params, train, evals, jnp.broadcast_to(lr, (n,)), chunk_size)
    return influence.report_nonfinite(matrix, lr)


def _flat_grads(loss_fn: LossFn, params: PyTree, examples: PyTree, chunk_size: int | None) -> jax.Array:
    """Per-example gradients flattened to f32[k, n_params]."""
    flat = lambda ex: ravel_pytree(jax.grad(loss_fn)(params, ex))[0]
    return jax.lax.map(flat, examples, batch_size=chunk_size) if chunk_size else jax.vmap(flat)(examples)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _linearized(loss_fn, params, train, evals, lr, chunk_size):
    g_train = _flat_grads(loss_fn, params, train, chunk_size)
    g_evals = _flat_grads(loss_fn, params, evals, chunk_size)
    return -lr[:, None] * (g_train @ g_evals.T)
