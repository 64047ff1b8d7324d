"""Dense single-step SGD EIF computed exactly in low-rank form: no per-sample copy of the weights.

One SGD step on sample i changes every weight matrix W [out, in] of a linear layer by
-lr * sum_t g_t x_t^T (x_t: the layer's input at position t, g_t: dL_i/d(output_t)): rank <= T.
The fine-tuned layer applied to x is W x - lr * sum_t g_t (x_t . x), which the decoder's `delta=`
hook computes from a = [x_1..x_T] (in, T), b = -lr [g_1..g_T]^T (T, out) without forming W - lr G.
The (tied) embedding E [V, d] changes by -lr (onehot(ids)^T G0 + C^T H), G0 = dL/d(embedding
output), C = dL/dlogits, H = final hidden states: rank <= 2T. RMSNorm weights (d floats per layer)
change densely, by the sum of per-token gradients. The factors come out of ONE backward pass through
the decoder's taps (`jaxeif.models.phi3`: a zero "out" per linear has gradient g_t, a zero "read"
has gradient x_t). All samples of a packed row (jaxeif.packing) share that pass: with block
attention, the per-token factors of sample i's tokens are exactly those of sample i trained alone.

The computation, in named steps:
  1. `row_gradients`: per packed train row, every tap's per-token gradient (one backward pass);
  2. `fine_tune_chunks`: the row's samples grouped by rank (length rounded up to `rank_bucket`) and
     cut into chunks of `chunk_size` fine-tunes (one compiled program per rank);
  3. `gather_deltas`: each chunk's exact low-rank deltas, sliced out of the row's gradients;
  4. `eval_losses`: the chunk's deltas vmapped over every packed eval row (slot losses, or their
     changes in precision "difference"), then each sample's mean: one row of the matrix per fine-tune.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import checks, chunking, difference, options, packing
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.deprecation import JaxeifDeprecationWarning
from jaxeif.finetune import PyTree
from jaxeif.lm.loss import (
    ROW_LENGTH,
    group_counts,
    group_means,
    pack_tokens,
    packed_nll,
    packed_slot_nll,
    row_arrays,
    slot_nll,
)
from jaxeif.lm.per_token import TokenInfluence, check_per_token, tokens_slots
from jaxeif.lm.tokens import ApplyFn, Tokens, check_example, checked
from jaxeif.models.decoder import DecoderConfig, attached_config
from jaxeif.options import ChunkSize
from jaxeif.packing import round_up
from jaxeif.precision import Precision

RANK_BUCKET = 32  # a fine-tune's rank: its sample's length rounded up to this (one program per bucket)
_LINEARS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


class FineTunes(NamedTuple):
    """A chunk of fine-tunes of one packed train row, all of one rank (padded to the chunk size).

    samples: int[k] the train samples (k <= chunk); index: int[chunk] the same, padded with the first;
    tokens: int32[chunk, rank] their tokens' indices in the row; valid: f32[chunk, rank] 1 on real
    tokens, 0 on rank padding (exact zeros in the factors)."""

    samples: np.ndarray
    index: np.ndarray
    tokens: np.ndarray
    valid: np.ndarray


def decoder_config(apply_fn: ApplyFn, config: DecoderConfig | None) -> DecoderConfig | None:
    """`config` when given (checked to be a DecoderConfig); else, deprecated, the config a jaxeif decoder's
    apply_fn was built with (a DeprecationWarning: pass `config=`); else None (any other apply_fn)."""
    if config is not None:
        if not isinstance(config, DecoderConfig):
            raise TypeError(
                f"`config` must be a jaxeif.models.decoder.DecoderConfig (from loading.from_pretrained or "
                f"loading.load), got {type(config).__name__}"
            )
        return config
    config = attached_config(apply_fn)
    if config is not None:
        warnings.warn(
            "taking the decoder config from the apply_fn is deprecated and will be removed: pass `config=` "
            "(the config returned by loading.from_pretrained)",
            JaxeifDeprecationWarning,
            stacklevel=3,
        )
    return config


def config_of(apply_fn: ApplyFn, config: DecoderConfig | None) -> DecoderConfig:
    """`decoder_config(apply_fn, config)`; a TypeError when there is none (the low-rank path needs it)."""
    config = decoder_config(apply_fn, config)
    if config is None:
        raise TypeError(
            "the low-rank path needs the decoder's DecoderConfig: pass `config=` (the config returned by "
            "jaxeif.models.loading.from_pretrained or loading.load)"
        )
    return config


def _linear_dims(config: DecoderConfig, module: tuple[str, str]) -> tuple[int, int]:
    c = config
    h, kv, hd, d, f = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    return {
        ("self_attn", "qkv_proj"): (d, (h + 2 * kv) * hd),
        ("self_attn", "o_proj"): (h * hd, d),
        ("mlp", "gate_up_proj"): (d, 2 * f),
        ("mlp", "down_proj"): (f, d),
    }[module]


def _norm_paths(config: DecoderConfig) -> list[tuple[tuple[str, ...], int]]:
    """(path in the layers' params, width) of every per-layer RMSNorm: hidden-size norms, and the per-head
    q/k norms (head_dim wide) of a qk_norm architecture."""
    paths = [((name,), config.hidden_size) for name in config.norms]
    if config.qk_norm:
        paths += [(("self_attn", "q_norm"), config.head_dim), (("self_attn", "k_norm"), config.head_dim)]
    return paths


def zero_taps(config: DecoderConfig, t: int) -> dict:
    """A `delta=` of zero taps for one packed row of t tokens: "out" and "read" on every linear and on the
    output projection, "out" on the embedding, and per-token additive deltas of every RMSNorm weight
    (whose gradients are then each token's contribution to the norm's gradient). A linear's bias needs
    no tap of its own: its per-token gradient is the "out" tap's."""
    L, d = config.num_hidden_layers, config.hidden_size
    layers: dict = {"self_attn": {}, "mlp": {}}
    for path, width in _norm_paths(config):
        _put(layers, path, {"w": jnp.zeros((L, 1, t, width))})
    for group, name in _LINEARS:
        n_in, n_out = _linear_dims(config, (group, name))
        layers[group][name] = {"out": jnp.zeros((L, 1, t, n_out)), "read": jnp.zeros((L, 1, t, n_in))}
    model = {"embed_tokens": {"out": jnp.zeros((1, t, d))}, "layers": layers, "norm": {"w": jnp.zeros((1, t, d))}}
    return {"model": model, "lm_head": {"out": jnp.zeros((1, t, config.vocab_size)), "read": jnp.zeros((1, t, d))}}


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- 1. per-token gradients
@functools.partial(jax.jit, static_argnames=("apply_fn", "config"))
def row_gradients(apply_fn, params, config, row: dict, slot_weight: jax.Array) -> dict:
    """Every tap's per-token gradient of one packed row's loss sum_g L_g (slot_weight = weight / #scored of
    its group). Block attention makes the tokens of sample g depend on nothing else, so restricted to g's
    tokens these are exactly the gradients of L_g alone."""

    def loss(taps):
        logits = apply_fn(params, row["ids"], row["visible"], delta=taps, positions=row["positions"])
        return jnp.sum(slot_weight * slot_nll(logits, row["at"], row["target"]))

    return jax.grad(loss)(zero_taps(config, row["ids"].shape[1]))


# ----------------------------------------------------------------------------- 2. chunks of fine-tunes
def fine_tune_chunks(packed: packing.Packed, k: int, rank_bucket: int, chunk: int | None) -> Iterator[FineTunes]:
    """The samples of packed row k, grouped by rank and cut into chunks of `chunk` (None: all of a rank)."""
    members = np.flatnonzero(packed.spans[:, 0] == k)
    ranks = np.array([round_up(int(packed.spans[i, 2]), rank_bucket) for i in members])
    for rank in np.unique(ranks):
        same = members[ranks == rank]
        size = len(same) if chunk is None else chunk
        for start in range(0, len(same), size):
            samples = same[start : start + size]
            idx = np.concatenate([samples, np.full(size - len(samples), samples[0])])
            _, first, length = packed.spans[idx].T
            slots = np.arange(rank)
            tokens = np.minimum(first[:, None] + slots[None], packed.ids.shape[1] - 1).astype(np.int32)
            valid = (slots[None] < length[:, None]).astype(np.float32)
            yield FineTunes(samples, idx, tokens, valid)


# ----------------------------------------------------------------------------- 3. the exact deltas
def gather_deltas(
    config: DecoderConfig, g: dict, ids: jax.Array, idx: jax.Array, valid: jax.Array, lr: jax.Array
) -> dict:
    """The exact low-rank delta of one SGD step on the sample at row tokens `idx` int32[R] (`valid` f32[R]
    masks padding slots: they add exact zeros), as an apply_fn `delta=` dict."""
    take = lambda x: jnp.take(x, idx, axis=-2) * valid[:, None].astype(x.dtype)  # noqa: E731  [..., t, f] -> [..., R, f]
    total = lambda x: jnp.sum(take(x), axis=-2)  # noqa: E731  this sample's summed per-token gradient
    lay = g["model"]["layers"]
    layers: dict = {"self_attn": {}, "mlp": {}}
    for group, name in _LINEARS:
        tap = lay[group][name]
        layers[group][name] = {"a": jnp.swapaxes(take(tap["read"][:, 0]), 1, 2), "b": -lr * take(tap["out"][:, 0])}
    if config.qkv_bias:  # dL/d(bias) is the sum of the output's per-token gradients
        layers["self_attn"]["qkv_proj"]["bias"] = -lr * total(lay["self_attn"]["qkv_proj"]["out"][:, 0])
    for path, _ in _norm_paths(config):
        _put(layers, path, {"w": -lr * total(_get(lay, path)["w"][:, 0])})
    g_embed_out = take(g["model"]["embed_tokens"]["out"][0])  # G0 = dL/d(embedding output): [R, d]
    onehot = jax.nn.one_hot(jnp.take(ids, idx), config.vocab_size, dtype=g_embed_out.dtype) * valid[:, None].astype(
        g_embed_out.dtype
    )
    g_logits, hidden = take(g["lm_head"]["out"][0]), take(g["lm_head"]["read"][0])  # C [R, V], H [R, d]
    if config.tie_word_embeddings:
        embed = {"a": jnp.concatenate([onehot, g_logits], 0).T, "b": -lr * jnp.concatenate([g_embed_out, hidden], 0)}
    else:
        embed = {"a": onehot.T, "b": -lr * g_embed_out}
    deltas = {
        "model": {"embed_tokens": embed, "layers": layers, "norm": {"w": -lr * total(g["model"]["norm"]["w"][0])}}
    }
    if not config.tie_word_embeddings:
        deltas["lm_head"] = {"a": hidden.T, "b": -lr * g_logits}
    return deltas


_gather_chunk = jax.jit(jax.vmap(gather_deltas, in_axes=(None, None, None, 0, 0, 0)), static_argnums=0)


# ----------------------------------------------------------------------------- 4. losses under each fine-tune
def _slot_changes(apply_fn, params, row: dict, deltas: dict) -> jax.Array:
    """Slot NLL changes f32[1, t] under `deltas`, propagated from factors at zero (jaxeif.difference)."""
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), deltas)
    return difference.propagate(lambda p, d: packed_slot_nll(apply_fn, p, row, d), (params, zeros), (None, deltas))


