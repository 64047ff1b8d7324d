"""Metrics of an influence matrix M[i, j] (train i, eval j) for the paper's desiderata.

Plain functions of a matrix plus labels or index pairings, written with jnp so that they are
differentiable in M (meta/ uses them as objectives) and work under jit. Labels and indices are
treated as constants. By default the diagonal (self-influence, which dwarfs everything else and
is trivially symmetric) is left out of symmetry, class means and sparsity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "symmetry_corr",
    "block_symmetry_corr",
    "inverse_asymmetry",
    "within_between",
    "noise_influence",
    "sparsity",
    "sign_shares",
]


def _square(M) -> jax.Array:
    M = jnp.asarray(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"expected a square influence matrix [n, n], got shape {M.shape}")
    return M


def _labels(labels, n: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"`labels` must have shape ({n},), one label per row of M; got {labels.shape}")
    return labels


def _mask(n: int, include_diagonal: bool) -> jax.Array:
    return jnp.ones((n, n), bool) if include_diagonal else ~jnp.eye(n, dtype=bool)


def _masked_corr(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Pearson correlation of x and y over the entries where mask is true (nan if either is constant)."""
    w = mask.astype(x.dtype)
    count = w.sum()
    xc = x - (w * x).sum() / count
    yc = y - (w * y).sum() / count
    return (w * xc * yc).sum() / jnp.sqrt((w * xc**2).sum() * (w * yc**2).sum())


def symmetry_corr(M, *, include_diagonal: bool = False) -> jax.Array:
    """corr(M, M^T) over the off-diagonal entries: 1 for a symmetric matrix, -1 for an antisymmetric one.

    Scale-free, so matrices of different size (different lr) compare directly.

    Args:
        M: f32[n, n] influence matrix.
        include_diagonal: count the diagonal too.

    Returns:
        f32 scalar in [-1, 1] (nan when M is constant off the diagonal).

    Raises:
        ValueError: M is not square.
    """
    M = _square(M)
    return _masked_corr(M, M.T, _mask(M.shape[0], include_diagonal))


def block_symmetry_corr(M, labels, *, include_diagonal: bool = False) -> jax.Array:
    """corr(M, M^T) pooled over the diagonal blocks: entries (i, j) with labels[i] == labels[j].

    Args:
        M: f32[n, n] influence matrix.
        labels: int[n] label per sample.
        include_diagonal: count the diagonal too.

    Returns:
        f32 scalar in [-1, 1].

    Raises:
        ValueError: M is not square or `labels` has the wrong length.
    """
    M = _square(M)
    labels = _labels(labels, M.shape[0])
    same = labels[:, None] == labels[None, :]
    return _masked_corr(M, M.T, same & _mask(M.shape[0], include_diagonal))


def inverse_asymmetry(M) -> jax.Array:
    """1 / ||M - M^T||_F, the paper's symmetry score: higher = more symmetric, inf when symmetric.

    Not scale-free: multiplying M by c divides it by c, so compare matrices of similar scale only
    (`symmetry_corr` is the scale-free form).

    Args:
        M: f32[n, n] influence matrix.

    Returns:
        f32 scalar > 0.

    Raises:
        ValueError: M is not square.
    """
    M = _square(M)
    return 1.0 / jnp.sqrt(jnp.sum((M - M.T) ** 2))


def within_between(M, labels, *, include_diagonal: bool = False) -> tuple[jax.Array, jax.Array]:
    """(mean of M over same-label pairs, mean over different-label pairs).

    Negative within = the class was learned; positive between = other classes were unlearned.

    Args:
        M: f32[n, n] influence matrix.
        labels: int[n] label per sample.
        include_diagonal: count self-influence among the same-label pairs.

    Returns:
        (within, between): two f32 scalars.

    Raises:
        ValueError: M is not square or `labels` has the wrong length.
    """
    M = _square(M)
    labels = _labels(labels, M.shape[0])
    same = labels[:, None] == labels[None, :]
    within = (same & _mask(M.shape[0], include_diagonal)).astype(M.dtype)
    between = (~same).astype(M.dtype)
    return (M * within).sum() / within.sum(), (M * between).sum() / between.sum()


def noise_influence(M, clean_idx, noisy_idx) -> jax.Array:
    """EIF_noise rows: M[noisy_idx[k]] - M[clean_idx[k]] (eq. 5-6 of the paper).

    With M in loss units (after minus before), positive entries mean the noisy copy taught sample j less
    than the clean copy did: the desired direction.

    Args:
        M: f32[n, m] influence matrix.
        clean_idx: int[k] rows of the clean samples.
        noisy_idx: int[k] rows of their noisy copies, paired one to one with `clean_idx`.

    Returns:
        f32[k, m].

    Raises:
        ValueError: M is not 2-d, or the index arrays are not 1-d, differ in length or leave M's rows.
    """
    M = jnp.asarray(M)
    if M.ndim != 2:
        raise ValueError(f"expected an influence matrix [n, m], got shape {M.shape}")
    clean_idx, noisy_idx = np.asarray(clean_idx), np.asarray(noisy_idx)
    if clean_idx.shape != noisy_idx.shape or clean_idx.ndim != 1:
        raise ValueError(
            f"`clean_idx` {clean_idx.shape} and `noisy_idx` {noisy_idx.shape} must be 1-d and pair up one to one"
        )
    for name, idx in (("clean_idx", clean_idx), ("noisy_idx", noisy_idx)):
        if idx.size and (idx.min() < -M.shape[0] or idx.max() >= M.shape[0]):
            raise ValueError(f"`{name}` has indices outside the {M.shape[0]} rows of M")
    return M[noisy_idx] - M[clean_idx]


