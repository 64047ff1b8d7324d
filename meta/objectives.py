"""Objectives: differentiable scalars of an influence matrix M f32[n, m] to minimise.

Sign convention of jaxeif: M[i, j] = loss after fine-tuning on i minus loss before, on j;
negative = j was learned. Every objective here is minimised by a matrix with the named
structure (tests/test_meta_objectives.py checks it), and most are scale-invariant, so they
shape influence without rewarding or punishing its overall size; pair them with
`keep_learning` when the amount learned matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import desiderata

_EPS = 1e-12


def _as_matrix(M: jax.Array) -> jax.Array:
    M = jnp.asarray(M)
    if M.ndim != 2:
        raise ValueError(f"the influence matrix must be 2-d (n_train, n_eval), got shape {M.shape}")
    return M


def _index(name: str, idx, n: int) -> jax.Array:
    idx = jnp.asarray(idx)
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be a 1-d integer index array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.shape[0] == 0:
        raise ValueError(f"`{name}` is empty; pass at least one index")
    if not isinstance(idx, jax.core.Tracer) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"`{name}` has indices outside [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
    return idx


def _labels(name: str, labels, n: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"`{name}` must have shape ({n},) (one label per row/column), got {labels.shape}")
    return labels


def same_class_mask(row_labels, col_labels) -> jax.Array:
    """bool[n, m]: True where row i and column j share a label.

    Args:
        row_labels: int[n], the label of each train sample (row of M).
        col_labels: int[m], the label of each eval sample (column of M).

    Returns:
        bool[n, m] with entry (i, j) = row_labels[i] == col_labels[j].
    """
    return jnp.asarray(row_labels)[:, None] == jnp.asarray(col_labels)[None, :]


def class_learning(
    M: jax.Array, row_labels, col_labels=None, *, rows=None, exclude: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(within, between) learning: -mean of M over same-class pairs and over different-class pairs.

    Positive within = the class was learned. For square M with `exclude=jnp.eye(n, dtype=bool)` this is
    minus `jaxeif.desiderata.within_between(M, labels)`. Not scale-invariant: use it with `keep_learning` /
    `stay_below` to hold the amount learned.

    Args:
        M: f32[n, m] influence matrix (negative = learned).
        row_labels: int[n] label per row.
        col_labels: int[m] label per column; None: `row_labels` (square M).
        rows: int[k] row indices to keep; None: all rows.
        exclude: bool[n, m] pairs to drop (e.g. self-influence); None: keep all.

    Returns:
        (within, between): two f32 scalars, -mean(M) over same-class and over different-class pairs.

    Raises:
        ValueError: M is not 2-d, a label array has the wrong length, `exclude` has another shape, or `rows`
            is out of range.
    """
    M = _as_matrix(M)
    col_labels = row_labels if col_labels is None else col_labels
    same = same_class_mask(_labels("row_labels", row_labels, M.shape[0]), _labels("col_labels", col_labels, M.shape[1]))
    keep = jnp.ones(M.shape, bool) if exclude is None else ~jnp.asarray(exclude, bool)
    if keep.shape != M.shape:
        raise ValueError(f"`exclude` must be a bool mask of M's shape {M.shape}, got {keep.shape}")
    if rows is not None:
        r = _index("rows", rows, M.shape[0])
        M, same, keep = M[r], same[r], keep[r]
    w, b = (same & keep).astype(M.dtype), (~same & keep).astype(M.dtype)
    return -jnp.sum(w * M) / jnp.maximum(w.sum(), 1), -jnp.sum(b * M) / jnp.maximum(b.sum(), 1)