def _scale_step(deltas: dict, s: jax.Array) -> dict:
    """The deltas of a step `s` times as long: the lr-scaled factors ("b", norm "w", "bias") times s; "a" is fixed."""
    return jax.tree_util.tree_map_with_path(lambda path, x: s * x if path[-1].key in ("b", "w", "bias") else x, deltas)


def _slot_slopes(apply_fn, params, row: dict, deltas: dict) -> jax.Array:
    """d/ds of the slot NLLs under `_scale_step(deltas, s)` at s = 0, f32[1, t]: the first-order change."""
    zero = jnp.zeros((), jax.tree.leaves(deltas)[0].dtype)
    return jax.jvp(
        lambda s: packed_slot_nll(apply_fn, params, row, _scale_step(deltas, s)), (zero,), (jnp.ones_like(zero),)
    )[1]


@functools.partial(jax.jit, static_argnames=("apply_fn", "propagate", "first_order"))
def eval_losses(apply_fn, params, deltas, row: dict, propagate: bool = False, first_order: bool = False) -> jax.Array:
    """Slot NLLs of one packed eval row under each fine-tune of a chunk, f32[c, 1, t]; their changes when
    `propagate` (precision "difference"); their first-order changes when `first_order`."""
    if first_order:
        return jax.vmap(lambda d: _slot_slopes(apply_fn, params, row, d))(deltas)
    if propagate:
        return jax.vmap(lambda d: _slot_changes(apply_fn, params, row, d))(deltas)
    return jax.vmap(lambda d: packed_slot_nll(apply_fn, params, row, d))(deltas)


