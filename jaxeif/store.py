"""An influence matrix on disk, as a grid of (train block x eval block) tiles filled by any number of workers.

Layout of a store folder (a zarr v2 group: zarr-python 2 and 3, xarray, dask and tensorstore open it
without jaxeif; docs/scale.md shows how):

    PATH/.zgroup, PATH/.zattrs      the zarr group; .zattrs repeats the manifest
    PATH/manifest.json              shape, dtype, tile grid, fingerprint of the call that fills it
    PATH/eif/.zarray                zarr v2 array f[n_train, n_eval], one uncompressed chunk per tile,
    PATH/eif/I.J                    NaN where a tile was never written
    PATH/tiles/I.J.json             tile (I, J) is complete: its checksum, written after its data

Everything is written once, atomically: the folder itself is built under a temp name and renamed
into place (a second worker racing to create it opens the first one's), each chunk is written by
tensorstore (temp file, fsync, rename) and each tile's marker by jaxeif.io.atomic_file, only after
the chunk was read back and its checksum taken. A tile is complete when its marker exists and the
chunk still hashes to the marker's checksum; anything else (no marker, a torn or altered chunk) is
missing, recomputed by `fill` and refused by `Store.read_tile`. No file is written by two
processes except by atomic rename of identical content, so workers need no lock and no coordinator.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxeif import checks, compile_cache, fingerprint, influence, io
from jaxeif import precision as precision_lib
from jaxeif.errors import Error
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision

FORMAT = "jaxeif.store/1"
MANIFEST = "manifest.json"
ARRAY = "eif"
TILES = "tiles"

__all__ = [
    "fill",
    "fill_spmd",
    "open",
    "plan",
    "Plan",
    "Store",
    "Grid",
    "FillResult",
    "StoreError",
    "StoreMismatchError",
    "TileError",
    "worker_share",
    "FORMAT",
]


class StoreError(Error, ValueError):
    """A store folder cannot be used as asked; the message names the folder, the cause and the fix."""


class StoreMismatchError(StoreError):
    """The store was made by another call (other data, loss, lr, ...); the message lists what differs."""


class TileError(StoreError):
    """A tile is missing, torn or altered (its checksum fails): it is never read; `fill` recomputes it."""


# ----------------------------------------------------------------------------- the tile grid


class Grid(NamedTuple):
    """A matrix of shape (n, m) cut into tiles of (rows, cols); edge tiles are smaller."""

    n: int
    m: int
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        """(tile rows, tile columns) of the grid."""
        return math.ceil(self.n / self.rows), math.ceil(self.m / self.cols)

    @property
    def count(self) -> int:
        return self.shape[0] * self.shape[1]

    def tiles(self) -> list[tuple[int, int]]:
        """Every tile (i, j), row-major."""
        return [(i, j) for i in range(self.shape[0]) for j in range(self.shape[1])]

    def bounds(self, tile: tuple[int, int]) -> tuple[slice, slice]:
        """(row slice, column slice) of the matrix that tile (i, j) covers."""
        i, j = tile
        if not (0 <= i < self.shape[0] and 0 <= j < self.shape[1]):
            raise IndexError(f"tile {tile} is outside the {self.shape[0]} x {self.shape[1]} tile grid")
        return (
            slice(i * self.rows, min(self.n, (i + 1) * self.rows)),
            slice(j * self.cols, min(self.m, (j + 1) * self.cols)),
        )

    def share(self, worker: int, workers: int) -> list[tuple[int, int]]:
        """The tiles of `worker` of `workers`: every workers-th tile in row-major order, from the worker-th.

        Fixed by (grid, worker, workers) alone, so independent processes agree without talking;
        interleaving spreads the smaller edge tiles over the workers."""
        return self.tiles()[worker::workers]


def worker_share(worker: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """(worker, workers): the arguments, else SLURM's job array (SLURM_ARRAY_TASK_ID minus
    SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT), else (0, 1).

    Raises:
        StoreError: only one of the two given, or worker outside [0, workers).
    """
    if worker is None and workers is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        try:
            worker = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            workers = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as e:
            raise StoreError(
                f"SLURM_ARRAY_TASK_ID is set but the array is not readable ({e}); run the array as "
                "`sbatch --array=0-K` or pass worker= and workers= explicitly"
            ) from None
    if worker is None and workers is None:
        return 0, 1
    if worker is None or workers is None:
        raise StoreError(f"pass both `worker` and `workers` (got worker={worker!r}, workers={workers!r}), or neither")
    for name, v in (("worker", worker), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise StoreError(f"`{name}` must be an int, got {v!r}")
    if not (workers >= 1 and 0 <= worker < workers):
        raise StoreError(
            f"`worker` must be in [0, workers) and workers >= 1, got worker={worker}, workers={workers}; "
            "number workers 0 .. workers-1"
        )
    return int(worker), int(workers)


# ----------------------------------------------------------------------------- fingerprint of a call


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def call_fingerprint(
    loss_fn, params, train, evals, lr_vec: np.ndarray, *, steps: int, optimizer, precision: Precision
) -> dict:
    """What a tile's values depend on, one digest or value per entry (compared field by field on reuse)."""
    return {
        "loss_fn": fingerprint.digest(loss_fn),
        "params": fingerprint.digest(params),
        "train": fingerprint.digest(train),
        "evals": "train" if evals is None else fingerprint.digest(evals),
        "lr": fingerprint.digest(lr_vec),
        "steps": steps,
        "optimizer": None if optimizer is None else fingerprint.digest(optimizer),
        "precision": precision_lib.name(precision),  # the short name: stable across releases
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "jaxeif")},
    }


