"""Language-model influence: the length-normalised NLL, tokenising samples, fine-tuned EIF
(dense via `jaxeif.eif`, LoRA, and the exact low-rank single-step SGD path) and prompted EIF.

Models enter as `apply_fn(params, ids int32[b, t], attention_mask=None, lora=None, logits_at=None)
-> f32[b, t, v]` (`jaxeif.models.phi3`; `logits_at` int32[b, k] gives only those positions' logits). A sample is a `Tokens` row: ids, attention (1 = real token) and score
(1 = this token's log-probability counts in the loss). The loss of a sample is

    L = -(1 / #scored) * sum_{t scored} log p(ids[t] | ids[<t])

Tokenisation: BOS (when the tokenizer or model has one) + the text's tokens (no other special
tokens); padding is on the right with attention 0 and score 0; a multi-line sample is ONE
sample (lines joined by "\\n"), every line scored and trained on.

Prompted EIF context format (PROMPT_FORMAT): BOS + tokens(p_i) + tokens("\\n") + tokens(p_j),
scoring only p_j's tokens; the reference is BOS + tokens(p_j). p_j's tokens are identical in
both, so EIF_prompt[i, j] = L(p_j | p_i) - L(p_j) measures only the context.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxeif
from jaxeif.finetune import PyTree

SEPARATOR = "\n"
PROMPT_FORMAT = "BOS + tokens(p_i) + tokens('\\n') + tokens(p_j); only p_j's tokens scored; minus L(BOS + tokens(p_j))"
ApplyFn = Callable[..., jax.Array]


class Tokens(NamedTuple):
    """A batch of tokenised samples, right-padded: ids int32[n, t], attention int32[n, t], score f32[n, t]."""

    ids: Any
    attention: Any
    score: Any

    def take(self, idx) -> "Tokens":
        return Tokens(*(np.asarray(x)[np.asarray(idx)] for x in self))

    def trim(self, length: int) -> "Tokens":
        return Tokens(*(np.asarray(x)[:, :length] for x in self))

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.attention).sum(axis=1)


# ----------------------------------------------------------------------------- tokenising
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (HF tokenizers, or tokenizers.Tokenizer)."""
    if not isinstance(text, str):
        raise TypeError(f"a sample must be a str, got {type(text).__name__}")
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can produce (added tokens included)."""
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return int(len(tokenizer))


def check_vocab(tokenizer, config) -> None:
    """The tokenizer must not produce ids past the model's embedding table."""
    n = vocab_size(tokenizer)
    if n > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocabulary has {config.vocab_size}: they do not belong "
            "together; load the tokenizer from the same checkpoint as the model (jaxeif.models.tokenizer.load_tokenizer)"
        )