def _slot_weights(packed: packing.Packed) -> np.ndarray:
    """weight / (#scored tokens of the slot's group): the packed loss sum_g L_g, each L_g a mean."""
    return (packed.weight / np.maximum(group_counts(packed)[packed.group], 1e-30)).astype(np.float32)


# ----------------------------------------------------------------------------- chunk size
def _chunk_rows(
    chunk_size,
    apply_fn,
    params,
    config,
    packed_train,
    packed_evals,
    rank_bucket,
    propagate,
    first_order=False,
    memory_budget=None,
) -> int | None:
    """Fine-tunes per step: an int or None as given; "auto": one on CPU (as jaxeif.chunking), on GPU/TPU the
    most whose program (largest rank, one eval row) fits the memory budget (jaxeif.chunking.choose)."""
    chunking.check_chunk_size(chunk_size)
    if chunk_size != "auto":
        return chunk_size
    if jax.default_backend() == "cpu":
        return 1
    rank = round_up(int(packed_train.spans[:, 2].max()), rank_bucket)
    most = int(max(np.unique(packed_train.spans[:, 0], return_counts=True)[1]))
    row, ev = row_arrays(packed_train, 0), row_arrays(packed_evals, 0)
    g = jax.eval_shape(lambda p, r: row_gradients(apply_fn, p, config, r, jnp.zeros(r["at"].shape)), params, row)

    def compile_at(chunks: chunking.Chunks):
        c = chunks.rows
        spec = (
            jax.ShapeDtypeStruct((c, rank), jnp.int32),
            jax.ShapeDtypeStruct((c, rank), jnp.float32),
            jax.ShapeDtypeStruct((c,), jnp.float32),
        )
        deltas = jax.eval_shape(lambda g_, i, v, lr: _gather_chunk(config, g_, row["ids"][0], i, v, lr), g, *spec)
        compiled = eval_losses.lower(apply_fn, params, deltas, ev, propagate, first_order).compile()
        return compiled, chunking.Footprint(chunking.program_bytes(compiled), 0)  # its arguments grow with rows

    chunks, _, _ = chunking.choose(compile_at, most, 1, budget=chunking.budget_bytes(memory_budget), accelerator=True)
    return chunks.rows


