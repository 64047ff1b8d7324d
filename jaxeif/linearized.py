"""eif_linearized(): the first-order approximation lr_i * u_i . g_j of the EIF (opt-in, never a default).

One optimizer step of size lr on train[i] moves the params by lr * u_i (u_i: the optimizer's
first update, -g_i for SGD), which changes the loss on evals[j] by lr * u_i . g_j + O(lr^2),
g = per-example gradient. Cheap (one gradient per example and one matrix product), but only an
approximation: compare with the exact `jaxeif.eif` before trusting it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxeif import checks, chunking, influence
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import LossFn, PyTree, first_update
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision


def eif_linearized(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    progress: bool = False,
    memory_budget: float | None = None,
) -> jax.Array:
    """First-order EIF: lr_i * <first update on train[i], grad loss(evals[j])> (SGD: -lr_i g_i . g_j).

    Not the exact EIF (use `jaxeif.eif` for that): its first-order term in lr, from one gradient
    per example and one matrix product. Differentiable in lr and params.

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        progress: a bar of examples on stderr.
        steps: must be 1 (the approximation is of one step).
        chunk_size: examples whose gradients are computed per step; "auto" picks the most that fit
            `memory_budget` by XLA's memory analysis (as in `jaxeif.eif`); None: all at once.
        precision: a jaxeif.Precision with difference=False (there is no difference of losses to propagate).
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).

    Returns:
        f32[n, m].

    Raises:
        ValueError: steps != 1, or a Precision with difference=True.
        NonFiniteInfluenceError, MemoryBudgetError, TypeError: as in `jaxeif.eif`.
    """
    evals, n, lr, precision = influence.validate(
        loss_fn,
        params,
        train,
        evals,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        progress=progress,
        precision=precision,
        memory_budget=memory_budget,
    )
    if steps != 1:
        raise ValueError(f"eif_linearized approximates one step, got steps={steps}; use jaxeif.eif for steps > 1")
    if precision_lib.propagates_difference(precision):
        raise ValueError(
            f"precision={precision_lib.name(precision)!r} applies to the exact EIF only; eif_linearized "
            "takes a Precision with difference=False"
        )
    progress_lib.check(progress, traced=checks.is_traced((params, train, evals, lr)))
    total = n + checks.leading_axis("evals", evals)
    with precision_lib.context(precision), progress_lib.bar(total, "eif_linearized examples", progress):
        args = precision_lib.cast_inputs(precision, (params, train, evals, jnp.broadcast_to(lr, (n,))))
        if chunk_size == "auto":
            per_step, compiled = _plan(loss_fn, args, optimizer, progress, memory_budget)
        if chunk_size == "auto" and not checks.is_traced(args):
            matrix = jax.block_until_ready(compiled(*args))
        else:
            per_step = per_step if chunk_size == "auto" else chunk_size
            matrix = jax.block_until_ready(_linearized(loss_fn, *args, optimizer, per_step, progress))
    return influence.report_nonfinite(influence.result_dtype(matrix, precision), lr)


def _plan(loss_fn, args, optimizer, progress: bool, memory_budget: float | None) -> tuple[int | None, Any]:
    """chunk_size "auto": (the most examples per step (None: all) whose program fits the budget by XLA's
    estimate, that compiled program).

    The gradients are independent per example and batch well on every backend, so unlike the exact
    EIF's rows (jaxeif.chunking.choose) the largest chunk that fits is the fastest on CPU too."""
    budget = chunking.budget_bytes(memory_budget)
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
    largest = max(checks.leading_axis("train", args[1]), checks.leading_axis("evals", args[2]))
    size: int | None = None
    while True:
        compiled = _linearized.lower(loss_fn, *specs, optimizer, size, progress).compile()
        used = chunking.program_bytes(compiled)
        if used <= budget:
            return size, compiled
        if size == 1:
            raise chunking.MemoryBudgetError(
                f"the gradient of one example needs an estimated {chunking.gib(used)}, over the memory budget of "
                f"{chunking.gib(budget)}; free device memory, raise `memory_budget`, or use a smaller model"
            )
        size = max(1, (largest if size is None else size) // 2)


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
