"""Per-token influence: the change of every scored eval token's NLL, not only of its length-normalised mean.

    inf = lm.finetuned_eif(apply_fn, params, train, evals, lr=1e-3, per_token=True)   # a TokenInfluence
    inf.per_token  # f32[n, m, T]: -log p(evals[j] token t) after fine-tuning on train[i], minus before
    inf.mask       # bool[m, T]: the scored tokens (per_token is 0 elsewhere)
    inf.matrix()   # f32[n, m]: sum_t weight * per_token / sum_t weight, the M the default call returns

T is the evals' token axis (Tokens.ids[j, t]); for `prompted_eif` it is the axis of p_j's own tokens.
How each path gets there, exactly:
  * dense and LoRA (`jaxeif.eif`): one eval per scored token, the sample with only that token scored
    (`token_evals`): its loss is that token's NLL. Exact, at the cost of #scored tokens evals, not m.
  * low-rank and prompted (packed rows): the slot NLLs the mean is taken of, each put back at its
    token (`SlotTokens`): no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import packing
from jaxeif.lm.tokens import Tokens


class TokenInfluence(NamedTuple):
    """per_token f32[n, m, T]: the change of eval j's token t NLL under fine-tune i (0 where not scored);
    mask bool[m, T]: the scored tokens; weight f32[m, T]: each token's weight in its eval's loss
    (Tokens.score: 1 on scored tokens for `lm.tokenize`'s samples, 0 off the mask)."""

    per_token: jax.Array
    mask: np.ndarray
    weight: np.ndarray

    def matrix(self) -> jax.Array:
        """The length-normalised (weighted) mean over tokens: the EIF matrix M.

        Returns:
            f32[n, m], sum_t weight * per_token / sum_t weight.
        """
        w = jnp.asarray(self.weight, self.per_token.dtype)
        return jnp.sum(self.per_token * w[None], axis=-1) / jnp.sum(w, axis=-1)[None]


def check_per_token(per_token) -> bool:
    """Check the `per_token` argument.

    Args:
        per_token: the argument as given.

    Returns:
        It, as a bool.

    Raises:
        TypeError: it is not True or False.
    """
    if not isinstance(per_token, (bool, np.bool_)):
        raise TypeError(f"`per_token` must be True or False, got {per_token!r}")
    return bool(per_token)


# ----------------------------------------------------------------------------- dense / LoRA: one eval per token
class TokenEvals(NamedTuple):
    """evals: one Tokens row per scored token (the sample, only that token scored, weight 1);
    sample / position: int[S] which eval and which token each row is; mask, weight: as TokenInfluence."""

    evals: Tokens
    sample: np.ndarray
    position: np.ndarray
    mask: np.ndarray
    weight: np.ndarray


def token_evals(evals: Tokens) -> TokenEvals:
    """Every scored token of `evals` as an eval of its own: its loss (lm.NLL) is that token's NLL.

    Args:
        evals: the evals, Tokens of [m, T].

    Returns:
        A `TokenEvals` with S rows, S the number of scored tokens.
    """
    ids, att, score = (np.asarray(x) for x in evals)
    mask = score > 0
    sample, position = np.nonzero(mask)
    one = np.zeros((sample.size, ids.shape[1]), np.float32)
    one[np.arange(sample.size), position] = 1.0
    rows = Tokens(ids[sample], att[sample], one)
    return TokenEvals(rows, sample, position, mask, np.where(mask, score, 0).astype(np.float32))


def from_columns(columns: jax.Array, te: TokenEvals) -> TokenInfluence:
    """The EIF of `token_evals`' rows put back at their tokens.

    Args:
        columns: f32[n, S], one column per row of `te.evals`.
        te: what `token_evals` returned.

    Returns:
        The TokenInfluence, per_token f32[n, m, T].
    """
    m, t = te.mask.shape
    out = jnp.zeros((columns.shape[0], m, t), columns.dtype).at[:, te.sample, te.position].set(columns)
    return TokenInfluence(out, te.mask, te.weight)


# ----------------------------------------------------------------------------- packed rows: slots back to tokens
class SlotTokens(NamedTuple):
    """Where every slot of a packed layout belongs: group int[r, t], position int[r, t] (the token it
    scores, on the group's token axis), valid bool[r, t]; mask / weight bool/f32[groups, T]."""

    group: np.ndarray
    position: np.ndarray
    valid: np.ndarray
    mask: np.ndarray
    weight: np.ndarray

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """Slot values put at their tokens.

        Args:
            values: f[r, t], one per slot of the packed layout.

        Returns:
            f64[groups, T], 0 off the mask.
        """
        out = np.zeros(self.mask.shape, np.float64)
        out[self.group[self.valid], self.position[self.valid]] = np.asarray(values, np.float64).reshape(
            self.valid.shape
        )[self.valid]
        return out


def slot_tokens(
    packed: packing.Packed, scored: Sequence[np.ndarray], length: int, weights: Sequence[np.ndarray] | None = None
) -> SlotTokens:
    """The token of every slot of a packed layout.

    A group's slots come in the order of its scored tokens (jaxeif.packing lays them out so), so its k-th slot
    scores token `scored[group][k]`.

    Args:
        packed: the packed layout.
        scored: per group, the positions of its scored tokens, in order.
        length: T, the token axis' length.
        weights: per group, its scored tokens' weights (default 1).

    Returns:
        The SlotTokens.
    """
    valid = packed.weight > 0
    flat_group = packed.group[valid]  # row-major: each group's slots in order
    order = np.argsort(flat_group, kind="stable")
    counts = np.bincount(flat_group, minlength=packed.groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ordinal = np.empty_like(order)
    ordinal[order] = np.arange(order.size) - np.repeat(starts, counts)
    expected = np.array([len(s) for s in scored])
    if not np.array_equal(counts, expected):
        raise AssertionError(
            f"packed slots per group {counts.tolist()} differ from the scored tokens {expected.tolist()}"
        )
    position = np.zeros(packed.weight.shape, np.int64)
    position[valid] = [scored[g][k] for g, k in zip(flat_group, ordinal)]
    group = np.where(valid, packed.group, 0)
    mask = np.zeros((packed.groups, length), bool)
    weight = np.zeros((packed.groups, length), np.float32)
    for g, s in enumerate(scored):
        mask[g, s] = True
        weight[g, s] = 1.0 if weights is None else weights[g]
    return SlotTokens(group, position, valid, mask, weight)


def tokens_slots(packed: packing.Packed, tokens: Tokens) -> SlotTokens:
    """`slot_tokens` of samples packed with `lm.pack_tokens` (group k = sample k).

    Args:
        packed: `lm.pack_tokens(tokens, ...)`.
        tokens: the samples, Tokens of [m, T].

    Returns:
        The SlotTokens (T: the tokens' length; weights: their scores).
    """
    score = np.asarray(tokens.score)
    scored = [np.flatnonzero(s > 0) for s in score]
    return slot_tokens(packed, scored, score.shape[1], [s[k] for s, k in zip(score, scored)])


# ----------------------------------------------------------------------------- prompted
def prompted_tokens(
    apply_fn,
    params,
    packed: packing.Packed,
    bodies: Sequence[Sequence[int]],
    head: Sequence[int],
    base,
    *,
    row_length: int,
) -> TokenInfluence:
    """`prompted_eif`'s TokenInfluence: every token of p_j after context p_i minus the same token alone.

    Args:
        apply_fn: the decoder.
        params: its params.
        packed: `packing.prefixed` of the contexts and `bodies`.
        bodies: the m evals' own token ids (T: the longest).
        head: the BOS (as a list), which predicts p_j's first token in the reference.
        base: must be None (a mean loss per eval cannot give each token's).
        row_length: tokens per packed row of the reference.

    Returns:
        The TokenInfluence, per_token f32[n, m, T].

    Raises:
        ValueError: `base` given, or no BOS.
    """
    from jaxeif.lm.loss import packed_slot_nll, row_arrays  # loss imports nothing of this module

    if base is not None:
        raise ValueError("`base` holds each eval's mean loss; per_token=True needs every token's: pass base=None")
    if not head:
        raise ValueError(
            "per_token=True needs a BOS token: without one, p_j's first token has no NLL alone to "
            "compare with; use a tokenizer or config with a bos_token_id"
        )
    m, length = len(bodies), max(map(len, bodies))
    n = packed.groups // m
    slots = lambda p: np.concatenate(
        [
            np.asarray(packed_slot_nll(apply_fn, params, row_arrays(p, k)))  # noqa: E731
            for k in range(p.ids.shape[0])
        ]
    )
    positions = [np.arange(len(b)) for b in bodies]
    after = slot_tokens(packed, positions * n, length).scatter(slots(packed)).reshape(n, m, length)
    alone = packing.pack(
        [packing.Piece(list(head) + list(b), [0.0] * len(head) + [1.0] * len(b), j) for j, b in enumerate(bodies)],
        row_length=row_length,
    )
    before = slot_tokens(alone, positions, length)
    changes = after.astype(np.float32) - before.scatter(slots(alone)).astype(np.float32)[None]
    return TokenInfluence(jnp.asarray(np.where(before.mask[None], changes, 0)), before.mask, before.weight)