def bos_token_id(tokenizer, config) -> int | None:
    """The BOS id (tokenizer first, then the model config); None when neither has one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None and config is not None and getattr(config, "bos_token_id", None) is not None:
        bos = config.bos_token_id if config.bos_token_id >= 0 else None
    return None if bos is None else int(bos)


def _pad_id(tokenizer, config) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def tokenize(
    tokenizer,
    texts: Sequence[str],
    *,
    config,
    contexts: Sequence[str] | None = None,
    length: int | None = None,
    pad_multiple: int = 8,
) -> Tokens:
    """Tokens of `texts` (each optionally after a context, see PROMPT_FORMAT), right-padded.

    Only the text's own tokens are scored. `length` fixes the padded length (else the longest,
    rounded up to `pad_multiple`). Errors: empty sample, sample longer than the model's context.
    """
    check_vocab(tokenizer, config)
    texts = list(texts)
    if not texts:
        raise ValueError("no samples to tokenize; pass at least one text")
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts; pass one context per text")
    bos = bos_token_id(tokenizer, config)
    head = [] if bos is None else [bos]
    sep = encode(tokenizer, SEPARATOR)
    rows = []
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"sample {k} is empty ({text!r}); every sample needs some text to score")
        body = encode(tokenizer, text)
        ctx = [] if contexts is None else encode(tokenizer, contexts[k]) + sep
        ids = head + ctx + body
        score = [0.0] * (len(head) + len(ctx)) + [1.0] * len(body)
        score[0] = 0.0  # nothing predicts the first token
        if sum(score) == 0:
            raise ValueError(f"sample {k} ({text!r}) has no token to score: with no BOS token a sample needs two tokens")
        limit = config.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(
                f"sample {k} is {len(ids)} tokens long (context included), longer than the model's context of "
                f"{limit} tokens; shorten it"
            )
        rows.append((ids, score))
    longest = max(len(ids) for ids, _ in rows)
    t = round_up(longest, pad_multiple) if length is None else int(length)
    if t < longest:
        raise ValueError(f"length={t} is shorter than the longest sample ({longest} tokens)")
    pad = _pad_id(tokenizer, config)
    ids = np.full((len(rows), t), pad, np.int32)
    att = np.zeros((len(rows), t), np.int32)
    score = np.zeros((len(rows), t), np.float32)
    for r, (row_ids, row_score) in enumerate(rows):
        ids[r, : len(row_ids)] = row_ids
        att[r, : len(row_ids)] = 1
        score[r, : len(row_ids)] = row_score
    return Tokens(ids, att, score)


# ----------------------------------------------------------------------------- the loss
def sequence_nll(logits: jax.Array, ids: jax.Array, score: jax.Array) -> jax.Array:
    """Mean -log p(ids[t] | ids[<t]) over scored t: logits f32[t, v], ids int32[t], score f32[t] -> f32[]."""
    logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
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


def scored_nll(logits: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean -log p(target) over weighted positions: logits f32[k, v], target int32[k], weight f32[k] -> f32[].

    With the logits at a sample's scored positions only (`scored_positions`), this equals `sequence_nll`.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
    return -jnp.sum(weight * token_logp) / jnp.sum(weight)


def scored_positions(tokens: Tokens, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions int32[n, k], targets int32[n, k], weights f32[n, k]): logits position p predicts ids[p + 1]
    for every scored token ids[p + 1]; right-padded with position 0, weight 0. `k` >= the most scored tokens."""
    ids, score = np.asarray(tokens.ids), np.asarray(tokens.score)
    n = ids.shape[0]
    pos, tgt, w = np.zeros((n, k), np.int32), np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
    for r in range(n):
        p = np.flatnonzero(score[r, 1:] > 0)
        if len(p) > k:
            raise ValueError(f"row {r} has {len(p)} scored tokens, more than k={k}")
        pos[r, : len(p)], tgt[r, : len(p)], w[r, : len(p)] = p, ids[r, p + 1], score[r, p + 1]
    return pos, tgt, w


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _batch_nll_at(apply_fn, params, ids, attention, pos, target, weight):
    logits = apply_fn(params, ids, attention, logits_at=pos)  # only the scored positions reach the output layer
    return jax.vmap(scored_nll)(logits, target, weight)


def fit_length(tokens: Tokens, length: int) -> Tokens:
    """Trim or right-pad (attention 0, score 0) every row to `length` tokens; no real token may be cut."""
    width = np.asarray(tokens.ids).shape[1]
    if length <= width:
        if np.asarray(tokens.attention)[:, length:].any():
            raise ValueError(f"cannot fit samples of {int(tokens.lengths.max())} tokens into length {length}")
        return tokens.trim(length)
    return Tokens(*(np.pad(np.asarray(x), ((0, 0), (0, length - width))) for x in tokens))


def length_batches(tokens: Tokens, batch_size: int | None, bucket: int | None = 16) -> list[tuple[np.ndarray, Tokens]]:
    """Rows sorted by length and cut into batches of exactly `batch_size` rows (the last one padded by
    repeating its first row; None: one batch of all rows), each fitted to its longest row rounded up to
    `bucket` (None: the longest row of all). Returns (row indices, batch) pairs.

    Few distinct shapes: the same compiled programs serve every domain and repeat."""
    lengths = np.asarray(tokens.lengths)
    n = lengths.shape[0]
    size = n if batch_size is None else int(batch_size)
    order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, n, size):
        idx = order[start : start + size]
        longest = int(lengths[idx].max()) if bucket is not None else int(lengths.max())
        length = round_up(longest, bucket) if bucket is not None else longest
        out.append((idx, fit_length(_pad_rows(tokens.take(idx), size), length)))
    return out


