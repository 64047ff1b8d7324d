"""Choosing a fine-tuning learning rate: sweep lrs, measure how well each lr's EIF agrees with the
previous one's, and take an lr of the plateau where they agree.

Too small an lr leaves EIF ~ 0 (float rounding dominates: matrices at neighbouring lrs disagree);
too large lets the nonlinearity of big steps dominate (they disagree again). A plateau is a run of
consecutive grid lrs whose EIF (off-diagonal entries) correlates >= threshold with the previous
lr's; the run includes the lr its first member agrees with. Two rules pick an lr from it (RULES):
"top_of_first_plateau" (the CNN study: the largest lr of the first run, the strongest signal still
on it) and "middle_of_longest_plateau" (the language-model study: the geometric middle of the
longest run, ties to the smaller lrs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

RULES = {
    "top_of_first_plateau": "largest lr of the first run of grid points whose EIF (off-diagonal) correlates >= "
    "threshold with the EIF at the previous grid lr",
    "middle_of_longest_plateau": "geometric middle lr of the longest run of grid lrs whose EIF (off-diagonal) "
    "correlates >= threshold with the previous lr's (the run includes the lr it agrees "
    "with; ties: the smaller lrs)",
}


class LrSweep(NamedTuple):
    """EIF magnitude and stability over learning rates, and the plateau lr chosen by `rule` (RULES)."""

    lrs: np.ndarray  # f[k], increasing
    magnitude: np.ndarray  # median |EIF| off the diagonal (finite entries)
    agreement: np.ndarray  # corr(EIF(lr_k), EIF(lr_{k-1})); NaN for k = 0
    noise: np.ndarray  # 1 - agreement
    chosen: float
    threshold: float
    rule: str = "middle_of_longest_plateau"


def offdiag(M) -> np.ndarray:
    """The off-diagonal entries of a square matrix (all entries of a rectangular one), in M's dtype;
    a list of matrices (e.g. one per domain) pools its members' entries."""
    if isinstance(M, (list, tuple)):
        return np.concatenate([offdiag(m) for m in M])
    M = np.asarray(M)
    return M[~np.eye(*M.shape, dtype=bool)] if M.shape[0] == M.shape[1] else M.ravel()


def agreement(prev, cur) -> float:
    """corr of the off-diagonal entries of two EIF matrices (or lists of them); NaN when `prev` is None or
    either is constant or non-finite."""
    if prev is None:
        return float("nan")
    a, b = offdiag(prev), offdiag(cur)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def magnitude(M) -> float:
    """Median |EIF| of the finite off-diagonal entries; NaN when none is finite."""
    off = offdiag(M)
    finite = off[np.isfinite(off)]
    return float(np.median(np.abs(finite))) if finite.size else float("nan")


def choose_lr(
    lrs: Sequence[float], agreements: Sequence[float], threshold: float, *, rule: str = "middle_of_longest_plateau"
) -> float:
    """The lr the plateau `rule` (a key of RULES) picks from a sweep's neighbour agreements (NaN: no agreement)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a plateau rule; use one of {sorted(RULES)}")
    lrs, agreements = [float(x) for x in lrs], np.asarray(agreements, dtype=float)
    good = np.nan_to_num(agreements, nan=-1.0) >= threshold
    runs = _runs(good)
    if not runs:
        raise ValueError(
            f"no plateau in the lr sweep: no two consecutive learning rates agree (EIF corr >= {threshold}; agreements "
            f"{np.round(agreements, 3).tolist()} at lrs {lrs}); widen or refine the lr grid, lower the threshold, or "
            "give the lr"
        )
    if rule == "top_of_first_plateau":
        return lrs[runs[0][1]]
    first, last = max(runs, key=lambda run: run[1] - run[0])  # max keeps the first (smaller lrs) of equal runs
    lo, hi = max(first - 1, 0), last  # the run includes the lr its first member agrees with
    window = np.asarray(lrs[lo : hi + 1])
    return float(window[np.argmin(np.abs(np.log(window) - np.log(math.sqrt(lrs[lo] * lrs[hi]))))])


def _runs(good: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of every run of consecutive True in `good`."""
    runs, start = [], None
    for k in range(len(good) + 1):
        if k < len(good) and good[k]:
            start = k if start is None else start
        elif start is not None:
            runs.append((start, k - 1))
            start = None
    return runs