def noise_invariance(M: jax.Array, clean_rows, noisy_rows) -> jax.Array:
    """||M[noisy_rows]||^2 / ||M[clean_rows]||^2: 0 when noisy samples influence nothing.

    Scale-invariant, so it asks noisy copies to teach less than their clean twins without asking for less
    learning overall.

    Args:
        M: f32[n, m] influence matrix.
        clean_rows: int[k] rows of the clean samples.
        noisy_rows: int[k] rows of their noisy copies; `noisy_rows[i]` is the copy of `clean_rows[i]`.

    Returns:
        f32 scalar >= 0.

    Raises:
        ValueError: the two index arrays differ in length, are empty or out of range.
        TypeError: an index array is not 1-d integer.
    """
    M = _as_matrix(M)
    clean = _index("clean_rows", clean_rows, M.shape[0])
    noisy = _index("noisy_rows", noisy_rows, M.shape[0])
    if clean.shape != noisy.shape:
        raise ValueError(f"`clean_rows` {clean.shape} and `noisy_rows` {noisy.shape} must pair up one to one")
    return jnp.sum(M[noisy] ** 2) / (jnp.sum(M[clean] ** 2) + _EPS)


def class_blocks(M: jax.Array, row_labels, col_labels=None) -> jax.Array:
    """1 - cosine(M, T), T = -1 on same-class pairs and 0 elsewhere: "learn within class, leave others alone".

    In [0, 2], 0 exactly when M = c * T for some c > 0; scale-invariant.

    Args:
        M: f32[n, m] influence matrix.
        row_labels: int[n] label per row.
        col_labels: int[m] label per column; None: `row_labels` (square M).

    Returns:
        f32 scalar in [0, 2].

    Raises:
        ValueError: M is not 2-d or a label array has the wrong length.
    """
    M = _as_matrix(M)
    col_labels = row_labels if col_labels is None else col_labels
    target = -same_class_mask(
        _labels("row_labels", row_labels, M.shape[0]), _labels("col_labels", col_labels, M.shape[1])
    ).astype(M.dtype)
    cos = jnp.sum(M * target) / (jnp.linalg.norm(M) * jnp.linalg.norm(target) + _EPS)
    return 1.0 - cos


def sparsity(M: jax.Array, *, include_diagonal: bool = False) -> jax.Array:
    """1 - Hoyer sparsity of M (`jaxeif.desiderata.sparsity`): 0 when one entry is nonzero, 1 when all are equal.

    Scale-invariant.

    Args:
        M: f32[n, m] influence matrix.
        include_diagonal: count the diagonal (self-influence) too; a non-square M needs True.

    Returns:
        f32 scalar in [0, 1].
    """
    return 1.0 - desiderata.sparsity(_as_matrix(M), include_diagonal=include_diagonal)


def symmetry(M: jax.Array, *, include_diagonal: bool = False) -> jax.Array:
    """1 - corr(M, M^T) (`jaxeif.desiderata.symmetry_corr`): 0 exactly when M is symmetric.

    Args:
        M: f32[n, n] influence matrix (square).
        include_diagonal: count the diagonal too (it is symmetric by definition, so False by default).

    Returns:
        f32 scalar in [0, 2].
    """
    return 1.0 - desiderata.symmetry_corr(_as_matrix(M), include_diagonal=include_diagonal)


def logic(M: jax.Array, rows, implied_cols, reversed_cols) -> jax.Array:
    """Mean over probes k of (a - b) / (|a| + |b|), a = M[rows[k], implied_cols[k]], b = M[rows[k], reversed_cols[k]].

    -1 when every implied statement is learned (a < 0) while its reversal is not (b >= 0): "fine-tuning on
    A->B->Z makes A->Z gain more than Z->A". Each probe's term is scale-free.

    Args:
        M: f32[n, m] influence matrix.
        rows: int[k] the trained sample of each probe.
        implied_cols: int[k] the eval that should gain.
        reversed_cols: int[k] the eval that should not.

    Returns:
        f32 scalar in [-1, 1].

    Raises:
        ValueError: the three index arrays differ in length, are empty or out of range.
        TypeError: an index array is not 1-d integer.
    """
    M = _as_matrix(M)
    r = _index("rows", rows, M.shape[0])
    imp = _index("implied_cols", implied_cols, M.shape[1])
    rev = _index("reversed_cols", reversed_cols, M.shape[1])
    if not (r.shape == imp.shape == rev.shape):
        raise ValueError(
            f"`rows` {r.shape}, `implied_cols` {imp.shape}, `reversed_cols` {rev.shape} must have equal lengths"
        )
    a, b = M[r, imp], M[r, rev]
    return jnp.mean((a - b) / (jnp.abs(a) + jnp.abs(b) + _EPS))


