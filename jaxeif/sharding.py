"""eif_sharded(): the exact EIF with its row axis split over devices (jax.sharding + shard_map).

Rows are independent fine-tunes, so each device computes its own block of rows with the
single-device core and no communication; params and evals are replicated. The program is
jaxeif.multihost's; this function returns the plain f32[n, m] (padding dropped), gathered to every
process when the devices span several (after `jax.distributed.initialize()`). Past one host's
memory use jaxeif.multihost.eif_rows or jaxeif.store.fill_spmd, which never gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxeif import checks, chunking, influence, multihost
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision


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
    """`jaxeif.eif` with the train rows split evenly over `devices`: the same values and gradients.

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
        MemoryBudgetError: across processes, when the whole matrix would take more than half the host's
            free memory (use jaxeif.multihost.eif_rows or jaxeif.store.fill_spmd, which never gather).
    """
    matrix, lr_rows, n = multihost.sharded_rows(
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
        progress=progress,
    )
    if not checks.is_traced(matrix) and not matrix.is_fully_addressable:  # across processes: gather, if it fits
        need = matrix.size * matrix.dtype.itemsize
        # the least free memory of any process: all of them refuse, or none (one refusing alone would hang the rest)
        # (in MiB as float32: without jax_enable_x64 an int64 byte count would wrap in int32)
        free_mib = multihost_utils.process_allgather(np.float32(chunking.host_free_bytes() / 2**20))
        free = int(float(np.min(free_mib)) * 2**20)
        if need > free // 2:
            raise chunking.MemoryBudgetError(
                f"eif_sharded gathers the whole {list(matrix.shape)} matrix ({chunking.gib(need)}) to every process, "
                f"over half the {chunking.gib(free)} free on this host; use jaxeif.multihost.eif_rows (rows stay "
                "on the devices that computed them) or jaxeif.store.fill_spmd (each process writes its own tiles)"
            )
        matrix = jnp.asarray(multihost_utils.process_allgather(matrix, tiled=True))
    return influence.report_nonfinite(matrix[:n], lr_rows[:n])
