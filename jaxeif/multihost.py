"""One SPMD program over every device of every process: eif rows sharded over a global mesh, never gathered.

After `jax.distributed.initialize()` on every process, `jax.devices()` lists the devices of all of
them. `eif_rows` splits the train rows over those devices (shard_map over a 1-d mesh; params and
evals replicated) and returns the global, row-sharded matrix: each process holds only the rows its
own devices computed (`.addressable_shards`). It is differentiable like jaxeif.eif (a meta-gradient
flows back through every device's rows). `jaxeif.store.fill_spmd` writes each process's tiles of it.
Every process must make the same calls with the same arguments (SPMD).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeif import checks, influence
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision

AXIS = "rows"


def mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-d mesh named "rows" over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(checks.device_list(devices)), (AXIS,))


@functools.lru_cache(maxsize=16)
def _runner(mesh_: Mesh, chunks, static_items: tuple):
    static = dict(static_items)
    return jax.jit(
        jax.shard_map(
            lambda tr, r, p, ev, li: influence.program(p, tr, ev, r[None], li, chunks=chunks, **static)[0],
            mesh=mesh_,
            in_specs=(P(AXIS), P(AXIS), P(), P(), P()),
            out_specs=P(AXIS),
            check_vma=False,
        )
    )


def padded_rows(n: int, devices: int) -> int:
    """Rows of `eif_rows`'s result: n rounded up to a multiple of the device count."""
    return n + (-n % devices)


def eif_rows(
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
    memory_budget: float | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> jax.Array:
    """jaxeif.eif with its rows sharded over `devices` (default: all, across processes), left sharded.

    Rows are padded to a multiple of the device count with copies of row 0 at lr 0 (their influence
    is 0; slice `[:n]` inside your jitted objective, or ignore them). Each device runs jaxeif.eif's own
    per-row program on its rows, so row r is bit-identical to row r of jaxeif.eif on the same backend.

    The other arguments are jaxeif.eif's.

    Args:
        devices: the devices to spread rows over (all of every process by default).

    Returns:
        f32[padded_rows(n, devices), m], sharded over rows (NamedSharding(mesh, P("rows"))); across
        processes it is not fully addressable: read `.addressable_shards`, nothing is gathered.

    Raises:
        NonFiniteInfluenceError: a fine-tune computed on this process diverged (a warning when traced).
    """
    matrix, lr_rows, n = sharded_rows(
        loss_fn,
        params,
        train,
        evals,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        memory_budget=memory_budget,
        devices=devices,
    )
    if checks.is_traced(matrix):
        return influence.report_nonfinite(matrix, lr_rows)
    for shard in matrix.addressable_shards:
        block = np.asarray(shard.data)
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            first = shard.index[0].start or 0
            rows_bad = (first + bad)[first + bad < n]
            if rows_bad.size:
                raise checks.NonFiniteInfluenceError(
                    f"{rows_bad.size} fine-tunes on this process diverged (non-finite influence) in rows "
                    f"{rows_bad.tolist()[:20]}; lower lr or steps for those samples",
                    rows_bad,
                    block,
                )
    return matrix


def sharded_rows(
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
    memory_budget: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
) -> tuple[jax.Array, jax.Array, int]:
    """The program of `eif_rows` (and jaxeif.sharding.eif_sharded), unchecked for diverged rows.

    Args: as `eif_rows`; progress: a bar of rows (padding included) on stderr.

    Returns:
        (the row-sharded f32[padded, m] matrix, f[padded] its rows' learning rates (0 for padding), n).
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
    progress_lib.check(progress, traced=checks.is_traced((params, train, evals, lr)))
    mesh_ = mesh(devices)
    d = mesh_.devices.size
    pad = padded_rows(n, d) - n
    lr_rows = jnp.concatenate([jnp.broadcast_to(lr, (n,)), jnp.zeros((pad,), jnp.result_type(lr))])
    static = influence.program_static(loss_fn, steps, optimizer, precision, progress)
    with precision_lib.context(precision), progress_lib.bar(n + pad, "eif rows", progress):
        params, train, evals, lr_rows, loss_inputs = precision_lib.cast_inputs(
            precision, (params, train, evals, lr_rows, influence.split_loss(loss_fn)[1])
        )
        per_device = (n + pad) // d
        if chunk_size == "auto":  # planned for one device's share of the rows
            local = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((per_device, *np.shape(x)[1:]), jnp.result_type(x)), train
            )
            local_lrs = jax.ShapeDtypeStruct((1, per_device), jnp.result_type(lr_rows))
            chunks = influence.plan(
                (params, local, evals, local_lrs, loss_inputs),
                static,
                chunk_size,
                memory_budget,
                precision,
                traced=True,
            )[0]
        else:
            chunks = influence.Chunks(chunk_size)
        rows = NamedSharding(mesh_, P(AXIS))
        train_rows = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x, train)
        run = _runner(mesh_, chunks, tuple(static.items()))
        matrix = influence.result_dtype(
            run(jax.device_put(train_rows, rows), jax.device_put(lr_rows, rows), params, evals, loss_inputs), precision
        )
        if not checks.is_traced(matrix):
            matrix = jax.block_until_ready(matrix)  # inside the bar's lifetime
    return matrix, lr_rows, n