def keep_learning(current: jax.Array, reference: jax.Array) -> jax.Array:
    """relu(1 - current/reference)^2: 0 while `current` learning stays at or above a positive `reference`.

    Pair it with a scale-free objective so the controls cannot reach it by learning nothing.

    Args:
        current: f32 scalar, e.g. the within-class learning of `class_learning` under the current controls.
        reference: f32 scalar > 0, the same quantity under the starting controls.

    Returns:
        f32 scalar >= 0.
    """
    return jax.nn.relu(1.0 - current / reference) ** 2


def stay_below(current: jax.Array, reference: jax.Array) -> jax.Array:
    """relu(current/reference - 1)^2: 0 while `current` stays at or below a positive `reference`.

    Args:
        current: f32 scalar, e.g. the between-class learning under the current controls.
        reference: f32 scalar > 0, the bound.

    Returns:
        f32 scalar >= 0.
    """
    return jax.nn.relu(current / reference - 1.0) ** 2


def toward(M: jax.Array, target, mask=None) -> jax.Array:
    """1 - cosine(M, target) over the masked entries: 0 exactly when M = c * target for some c > 0.

    A scale-free pull toward any influence structure a user can draw, e.g. `target = -1.0 *
    same_class_mask(labels, labels)` ("learn only from the same class"); scaling M leaves it unchanged.
    Uncentred on purpose: an entry drawn as 0 must stay near 0, not at an offset.

    Args:
        M: f32[n, m] influence matrix.
        target: f32[n, m] the drawn structure (negative = should be learned).
        mask: bool[n, m] entries that count; None: all (pass `~jnp.eye(n, dtype=bool)` to drop self-influence).

    Returns:
        f32 scalar in [0, 2].

    Raises:
        ValueError: M is not 2-d, or `target` / `mask` has another shape than M.
    """
    M = _as_matrix(M)
    _something_to_match(mask, target)
    target = jnp.asarray(target, M.dtype)
    if target.shape != M.shape:
        raise ValueError(f"`target` must have the shape of M {M.shape}, got {target.shape}")
    w = jnp.ones(M.shape, M.dtype) if mask is None else jnp.asarray(mask).astype(M.dtype)
    if w.shape != M.shape:
        raise ValueError(f"`mask` must have the shape of M {M.shape}, got {w.shape}")
    dot = (w * M * target).sum()
    return 1.0 - dot / jnp.sqrt((w * M**2).sum() * (w * target**2).sum() + _EPS)


def _something_to_match(mask, target) -> None:
    """ValueError when `toward` has nothing to match (it would be 1 with zero gradient, and meta.fit would
    change nothing): an all-False mask, or a target that is 0 on every kept entry. Checked on the values as
    passed (constants stay concrete inside meta.fit's jit); skipped for traced ones."""
    if any(isinstance(x, jax.core.Tracer) for x in (mask, target)):
        return
    target = np.asarray(target)
    w = np.ones(target.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if w.shape != target.shape:
        return  # the shape checks below name it
    if not w.any():
        raise ValueError("`mask` of toward is False everywhere: no entry counts; keep at least one entry (True)")
    if not np.any(w & (target != 0)):
        raise ValueError(
            "`target` of toward is 0 on every entry the mask keeps: there is no direction to pull M "
            "toward; draw the structure to match with nonzero entries (e.g. -1.0 * same_class_mask)"
        )