def sparsity(M, *, include_diagonal: bool = False) -> jax.Array:
    """Hoyer sparsity of |M|: 0 when all entries have equal magnitude, 1 when one entry is nonzero.

    (sqrt(k) - ||x||_1 / ||x||_2) / (sqrt(k) - 1) over the k counted entries; scale-free and differentiable
    (nan for an all-zero matrix).

    Args:
        M: f32[n, m] influence matrix.
        include_diagonal: count the diagonal too; a non-square M needs True.

    Returns:
        f32 scalar in [0, 1].

    Raises:
        ValueError: M is not 2-d, or not square while `include_diagonal` is False.
    """
    M = jnp.asarray(M)
    if M.ndim != 2:
        raise ValueError(f"expected an influence matrix [n, m], got shape {M.shape}")
    mask = jnp.ones(M.shape, bool) if include_diagonal else _mask(_square(M).shape[0], False)
    w = mask.astype(M.dtype)
    k = w.sum()
    l1 = (w * jnp.abs(M)).sum()
    l2 = jnp.sqrt((w * M**2).sum())
    return (jnp.sqrt(k) - l1 / l2) / (jnp.sqrt(k) - 1)


def sign_shares(M, labels, *, floor=None, include_diagonal: bool = False) -> dict[str, jax.Array]:
    """Sign counts that rounding cannot fake, among pairs with |M| above a noise floor.

    Args:
        M: f32[n, n] influence matrix.
        labels: int[n] label per sample.
        floor: f[n, n] or a scalar, e.g. from `jaxeif.noise_floor`; None counts every pair.
        include_diagonal: count the diagonal too.

    Returns:
        {"within_learned": share of counted same-label pairs with M < 0, "between_unlearned": share of counted
        different-label pairs with M > 0, "excluded": share of pairs the floor left out}; nan where nothing
        is counted.

    Raises:
        ValueError: M is not square or `labels` has the wrong length.
    """
    M = _square(M)
    labels = _labels(labels, M.shape[0])
    counted = _mask(M.shape[0], include_diagonal)
    above = counted if floor is None else counted & (jnp.abs(M) > jnp.asarray(floor))
    same = labels[:, None] == labels[None, :]
    share = lambda hit, where: (hit & where).sum() / where.sum()  # noqa: E731  (nan when nothing is counted)
    return {
        "within_learned": share(M < 0, above & same),
        "between_unlearned": share(M > 0, above & ~same),
        "excluded": 1.0 - above.sum() / counted.sum(),
    }


def probe_scores(matrices: np.ndarray, probes) -> list[dict]:
    """Per logic probe, the log-prob gain of the implied statement minus the not-implied one, over repeats.

    The gain is M[i, not_implied] - M[i, implied]. A host-side summary for a results file (numpy, not
    differentiable), unlike the metrics above.

    Args:
        matrices: f[repeats, n, m] influence matrices of the repeats.
        probes: `jaxeif.data.domains.ProbeRows` (train row, implied and not-implied columns, why).

    Returns:
        One dict per probe: its rows and reason, the gain's mean and std over repeats, the share of repeats in
        the right direction (gain > 0) and the gain per repeat.
    """
    out = []
    for p in probes:
        diffs = matrices[:, p.train, p.not_implied] - matrices[:, p.train, p.implied]
        out.append(
            {
                "train": p.train,
                "implied": p.implied,
                "not_implied": p.not_implied,
                "why": p.why,
                "mean": float(diffs.mean()),
                "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
                "right_direction": float(np.mean(diffs > 0)),
                "per_repeat": diffs.tolist(),
            }
        )
    return out


def agreement(matrix, truth) -> dict:
    """How well `matrix` reproduces a reference `truth` (e.g. its float64 computation), entry by entry.

    Args:
        matrix: f[n, m], the matrix to judge.
        truth: f[n, m], the reference; on a square matrix the diagonal is left out (self-influence).

    Returns:
        {"sign_agreement": share of off-diagonal entries with truth's sign, "median_rel_error",
        "p99_rel_error": |matrix - truth| / |truth| over them, "zero_truth_entries": entries whose truth
        is exactly 0 (no sign, no relative error: counted and left out)}.
    """
    matrix, truth = np.asarray(matrix, np.float64), np.asarray(truth, np.float64)
    off = ~np.eye(*truth.shape, dtype=bool) if truth.shape[0] == truth.shape[1] else np.ones(truth.shape, bool)
    zero = off & (truth == 0)
    off &= truth != 0
    rel = np.abs(matrix - truth)[off] / np.abs(truth[off])
    return {
        "sign_agreement": float(np.mean(np.sign(matrix[off]) == np.sign(truth[off]))),
        "median_rel_error": float(np.median(rel)),
        "p99_rel_error": float(np.quantile(rel, 0.99)),
        "zero_truth_entries": int(zero.sum()),
    }
