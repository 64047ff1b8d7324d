"""The length-normalised NLL of a sample, alone (`NLL`, a loss_fn for `jaxeif.eif`) or of many samples
packed into shared rows (`nll`, `packed_nll`; `jaxeif.packing`: exact, no padding to the longest
sample, a prompt context computed once for all its continuations). The loss of a sample is

    L = -(1 / #scored) * sum_{t scored} log p(ids[t] | ids[<t])
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import packing
from jaxeif import progress as progress_lib
from jaxeif.finetune import PyTree
from jaxeif.lm.tokens import ApplyFn, Tokens, check_tokens, model_vocab_size

ROW_LENGTH = 256
"""Tokens per packed row (`jaxeif.packing`): wide matmuls, attention still cheap (256 ran faster than 128 and 512)."""


def _at_least_f32(x: jax.Array) -> jax.Array:
    """x in float32, or float64 when it is float64 (precision "float64" keeps its accuracy to the end)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sequence_nll(logits: jax.Array, ids: jax.Array, score: jax.Array) -> jax.Array:
    """Length-normalised NLL of one sample: the score-weighted mean of -log p(ids[t] | ids[<t]).

    Args:
        logits: f32[t, v] the model's logits for the sample (float64 stays float64).
        ids: int32[t] token ids.
        score: f32[t] weight of each position's -log p (0 at position 0 and on padding).

    Returns:
        f32[] the loss.
    """
    logp = jax.nn.log_softmax(_at_least_f32(logits[:-1]), axis=-1)
    token_logp = jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0]
    weight = score[1:]
    return -jnp.sum(weight * token_logp) / jnp.sum(weight)


@dataclasses.dataclass(frozen=True)
class NLL:
    """`loss_fn(params, example)` for `jaxeif.eif`: the length-normalised NLL of one `Tokens` row.

    A frozen dataclass, so it is hashable and equal for the same `apply_fn`: `jaxeif.eif`'s compiled programs
    are reused across calls.

    Attributes:
        apply_fn: the model, `apply_fn(params, ids int32[b, t], attention int32[b, t]) -> f32[b, t, v]`.
    """

    apply_fn: ApplyFn

    def __call__(self, params: PyTree, example: Tokens) -> jax.Array:
        logits = self.apply_fn(params, example.ids[None], example.attention[None])[0]
        return sequence_nll(logits, example.ids, example.score)


def slot_nll(logits: jax.Array, at: jax.Array, target: jax.Array) -> jax.Array:
    """-log p(target) read at logits position `at`, for every slot of packed rows.

    Args:
        logits: f32[r, t, v] logits of r packed rows.
        at: int32[r, k] the position whose logits predict each slot's token.
        target: int32[r, k] the token each slot scores.

    Returns:
        f32[r, k] the slot NLLs (float64 when the logits are).
    """
    logits = _at_least_f32(logits)
    lse = jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), at, axis=1)
    picked = jnp.take_along_axis(jnp.take_along_axis(logits, at[..., None], axis=1), target[..., None], axis=2)[..., 0]
    return lse - picked


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def packed_slot_nll(apply_fn, params, row: dict, delta=None) -> jax.Array:
    """Slot NLLs of one packed row, the decoder changed by `delta` (`jaxeif.models.phi3`'s hook). Jitted.

    Args:
        apply_fn: the decoder (static).
        params: its params.
        row: one row of a `jaxeif.packing.Packed` (`row_arrays`).
        delta: per-module changes for the decoder's `delta=` hook; None: the model as it is.

    Returns:
        f32[1, t] the NLL of every slot of the row.
    """
    logits = apply_fn(params, row["ids"], row["visible"], delta=delta, positions=row["positions"])
    return slot_nll(logits, row["at"], row["target"])