# ----------------------------------------------------------------------------- public API
def sgd_step_lowrank(
    apply_fn: ApplyFn, params: PyTree, example: Tokens, lr, *, config: DecoderConfig | None = None
) -> dict:
    """The low-rank delta of ONE SGD step on `example` (a Tokens row), exactly: `apply_fn(params, ids,
    delta=delta)` is then the fine-tuned model (norm weights enter as additive deltas)."""
    config = config_of(apply_fn, config)
    example = check_example("example", example, config.vocab_size)
    n = int(np.asarray(example.attention).sum())
    packed = packing.samples(np.asarray(example.ids)[None], np.array([n]), np.asarray(example.score)[None], multiple=1)
    g = row_gradients(apply_fn, params, config, row_arrays(packed, 0), jnp.asarray(_slot_weights(packed)))
    one = lambda x: jnp.asarray(x)[None]  # noqa: E731
    deltas = _gather_chunk(
        config, g, jnp.asarray(packed.ids[0]), one(np.arange(n)), one(np.ones(n, np.float32)), one(np.float32(lr))
    )
    return jax.tree.map(lambda x: x[0], deltas)


def lowrank_sgd_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float | np.ndarray,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    config: DecoderConfig | None = None,
    progress: bool = False,
    memory_budget: float | None = None,
    row_length: int = ROW_LENGTH,
    rank_bucket: int = RANK_BUCKET,
    base: np.ndarray | None = None,
    per_token: bool = False,
) -> jax.Array | TokenInfluence:
    """Dense single-step SGD EIF computed exactly in low-rank form (no weight copies).

    Equals `finetuned_eif(..., steps=1, optimizer=None, path="dense")`.

    Args:
        apply_fn: the decoder, apply_fn(params, ids, attention_mask=None, delta=None, positions=None).
        params: the decoder's parameters.
        train: the fine-tune samples, jaxeif.lm.Tokens.
        evals: the evaluated samples, jaxeif.lm.Tokens (None: `train`).
        config: the decoder's DecoderConfig (required; taken from a jaxeif apply_fn with a
            DeprecationWarning when omitted).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        chunk_size: fine-tunes (rows) vmapped per step; "auto": one on CPU, on GPU/TPU the most whose
            program fits `memory_budget` (jaxeif.chunking), as in `jaxeif.eif`.
        precision: any jaxeif.Precision; difference=True propagates each eval loss's change from the
            low-rank factors at zero (jaxeif.difference), so small entries keep float32 relative accuracy;
            dtype "float64" runs everything in float64.
        progress: a bar over fine-tunes.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        row_length: tokens per packed row.
        rank_bucket: ranks are rounded up to a multiple of this (fewer compiled shapes).
        base: f32[m], the evals' losses before fine-tuning (computed with `nll` when None; unused with
            difference=True; must be None with per_token=True).
        per_token: return a `lm.TokenInfluence`, every scored eval token's NLL change (the same slot
            losses, not averaged) instead of M.

    Returns:
        f32[n, m], or a TokenInfluence with per_token=True.

    Raises:
        TypeError, ValueError: bad arguments, named in the message.
    """
    if check_per_token(per_token) and base is not None:
        raise ValueError("`base` holds each eval's mean loss; per_token=True needs every token's: pass base=None")
    return _lowrank_eif(
        apply_fn,
        params,
        train,
        evals,
        lr=lr,
        chunk_size=chunk_size,
        precision=precision,
        config=config,
        progress=progress,
        row_length=row_length,
        rank_bucket=rank_bucket,
        base=base,
        first_order=False,
        memory_budget=memory_budget,
        per_token=per_token,
    )


