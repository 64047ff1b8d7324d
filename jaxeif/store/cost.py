"""A plan on paper: devices x hours, tiles, bytes on disk and peak memory per worker of an n x m store."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxeif.store.layout import Grid, StoreError, check_tile


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
    rows, cols = check_tile(tile)
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
