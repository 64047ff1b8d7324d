"""eif(): the exact empirical influence matrix, fine-tuning on each sample separately."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import checks
from jaxeif.finetune import LossFn, PyTree, finetune, losses


def eif(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float = 1e-3,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """M[i, j] = loss(theta_i, evals[j]) - loss(params, evals[j]): f32[n_train, n_eval].

    theta_i is `params` after `steps` optimizer steps on train[i] alone, each update scaled
    by lr (scalar or shape (n,)); `optimizer` defaults to SGD with unit rate. Fine-tunes are
    vmapped `chunk_size` at a time (None: all at once); jittable, differentiable in lr and
    params. Raises `NonFiniteInfluenceError` naming diverged rows (warns when traced).
    """
    evals, n, lr = validate(loss_fn, params, train, evals, lr=lr, steps=steps, optimizer=optimizer,
                            chunk_size=chunk_size)
    matrix = _eif(loss_fn, params, train, evals, jnp.broadcast_to(lr, (n,)), steps, optimizer, chunk_size)
    return report_nonfinite(matrix, lr)


def validate(loss_fn, params, train, evals, *, lr, steps, optimizer, chunk_size):
    """eif's input checks, shared by the sharded and linearised variants: returns (evals, n, lr)."""
    evals = train if evals is None else evals
    n = checks.leading_axis("train", train)
    checks.leading_axis("evals", evals)
    checks.positive_int("steps", steps)
    checks.positive_int("chunk_size", chunk_size, allow_none=True)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    checks.float_params(params)
    checks.finite("params", params)
    checks.finite("train", train)
    if evals is not train:
        checks.finite("evals", evals)
    lr = checks.learning_rate(lr, n)
    first = functools.partial(jax.tree.map, lambda x: x[0])
    checks.scalar_loss(loss_fn, params, first(train), "train")
    checks.scalar_loss(loss_fn, params, first(evals), "evals")
    return evals, n, lr


def report_nonfinite(matrix: jax.Array, lr: jax.Array) -> jax.Array:
    """Raise NonFiniteInfluenceError for diverged rows (a warning when traced); return the matrix."""
    if checks.is_traced(matrix):
        jax.debug.callback(_warn_nonfinite, jnp.all(jnp.isfinite(matrix), axis=1))
    else:
        checks.raise_if_nonfinite(matrix, lr)
    return matrix


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps", "optimizer", "chunk_size"))
def _eif(loss_fn, params, train, evals, lr, steps, optimizer, chunk_size):
    base = losses(loss_fn, params, evals)

    def row(args):
        example, lr_i = args
        theta_i = finetune(loss_fn, params, example, lr=lr_i, steps=steps, optimizer=optimizer)
        return losses(loss_fn, theta_i, evals) - base

    if chunk_size is None or chunk_size >= lr.shape[0]:
        return jax.vmap(row)((train, lr))
    return jax.lax.map(row, (train, lr), batch_size=chunk_size)


def _warn_nonfinite(row_finite: Any) -> None:
    rows = np.flatnonzero(~np.asarray(row_finite))
    if rows.size:
        warnings.warn(f"jaxeif.eif: non-finite influence in rows {rows.tolist()[:20]} (diverged fine-tunes)", RuntimeWarning)