# ----------------------------------------------------------------------------- the store


def _chunk_spec(folder: pathlib.Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / ARRAY)}}


def _context():
    import tensorstore as ts  # imported on first use (about 0.25 s)

    return ts.Context({"file_io_sync": True})  # fsync each chunk before its rename: durable before it is marked


def _checksum(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


class Store:
    """A lazy reader (and, for `fill`, writer) of one store folder. Nothing is read until asked."""

    def __init__(self, path: pathlib.Path, manifest: dict):
        import tensorstore as ts

        self.path = path
        self.manifest = manifest
        g = manifest["grid"]
        self.grid = Grid(*manifest["shape"], *g["tile"])
        self.dtype = np.dtype(manifest["dtype"])
        self._array = ts.open(_chunk_spec(path), open=True, context=_context()).result()

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.n, self.grid.m

    def __repr__(self) -> str:
        return (
            f"jaxeif.store.Store({str(self.path)!r}, shape={self.shape}, tile={self.grid.rows}x{self.grid.cols}, "
            f"{len(self.complete())}/{self.grid.count} tiles complete)"
        )

    # -- tiles
    def _marker(self, tile: tuple[int, int]) -> pathlib.Path:
        return self.path / TILES / f"{tile[0]}.{tile[1]}.json"

    def _read_raw(self, tile: tuple[int, int]) -> np.ndarray:
        r, c = self.grid.bounds(tile)
        return np.asarray(self._array[r, c].read().result())

    def marked(self) -> list[tuple[int, int]]:
        """Tiles with a completion marker (their data is not checked: see `complete`)."""
        out = []
        for f in (self.path / TILES).glob("*.json"):
            with contextlib.suppress(ValueError):
                out.append(tuple(int(x) for x in f.name[:-5].split(".")))
        return sorted(t for t in out if len(t) == 2)

    def check(self, tile: tuple[int, int]) -> np.ndarray:
        """The values of a complete tile, f[rows, cols], after checking them against its marker's checksum.

        Raises:
            TileError: the tile has no marker (never finished), its chunk cannot be decoded (torn),
                or its bytes do not hash to the recorded checksum (altered). `fill` recomputes such tiles.
        """
        tile = (int(tile[0]), int(tile[1]))
        marker = self._marker(tile)
        self.grid.bounds(tile)
        try:
            record = json.loads(marker.read_text())
        except FileNotFoundError:
            raise TileError(
                f"tile {tile} of {self.path} is not complete (no {TILES}/{marker.name}); "
                "run jaxeif.store.fill on this store to compute it"
            ) from None
        except ValueError as e:
            raise TileError(f"tile {tile}'s marker {marker} is unreadable ({e}); delete it and rerun fill") from None
        try:
            values = self._read_raw(tile)
        except Exception as e:  # tensorstore raises ValueError subclasses of its own for torn chunks
            raise TileError(
                f"tile {tile} of {self.path} cannot be decoded ({type(e).__name__}: {e}); "
                "it was torn: rerun jaxeif.store.fill, which recomputes it"
            ) from None
        if _checksum(values) != record.get("blake2b"):
            raise TileError(
                f"tile {tile} of {self.path} does not match its recorded checksum (altered or torn "
                f"chunk {ARRAY}/{tile[0]}.{tile[1]}); rerun jaxeif.store.fill, which recomputes it"
            )
        return values

    read_tile = check

    def record(self, tile: tuple[int, int]) -> dict | None:
        """What the tile's marker records (checksum, worker or process, host, backend, seconds), or None
        when the tile has no readable marker."""
        try:
            return json.loads(self._marker((int(tile[0]), int(tile[1]))).read_text())
        except (OSError, ValueError):
            return None

    def complete(self) -> list[tuple[int, int]]:
        """Tiles with a marker (cheap; `verify` also checks their data)."""
        return self.marked()

    def missing(self) -> list[tuple[int, int]]:
        """Tiles without a marker."""
        done = set(self.marked())
        return [t for t in self.grid.tiles() if t not in done]

    def verify(self) -> dict[tuple[int, int], str]:
        """Every marked tile whose data fails its checksum, with the reason (empty: all marked tiles are intact)."""
        bad = {}
        for t in self.marked():
            try:
                self.check(t)
            except TileError as e:
                bad[t] = str(e)
        return bad

    def iter_tiles(
        self,
        tiles: Sequence[tuple[int, int]] | None = None,
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """((i, j), checked values) for `tiles` (default: the whole grid, row-major), one tile in memory at a time.

        Raises:
            TileError: on the first tile that is not complete and intact.
        """
        for t in self.grid.tiles() if tiles is None else tiles:
            yield t, self.check(t)

    def to_numpy(self, *, max_bytes: float | None = 2**31) -> np.ndarray:
        """The whole matrix f[n, m], every tile checked.

        Raises:
            StoreError: the matrix is larger than `max_bytes` (stream it with `iter_tiles` or
                jaxeif.streaming instead, or raise max_bytes).
            TileError: a tile is not complete and intact.
        """
        nbytes = self.grid.n * self.grid.m * self.dtype.itemsize
        if max_bytes is not None and nbytes > max_bytes:
            raise StoreError(
                f"the {self.grid.n} x {self.grid.m} matrix takes {nbytes / 2**30:.2f} GiB, over "
                f"max_bytes={max_bytes:.3g}; read it tile by tile (Store.iter_tiles, jaxeif.streaming) "
                "or pass a larger max_bytes"
            )
        missing = self.missing()
        if missing:
            raise TileError(
                f"{len(missing)} of {self.grid.count} tiles of {self.path} are not complete "
                f"(first {missing[:4]}); run jaxeif.store.fill for every worker first"
            )
        out = np.empty(self.shape, self.dtype)
        for t, values in self.iter_tiles():
            out[self.grid.bounds(t)] = values
        return out

    def write_tile(self, tile: tuple[int, int], values: np.ndarray, **record: Any) -> str:
        """Write a tile's values, make them durable, read them back, then mark the tile complete.

        Returns its checksum. Safe against a kill at any point: without the marker the tile counts as
        missing, and the marker is only written (atomically) once the chunk on disk hashes right."""
        r, c = self.grid.bounds(tile)
        values = np.asarray(values)
        if values.shape != (r.stop - r.start, c.stop - c.start):
            raise StoreError(
                f"tile {tile} takes values of shape {(r.stop - r.start, c.stop - c.start)}, got {values.shape}"
            )
        if not np.can_cast(values.dtype, self.dtype, "safe"):
            raise StoreError(
                f"tile {tile} has dtype {values.dtype}, which the store's {self.dtype} would round; "
                "fill a new store (the dtype follows the params' dtype)"
            )
        values = values.astype(self.dtype)
        self._marker(tile).unlink(missing_ok=True)
        self._array[r, c].write(values).result()
        checksum = _checksum(values)
        if _checksum(self._read_raw(tile)) != checksum:
            raise StoreError(
                f"tile {tile} read back from {self.path} differs from what was written; "
                "the disk or file system is not keeping data: check it and rerun"
            )
        io.save_json(
            self._marker(tile),
            {"tile": list(tile), "rows": [r.start, r.stop], "cols": [c.start, c.stop], "blake2b": checksum, **record},
        )
        return checksum


# ----------------------------------------------------------------------------- create or open


def _manifest(grid: Grid, dtype: np.dtype, call: dict) -> dict:
    return {
        "format": FORMAT,
        "shape": [grid.n, grid.m],
        "dtype": dtype.str,
        "grid": {
            "tile": [grid.rows, grid.cols],
            "tiles": list(grid.shape),
            "order": "row-major",
            "assignment": "worker w of k takes tiles[w::k] in row-major order",
        },
        "array": ARRAY,
        "tiles_complete": f"{TILES}/I.J.json exists and the chunk {ARRAY}/I.J hashes to its blake2b (of the tile's "
        "C-order values, edge tiles unpadded)",
        "fingerprint": call,
    }


def _read_manifest(path: pathlib.Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(
            f"{path / MANIFEST} cannot be read ({e}); the store is damaged: pass a new path, "
            "or fresh=True to start it over"
        ) from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path} holds a store of format {manifest.get('format')!r}, not {FORMAT!r}; pass a new path")
    return manifest


def _differences(saved: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(saved) | set(new)):
            out += _differences(saved.get(k), new.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if saved == new else [f"{where} ({saved!r} saved, {new!r} now)"]


def _create(path: pathlib.Path, manifest: dict) -> None:
    """Build the store under a temp name beside `path` and rename it into place (atomic: a worker that
    loses the race finds the winner's store); `path` may be missing or an empty folder."""
    import tensorstore as ts

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        n, m = manifest["shape"]
        ts.open(
            {
                **_chunk_spec(tmp),
                "metadata": {
                    "shape": [n, m],
                    "chunks": manifest["grid"]["tile"],
                    "dtype": manifest["dtype"],
                    "compressor": None,
                    "fill_value": "NaN",
                    "order": "C",
                    "dimension_separator": ".",
                },
            },
            create=True,
            context=_context(),
        ).result()
        io.save_json(tmp / ".zgroup", {"zarr_format": 2})
        io.save_json(tmp / ".zattrs", {"jaxeif": manifest})
        io.save_json(tmp / ARRAY / ".zattrs", {"_ARRAY_DIMENSIONS": ["train", "eval"]})  # xarray's dimension names
        (tmp / TILES).mkdir()
        io.save_json(tmp / MANIFEST, manifest)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    io._fsync_dir(path.parent)


def _open_or_create(path: os.PathLike | str, manifest: dict, *, fresh: bool) -> Store:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise StoreError(f"`path` must be a folder path, got {path!r}")
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise StoreError(f"store path {path} is an existing file; pass a folder path")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).exists():
            raise StoreError(f"{path} is not empty and holds no {MANIFEST}: it is not a jaxeif store; pass a new path")
        saved = _read_manifest(path)
        if fresh:
            shutil.rmtree(path)
        else:
            diff = _differences(saved, manifest)
            if diff:
                raise StoreMismatchError(
                    f"the store at {path} was filled by another call; differs in: {'; '.join(diff)}. "
                    "Pass a new path for this call, or fresh=True to delete that store and start over"
                )
            return Store(path, saved)
    _create(path, manifest)
    saved = _read_manifest(path)
    diff = _differences(saved, manifest)
    if diff:  # another worker created it first, from another call
        raise StoreMismatchError(
            f"the store at {path} was just created by another call; differs in: "
            f"{'; '.join(diff)}. Start every worker with the same call, or pass a new path"
        )
    return Store(path, saved)


def open(path: os.PathLike | str) -> Store:  # noqa: A001  (jaxeif.store.open, as in zarr.open / tensorstore.open)
    """The store at `path`, for reading (lazy: tiles are read and checked on demand).

    Raises:
        StoreError: `path` holds no jaxeif store.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not (path / MANIFEST).exists():
        raise StoreError(f"{path} holds no jaxeif store ({MANIFEST} missing); fill one with jaxeif.store.fill")
    return Store(path, _read_manifest(path))


# ----------------------------------------------------------------------------- fill


class FillResult(NamedTuple):
    """What one `fill` call did: the store, and the tiles it computed, found complete, or recomputed
    because their data failed the checksum (each a list of (i, j))."""

    store: Store
    computed: list
    reused: list
    repaired: list


def _check_tile(tile: Any) -> tuple[int, int]:
    if (
        not isinstance(tile, (tuple, list))
        or len(tile) != 2
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in tile)
    ):
        raise StoreError(f"`tile` must be (rows, cols), two ints >= 1, got {tile!r}")
    return int(tile[0]), int(tile[1])


def _dtype(params: PyTree) -> np.dtype:
    """float64 if any parameter is float64 (the EIF comes out in float64), else float32."""
    leaves = [np.dtype(jax.numpy.result_type(x)) for x in jax.tree.leaves(params)]
    return np.dtype(np.float64) if any(d == np.float64 for d in leaves) else np.dtype(np.float32)


def _take(tree: PyTree, rows: slice) -> PyTree:
    return jax.tree.map(lambda x: x[rows], tree)


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
    rows, cols = _check_tile(tile)
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
    store = _open_or_create(path, _manifest(grid, _dtype(params), call), fresh=fresh)
    computed, reused, repaired = [], [], []
    compile_cache.enable()
    for t in grid.share(worker, workers):
        if store._marker(t).exists():
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
            _take(train, r),
            _take(evals_, c),
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
    store = _open_or_create(path, _manifest(grid, _dtype(params), call), fresh=False)
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
                _take(evals_, c),
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


# ----------------------------------------------------------------------------- a plan on paper


class Plan(NamedTuple):
    """What filling an n x m store costs, from a measured rate (see `plan`)."""

    n: int
    m: int
    pairs: int
    pairs_per_second: float  # per device
    devices: int
    device_hours: float
    hours: float  # wall clock with `devices` devices busy in parallel
    tile: tuple[int, int]
    tiles: int
    seconds_per_tile: float  # on one device
    bytes_on_disk: int  # the matrix (uncompressed zarr chunks, edge chunks padded) and the tile markers
    tile_bytes: int
    peak_bytes_per_worker: int | None  # program_bytes + a tile's values and their read-back copy

    def __str__(self) -> str:
        peak = "n/a (pass program_bytes)" if self.peak_bytes_per_worker is None else _size(self.peak_bytes_per_worker)
        return (
            f"{self.n:,} x {self.m:,} = {self.pairs:.3g} pairs at {self.pairs_per_second:.3g} pairs/s per device: "
            f"{self.device_hours:.3g} device-hours = {self.hours:.3g} h on {self.devices} devices; "
            f"{self.tiles:,} tiles of {self.tile[0]:,} x {self.tile[1]:,} ({_size(self.tile_bytes)}, "
            f"{self.seconds_per_tile:.3g} s each); {_size(self.bytes_on_disk)} on disk; peak per worker {peak}"
        )


def _size(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


MARKER_BYTES = 400  # a tile's completion record (JSON), about


def plan(
    n: int,
    m: int | None = None,
    *,
    pairs_per_second: float,
    devices: int = 1,
    tile: tuple[int, int] = (4096, 4096),
    itemsize: int = 4,
    program_bytes: int | None = None,
) -> Plan:
    """Devices x hours, tiles, bytes on disk and peak memory per worker of an n x m store, on paper.

    Args:
        n: train rows.
        m: eval columns (defaults to n).
        pairs_per_second: a measured rate of one device (e.g. n*m / seconds of a warm jaxeif.eif call
            with m at least the tile's columns; the fine-tune of a row is redone once per column block).
        devices: devices (or worker processes) filling the store at once.
        tile: (rows, cols) of a tile.
        itemsize: bytes per entry (4: float32).
        program_bytes: the EIF program's peak on one tile, from XLA (jaxeif.chunk_plan(...)[1] on a
            tile-sized call); None leaves the peak per worker out.

    Returns:
        Plan (print it for one line).
    """
    m = n if m is None else m
    for name, v in (("n", n), ("m", m), ("devices", devices), ("itemsize", itemsize)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise StoreError(f"`{name}` must be an int >= 1, got {v!r}")
    if not (isinstance(pairs_per_second, (int, float)) and pairs_per_second > 0):
        raise StoreError(f"`pairs_per_second` must be a positive measured rate, got {pairs_per_second!r}")
    rows, cols = _check_tile(tile)
    grid = Grid(n, m, min(rows, n), min(cols, m))
    pairs = n * m
    tile_bytes = grid.rows * grid.cols * itemsize
    device_hours = pairs / pairs_per_second / 3600
    return Plan(
        n=n,
        m=m,
        pairs=pairs,
        pairs_per_second=float(pairs_per_second),
        devices=devices,
        device_hours=device_hours,
        hours=device_hours / devices * math.ceil(grid.count / devices) / (grid.count / devices),
        tile=(grid.rows, grid.cols),
        tiles=grid.count,
        seconds_per_tile=grid.rows * grid.cols / pairs_per_second,
        bytes_on_disk=grid.count * (tile_bytes + MARKER_BYTES),
        tile_bytes=tile_bytes,
        peak_bytes_per_worker=None if program_bytes is None else int(program_bytes) + 2 * tile_bytes,
    )
