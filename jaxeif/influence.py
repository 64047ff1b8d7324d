"""eif() and eif_sweep(): exact empirical influence matrices, fine-tuning on each sample separately."""

from __future__ import annotations

import collections
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import checks, chunking, options, sanity
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.chunking import Chunks
from jaxeif.difference import loss_difference
from jaxeif.finetune import LossFn, PyTree, apply_delta, finetune, finetune_delta, first_update, scale_updates
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision


def eif(
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
    """The exact empirical influence matrix: fine-tune on each train example alone, measure every eval.

    M[i, j] = loss(theta_i, evals[j]) - loss(params, evals[j]), with theta_i = `params` after
    `steps` optimizer steps on train[i] alone, each update scaled by lr. Jittable and
    differentiable in lr and params.

    Caching (docs/caching.md): the compiled program is reused for inputs of the same shapes, dtypes and
    options, and recompiled when what `loss_fn` reads changes (its code, closure, attributes, the
    module-level values it names: `jaxeif.sanity.loss_version`). Arrays `loss_fn` closes over are
    compiled in as constants; bind them with `jax.tree_util.Partial(fn, arrays)` to pass them as inputs.
    A loss closing over a value traced by an enclosing jax.grad/jit is refused (TypeError; use a
    Partial). Warns (RuntimeWarning) when low-precision updates round away entirely, and in
    precision="float64" when the loss computes something else with x64 enabled.

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required, every finding depends on it.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate; lr scales its updates).
        chunk_size: rows per step; "auto" picks the fastest layout within `memory_budget` from XLA's
            memory analysis (jaxeif.chunking); None: all rows at once.
        precision: the arithmetic, a jaxeif.Precision (see jaxeif.precision).
        progress: show a bar of finished rows on stderr (not under jit/grad).
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).

    Returns:
        f32[n, m], the influence matrix M.

    Raises:
        NonFiniteInfluenceError: some fine-tunes diverged; `.rows` names them, `.matrix` holds the raw
            result (a RuntimeWarning instead when traced).
        MemoryBudgetError: the program does not fit the device or `memory_budget`.
        TypeError, ValueError: bad arguments, named in the message.
    """
    evals, n, lr, precision = validate(
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
    lrs = jnp.broadcast_to(lr, (n,))[None]
    matrix = matrices(
        loss_fn,
        params,
        train,
        evals,
        lrs,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        progress=progress,
        memory_budget=memory_budget,
    )[0]
    return report_nonfinite(matrix, lr)


def eif_sweep(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lrs: jax.Array | Any,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    progress: bool = False,
    memory_budget: float | None = None,
) -> jax.Array:
    """The EIF at k learning rates in one program; entry [a] equals `eif(..., lr=lrs[a])`.

    Base losses are shared, and for steps == 1 so is each row's first optimizer update (lr only
    scales it).

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: rows per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        precision: the arithmetic, a jaxeif.Precision.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        lrs: the learning rates, f[k] (one per sweep point) or f[k, n] (per point and train example).
        progress: a bar of rows, each row being its k fine-tunes.

    Returns:
        f32[k, n, m].

    Raises:
        NonFiniteInfluenceError: rows diverged at some rate; `.rows` holds the (point, row) pairs and
            `.matrix` the whole [k, n, m] result (a RuntimeWarning instead when traced).
        MemoryBudgetError, TypeError, ValueError: as in `eif`.
    """
    evals, n, _, precision = validate(
        loss_fn,
        params,
        train,
        evals,
        lr=0.0,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        progress=progress,
        precision=precision,
        memory_budget=memory_budget,
    )
    lrs = checks.learning_rates(lrs, n)
    out = matrices(
        loss_fn,
        params,
        train,
        evals,
        jnp.broadcast_to(lrs[:, None], (lrs.shape[0], n)) if lrs.ndim == 1 else lrs,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        progress=progress,
        memory_budget=memory_budget,
    )
    if checks.is_traced(out):
        jax.debug.callback(_warn_nonfinite, jnp.all(jnp.isfinite(out), axis=(0, 2)))
        return out
    finite = np.all(np.isfinite(np.asarray(out)), axis=2)  # [k, n]
    if not finite.all():
        points = np.flatnonzero(~finite.all(axis=1))
        raise checks.NonFiniteInfluenceError(
            f"fine-tunes diverged at {points.size} of {out.shape[0]} learning rates: "
            + "; ".join(f"lrs[{a}] {int((~finite[a]).sum())} rows" for a in points[:8])
            + ". Lower the largest rates; `.matrix` holds the whole [k, n, m] result, `.rows` the (point, row) pairs",
            np.argwhere(~finite),
            np.asarray(out),
        )
    return out


def chunk_plan(
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
    sweep_points: int = 1,
) -> tuple[Chunks, int]:
    """The layout `eif` (or an eif_sweep of `sweep_points` rates) runs with, without running it.

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: rows per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        precision: the arithmetic, a jaxeif.Precision.
        progress: show a progress bar on stderr.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        sweep_points: the number of learning rates of an eif_sweep (1: `eif`).

    Returns:
        (Chunks(rows, evals), XLA's estimated peak bytes of the compiled program).

    Raises:
        MemoryBudgetError: no layout fits; TypeError, ValueError: bad arguments.
    """
    evals, n, lr, precision = validate(
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
    with precision_lib.context(precision):
        args = precision_lib.cast_inputs(
            precision, (params, train, evals, jnp.broadcast_to(lr, (sweep_points, n)), split_loss(loss_fn)[1])
        )
        static = program_static(loss_fn, steps, optimizer, precision, progress)
        chunks, _, nbytes = plan(jax.tree.map(jnp.asarray, args), static, chunk_size, memory_budget, precision)
    return chunks, nbytes


def validate(
    loss_fn,
    params,
    train,
    evals,
    *,
    lr,
    steps,
    optimizer,
    chunk_size,
    progress=False,
    precision: Any = Precision(),
    memory_budget: Any = None,
) -> tuple[PyTree, int, jax.Array, Precision]:
    """The input checks every EIF function shares (jaxeif.options): returns (evals, n, lr, precision)."""
    options.check_progress(progress)
    precision = options.check_precision(precision)
    options.check_memory_budget(memory_budget)
    evals = train if evals is None else evals
    n = checks.leading_axis("train", train)
    checks.leading_axis("evals", evals)
    checks.positive_int("steps", steps)
    options.check_chunk_size(chunk_size)
    options.check_optimizer(optimizer)
    checks.model_inputs(params, loss_fn)  # framework state and non-array leaves, before any dtype is asked
    checks.float_params(params)
    checks.finite("params", params)
    checks.finite("train", train)
    if evals is not train:
        checks.finite("evals", evals)
    lr = checks.learning_rate(lr, n)
    first = functools.partial(jax.tree.map, lambda x: x[0])
    checks.scalar_loss(loss_fn, params, first(train), "train")
    checks.scalar_loss(loss_fn, params, first(evals), "evals")
    return evals, n, lr, precision


def report_nonfinite(matrix: jax.Array, lr: jax.Array) -> jax.Array:
    """Raise NonFiniteInfluenceError for diverged rows (a warning when traced); return the matrix."""
    if checks.is_traced(matrix):
        jax.debug.callback(_warn_nonfinite, jnp.all(jnp.isfinite(matrix), axis=1))
    else:
        checks.raise_if_nonfinite(matrix, lr)
    return matrix


# ----------------------------------------------------------------------------- the program


def _map(fn, evals: PyTree, tile: int | None) -> jax.Array:
    """fn of every eval, f32[m], `tile` evals at a time (None: all at once)."""
    return jax.vmap(fn)(evals) if tile is None else jax.lax.map(fn, evals, batch_size=tile)


def _losses(loss_fn: LossFn, params: PyTree, evals: PyTree, tile: int | None) -> jax.Array:
    """Loss of every eval, f32[m]."""
    return _map(functools.partial(loss_fn, params), evals, tile)


def _row(
    loss_fn, params, example, lrs: jax.Array, evals, base, *, steps: int, optimizer, tile, difference
) -> jax.Array:
    """f[k, m]: the fine-tune on `example` at each of the k rates `lrs`, against every eval.

    The k rates run one after another (lax.map): vmapping them would batch the params, which
    XLA:CPU turns into slow grouped convolutions; rows are the axis to parallelise. With
    `difference`, the params' change is propagated through loss_fn instead (jaxeif.difference)."""
    if steps > 1:
        delta = lambda lr: finetune_delta(loss_fn, params, example, lr=lr, steps=steps, optimizer=optimizer)  # noqa: E731
        tune = lambda lr: finetune(loss_fn, params, example, lr=lr, steps=steps, optimizer=optimizer)  # noqa: E731
    else:  # one step: the optimizer's first update does not depend on lr, which only scales it
        updates = first_update(loss_fn, params, example, optimizer)
        delta = lambda lr: scale_updates(updates, lr)  # noqa: E731
        tune = lambda lr: apply_delta(params, delta(lr))  # noqa: E731
    if difference:
        change = lambda d: functools.partial(loss_difference, loss_fn, params, d)  # noqa: E731
        return jax.lax.map(lambda lr: _map(change(delta(lr)), evals, tile), lrs)
    return jax.lax.map(lambda lr: _losses(loss_fn, tune(lr), evals, tile) - base, lrs)


def split_loss(loss_fn) -> tuple[Any, list]:
    """(static part, array inputs) of a loss_fn. A `jax.tree_util.Partial`'s bound arguments (frozen base
    weights, say) enter the compiled program as inputs, not as constants compiled into it; any other
    callable is static as a whole."""
    if isinstance(loss_fn, jax.tree_util.Partial):
        inputs, treedef = jax.tree.flatten(loss_fn)
        return treedef, [jnp.asarray(x) for x in inputs]  # python scalars too: the program takes arrays
    return loss_fn, []


def program(
    params,
    train,
    evals,
    lrs,
    loss_inputs=(),
    *,
    loss_fn,
    steps,
    optimizer,
    chunks: Chunks,
    difference: bool = False,
    progress: bool = False,
    loss_version: str | None = None,
):
    """f32[k, n, m]: every row's k fine-tunes against every eval. Each row is rematerialised in
    the backward pass (jax.checkpoint), so reverse mode keeps about one chunk of rows in memory.
    With `progress`, each finished row ticks the open bar (jaxeif.progress). `loss_version` (unused in the
    body) keys the compiled program on what loss_fn reads (jaxeif.sanity.loss_version)."""
    if isinstance(loss_fn, jax.tree_util.PyTreeDef):  # split_loss's static part: bind the inputs again
        loss_fn = jax.tree.unflatten(loss_fn, loss_inputs)
    base = None if difference else _losses(loss_fn, params, evals, chunks.evals)

    @jax.checkpoint
    def fine_tunes(args):
        example, lr_row = args
        return _row(
            loss_fn,
            params,
            example,
            lr_row,
            evals,
            base,
            steps=steps,
            optimizer=optimizer,
            tile=chunks.evals,
            difference=difference,
        )

    def row(args):
        out = fine_tunes(args)
        if progress:
            progress_lib.tick(out)
        return out

    n = lrs.shape[1]
    if chunks.rows is None or chunks.rows >= n:
        out = jax.vmap(row)((train, lrs.T))
    else:
        out = jax.lax.map(row, (train, lrs.T), batch_size=chunks.rows)
    return jnp.moveaxis(out, 0, 1)


class _OutOfMemory(Exception):
    """The planned program ran out of device memory (caught once by `matrices` to plan again)."""


def _run_planned(compiled, args, chunks: Chunks, nbytes: int, *, retry: bool) -> jax.Array:
    """`compiled(*args)`, finished; an allocation failure is _OutOfMemory when `retry`, else a MemoryBudgetError."""
    try:
        return jax.block_until_ready(compiled(*args))  # inside the progress bar's lifetime
    except Exception as e:  # XLA raises its own runtime error type; only allocation failures are ours
        if not chunking.out_of_memory(e):
            raise
        if retry and nbytes > 0:
            raise _OutOfMemory from e
        raise _out_of_memory_error(chunks, nbytes) from e


def _out_of_memory_error(chunks: Chunks, nbytes: int) -> chunking.MemoryBudgetError:
    return chunking.MemoryBudgetError(
        f"out of device memory at chunk_size={chunks.rows} rows x {chunks.evals or 'all'} evals "
        f"(XLA's estimate for this program: {chunking.gib(nbytes)}); pass a smaller chunk_size, "
        "or chunk_size='auto' with a smaller memory_budget"
    )


_STATIC = ("loss_fn", "steps", "optimizer", "chunks", "difference", "progress", "loss_version")
_jitted_program = jax.jit(program, static_argnames=_STATIC)
_CACHE: collections.OrderedDict = collections.OrderedDict()  # (call signature) -> (chunks, compiled, bytes)
_CACHE_SIZE = 16


def matrices(
    loss_fn, params, train, evals, lrs, *, steps, optimizer, chunk_size, precision, progress, memory_budget
) -> jax.Array:
    """The checked core of eif and eif_sweep: [k, n, m] for lrs f[k, n] (dtype: `result_dtype`)."""
    precision = options.check_precision(precision)
    progress_lib.check(progress, traced=checks.is_traced((params, train, evals, lrs, split_loss(loss_fn)[1])))
    with precision_lib.context(precision), progress_lib.bar(lrs.shape[1], "eif rows", progress):
        args = precision_lib.cast_inputs(precision, (params, train, evals, lrs, split_loss(loss_fn)[1]))
        static = program_static(loss_fn, steps, optimizer, precision, progress)
        if checks.is_traced(args):
            chunks, _, _ = plan(args, static, chunk_size, memory_budget, precision, traced=True)
            out = program(*args, chunks=chunks, **static)
        else:
            _meaningful(loss_fn, params, train, lrs, optimizer, precision)
            args = jax.tree.map(jnp.asarray, args)
            chunks, compiled, nbytes = plan(args, static, chunk_size, memory_budget, precision)
            while True:
                try:
                    out = _run_planned(compiled, args, chunks, nbytes, retry=chunk_size == "auto")
                    break
                except _OutOfMemory as e:  # "auto" trusted an estimate that was too low: plan again in half
                    smaller = plan(args, static, chunk_size, nbytes // 2, precision)
                    if smaller[2] >= nbytes:  # no smaller program: give up as a fixed chunk_size would
                        raise _out_of_memory_error(chunks, nbytes) from e.__cause__
                    warnings.warn(
                        f"jaxeif: out of device memory at {chunks.rows} rows x {chunks.evals or 'all'} evals "
                        f"although XLA estimated {chunking.gib(nbytes)}; chunk_size='auto' planned again within "
                        f"{chunking.gib(nbytes // 2)} (kept for later calls; pass memory_budget= to choose)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    chunks, compiled, nbytes = smaller
                    _CACHE[plan_key(args, static, chunk_size, memory_budget, precision)] = smaller
            if precision_lib.propagates_difference(precision):
                out = _direct_where_nonfinite(
                    out,
                    loss_fn,
                    params,
                    train,
                    evals,
                    lrs,
                    steps=steps,
                    optimizer=optimizer,
                    chunk_size=chunk_size,
                    precision=precision,
                    progress=False,
                    memory_budget=memory_budget,
                )
        return result_dtype(out, precision)


def _meaningful(loss_fn, params, train, lrs, optimizer, precision: Precision) -> None:
    """jaxeif.sanity's checks before a compiled (untraced) call: a loss closing over a tracer is refused;
    updates that round away in the params' dtype, and a loss that float64 mode changes, are warned of."""
    sanity.closed_over_tracer(loss_fn)
    sanity.warn_if_updates_round_away(loss_fn, params, train, lrs, optimizer, precision)
    if precision_lib.is_float64(precision):
        sanity.warn_if_float64_differs(loss_fn, params, jax.tree.map(lambda x: x[0], train))


def _direct_where_nonfinite(out, loss_fn, params, train, evals, lrs, *, precision: Precision, **kwargs) -> jax.Array:
    """Entries whose propagated difference overflowed, recomputed as a difference of two losses.

    A huge step (the CNN at lr 1 moves logits by ~1e8) can overflow the propagated form where the
    direct one stays finite; entries that large lose nothing by direct subtraction. Warns with the count."""
    bad = ~np.isfinite(np.asarray(out))  # [k, n, m]
    rows = np.flatnonzero(bad.any(axis=(0, 2)))
    if not rows.size:
        return out
    direct = precision_lib.direct_counterpart(precision)
    take = functools.partial(jax.tree.map, lambda x: jnp.asarray(x)[rows])
    redone = np.asarray(
        matrices(loss_fn, params, take(train), evals, jnp.asarray(lrs)[:, rows], precision=direct, **kwargs)
    )
    fixed = np.array(out)
    fixed[:, rows] = np.where(bad[:, rows], redone, fixed[:, rows])
    warnings.warn(
        f"jaxeif: {int(bad.sum())} entries in rows {rows.tolist()[:20]} overflowed in "
        f"precision={precision_lib.name(precision)!r} (very large loss changes); they were recomputed in "
        f"{precision_lib.name(direct)!r}, which is as accurate at that size",
        RuntimeWarning,
        stacklevel=3,
    )
    return jnp.asarray(fixed)


def program_static(loss_fn, steps: int, optimizer, precision: Precision, progress: bool = False) -> dict:
    """The static arguments of `program` for a checked Precision (loss_fn: split_loss's static part)."""
    return dict(
        loss_fn=split_loss(loss_fn)[0],
        steps=steps,
        optimizer=optimizer,
        difference=precision_lib.propagates_difference(precision),
        progress=progress,
        loss_version=sanity.loss_version(loss_fn),
    )


def result_dtype(out: jax.Array, precision: Precision) -> jax.Array:
    """float32 for dtype "float64" (the float64 result keeps its relative accuracy when rounded), else as computed."""
    return out.astype(jnp.float32) if precision_lib.is_float64(precision) else out


def plan_key(args, static: dict, chunk_size, memory_budget, mode: Precision, traced: bool = False) -> tuple:
    """What `plan`'s result depends on: the arguments' structure, shapes and dtypes, the program's static
    arguments, the chunking options and the precision."""
    return (
        jax.tree.structure(args),
        tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) for x in jax.tree.leaves(args)),
        tuple(static.items()),
        chunk_size,
        memory_budget,
        mode,
        traced,
    )


def plan(
    args, static: dict, chunk_size, memory_budget, mode: Precision, *, traced: bool = False
) -> tuple[Chunks, Any, int]:
    """(chunks, compiled program (unused when traced), its estimated bytes) for these arguments,
    under precision `mode` (call inside its context).

    A fixed chunk_size is compiled as given (and refused if XLA's estimate exceeds free memory);
    "auto" searches with chunking.choose. Traced calls may be differentiated: their budget is a
    third of the free memory (the backward pass rematerialises a chunk and keeps its cotangents).
    """
    chunking.check_memory_budget(memory_budget)
    if traced and chunk_size != "auto":
        return Chunks(chunk_size), None, 0
    accelerator = jax.default_backend() != "cpu"
    if traced and not accelerator:
        return Chunks(1), None, 0
    key = plan_key(args, static, chunk_size, memory_budget, mode, traced)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    lower_with = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args) if traced else args
    )

    def compile_at(chunks: Chunks):
        compiled = _jitted_program.lower(*lower_with, chunks=chunks, **static).compile()
        return compiled, chunking.footprint(compiled)

    def floor_at(chunks: Chunks) -> int:
        return chunking.jaxpr_floor(_jitted_program.trace(*lower_with, chunks=chunks, **static).jaxpr)

    n, m = args[3].shape[1], checks.leading_axis("evals", args[2])
    if chunk_size == "auto":
        budget = chunking.budget_bytes(memory_budget)
        result = chunking.choose(
            compile_at,
            n,
            m,
            budget=budget // 3 if traced else budget,
            accelerator=accelerator,
            floor_at=floor_at if accelerator else None,
        )
    else:
        compiled, (nbytes, _) = compile_at(Chunks(chunk_size))
        free = chunking.free_bytes() if accelerator else None
        if accelerator and nbytes > free:
            raise chunking.MemoryBudgetError(
                f"chunk_size={chunk_size} needs an estimated {chunking.gib(nbytes)} (XLA's memory analysis), more than "
                f"the {chunking.gib(free)} free on {jax.devices()[0].device_kind}; "
                "pass a smaller chunk_size or chunk_size='auto'"
            )
        result = (Chunks(chunk_size), compiled, nbytes)
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _warn_nonfinite(row_finite: Any) -> None:
    rows = np.flatnonzero(~np.asarray(row_finite))
    if rows.size:
        warnings.warn(
            f"jaxeif.eif: non-finite influence in rows {rows.tolist()[:20]} (diverged fine-tunes)",
            RuntimeWarning,
            stacklevel=3,
        )
