"""eif_sharded(): the exact EIF with its row axis split over devices (jax.sharding + shard_map).

Rows are independent fine-tunes, so each device computes its own block of rows with the
single-device core and no communication; params and evals are replicated. Multi-host: call
`jax.distributed.initialize()` first on every process; `jax.devices()` then spans all hosts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeif import checks, influence
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision

_AXIS = "rows"


def _pad_rows(tree: PyTree, rows: int) -> PyTree:
    """Append `rows` copies of example 0 to every leaf (padding rows are computed, then dropped)."""
    if rows == 0:
        return tree
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], rows, axis=0)]), tree)


def eif_sharded(
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
    devices: Sequence[jax.Device] | None = None,
) -> jax.Array:
    """`jaxeif.eif` with the train rows split evenly over `devices`: the same values.

    Rows are padded to a multiple of the device count with copies of row 0 (lr 0), computed and
    dropped.

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        precision: the arithmetic, a jaxeif.Precision.
        progress: show a progress bar on stderr.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        chunk_size: rows in flight per device; "auto" is planned for one device's share of rows
            (jaxeif.chunking), as in `jaxeif.eif`.
        devices: the devices to split rows over (None: all of `jax.devices()`, every host's).

    Returns:
        f32[n, m], gathered to every process.

    Raises:
        NonFiniteInfluenceError, MemoryBudgetError, TypeError, ValueError: as in `jaxeif.eif`.
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
    devices = checks.device_list(devices)
    pad = -n % len(devices)
    lr_rows = jnp.concatenate([jnp.broadcast_to(lr, (n,)), jnp.zeros((pad,), jnp.result_type(lr))])
    mesh = Mesh(np.asarray(devices), (_AXIS,))
    static = influence.program_static(loss_fn, steps, optimizer, precision, progress)
    with precision_lib.context(precision), progress_lib.bar(n + pad, "eif rows", progress):
        params, train, evals, lr_rows, loss_inputs = precision_lib.cast_inputs(
            precision, (params, train, evals, lr_rows, influence.split_loss(loss_fn)[1])
        )
        per_device = (n + pad) // len(devices)
        local = jax.tree.map(lambda x: jax.ShapeDtypeStruct((per_device, *np.shape(x)[1:]), jnp.result_type(x)), train)
        local_lrs = jax.ShapeDtypeStruct((1, per_device), jnp.result_type(lr_rows))
        chunks = (
            influence.plan(
                (params, local, evals, local_lrs, loss_inputs),
                static,
                chunk_size,
                memory_budget,
                precision,
                traced=True,
            )[0]
            if chunk_size == "auto"
            else influence.Chunks(chunk_size)
        )
        run = jax.jit(
            jax.shard_map(
                lambda tr, r, p, ev, li: influence._program(p, tr, ev, r[None], li, chunks=chunks, **static)[0],
                mesh=mesh,
                in_specs=(P(_AXIS), P(_AXIS), P(), P(), P()),
                out_specs=P(_AXIS),
                check_vma=False,
            )
        )
        rows = NamedSharding(mesh, P(_AXIS))
        train_rows = jax.device_put(_pad_rows(train, pad), rows)
        matrix = influence.result_dtype(
            run(train_rows, jax.device_put(lr_rows, rows), params, evals, loss_inputs), precision
        )
        matrix = jax.block_until_ready(matrix)  # inside the bar's lifetime
    if not matrix.is_fully_addressable:  # multi-host: every process gets the whole matrix
        matrix = jnp.asarray(multihost_utils.process_allgather(matrix, tiled=True))
    return influence.report_nonfinite(matrix[:n], lr)
