"""eif_linearized(): the first-order approximation lr_i * u_i . g_j of the EIF (opt-in, never a default).

One optimizer step of size lr on train[i] moves the params by lr * u_i (u_i: the optimizer's
first update, -g_i for SGD), which changes the loss on evals[j] by lr * u_i . g_j + O(lr^2),
g = per-example gradient. Cheap (one gradient per example and one matrix product), but only an
approximation: compare with the exact `jaxeif.eif` before trusting it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxeif import checks, influence
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import LossFn, PyTree, first_update


def eif_linearized(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float = 1e-3,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | str | None = "auto",
    precision: str = "highest",
    progress: bool = False,
) -> jax.Array:
    """First-order EIF f32[n, m]: lr_i * <first update on train[i], grad loss(evals[j])> (SGD: -lr_i g_i.g_j).

    Gradients are computed `chunk_size` examples at a time ("auto" or None: all at once, one
    gradient per example is all this needs); `precision`: "highest", "tf32", "bfloat16" or
    "float64" (jaxeif.precision); `progress`: a bar of examples. `steps` must be 1 (the
    approximation is of one step). Differentiable in lr and params. Not the exact EIF: use
    `jaxeif.eif` for that.
    """
    evals, n, lr = influence.validate(loss_fn, params, train, evals, lr=lr, steps=steps, optimizer=optimizer,
                                      chunk_size=chunk_size, progress=progress)
    if steps != 1:
        raise ValueError(f"eif_linearized approximates one step, got steps={steps}; use jaxeif.eif for steps > 1")
    if precision_lib.propagates_difference(precision_lib.check(precision)):
        raise ValueError(f"precision={precision!r} applies to the exact EIF only; eif_linearized takes "
                         "'highest', 'tf32', 'bfloat16' or 'float64'")
    per_step = None if chunk_size == "auto" else chunk_size
    progress_lib.check(progress, traced=checks.is_traced((params, train, evals, lr)))
    total = n + checks.leading_axis("evals", evals)
    with precision_lib.context(precision), progress_lib.bar(total, "eif_linearized examples", progress):
        args = precision_lib.cast_inputs(precision, (params, train, evals, jnp.broadcast_to(lr, (n,))))
        matrix = jax.block_until_ready(_linearized(loss_fn, *args, optimizer, per_step, progress))
    return influence.report_nonfinite(influence.result_dtype(matrix, precision), lr)


def _flat(tree: PyTree, progress: bool) -> jax.Array:
    """`tree` as one flat vector (ticking the open bar when `progress`)."""
    flat = ravel_pytree(tree)[0]
    if progress:
        progress_lib.tick(flat)
    return flat


def _per_example(fn, examples: PyTree, chunk_size: int | None) -> jax.Array:
    """fn of every example, stacked: `chunk_size` examples at a time (None: all at once)."""
    return jax.lax.map(fn, examples, batch_size=chunk_size) if chunk_size else jax.vmap(fn)(examples)


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "chunk_size", "progress"))
def _linearized(loss_fn, params, train, evals, lr, optimizer, chunk_size, progress):
    """f[n, m]: lr_i * u_i . g_j with u the first updates on train, g the gradients on evals."""
    update = lambda ex: _flat(first_update(loss_fn, params, ex, optimizer), progress)  # noqa: E731
    grad = lambda ex: _flat(jax.grad(loss_fn)(params, ex), progress)  # noqa: E731
    u_train = _per_example(update, train, chunk_size)
    g_evals = _per_example(grad, evals, chunk_size)
    return lr[:, None] * (u_train @ g_evals.T)