def length_groups(tokens: Tokens, multiple: int = 16) -> list[tuple[np.ndarray, Tokens]]:
    """Rows grouped by length rounded up to `multiple`, each group trimmed to that length."""
    lengths = np.asarray(tokens.lengths)
    buckets = np.array([round_up(int(n), multiple) for n in lengths])
    width = np.asarray(tokens.ids).shape[1]
    out = []
    for b in np.unique(buckets):
        idx = np.flatnonzero(buckets == b)
        out.append((idx, tokens.take(idx).trim(min(int(b), width))))
    return out


def _pad_rows(tokens: Tokens, rows: int) -> Tokens:
    """Repeat the first row until there are `rows` rows (fixed batch shapes, fewer compiles)."""
    n = np.asarray(tokens.ids).shape[0]
    idx = np.concatenate([np.arange(n), np.zeros(rows - n, np.int64)])
    return tokens.take(idx)


def nll(apply_fn: ApplyFn, params: PyTree, tokens: Tokens, *, batch_size: int = 4, bucket: int | None = 16,
        score_bucket: int = 32, progress=None) -> np.ndarray:
    """Loss of every row, f32[n]: rows sorted by length, `batch_size` at a time (`length_batches`), and
    the output layer applied only at scored positions (`apply_fn(..., logits_at=)`, up to `score_bucket`
    multiples). `apply_fn` must accept `logits_at` (jaxeif.models.phi3's does)."""
    out = np.zeros(np.asarray(tokens.ids).shape[0], np.float32)
    for idx, batch in length_batches(tokens, batch_size, bucket):
        most = int((np.asarray(batch.score)[:, 1:] > 0).sum(axis=1).max())
        k = min(round_up(most, score_bucket), batch.ids.shape[1])
        pos, tgt, w = scored_positions(batch, k)
        vals = _batch_nll_at(apply_fn, params, jnp.asarray(batch.ids), jnp.asarray(batch.attention),
                             jnp.asarray(pos), jnp.asarray(tgt), jnp.asarray(w))
        out[idx] = np.asarray(vals)[: len(idx)]
        if progress is not None:
            progress.update(len(idx))
    return out


# ----------------------------------------------------------------------------- fine-tuned EIF
def finetuned_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float = 1e-3,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | None = 1,
) -> jax.Array:
    """Dense fine-tuned EIF, f32[n, m]: `jaxeif.eif` with the length-normalised NLL (whole sample trained)."""
    return jaxeif.eif(NLL(apply_fn), params, _as_jnp(train), None if evals is None else _as_jnp(evals),
                      lr=lr, steps=steps, optimizer=optimizer, chunk_size=chunk_size)


def lora_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    adapters,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float = 1e-3,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | None = 1,
) -> jax.Array:
    """LoRA EIF, f32[n, m]: only the adapters are fine-tuned (vmapped over samples); base params shared.

    `adapters` is a `jaxeif.models.lora.Adapters` (deltas + static scale) or a plain delta dict.
    """
    deltas, scale = (adapters.deltas, float(adapters.scale)) if hasattr(adapters, "deltas") else (adapters, 1.0)
    loss_fn = _lora_loss(apply_fn, params, scale)
    return jaxeif.eif(loss_fn, deltas, _as_jnp(train), None if evals is None else _as_jnp(evals),
                      lr=lr, steps=steps, optimizer=optimizer, chunk_size=chunk_size)


_LORA_LOSSES: dict = {}


def _lora_loss(apply_fn, params, scale):
    """One loss_fn per (apply_fn, params, scale) so eif's jit cache is reused across calls."""
    key = (apply_fn, id(params), scale)
    if key not in _LORA_LOSSES or _LORA_LOSSES[key][0] is not params:
        from jaxeif.models.lora import Adapters

        def loss_fn(deltas, example, _apply=apply_fn, _params=params, _scale=scale):
            lora = Adapters(deltas, _scale)
            logits = _apply(_params, example.ids[None], example.attention[None], lora=lora)[0]
            return sequence_nll(logits, example.ids, example.score)

        _LORA_LOSSES[key] = (params, loss_fn)
    return _LORA_LOSSES[key][1]


