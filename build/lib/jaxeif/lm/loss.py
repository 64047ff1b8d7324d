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

ROW_LENGTH = 256  # tokens per packed row (jaxeif.packing): wide matmuls, attention still cheap (measured: 256 beat 128 and 512)


def _at_least_f32(x: jax.Array) -> jax.Array:
    """x in float32, or float64 when it is float64 (precision "float64" keeps its accuracy to the end)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sequence_nll(logits: jax.Array, ids: jax.Array, score: jax.Array) -> jax.Array:
    """Mean -log p(ids[t] | ids[<t]) over scored t: logits f32[t, v], ids int32[t], score f32[t] -> f32[]."""
    logp = jax.nn.log_softmax(_at_least_f32(logits[:-1]), axis=-1)
    token_logp = jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0]
    weight = score[1:]
    return -jnp.sum(weight * token_logp) / jnp.sum(weight)


@dataclasses.dataclass(frozen=True)
class NLL:
    """loss_fn(params, example: Tokens row) for `jaxeif.eif`; hashable, so eif's jit cache is reused."""

    apply_fn: ApplyFn

    def __call__(self, params: PyTree, example: Tokens) -> jax.Array:
        logits = self.apply_fn(params, example.ids[None], example.attention[None])[0]
        return sequence_nll(logits, example.ids, example.score)


def slot_nll(logits: jax.Array, at: jax.Array, target: jax.Array) -> jax.Array:
    """-log p(target) read at logits index `at`: logits f32[r, t, v], at/target int32[r, k] -> f32[r, k]."""
    logits = _at_least_f32(logits)
    lse = jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), at, axis=1)
    picked = jnp.take_along_axis(jnp.take_along_axis(logits, at[..., None], axis=1), target[..., None], axis=2)[..., 0]
    return lse - picked


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def packed_slot_nll(apply_fn, params, row: dict, delta=None) -> jax.Array:
    """Slot NLLs f32[1, t] of one packed row (`row_arrays`), the decoder changed by `delta` (phi3's hook)."""
    logits = apply_fn(params, row["ids"], row["visible"], delta=delta, positions=row["positions"])
    return slot_nll(logits, row["at"], row["target"])


def row_arrays(packed: packing.Packed, k: int) -> dict:
    return {f: jnp.asarray(getattr(packed, f)[k : k + 1]) for f in ("ids", "positions", "visible", "at", "target")}


def group_counts(packed: packing.Packed) -> np.ndarray:
    """Summed slot weight (#scored tokens) of every group, float64[groups]."""
    return np.bincount(packed.group.ravel(), packed.weight.ravel().astype(np.float64), minlength=packed.groups)


def group_means(packed: packing.Packed, slot_values: np.ndarray) -> np.ndarray:
    """Weighted mean of the slot values f[r, t] of every group: each group's length-normalised NLL, f64[groups]."""
    weighted = packed.weight.astype(np.float64) * np.asarray(slot_values, np.float64).reshape(packed.weight.shape)
    return np.bincount(packed.group.ravel(), weighted.ravel(), minlength=packed.groups) / np.maximum(group_counts(packed), 1e-30)


def packed_nll(apply_fn: ApplyFn, params: PyTree, packed: packing.Packed, delta=None, progress: bool = False,
               dtype=np.float32) -> np.ndarray:
    """Length-normalised NLL of every group of `packed`, `dtype`[groups], one row per forward pass
    (`progress`: a bar of the groups done)."""
    progress_lib.check(progress)
    values = []
    with progress_lib.bar(packed.groups, "losses", progress, unit="sample") as advance:
        for k in range(packed.ids.shape[0]):
            values.append(np.asarray(packed_slot_nll(apply_fn, params, row_arrays(packed, k), delta))[0])
            advance(int(np.unique(packed.group[k][packed.weight[k] > 0]).size))
    return group_means(packed, np.stack(values)).astype(dtype)


def pack_tokens(tokens: Tokens, row_length: int = ROW_LENGTH) -> packing.Packed:
    """`tokens`' samples packed into rows (`jaxeif.packing`): group k = sample k."""
    return packing.samples(np.asarray(tokens.ids), tokens.lengths, np.asarray(tokens.score), row_length=row_length)


def nll(apply_fn: ApplyFn, params: PyTree, tokens: Tokens, *, row_length: int = ROW_LENGTH,
        progress: bool = False) -> np.ndarray:
    """Loss of every sample, f32[n]: samples packed into shared rows of <= `row_length` tokens, each
    sample attending only to itself (exact; no padding to the longest sample). `apply_fn` must accept
    3-d attention masks and `positions` (jaxeif.models.phi3's does)."""
    tokens = check_tokens("tokens", tokens, model_vocab_size(apply_fn, params))
    return packed_nll(apply_fn, params, pack_tokens(tokens, row_length), progress=progress)