def summarise(
    lrs: Sequence[float], matrices: Sequence, *, threshold: float, rule: str = "middle_of_longest_plateau"
) -> LrSweep:
    """The sweep of EIF `matrices` (one per lr of `lrs`; each a matrix or a list pooled): magnitudes,
    neighbour agreements and the lr the rule chooses. The pairs are sorted by lr first (agreement is between
    neighbouring rates), so any order of the grid gives the sorted grid's choice; repeated rates are refused."""
    lrs, matrices = _sorted_grid(lrs, matrices)
    agree = np.array([agreement(prev, cur) for prev, cur in zip([None, *matrices[:-1]], matrices)])
    return LrSweep(
        np.asarray(lrs, dtype=float),
        np.array([magnitude(M) for M in matrices]),
        agree,
        1.0 - agree,
        choose_lr(lrs, agree, threshold, rule=rule),
        threshold,
        rule,
    )


def _sorted_grid(lrs: Sequence[float], matrices: Sequence) -> tuple[np.ndarray, list]:
    """(lrs ascending, matrices in the same order), after checking the grid: finite, > 0, distinct, one matrix
    per rate."""
    lrs = np.asarray(lrs, dtype=float)
    if lrs.ndim != 1 or len(lrs) != len(matrices):
        raise ValueError(f"`lrs` ({lrs.shape}) and `matrices` ({len(matrices)}) must pair up: one matrix per lr")
    bad = np.flatnonzero(~np.isfinite(lrs) | (lrs <= 0))
    if bad.size:
        raise ValueError(f"`lrs[{bad[0]}]` is {lrs[bad[0]]}; every learning rate must be finite and > 0")
    order = np.argsort(lrs, kind="stable")
    lrs = lrs[order]
    repeated = np.flatnonzero(np.diff(lrs) == 0)
    if repeated.size:
        raise ValueError(f"`lrs` holds {lrs[repeated[0]]} twice; pass each learning rate once")
    return lrs, [matrices[i] for i in order]


def lr_sweep(
    eif_at: Callable[[float], np.ndarray],
    lrs: Sequence[float],
    *,
    threshold: float = 0.95,
    rule: str = "middle_of_longest_plateau",
    progress: bool = False,
) -> LrSweep:
    """Run `eif_at(lr)` for each lr (increasing) and pick the plateau lr with `rule` (RULES).

    `eif_at` returns one EIF matrix, or a list of them (e.g. one per domain) whose off-diagonal
    entries are pooled; entries are compared in float64."""
    lrs = np.asarray(sorted(float(x) for x in lrs))
    if len(lrs) < 3 or np.any(lrs <= 0):
        raise ValueError("lr_sweep needs at least 3 positive learning rates")
    mats = []
    for lr in tqdm(lrs, desc="lr sweep", disable=not progress):
        out = eif_at(float(lr))
        mats.append(
            [np.asarray(m, np.float64) for m in out] if isinstance(out, (list, tuple)) else np.asarray(out, np.float64)
        )
    return summarise(lrs, mats, threshold=threshold, rule=rule)


def plot_lr_sweep(sweep: LrSweep, title: str | None = None):
    """The sweep figure (magnitude and agreement vs lr, chosen lr marked) via jaxeif.plot."""
    from jaxeif import plot  # matplotlib is slow to import and only the figure needs it

    return plot.lr_sweep(
        sweep.lrs, sweep.magnitude, sweep.agreement, threshold=sweep.threshold, chosen=sweep.chosen, title=title
    )
