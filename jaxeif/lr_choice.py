"""Choosing a fine-tuning learning rate: sweep lrs, measure how well each lr's EIF agrees with the
previous one's, and take an lr of the plateau where they agree."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np


class LrSweep(NamedTuple):
    """EIF magnitude and stability over learning rates, and the plateau lr chosen by `choose_plateau`."""

    lrs: np.ndarray  # f[k], increasing
    magnitude: np.ndarray  # median |EIF| off the diagonal
    agreement: np.ndarray  # corr(EIF(lr_k), EIF(lr_{k-1})); NaN for k = 0
    noise: np.ndarray  # 1 - agreement
    chosen: float
    threshold: float


def _offdiag(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, np.float64)
    return M[~np.eye(*M.shape, dtype=bool)] if M.shape[0] == M.shape[1] else M.ravel()


def choose_plateau(lrs: np.ndarray, agreement: np.ndarray, threshold: float) -> float:
    """The plateau rule: the longest run of consecutive lrs whose EIF correlates >= threshold with the
    previous lr's; return the run's geometric middle lr (ties: the smaller lrs). Too small an lr gives
    float round-off noise (low agreement), too large a non-linear regime (agreement falls)."""
    good = np.asarray(agreement) >= threshold
    best, run_start, best_len = None, None, 0
    for k in range(len(lrs) + 1):
        if k < len(lrs) and good[k]:
            run_start = k if run_start is None else run_start
            continue
        if run_start is not None:
            length = k - run_start
            if length > best_len:
                best, best_len = (run_start - 1, k - 1), length  # the run includes the lr it agrees with
            run_start = None
    if best is None:
        raise ValueError(f"no two consecutive learning rates agree (corr >= {threshold}); widen or refine the lr grid")
    lo, hi = lrs[best[0]], lrs[best[1]]
    target = math.sqrt(lo * hi)
    window = np.asarray(lrs[best[0] : best[1] + 1])
    return float(window[np.argmin(np.abs(np.log(window) - np.log(target)))])


def lr_sweep(eif_at: Callable[[float], np.ndarray], lrs: Sequence[float], *, threshold: float = 0.95,
             progress: bool = False) -> LrSweep:
    """Run `eif_at(lr)` for each lr (increasing) and pick the plateau lr with `choose_plateau`.

    `eif_at` returns one EIF matrix, or a list of them (e.g. one per domain) whose off-diagonal
    entries are pooled."""
    lrs = np.asarray(sorted(float(x) for x in lrs))
    if len(lrs) < 3 or np.any(lrs <= 0):
        raise ValueError("lr_sweep needs at least 3 positive learning rates")
    mats = []
    it = lrs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lrs, desc="lr sweep")
    for lr in it:
        out = eif_at(float(lr))
        mats.append(np.concatenate([_offdiag(m) for m in out]) if isinstance(out, (list, tuple)) else _offdiag(out))
    magnitude = np.array([np.median(np.abs(m)) for m in mats])
    agreement = np.array([np.nan] + [np.corrcoef(a, b)[0, 1] for a, b in zip(mats[:-1], mats[1:])])
    chosen = choose_plateau(lrs, np.nan_to_num(agreement, nan=-1.0), threshold)
    return LrSweep(lrs, magnitude, agreement, 1.0 - agreement, chosen, threshold)


def plot_lr_sweep(sweep: LrSweep, title: str | None = None):
    """The sweep figure (magnitude and agreement vs lr, chosen lr marked) via jaxeif.plot."""
    from jaxeif import plot

    return plot.lr_sweep(sweep.lrs, sweep.magnitude, sweep.agreement, threshold=sweep.threshold,
                         chosen=sweep.chosen, title=title)
