"""Filling a store: `fill` (independent workers, each a fixed share of tiles) and `fill_spmd` (one SPMD
program over every device of every process, each process writing the tiles its devices computed)."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import optax

from jaxeif import checks, compile_cache, influence
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision
from jaxeif.store.layout import (
    Grid,
    Store,
    StoreError,
    TileError,
    call_fingerprint,
    check_tile,
    manifest_for,
    open_or_create,
    worker_share,
)

# ----------------------------------------------------------------------------- fill


class FillResult(NamedTuple):
    """What one `fill` call did: the store, and the tiles it computed, found complete, or recomputed
    because their data failed the checksum (each a list of (i, j))."""

    store: Store
    computed: list
    reused: list
    repaired: list


def _dtype(params: PyTree) -> np.dtype:
    """float64 if any parameter is float64 (the EIF comes out in float64), else float32."""
    leaves = [np.dtype(jax.numpy.result_type(x)) for x in jax.tree.leaves(params)]
    return np.dtype(np.float64) if any(d == np.float64 for d in leaves) else np.dtype(np.float32)


def _checked_call(
    loss_fn,
    params,
    train,
    evals,
    *,
    tile,
    lr,
    steps,
    optimizer,
    chunk_size,
    progress,
    precision,
    memory_budget,
    traced: str,
):
    """The checked arguments of a fill: (evals, lr f[n], Precision, the tile Grid, the call's fingerprint).

    A traced lr (the fill under jit/grad) is a StoreError with the message `traced`: a fill writes files."""
    rows, cols = check_tile(tile)
    checked_evals, n, lr_arr, precision = influence.validate(
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
    if checks.is_traced(lr_arr):
        raise StoreError(traced)
    m = checks.leading_axis("evals", checked_evals)
    lr_vec = np.broadcast_to(np.asarray(lr_arr), (n,))
    grid = Grid(n, m, min(rows, n), min(cols, m))
    call = call_fingerprint(
        loss_fn, params, train, evals, lr_vec, steps=steps, optimizer=optimizer, precision=precision
    )
    return checked_evals, lr_vec, precision, grid, call


def fill(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float,
    path: os.PathLike | str,
    tile: tuple[int, int],
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    memory_budget: float | None = None,
    worker: int | None = None,
    workers: int | None = None,
    fresh: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> FillResult:
    """Compute this worker's share of the tiles of `jaxeif.eif(loss_fn, params, train, evals, lr=lr, ...)`
    into the store at `path`, skipping tiles already complete.

    Tile (i, j) holds M[i*rows:(i+1)*rows, j*cols:(j+1)*cols], computed by jaxeif.eif on those train
    rows and eval columns alone. Rows are independent fine-tunes, so with cols >= n_eval the store is
    bit-identical to one whole-matrix call on the same backend; a column block is bit-identical to
    jaxeif.eif on that block, and equal to the whole call to float32 rounding of the losses (XLA
    rounds an eval's loss differently with the number of evals batched beside it). Any number of processes may fill
    one store at once, each with its own `worker` of `workers` (or SLURM_ARRAY_TASK_ID/COUNT): the
    split is fixed, a killed worker loses only the tile it was computing, and a rerun does only what
    is missing or fails its checksum (with a warning).

    `loss_fn`, `params`, `train`, `evals`, `lr`, `steps`, `optimizer`, `chunk_size`, `precision` and
    `memory_budget` are jaxeif.eif's (lr a scalar or f[n_train]); chunk_size and memory_budget do not
    enter the manifest.

    Args:
        path: the store folder (created if missing or empty).
        tile: (rows, cols) of a tile; the zarr chunk shape.
        worker: this process's index in the split (see `worker_share`); default 0.
        workers: how many processes share the tiles; default 1 (all tiles).
        fresh: delete an existing store at `path` first (single process only).
        verify: before skipping a tile that has a marker, read it and check its checksum (a restart
            then reads this worker's finished share once); False trusts the markers.
        progress: print one line per finished tile.

    Returns:
        FillResult(store, computed, reused, repaired).

    Raises:
        StoreMismatchError: the store at `path` was made by a different call (names the fields).
        StoreError: bad path, tile or worker arguments.
        NonFiniteInfluenceError: as jaxeif.eif, for the tile where a fine-tune diverged.
    """
    worker, workers = worker_share(worker, workers)
    for name, flag in (("fresh", fresh), ("verify", verify)):
        if not isinstance(flag, bool):
            raise StoreError(f"`{name}` must be True or False, got {flag!r}")
    if fresh and workers > 1:
        raise StoreError(
            "fresh=True deletes the store, which the other workers are filling; delete it once "
            "before starting them, or give every worker a new path"
        )
    evals_, lr_vec, precision, grid, call = _checked_call(
        loss_fn,
        params,
        train,
        evals,
        tile=tile,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        progress=progress,
        precision=precision,
        memory_budget=memory_budget,
        traced=(
            "jaxeif.store.fill writes files and cannot be traced (jit/grad); call jaxeif.eif inside "
            "the transformation instead"
        ),
    )
    store = open_or_create(path, manifest_for(grid, _dtype(params), call), fresh=fresh)
    computed, reused, repaired = [], [], []
    compile_cache.enable()
    for t in grid.share(worker, workers):
        if store.marker_path(t).exists():
            try:
                if verify:
                    store.check(t)
                reused.append(t)
                continue
            except TileError as e:
                warnings.warn(f"jaxeif.store: {e}; recomputing it", RuntimeWarning, stacklevel=2)
                repaired.append(t)
        r, c = grid.bounds(t)
        start = time.perf_counter()
        values = influence.eif(
            loss_fn,
            params,
            checks.take(train, r),
            checks.take(evals_, c),
            lr=lr_vec[r],
            steps=steps,
            optimizer=optimizer,
            chunk_size=chunk_size,
            precision=precision,
            memory_budget=memory_budget,
        )
        seconds = time.perf_counter() - start
        store.write_tile(
            t,
            np.asarray(values),
            worker=worker,
            workers=workers,
            seconds=round(seconds, 4),
            host=socket.gethostname(),
            backend=jax.default_backend(),
        )
        if t not in repaired:
            computed.append(t)
        if progress:
            print(
                f"jaxeif.store: worker {worker}/{workers} tile {t} ({r.stop - r.start}x{c.stop - c.start}) "
                f"in {seconds:.2f} s",
                flush=True,
            )
    return FillResult(store, computed, reused, repaired)


# ----------------------------------------------------------------------------- one SPMD program over many hosts


def fill_spmd(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float,
    path: os.PathLike | str,
    tile: tuple[int, int],
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    memory_budget: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    verify: bool = True,
    progress: bool = False,
) -> FillResult:
    """Fill the store with one SPMD program: every process calls this with the same arguments (after
    `jax.distributed.initialize()`), rows are sharded over every device of every process, and each
    process writes only the tiles its own devices computed. Nothing gathers the matrix.

    One step computes one tile row block per device (devices x tile rows train rows) against one
    column block of evals, with jaxeif.multihost.eif_rows. Process 0 decides which tiles are missing
    (checksums checked) and broadcasts that, so every process runs the same steps; a step whose tiles
    are all complete is skipped. Values: as in `fill` (with cols >= n_eval, bit-identical to
    jaxeif.eif on the same backend).

    The other arguments are `fill`'s, without worker/workers/fresh.

    Args:
        devices: the global devices to use (default all).
        verify: process 0 reads and checks every marked tile first (False trusts the markers).

    Returns:
        FillResult of this process's tiles (the store, computed, reused; repaired: tiles whose data
        failed the checksum, recomputed).

    Raises:
        StoreMismatchError, StoreError: as `fill`.
        NonFiniteInfluenceError: a tile computed on this process diverged.
    """
    from jax.experimental import multihost_utils

    from jaxeif import multihost

    evals_, lr_vec, precision, grid, call = _checked_call(
        loss_fn,
        params,
        train,
        evals,
        tile=tile,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        progress=progress,
        precision=precision,
        memory_budget=memory_budget,
        traced="jaxeif.store.fill_spmd writes files and cannot be traced; use jaxeif.multihost.eif_rows",
    )
    mesh_ = multihost.mesh(devices)
    devices_ = list(mesh_.devices.flat)
    if not isinstance(verify, bool):
        raise StoreError(f"`verify` must be True or False, got {verify!r}")
    compile_cache.enable()
    store = open_or_create(path, manifest_for(grid, _dtype(params), call), fresh=False)
    # Process 0's view of what is missing, for everyone: all processes must run the same steps.
    status = np.zeros(grid.shape, np.int32)  # 0 missing, 1 complete, 2 damaged
    if jax.process_index() == 0:
        for t in store.marked():
            try:
                if verify:
                    store.check(t)
                status[t] = 1
            except TileError as e:
                warnings.warn(f"jaxeif.store: {e}; recomputing it", RuntimeWarning, stacklevel=2)
                status[t] = 2
    status = np.asarray(multihost_utils.broadcast_one_to_all(status))
    local = {d: k for k, d in enumerate(devices_) if d.process_index == jax.process_index()}
    computed, reused, repaired = [], [], []
    n_dev = len(devices_)
    for first in range(0, grid.shape[0], n_dev):
        tile_rows = list(range(first, min(first + n_dev, grid.shape[0])))
        # device k takes tile row first + k, padded to `rows` rows (row 0 at lr 0), or nothing past the grid
        idx = np.zeros(n_dev * grid.rows, np.int64)
        lrs = np.zeros(n_dev * grid.rows, lr_vec.dtype)
        for k, i in enumerate(tile_rows):
            r = grid.bounds((i, 0))[0]
            idx[k * grid.rows : k * grid.rows + r.stop - r.start] = np.arange(r.start, r.stop)
            lrs[k * grid.rows : k * grid.rows + r.stop - r.start] = lr_vec[r]
        batch = jax.tree.map(lambda x, idx=idx: np.asarray(x)[idx], train)
        for j in range(grid.shape[1]):
            mine = [(i, j) for i in tile_rows if devices_[i - first] in local]
            for t in mine:
                if status[t] == 1:
                    reused.append(t)
            if all(status[i, j] == 1 for i in tile_rows):
                continue
            c = grid.bounds((0, j))[1]
            start = time.perf_counter()
            block = multihost.eif_rows(
                loss_fn,
                params,
                batch,
                checks.take(evals_, c),
                lr=lrs,
                steps=steps,
                optimizer=optimizer,
                chunk_size=chunk_size,
                precision=precision,
                memory_budget=memory_budget,
                devices=devices_,
            )
            seconds = time.perf_counter() - start
            for shard in block.addressable_shards:
                i = first + (shard.index[0].start or 0) // grid.rows
                if i not in tile_rows or status[i, j] == 1:
                    continue
                r = grid.bounds((i, j))[0]
                values = np.asarray(shard.data)[: r.stop - r.start]
                store.write_tile(
                    (i, j),
                    values,
                    process=jax.process_index(),
                    processes=jax.process_count(),
                    device=str(shard.device),
                    seconds=round(seconds, 4),
                    host=socket.gethostname(),
                    backend=jax.default_backend(),
                )
                (repaired if status[i, j] == 2 else computed).append((i, j))
                if progress:
                    print(
                        f"jaxeif.store: process {jax.process_index()} device {shard.device} tile {(i, j)} "
                        f"in {seconds:.2f} s",
                        flush=True,
                    )
    # Return only once every process has written its tiles: the store is whole on return, everywhere,
    # and a next call's process 0 does not read the markers while another process still writes them.
    multihost_utils.sync_global_devices("jaxeif.store.fill_spmd: every tile written")
    return FillResult(store, computed, reused, repaired)
