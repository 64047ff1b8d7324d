"""Pack short token sequences into shared rows, so one forward pass serves many samples.

A `Piece` is a token sequence; a piece may continue a `parent` piece (a shared prefix, e.g. one
prompt context followed by many candidate continuations). In a packed row every token sees only
earlier tokens of its own piece and its parent's tokens, and has its position within that
chain, so each token's logits equal those of its sample computed alone (block attention masks +
per-piece rotary positions; `jaxeif.models.phi3`'s apply_fn takes both). Nothing is padded to
the longest sample, and a prefix shared by m continuations is computed once instead of m times.

Scored tokens are listed per row as slots: logits index `at` predicts `target` with `weight`,
counted toward output `group`, so a loss per group is sum(weight * nll) / sum(weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Piece(NamedTuple):
    """One token sequence to pack, optionally continuing a prefix piece.

    Attributes:
        ids: the tokens.
        score: weight of -log p(ids[k]) in group `group`'s loss, one per token. ids[0] is predicted by the
            parent's last token, or by nothing (no parent: then score[0] must be 0).
        group: the output (loss) this piece's scored tokens count toward.
        parent: index of the prefix piece, a root listed before this one; None: no prefix.
    """

    ids: Sequence[int]
    score: Sequence[float]
    group: int
    parent: int | None = None


class Packed(NamedTuple):
    """Rows of packed pieces: token arrays and slot arrays of shape [r, t] (a row has at most t scored tokens).

    Attributes:
        ids: int32[r, t] tokens.
        positions: int32[r, t] rotary position of each token within its chain (parent + piece).
        visible: bool[r, t, t] key k visible to query q (block attention).
        at: int32[r, t] the index whose logits predict each slot's token.
        target: int32[r, t] each slot's token.
        weight: f32[r, t] each slot's weight (0: empty slot).
        group: int32[r, t] the output each slot counts toward.
        spans: int32[pieces, 3] (row, start, length) of every piece.
        groups: number of outputs.
    """

    ids: np.ndarray  # int32[r, t]
    positions: np.ndarray  # int32[r, t] rotary position of each token within its chain
    visible: np.ndarray  # bool[r, t, t] key k visible to query q
    at: np.ndarray  # int32[r, t] index whose logits predict the slot's token
    target: np.ndarray  # int32[r, t]
    weight: np.ndarray  # f32[r, t] (0: empty slot)
    group: np.ndarray  # int32[r, t]
    spans: np.ndarray  # int32[pieces, 3]: (row, start, length) of every piece
    groups: int  # number of outputs


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n.

    Args:
        n: the number to round.
        multiple: the step, >= 1.

    Returns:
        The rounded number.
    """
    return -(-int(n) // int(multiple)) * int(multiple)


def _families(pieces: Sequence[Piece]) -> list[tuple[int, list[int]]]:
    """(root, children) in order of the roots; a piece's parent must be a root listed before it."""
    children: dict[int, list[int]] = {}
    roots = []
    for k, p in enumerate(pieces):
        if len(p.ids) == 0:
            raise ValueError(f"piece {k} has no tokens")
        if len(p.score) != len(p.ids):
            raise ValueError(f"piece {k}: {len(p.score)} scores for {len(p.ids)} tokens")
        if p.parent is None:
            if p.score[0] != 0:
                raise ValueError(f"piece {k} has no parent, so nothing predicts its first token: score[0] must be 0")
            roots.append(k)
            children[k] = []
        elif p.parent not in children:
            raise ValueError(f"piece {k}'s parent {p.parent} must be a piece without a parent listed before it")
        else:
            children[p.parent].append(k)
    return [(r, children[r]) for r in roots]


def pack(pieces: Sequence[Piece], *, row_length: int = 512, multiple: int = 32) -> Packed:
    """Pack pieces first-fit, in order, into rows of at most `row_length` tokens.

    A family (a root and its children) longer than `row_length` is split into copies of its root, each with
    some children, when the root is unscored; a single root + child longer than `row_length` gets a row of
    its own. Rows are padded to the longest row rounded up to `multiple` (fewer distinct shapes to compile).

    Args:
        pieces: the pieces; a parent must be a root listed before its children.
        row_length: the most tokens per row.
        multiple: rounding of the padded row length.

    Returns:
        The packed rows.

    Raises:
        ValueError: no pieces, an empty piece, scores and tokens of different lengths, a first token scored
            with nothing to predict it, or a parent that is not an earlier root.
    """
    if not pieces:
        raise ValueError("nothing to pack: pass at least one piece")
    units = []  # (root, children) that must share a row
    for root, kids in _families(pieces):
        root_len = len(pieces[root].ids)
        if not kids or root_len + sum(len(pieces[c].ids) for c in kids) <= row_length:
            units.append((root, kids))
            continue
        if any(pieces[root].score):
            raise ValueError(f"piece {root} is scored and its continuations exceed row_length={row_length}; raise it")
        part, used = [], root_len
        for c in kids:
            if part and used + len(pieces[c].ids) > row_length:
                units.append((root, part))
                part, used = [], root_len
            part.append(c)
            used += len(pieces[c].ids)
        units.append((root, part))
    rows: list[list[tuple[int, list[int]]]] = [[]]
    used = 0
    for root, kids in units:
        size = len(pieces[root].ids) + sum(len(pieces[c].ids) for c in kids)
        if rows[-1] and used + size > row_length:
            rows.append([])
            used = 0
        rows[-1].append((root, kids))
        used += size
    lengths = [sum(len(pieces[r].ids) + sum(len(pieces[c].ids) for c in kids) for r, kids in row) for row in rows]
    return _layout(pieces, rows, round_up(max(lengths), multiple))


def _layout(pieces, rows, t: int) -> Packed:
    r = len(rows)
    ids = np.zeros((r, t), np.int32)
    positions = np.zeros((r, t), np.int32)
    owner = np.full((r, t), -1, np.int64)  # piece of each token; -1: padding
    at, target = np.zeros((r, t), np.int32), np.zeros((r, t), np.int32)
    weight, group = np.zeros((r, t), np.float32), np.zeros((r, t), np.int32)
    visible = np.zeros((r, t, t), bool)
    spans = np.full((len(pieces), 3), -1, np.int32)
    for i, row in enumerate(rows):
        cursor, slot = 0, 0
        for root, kids in row:
            root_start = cursor
            for k in [root] + kids:
                p = pieces[k]
                n = len(p.ids)
                start = cursor
                offset = 0 if k == root else len(pieces[root].ids)
                ids[i, start : start + n] = p.ids
                positions[i, start : start + n] = offset + np.arange(n)
                owner[i, start : start + n] = k
                block = np.tril(np.ones((n, n), bool))
                visible[i, start : start + n, start : start + n] = block
                if k != root:  # a continuation sees its whole prefix
                    visible[i, start : start + n, root_start : root_start + len(pieces[root].ids)] = True
                if spans[k, 0] < 0:
                    spans[k] = (i, start, n)
                for j, w in enumerate(p.score):
                    if w == 0:
                        continue
                    at[i, slot] = start + j - 1 if j > 0 else root_start + len(pieces[root].ids) - 1
                    target[i, slot], weight[i, slot], group[i, slot] = p.ids[j], w, p.group
                    slot += 1
                cursor += n
        pad = np.arange(cursor, t)
        visible[i, pad, pad] = True  # padding sees itself only (no row without a visible key)
    groups = 1 + max(p.group for p in pieces)
    return Packed(ids, positions, visible, at, target, weight, group, spans, groups)


def samples(ids: np.ndarray, lengths: np.ndarray, score: np.ndarray, **kwargs) -> Packed:
    """Independent samples packed into rows; group k is sample k.

    Args:
        ids: int[n, t] right-padded token ids.
        lengths: int[n] true length of each sample.
        score: f[n, t] weight of each token's -log p (0 at position 0 and on padding).
        **kwargs: `row_length` and `multiple` of `pack`.

    Returns:
        The packed rows.
    """
    pieces = [Piece(ids[k, :n].tolist(), score[k, :n].tolist(), k) for k, n in enumerate(np.asarray(lengths))]
    return pack(pieces, **kwargs)


def prefixed(prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], **kwargs) -> Packed:
    """Every continuation j after every prefix i, packed; group i * m + j.

    Prefix tokens are unscored and computed once per prefix; every continuation token is scored. This is
    the prompted EIF's layout: m continuations share each prompt.

    Args:
        prefixes: the n prefixes' token ids.
        continuations: the m continuations' token ids.
        **kwargs: `row_length` and `multiple` of `pack`.

    Returns:
        The packed rows, n * m groups.
    """
    m = len(continuations)
    pieces = []
    for i, pre in enumerate(prefixes):
        parent = len(pieces)
        pieces.append(Piece(list(pre), [0.0] * len(pre), i * m))
        pieces += [Piece(list(c), [1.0] * len(c), i * m + j, parent) for j, c in enumerate(continuations)]
    return pack(pieces, **kwargs)