def _as_jnp(tokens: Tokens) -> Tokens:
    return Tokens(*(jnp.asarray(x) for x in tokens))


# ----------------------------------------------------------------------------- exact low-rank SGD step
# One SGD step on sample i changes every weight matrix W [out, in] of a linear layer by
# -lr * sum_t g_t x_t^T (x_t: the layer's input at position t, g_t: dL_i/d(output_t)): rank <= T.
# The fine-tuned layer applied to x is W x - lr * sum_t g_t (x_t . x), which phi3's low-rank hook
# computes from a = [x_1..x_T] (in, T), b = -lr [g_1..g_T]^T (T, out) without forming W - lr G.
# The (tied) embedding E [V, d] changes by -lr (onehot(ids)^T G0 + C^T H), G0 = dL/d(embedding
# output), C = dL/d(logits), H = final hidden states: rank <= 2T. RMSNorm weights (d floats per
# layer) are updated densely. The factors x_t, g_t are read out of the (scanned) model with a flax
# method interceptor: each linear output gets a zero perturbation `eps` (its gradient is g_t) and a
# zero `probe` whose gradient is defined to be the input x_t (`_read_out`).
_TAP = "__jaxeif_tap__"


@jax.custom_vjp
def _read_out(y: jax.Array, x: jax.Array, probe: jax.Array) -> jax.Array:
    """Identity in y; the gradient with respect to `probe` is x (reads x out of a scanned layer)."""
    return y


def _read_out_fwd(y, x, probe):
    return y, x


def _read_out_bwd(x, ct):
    return ct, jnp.zeros_like(x), x


_read_out.defvjp(_read_out_fwd, _read_out_bwd)


def _tap_interceptor(next_fun, args, kwargs, context):
    """Route linear layers, the layer stack input and the final hidden states through taps."""
    from jaxeif.models import phi3

    module = context.module
    if context.method_name == "__call__" and isinstance(module, phi3.Linear):
        x, delta = args[0], args[1] if len(args) > 1 else kwargs.get("delta")
        if isinstance(delta, dict) and _TAP in delta:
            tap = delta[_TAP]
            return _read_out(next_fun(x, None) + tap["eps"], x, tap["probe"])
    if context.method_name == "__call__" and isinstance(module, phi3.DecoderLayer):
        lora = args[1]
        if isinstance(lora, dict) and _TAP in lora:
            return next_fun(args[0] + lora[_TAP]["eps"], *args[1:], **kwargs)
    if context.method_name == "__call__" and isinstance(module, phi3.Phi3Model):
        lora = args[2] if len(args) > 2 else kwargs.get("lora")
        if isinstance(lora, dict) and _TAP in lora:
            h, e = next_fun(*args, **kwargs)
            return _read_out(h, h, lora[_TAP]["probe"]), e
    return next_fun(*args, **kwargs)


def _is_norm(path) -> bool:
    return any("norm" in str(getattr(k, "key", k)) for k in path)


def split_norms(params: PyTree) -> tuple[PyTree, PyTree]:
    """(norm weights, everything else) as two trees of the same structure with None holes."""
    norms = jax.tree_util.tree_map_with_path(lambda p, x: x if _is_norm(p) else None, params)
    rest = jax.tree_util.tree_map_with_path(lambda p, x: None if _is_norm(p) else x, params)
    return norms, rest


def _merge(norms: PyTree, rest: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: b if a is None else a, norms, rest, is_leaf=lambda x: x is None)


_LINEARS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def _linear_dims(config, module: tuple[str, str]) -> tuple[int, int]:
    c = config
    h, kv, hd, d, f = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    return {
        ("self_attn", "qkv_proj"): (d, (h + 2 * kv) * hd),
        ("self_attn", "o_proj"): (h * hd, d),
        ("mlp", "gate_up_proj"): (d, 2 * f),
        ("mlp", "down_proj"): (f, d),
    }[module]