def linearized_sgd_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float | np.ndarray,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    config: DecoderConfig | None = None,
    progress: bool = False,
    memory_budget: float | None = None,
    row_length: int = ROW_LENGTH,
    rank_bucket: int = RANK_BUCKET,
) -> jax.Array:
    """First-order single-step SGD EIF, -lr <g_i, g_j>, in low-rank form.

    Equals `jaxeif.eif_linearized(lm.NLL(apply_fn), ...)` without any weight-sized gradient. Each entry
    is the derivative of eval j's loss along sample i's low-rank step (a forward-mode pass per eval row).

    Args:
        apply_fn: the decoder, apply_fn(params, ids, attention_mask=None, delta=None, positions=None).
        params: the decoder's parameters.
        train: the fine-tune samples, jaxeif.lm.Tokens.
        evals: the evaluated samples, jaxeif.lm.Tokens (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        chunk_size: fine-tunes (rows) vmapped per step, as in `lowrank_sgd_eif`.
        precision: a jaxeif.Precision (difference=True changes nothing here: no losses are subtracted).
        config: the decoder's DecoderConfig (required; taken from a jaxeif apply_fn with a DeprecationWarning
            when omitted).
        progress: show a progress bar on stderr.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        row_length: tokens per packed row.
        rank_bucket: ranks are rounded up to a multiple of this (fewer compiled shapes).

    Returns:
        f32[n, m].

    Raises:
        TypeError, ValueError: bad arguments, named in the message.
    """
    return _lowrank_eif(
        apply_fn,
        params,
        train,
        evals,
        lr=lr,
        chunk_size=chunk_size,
        precision=precision,
        config=config,
        progress=progress,
        row_length=row_length,
        rank_bucket=rank_bucket,
        base=None,
        first_order=True,
        memory_budget=memory_budget,
    )