def row_arrays(packed: packing.Packed, k: int) -> dict:
    """Row `k` of a packed batch as device arrays with a leading axis of 1, the input of `packed_slot_nll`.

    Args:
        packed: the packed samples.
        k: the row index.

    Returns:
        {"ids", "positions", "visible", "at", "target"}: arrays of shape [1, ...].
    """
    return {f: jnp.asarray(getattr(packed, f)[k : k + 1]) for f in ("ids", "positions", "visible", "at", "target")}


def group_counts(packed: packing.Packed) -> np.ndarray:
    """Summed slot weight (number of scored tokens) of every group of a packed batch.

    Args:
        packed: the packed samples.

    Returns:
        float64[groups].
    """
    return np.bincount(packed.group.ravel(), packed.weight.ravel().astype(np.float64), minlength=packed.groups)


def group_means(packed: packing.Packed, slot_values: np.ndarray) -> np.ndarray:
    """Weighted mean of slot values per group: each group's length-normalised NLL.

    Args:
        packed: the packed samples.
        slot_values: f[r, t] a value per slot (e.g. `packed_slot_nll` of every row).

    Returns:
        float64[groups].
    """
    weighted = packed.weight.astype(np.float64) * np.asarray(slot_values, np.float64).reshape(packed.weight.shape)
    return np.bincount(packed.group.ravel(), weighted.ravel(), minlength=packed.groups) / np.maximum(
        group_counts(packed), 1e-30
    )


def packed_nll(
    apply_fn: ApplyFn, params: PyTree, packed: packing.Packed, delta=None, progress: bool = False, dtype=np.float32
) -> np.ndarray:
    """Length-normalised NLL of every group of a packed batch, one row per forward pass.

    Args:
        apply_fn: the decoder; it must accept 3-d attention masks and `positions`.
        params: its params.
        packed: the packed samples (`pack_tokens`).
        delta: per-module changes for the decoder's `delta=` hook; None: the model as it is.
        progress: show a bar of the groups done.
        dtype: the dtype of the result.

    Returns:
        `dtype`[groups] (a numpy array).
    """
    progress_lib.check(progress)
    values = []
    with progress_lib.bar(packed.groups, "losses", progress, unit="sample") as advance:
        for k in range(packed.ids.shape[0]):
            values.append(np.asarray(packed_slot_nll(apply_fn, params, row_arrays(packed, k), delta))[0])
            advance(int(np.unique(packed.group[k][packed.weight[k] > 0]).size))
    return group_means(packed, np.stack(values)).astype(dtype)


def pack_tokens(tokens: Tokens, row_length: int = ROW_LENGTH) -> packing.Packed:
    """The samples of `tokens` packed into shared rows (`jaxeif.packing`): group k is sample k.

    Args:
        tokens: right-padded samples.
        row_length: tokens per packed row.

    Returns:
        The packed batch.
    """
    return packing.samples(np.asarray(tokens.ids), tokens.lengths, np.asarray(tokens.score), row_length=row_length)


def nll(
    apply_fn: ApplyFn, params: PyTree, tokens: Tokens, *, row_length: int = ROW_LENGTH, progress: bool = False
) -> np.ndarray:
    """Loss of every sample, each attending only to itself inside shared packed rows.

    Exact (each sample's logits equal those computed alone) with no padding to the longest sample.

    Args:
        apply_fn: the decoder; it must accept 3-d attention masks and `positions` (`jaxeif.models.phi3`'s does).
        params: its params.
        tokens: the samples (checked against the model's vocabulary).
        row_length: tokens per packed row.
        progress: show a bar of the samples done.

    Returns:
        f32[n] (a numpy array).

    Raises:
        ValueError: `tokens` breaks a rule of `Tokens` (the error names the field, sample and position).
        TypeError: `tokens` is not a `Tokens` or a field has a wrong dtype.
    """
    tokens = check_tokens("tokens", tokens, model_vocab_size(apply_fn, params))
    return packed_nll(apply_fn, params, pack_tokens(tokens, row_length), progress=progress)
