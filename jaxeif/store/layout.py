"""The store folder: its tile grid, manifest and Store (read, check and write one tile), created or
opened atomically; the folder layout is in jaxeif.store's docstring."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxeif import fingerprint, io
from jaxeif import precision as precision_lib
from jaxeif.errors import Error
from jaxeif.precision import Precision

FORMAT = "jaxeif.store/1"
MANIFEST = "manifest.json"
ARRAY = "eif"
TILES = "tiles"


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
    def marker_path(self, tile: tuple[int, int]) -> pathlib.Path:
        """Where tile (i, j)'s completion marker lives (it may not exist yet)."""
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
        marker = self.marker_path(tile)
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
            return json.loads(self.marker_path((int(tile[0]), int(tile[1]))).read_text())
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
        self.marker_path(tile).unlink(missing_ok=True)
        self._array[r, c].write(values).result()
        checksum = _checksum(values)
        if _checksum(self._read_raw(tile)) != checksum:
            raise StoreError(
                f"tile {tile} read back from {self.path} differs from what was written; "
                "the disk or file system is not keeping data: check it and rerun"
            )
        io.save_json(
            self.marker_path(tile),
            {"tile": list(tile), "rows": [r.start, r.stop], "cols": [c.start, c.stop], "blake2b": checksum, **record},
        )
        return checksum


# ----------------------------------------------------------------------------- create or open


def manifest_for(grid: Grid, dtype: np.dtype, call: dict) -> dict:
    """The manifest of a store of this grid and dtype filled by the call with fingerprint `call`."""
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
    io.fsync_dir(path.parent)


def open_or_create(path: os.PathLike | str, manifest: dict, *, fresh: bool) -> Store:
    """The store at `path` if its manifest is `manifest`, else a new one there (atomically; `fresh` deletes
    an existing store first).

    Raises:
        StoreError: `path` is a file, or a non-empty folder that is no store.
        StoreMismatchError: the store there (or one another worker just created) was made by another call.
    """
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


def check_tile(tile: Any) -> tuple[int, int]:
    """`tile` as (rows, cols), or a StoreError saying what a tile must be."""
    if (
        not isinstance(tile, (tuple, list))
        or len(tile) != 2
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in tile)
    ):
        raise StoreError(f"`tile` must be (rows, cols), two ints >= 1, got {tile!r}")
    return int(tile[0]), int(tile[1])
