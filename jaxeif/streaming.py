"""The study metrics of jaxeif.desiderata, computed tile by tile from a jaxeif.store: never more than two
tiles (a tile and its mirror across the diagonal) plus O(n + k m) running state in memory.

Every sum is accumulated in float64 in one pass, so the results equal the in-memory float32 metrics
to float32 rounding. Symmetric metrics pair tile (I, J) with tile (J, I); they need a square matrix
cut into square tiles (rows == cols), which is what a train-vs-train store is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxeif.store import Store, StoreError

__all__ = ["summarize", "Summary", "top_k"]


class _Moments:
    """Running sums for a masked Pearson correlation of (x, y) pairs."""

    def __init__(self):
        self.count = self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> None:
        x, y = x[mask].astype(np.float64), y[mask].astype(np.float64)
        self.count += x.size
        self.sx += x.sum()
        self.sy += y.sum()
        self.sxx += (x * x).sum()
        self.syy += (y * y).sum()
        self.sxy += (x * y).sum()

    def corr(self) -> float:
        if self.count == 0:
            return float("nan")
        cov = self.sxy - self.sx * self.sy / self.count
        vx = self.sxx - self.sx**2 / self.count
        vy = self.syy - self.sy**2 / self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(cov / np.sqrt(vx * vy))


class _TopK:
    """Per column, the k largest (or smallest) entries seen so far and their rows."""

    def __init__(self, k: int, m: int, largest: bool):
        self.k, self.sign = k, (1.0 if largest else -1.0)
        self.values = np.full((k, m), -np.inf)  # sign * value, f64[k, m]; -inf until k rows were seen
        self.rows = np.full((k, m), -1, np.int64)

    def add(self, block: np.ndarray, first_row: int, cols: slice) -> None:
        vals = np.concatenate([self.values[:, cols], self.sign * block.astype(np.float64)])
        rows = np.concatenate(
            [
                self.rows[:, cols],
                np.broadcast_to(np.arange(first_row, first_row + block.shape[0])[:, None], block.shape),
            ]
        )
        keep = np.argsort(-vals, axis=0, kind="stable")[: self.k]  # earlier rows win ties
        self.values[:, cols] = np.take_along_axis(vals, keep, 0)
        self.rows[:, cols] = np.take_along_axis(rows, keep, 0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.rows, self.sign * self.values


class Summary(NamedTuple):
    """The metrics of one pass over a store (see `summarize`); None where the store's shape or the
    arguments do not allow one (e.g. symmetry of a non-square matrix, class metrics without labels)."""

    symmetry_corr: float | None
    block_symmetry_corr: float | None
    within: float | None
    between: float | None
    class_means: np.ndarray | None  # f64[c, c]: mean of M over (label a rows, label b columns), diagonal left out
    classes: np.ndarray | None  # the label values of class_means' axes
    sign_shares: dict | None  # as jaxeif.desiderata.sign_shares
    sparsity: float
    row_sums: np.ndarray  # f64[n]
    col_sums: np.ndarray  # f64[m]
    top_rows: np.ndarray  # i64[k, m]: per eval column, the rows of the k largest entries, largest first
    top_values: np.ndarray  # f64[k, m]
    bottom_rows: np.ndarray  # i64[k, m]: per eval column, the rows of the k most negative entries, most negative first
    bottom_values: np.ndarray  # f64[k, m]
    tiles_read: int
    max_tiles_held: int


def top_k(M: np.ndarray, k: int, *, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """In memory, for reference: (rows i64[k, m], values f[k, m]) of each column's k largest (or most
    negative) entries, ties to the earlier row."""
    M = np.asarray(M)
    key = -M if largest else M
    rows = np.argsort(key, axis=0, kind="stable")[:k]
    return rows, np.take_along_axis(M, rows, 0)


def _floor_block(floor: Any, r: slice, c: slice, shape: tuple[int, int]) -> np.ndarray | float | None:
    if floor is None or np.ndim(floor) == 0:
        return floor
    if isinstance(floor, Store):
        return floor.read_tile((r.start // floor.grid.rows, c.start // floor.grid.cols))
    floor = np.asarray(floor) if not hasattr(floor, "shape") else floor
    if floor.shape == (shape[1],):
        return np.asarray(floor[c])[None, :]
    return np.asarray(floor[r, c])


def _check(store: Store, labels, floor, k: int) -> tuple[np.ndarray | None, bool]:
    if not isinstance(store, Store):
        raise TypeError(f"`store` must be a jaxeif.store.Store (jaxeif.store.open(path)), got {type(store).__name__}")
    n, m = store.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1 (entries kept per eval column), got {k!r}")
    square = n == m and store.grid.rows == store.grid.cols
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},), one label per row; got {labels.shape}")
        if not square:
            raise StoreError(
                f"class metrics need a square matrix in square tiles; this store is {n} x {m} in "
                f"{store.grid.rows} x {store.grid.cols} tiles: fill a train-vs-train store with "
                "tile=(t, t)"
            )
    if (
        floor is not None
        and not isinstance(floor, Store)
        and np.ndim(floor) not in (0,)
        and np.shape(floor) not in ((m,), (n, m))
    ):
        raise ValueError(
            f"`floor` must be a scalar, f[{m}] (per eval, as jaxeif.noise_floor's rows) or f[{n}, {m}], "
            f"got shape {np.shape(floor)}"
        )
    if isinstance(floor, Store) and (floor.shape != store.shape or floor.grid != store.grid):
        raise ValueError("a `floor` store must have the same shape and tiles as `store`")
    return labels, square


def summarize(
    store: Store, labels: Any = None, *, floor: Any = None, k: int = 10, include_diagonal: bool = False
) -> Summary:
    """Every study metric in one pass over the store's tiles (each read once, checksum checked).

    Args:
        store: a complete jaxeif.store.Store (jaxeif.store.open(path)).
        labels: i[n], one class per train row (= eval column); None skips the class metrics.
        floor: the noise floor for sign_shares: a scalar, f[m] per eval (jaxeif.noise_floor(...)[0]),
            an f[n, m] array (memory-mapped is fine: read tile by tile) or a Store of the same grid.
        k: entries kept per eval column for top/bottom influencers.
        include_diagonal: count self-influence in symmetry, class means and sparsity (desiderata's flag).

    Returns:
        Summary; equal to jaxeif.desiderata's in-memory metrics to float32 rounding.

    Raises:
        TileError: a tile is missing or fails its checksum.
        StoreError: class metrics asked of a non-square store or tiles.
    """
    labels, square = _check(store, labels, floor, k)
    grid = store.grid
    n, m = store.shape
    sym, block_sym = _Moments(), _Moments()
    classes = np.unique(labels) if labels is not None else None
    code = np.searchsorted(classes, labels) if labels is not None else None
    c = 0 if classes is None else classes.size
    class_sum, class_count = np.zeros((c, c)), np.zeros((c, c))
    signs = dict(within_hit=0, within_n=0, between_hit=0, between_n=0, above=0, counted=0)
    l1 = l2 = 0.0
    counted = 0
    row_sums, col_sums = np.zeros(n), np.zeros(m)
    top, bottom = _TopK(min(k, n), m, True), _TopK(min(k, n), m, False)
    tiles_read = held = max_held = 0

    def visit(tile: tuple[int, int], T: np.ndarray, mirror: np.ndarray | None) -> None:
        nonlocal l1, l2, counted
        r, cs = grid.bounds(tile)
        rows_i, cols_j = np.arange(r.start, r.stop)[:, None], np.arange(cs.start, cs.stop)[None, :]
        # the diagonal is left out unless asked for; a non-square matrix has none (desiderata: square only)
        off = rows_i != cols_j if n == m and not include_diagonal else np.ones(T.shape, bool)
        x = T.astype(np.float64)
        row_sums[r] += x.sum(axis=1)
        col_sums[cs] += x.sum(axis=0)
        top.add(T, r.start, cs)
        bottom.add(T, r.start, cs)
        counted += int(off.sum())
        l1 += np.abs(x[off]).sum()
        l2 += (x[off] ** 2).sum()
        if mirror is not None:
            sym.add(T, mirror.T, off)
        if labels is not None:
            a, b = code[r][:, None], code[cs][None, :]
            same = a == b
            if mirror is not None:
                block_sym.add(T, mirror.T, same & off)
            np.add.at(class_sum, (np.broadcast_to(a, T.shape)[off], np.broadcast_to(b, T.shape)[off]), x[off])
            np.add.at(class_count, (np.broadcast_to(a, T.shape)[off], np.broadcast_to(b, T.shape)[off]), 1)
            fb = _floor_block(floor, r, cs, (n, m))
            above = off if fb is None else off & (np.abs(T) > fb)
            signs["within_hit"] += int((above & same & (T < 0)).sum())
            signs["within_n"] += int((above & same).sum())
            signs["between_hit"] += int((above & ~same & (T > 0)).sum())
            signs["between_n"] += int((above & ~same).sum())
            signs["above"] += int(above.sum())
            signs["counted"] += int(off.sum())

    if square:
        for i in range(grid.shape[0]):
            for j in range(i, grid.shape[1]):
                T = store.read_tile((i, j))
                held, tiles_read = 1, tiles_read + 1
                if i == j:
                    max_held = max(max_held, held)
                    visit((i, j), T, T)
                    continue
                U = store.read_tile((j, i))
                held, tiles_read = 2, tiles_read + 1
                max_held = max(max_held, held)
                visit((i, j), T, U)
                visit((j, i), U, T)
                del T, U
    else:
        for t in grid.tiles():
            T = store.read_tile(t)
            tiles_read, max_held = tiles_read + 1, max(max_held, 1)
            visit(t, T, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        sparsity = float((np.sqrt(counted) - l1 / np.sqrt(l2)) / (np.sqrt(counted) - 1))
        within = between = shares = None
        if labels is not None:
            same_c = np.eye(c, dtype=bool)
            within = float(class_sum[same_c].sum() / class_count[same_c].sum())
            # desiderata.within_between counts the diagonal in "between" never (it is same-label) and, by
            # default, leaves it out of "within": the same pairs as visited here
            between = float(class_sum[~same_c].sum() / class_count[~same_c].sum())
            shares = {
                "within_learned": signs["within_hit"] / signs["within_n"] if signs["within_n"] else float("nan"),
                "between_unlearned": signs["between_hit"] / signs["between_n"] if signs["between_n"] else float("nan"),
                "excluded": 1.0 - signs["above"] / signs["counted"],
            }
            means = class_sum / class_count
    top_rows, top_values = top.result()
    bottom_rows, bottom_values = bottom.result()
    return Summary(
        symmetry_corr=sym.corr() if square else None,
        block_symmetry_corr=block_sym.corr() if labels is not None else None,
        within=within,
        between=between,
        class_means=means if labels is not None else None,
        classes=classes,
        sign_shares=shares,
        sparsity=sparsity,
        row_sums=row_sums,
        col_sums=col_sums,
        top_rows=top_rows,
        top_values=top_values,
        bottom_rows=bottom_rows,
        bottom_values=bottom_values,
        tiles_read=tiles_read,
        max_tiles_held=max_held,
    )