def _zero_taps(config, t: int) -> dict:
    """Zero perturbations/probes for every tapped place, for one sample of t tokens."""
    L, d = config.num_hidden_layers, config.hidden_size
    layers: dict = {"self_attn": {}, "mlp": {}, _TAP: {"eps": jnp.zeros((L, 1, t, d))}}
    for group, name in _LINEARS:
        n_in, n_out = _linear_dims(config, (group, name))
        layers[group][name] = {_TAP: {"eps": jnp.zeros((L, 1, t, n_out)), "probe": jnp.zeros((L, 1, t, n_in))}}
    taps = {"model": {"layers": layers, _TAP: {"probe": jnp.zeros((1, t, d))}}}
    if not config.tie_word_embeddings:
        taps["lm_head"] = {_TAP: {"eps": jnp.zeros((1, t, config.vocab_size)), "probe": jnp.zeros((1, t, d))}}
    return taps


def sgd_step_lowrank(apply_fn: ApplyFn, params: PyTree, config, example: Tokens, lr) -> tuple[PyTree, dict]:
    """(updated norm weights, low-rank deltas) of ONE SGD step on `example` (a Tokens row), exactly.

    `apply_fn(merge(norms, params), ids, mask, lora=deltas)` is then the fine-tuned model.
    """
    norms, rest = split_norms(params)
    t = example.ids.shape[0]

    def loss(norms, taps):
        with nn.intercept_methods(_tap_interceptor):
            logits = apply_fn(_merge(norms, rest), example.ids[None], example.attention[None], lora=taps)[0]
        return sequence_nll(logits, example.ids, example.score), logits

    (g_norms, g_taps), logits = jax.grad(loss, argnums=(0, 1), has_aux=True)(norms, _zero_taps(config, t))
    g_logits = jax.grad(sequence_nll)(logits, example.ids, example.score)  # C: [t, V]
    new_norms = jax.tree.map(lambda w, g: w - lr * g, norms, g_norms)
    layers = {"self_attn": {}, "mlp": {}}
    for group, name in _LINEARS:
        tap = g_taps["model"]["layers"][group][name][_TAP]
        layers[group][name] = {"a": jnp.swapaxes(tap["probe"][:, 0], 1, 2), "b": -lr * tap["eps"][:, 0]}
    g_embed_out = g_taps["model"]["layers"][_TAP]["eps"][0, 0]  # dL/d(input of layer 0) = dL/d(embedding output)
    onehot = jax.nn.one_hot(example.ids, config.vocab_size, dtype=g_embed_out.dtype)  # [t, V]
    if config.tie_word_embeddings:
        hidden = g_taps["model"][_TAP]["probe"][0]  # final hidden states H: [t, d]
        embed = {"a": jnp.concatenate([onehot, g_logits], 0).T, "b": -lr * jnp.concatenate([g_embed_out, hidden], 0)}
    else:
        embed = {"a": onehot.T, "b": -lr * g_embed_out}
    deltas = {"model": {"embed_tokens": embed, "layers": layers}}
    if not config.tie_word_embeddings:
        tap = g_taps["lm_head"][_TAP]
        deltas["lm_head"] = {"a": tap["probe"][0].T, "b": -lr * tap["eps"][0]}
    return new_norms, deltas


@functools.partial(jax.jit, static_argnames=("apply_fn", "config"))
def _lowrank_factors(apply_fn, params, config, train: Tokens, lr):
    return jax.vmap(lambda ex, r: sgd_step_lowrank(apply_fn, params, config, ex, r))(train, lr)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _lowrank_losses(apply_fn, params, norms, deltas, evals: Tokens):
    _, rest = split_norms(params)

    def row(n, d):
        logits = apply_fn(_merge(n, rest), evals.ids, evals.attention, lora=d)
        return jax.vmap(sequence_nll)(logits, evals.ids, evals.score)

    return jax.vmap(row)(norms, deltas)


