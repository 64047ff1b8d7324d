"""eif_sharded(): the exact EIF with its row axis split over devices (jax.sharding + shard_map).

Rows are independent fine-tunes, so each device computes its own block of rows with the
single-device core and no communication; params and evals are replicated. Multi-host: call
`jax.distributed.initialize()` first on every process; `jax.devices()` then spans all hosts.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeif import checks, influence
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import LossFn, PyTree

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
    lr: jax.Array | float = 1e-3,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | str | None = "auto",
    precision: str = "highest",
    progress: bool = False,
    memory_budget: float | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> jax.Array:
    """`jaxeif.eif` with train rows split evenly over `devices` (default: all): f32[n, m], same values.

    `chunk_size` bounds rows in flight per device ("auto": chosen for one device's share of rows,
    see jaxeif.chunking); `precision` and `progress` as in eif. Rows are padded to a multiple of the
    device count with copies of row 0 (lr 0) and dropped. Raises NonFiniteInfluenceError like eif.
    """
    evals, n, lr = influence.validate(loss_fn, params, train, evals, lr=lr, steps=steps,
                                      optimizer=optimizer, chunk_size=chunk_size, progress=progress)
    progress_lib.check(progress, traced=checks.is_traced((params, train, evals, lr)))
    devices = checks.device_list(devices)
    pad = -n % len(devices)
    lr_rows = jnp.concatenate([jnp.broadcast_to(lr, (n,)), jnp.zeros((pad,), jnp.result_type(lr))])
    mesh = Mesh(np.asarray(devices), (_AXIS,))
    precision = precision_lib.check(precision)
    static = influence.program_static(loss_fn, steps, optimizer, precision, progress)
    with precision_lib.context(precision), progress_lib.bar(n + pad, "eif rows", progress):
        params, train, evals, lr_rows, loss_inputs = precision_lib.cast_inputs(
            precision, (params, train, evals, lr_rows, influence.split_loss(loss_fn)[1]))
        per_device = (n + pad) // len(devices)
        local = jax.tree.map(lambda x: jax.ShapeDtypeStruct((per_device, *np.shape(x)[1:]), jnp.result_type(x)), train)
        local_lrs = jax.ShapeDtypeStruct((1, per_device), jnp.result_type(lr_rows))
        chunks = influence.plan((params, local, evals, local_lrs, loss_inputs), static, chunk_size, memory_budget, precision,
                                traced=True)[0] if chunk_size == "auto" else influence.Chunks(chunk_size)
        run = jax.jit(jax.shard_map(
            lambda tr, r, p, ev, li: influence._program(p, tr, ev, r[None], li, chunks=chunks, **static)[0],
            mesh=mesh, in_specs=(P(_AXIS), P(_AXIS), P(), P(), P()), out_specs=P(_AXIS), check_vma=False))
        rows = NamedSharding(mesh, P(_AXIS))
        train_rows = jax.device_put(_pad_rows(train, pad), rows)
        matrix = influence.result_dtype(run(train_rows, jax.device_put(lr_rows, rows), params, evals, loss_inputs), precision)
        matrix = jax.block_until_ready(matrix)  # inside the bar's lifetime
    if not matrix.is_fully_addressable:  # multi-host: every process gets the whole matrix
        matrix = jnp.asarray(multihost_utils.process_allgather(matrix, tiled=True))
    return influence.report_nonfinite(matrix[:n], lr)