def _lowrank_eif(
    apply_fn,
    params,
    train,
    evals,
    *,
    lr,
    chunk_size,
    precision,
    config,
    progress,
    row_length,
    rank_bucket,
    base,
    first_order: bool,
    memory_budget=None,
    per_token: bool = False,
) -> jax.Array | TokenInfluence:
    """The loop of both: per packed train row its gradients, per chunk of its fine-tunes their deltas,
    per eval row the losses (or their changes, or first-order changes) under each."""
    config = config_of(apply_fn, config)
    precision = options.check_precision(precision)
    options.check_memory_budget(memory_budget)
    progress_lib.check(progress)
    train, evals = checked(apply_fn, params, train, evals, config.vocab_size, context=config.max_position_embeddings)
    n = np.asarray(train.ids).shape[0]
    result = np.float64 if precision_lib.is_float64(precision) else np.float32  # the dtype losses are subtracted in
    lr = np.broadcast_to(np.asarray(checks.learning_rate(lr, n), result), (n,))
    packed_train = pack_tokens(train, row_length)
    packed_evals = packed_train if evals is None else pack_tokens(evals, row_length)
    propagate = precision_lib.propagates_difference(precision) and not first_order
    changes = propagate or first_order  # the programs give loss changes: nothing to subtract
    tokens = tokens_slots(packed_evals, train if evals is None else evals) if per_token else None
    reduce = (lambda v: group_means(packed_evals, v)) if tokens is None else tokens.scatter  # noqa: E731
    with precision_lib.context(precision):
        params, lr, weights = precision_lib.cast_inputs(precision, (params, lr, _slot_weights(packed_train)))
        lr, weights = np.asarray(lr), np.asarray(weights)
        chunk = _chunk_rows(
            chunk_size,
            apply_fn,
            params,
            config,
            packed_train,
            packed_evals,
            rank_bucket,
            propagate,
            first_order,
            memory_budget,
        )
        eval_rows = [row_arrays(packed_evals, k) for k in range(packed_evals.ids.shape[0])]
        if base is None and not changes and tokens is None:
            base = packed_nll(apply_fn, params, packed_evals, dtype=result)
        elif base is None and not changes:  # every token's NLL before fine-tuning
            before = np.concatenate([np.asarray(packed_slot_nll(apply_fn, params, row)) for row in eval_rows])
            base = tokens.scatter(before).astype(result)
        out = np.zeros((n, packed_evals.groups) + (() if tokens is None else tokens.mask.shape[1:]), np.float64)
        with progress_lib.bar(n, "low-rank SGD EIF", progress, unit="fine-tune") as advance:
            for k in range(packed_train.ids.shape[0]):
                g = row_gradients(
                    apply_fn, params, config, row_arrays(packed_train, k), jnp.asarray(weights[k : k + 1])
                )
                ids = jnp.asarray(packed_train.ids[k])
                for ft in fine_tune_chunks(packed_train, k, rank_bucket, chunk):
                    deltas = _gather_chunk(
                        config, g, ids, jnp.asarray(ft.tokens), jnp.asarray(ft.valid), jnp.asarray(lr[ft.index])
                    )
                    slots = np.concatenate(
                        [
                            np.asarray(eval_losses(apply_fn, params, deltas, row, propagate, first_order))
                            for row in eval_rows
                        ],
                        axis=1,
                    )  # [chunk, eval rows, t]
                    out[ft.samples] = np.stack([reduce(v) for v in slots[: len(ft.samples)]])
                    advance(len(ft.samples))
    if not changes:
        out = out.astype(result) - np.asarray(base, result)[None]
    if tokens is not None:
        return TokenInfluence(jnp.asarray(np.where(tokens.mask[None], out, 0), jnp.float32), tokens.mask, tokens.weight)
    return jnp.asarray(out, jnp.float32)