def lowrank_sgd_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    config,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float | np.ndarray = 1e-3,
    chunk_size: int = 1,
    eval_batch: int | None = 3,
    bucket: int | None = 16,
    rank_bucket: int | None = 32,
    base: np.ndarray | None = None,
    progress=None,
) -> np.ndarray:
    """Dense single-step SGD EIF, f32[n, m], computed exactly in low-rank form (no weight copies).

    Equals `finetuned_eif(..., steps=1, optimizer=None)`. Train rows are padded to their length rounded
    up to `rank_bucket` (None: all to the longest; padding adds exact zeros to the update) and
    `chunk_size` fine-tunes of one such length are vmapped together; evals are sorted by length and
    scored `eval_batch` rows at a time, each batch padded to a multiple of `bucket` tokens
    (`length_batches`; None: one batch / the longest). Fixed shapes: repeats reuse compiled programs.
    `base` (f32[m], the evals' losses before fine-tuning) is computed with `nll` when not given.
    """
    evals = train if evals is None else evals
    n = np.asarray(train.ids).shape[0]
    lr = np.broadcast_to(np.asarray(lr, np.float32), (n,))
    batches = length_batches(evals, eval_batch, bucket)
    base = nll(apply_fn, params, evals, bucket=bucket) if base is None else np.asarray(base, np.float32)
    lengths = np.asarray(train.lengths)
    ranks = (np.array([round_up(int(t), rank_bucket) for t in lengths]) if rank_bucket is not None
             else np.full(n, int(lengths.max())))
    out = np.zeros((n, base.shape[0]), np.float32)
    for rank in np.unique(ranks):
        members = np.flatnonzero(ranks == rank)
        for start in range(0, len(members), chunk_size):
            rows = members[start : start + chunk_size]
            idx = np.concatenate([rows, np.full(chunk_size - len(rows), rows[0])])
            chunk = fit_length(train.take(idx), int(rank))
            norms, deltas = _lowrank_factors(apply_fn, params, config, _as_jnp(chunk), jnp.asarray(lr[idx]))
            for cols, batch in batches:
                vals = np.asarray(_lowrank_losses(apply_fn, params, norms, deltas, _as_jnp(batch)))
                out[np.ix_(rows, cols)] = vals[: len(rows), : len(cols)] - base[cols][None]
            if progress is not None:
                progress.update(len(rows))
    return out


# ----------------------------------------------------------------------------- prompted EIF
def prompted_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    tokenizer,
    config,
    texts: Sequence[str],
    eval_texts: Sequence[str] | None = None,
    *,
    batch_size: int = 4,
    base: np.ndarray | None = None,
    progress=None,
) -> np.ndarray:
    """EIF_prompt[i, j] = L(p_j | context p_i) - L(p_j), f32[n, m]; context format: PROMPT_FORMAT.

    Pairs are scored `batch_size` at a time in order of length, the output layer only at p_j's tokens
    (`nll`). `base` (f32[m], L(p_j) alone) is computed when not given.
    """
    texts = list(texts)
    evals = texts if eval_texts is None else list(eval_texts)
    if base is None:
        base = nll(apply_fn, params, tokenize(tokenizer, evals, config=config), batch_size=batch_size)
    pairs = tokenize(tokenizer, [e for _ in texts for e in evals], contexts=[t for t in texts for _ in evals], config=config)
    after = nll(apply_fn, params, pairs, batch_size=batch_size, progress=progress)
    return after.reshape(len(texts), len(evals)) - np.asarray(base, np.float32)[None]


# ----------------------------------------------------------------------------- learning-rate sweep
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
    """Run `eif_at(lr)` for each lr (increasing) and pick the plateau lr with `choose_plateau`."""
    lrs = np.asarray(sorted(float(x) for x in lrs))
    if len(lrs) < 3 or np.any(lrs <= 0):
        raise ValueError("lr_sweep needs at least 3 positive learning rates")
    mats = []
    it = lrs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lrs, desc="lr sweep")
    for lr in it:
        mats.append(_offdiag(eif_at(float(lr))))
    magnitude = np.array([np.median(np.abs(m)) for m in mats])
    agreement = np.array([np.nan] + [np.corrcoef(a, b)[0, 1] for a, b in zip(mats[:-1], mats[1:])])
    chosen = choose_plateau(lrs, np.nan_to_num(agreement, nan=-1.0), threshold)
    return LrSweep(lrs, magnitude, agreement, 1.0 - agreement, chosen, threshold)


def plot_lr_sweep(sweep: LrSweep, title: str | None = None):
    """The sweep figure (magnitude and agreement vs lr, chosen lr marked) via jaxeif.plot."""
    from jaxeif import plot

    return plot.lr_sweep(sweep.lrs, sweep.magnitude, sweep.agreement, threshold=sweep.threshold,
                         chosen=sweep.chosen, title=title)
