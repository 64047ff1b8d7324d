"""Language-model influence: the length-normalised NLL, tokenising samples, fine-tuned EIF
(dense via `jaxeif.eif`, LoRA, and the exact low-rank single-step SGD path) and prompted EIF.

Models enter as `apply_fn(params, ids int32[b, t], attention_mask=None, lora=None, positions=None)
-> f32[b, t, v]` (`jaxeif.models.phi3`), where attention_mask may be a bool[b, t, t] visibility
mask: losses are computed on samples packed into shared rows (`jaxeif.packing`; exact, no padding
to the longest sample, a prompt context computed once for all its continuations). A sample is a
`Tokens` row: ids, attention (1 = real token) and score (1 = this token's log-probability counts in
the loss). The loss of a sample is

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
from jaxeif import checks, packing
from jaxeif.packing import round_up
from jaxeif.finetune import PyTree

SEPARATOR = "\n"
ROW_LENGTH = 256  # tokens per packed row (jaxeif.packing): wide matmuls, attention still cheap (measured: 256 beat 128 and 512)
PROMPT_FORMAT = "BOS + tokens(p_i) + tokens('\\n') + tokens(p_j); only p_j's tokens scored; minus L(BOS + tokens(p_j))"
ApplyFn = Callable[..., jax.Array]


class Tokens(NamedTuple):
    """A batch of tokenised samples, right-padded: ids int32[n, t], attention int32[n, t], score f32[n, t].

    ids: token ids in [0, vocabulary size). attention: 1 for the sample's real tokens, then 0 for the
    padding on the right. score: the weight of -log p(ids[t] | ids[<t]) in the sample's loss, >= 0,
    0 at position 0 (nothing predicts it) and on padding, > 0 somewhere; `tokenize` makes 0/1 scores.
    Every language-model entry point checks these rules (`check_tokens`).
    """

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


def check_tokens(name: str, tokens: Any, vocab_size: int) -> Tokens:
    """`tokens` as numpy Tokens (int32, int32, float32) after checking the rules of `Tokens`;
    a ValueError or TypeError naming `name` and the field otherwise."""
    if not isinstance(tokens, tuple) or len(tokens) != 3:
        raise TypeError(f"`{name}` must be a jaxeif.lm.Tokens(ids, attention, score) (lm.tokenize makes one), "
                        f"got {type(tokens).__name__}")
    ids, att, score = (_host_array(f"{name}.{field}", x) for field, x in zip(Tokens._fields, tokens))
    if not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != bool):
        raise TypeError(f"`{name}.ids` has dtype {ids.dtype}; token ids must be integers (int32)")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"`{name}.ids` has shape {ids.shape}; pass int[n, t], one row per sample "
                         "(add a leading axis for a single sample: ids[None])")
    for field, x in (("attention", att), ("score", score)):
        if x.shape != ids.shape:
            raise ValueError(f"`{name}.{field}` has shape {x.shape} but `{name}.ids` has {ids.shape}; give all three "
                             "fields the same [n, t] shape")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
            raise TypeError(f"`{name}.{field}` has dtype {x.dtype}; it must hold real numbers")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        (r, t), value = bad[0], ids[tuple(bad[0])]
        raise ValueError(f"`{name}.ids` holds id {value} (sample {r}, position {t}), outside the model's vocabulary "
                         f"[0, {vocab_size}); tokenize with the model's own tokenizer (lm.tokenize)")
    if not np.all((att == 0) | (att == 1)):
        raise ValueError(f"`{name}.attention` must hold only 0 and 1, got {np.unique(att)[:5].tolist()}")
    att = att.astype(np.int32)
    lengths = att.sum(axis=1)
    not_prefix = np.flatnonzero(np.any(att != (np.arange(att.shape[1])[None] < lengths[:, None]), axis=1))
    if not_prefix.size:
        raise ValueError(f"`{name}.attention` of sample {not_prefix[0]} is not 1s followed by 0s: pad on the right "
                         "(real tokens first, attention 1)")
    score = score.astype(np.float32)
    if not np.all(np.isfinite(score)) or np.any(score < 0):
        raise ValueError(f"`{name}.score` must be finite and >= 0 (a weight per token)")
    if np.any(score[:, 0] != 0):
        raise ValueError(f"`{name}.score` is nonzero at position 0 of sample {np.flatnonzero(score[:, 0])[0]}: "
                         "nothing predicts the first token, so set its score to 0")
    padded = np.argwhere((score != 0) & (att == 0))
    if padded.size:
        raise ValueError(f"`{name}.score` is nonzero where attention is 0 (sample {padded[0][0]}, position "
                         f"{padded[0][1]}); score only real tokens")
    empty = np.flatnonzero(score.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"`{name}.score` of sample {empty[0]} is all zero: nothing to score; mark the tokens whose "
                         "log-probability counts with score > 0")
    return Tokens(ids.astype(np.int32), att, score)


def _host_array(name: str, x: Any) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"`{name}` is traced; the language-model entry points take concrete Tokens (call them outside jit)")
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}") from e


def check_example(name: str, example: Any, vocab_size: int) -> Tokens:
    """One sample (Tokens of 1-d rows), checked as `check_tokens` checks a batch; returns it with 1-d rows."""
    if not isinstance(example, tuple) or len(example) != 3:
        raise TypeError(f"`{name}` must be ONE sample, a jaxeif.lm.Tokens of 1-d rows, got {type(example).__name__}")
    shapes = [np.shape(x) for x in example]
    if any(len(shape) != 1 for shape in shapes):
        raise ValueError(f"`{name}` must be ONE sample, Tokens of 1-d rows (e.g. Tokens(*(x[k] for x in toks))), "
                         f"got shapes {shapes}")
    one = check_tokens(name, Tokens(*(np.asarray(x)[None] for x in example)), vocab_size)
    return Tokens(*(x[0] for x in one))


def model_vocab_size(apply_fn: ApplyFn, params: PyTree) -> int:
    """The vocabulary size of a model: the last axis of its logits, found abstractly (no compute)."""
    out = jax.eval_shape(lambda p: apply_fn(p, jnp.zeros((1, 2), jnp.int32)), params)
    return int(out.shape[-1])


def _checked(apply_fn, params, train, evals, vocab_size: int | None = None) -> tuple[Tokens, Tokens | None]:
    """`train` and `evals` (None stays None) checked against the model's vocabulary."""
    vocab_size = model_vocab_size(apply_fn, params) if vocab_size is None else int(vocab_size)
    train = check_tokens("train", train, vocab_size)
    return train, None if evals is None else check_tokens("evals", evals, vocab_size)


# ----------------------------------------------------------------------------- tokenising
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (HF tokenizers, or tokenizers.Tokenizer)."""
    if not isinstance(text, str):
        raise TypeError(f"a sample must be a str, got {type(text).__name__}")
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _body(tokenizer, text: str, k: int) -> list[int]:
    """Tokens of sample k, which must have some text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"sample {k} is empty ({text!r}); every sample needs some text to score")
    return encode(tokenizer, text)


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
        body = _body(tokenizer, text, k)
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


def slot_nll(logits: jax.Array, at: jax.Array, target: jax.Array) -> jax.Array:
    """-log p(target) read at logits index `at`: logits f32[r, t, v], at/target int32[r, k] -> f32[r, k]."""
    logits = logits.astype(jnp.float32)
    lse = jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), at, axis=1)
    picked = jnp.take_along_axis(jnp.take_along_axis(logits, at[..., None], axis=1), target[..., None], axis=2)[..., 0]
    return lse - picked


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _packed_slot_nll(apply_fn, params, row: dict, lora=None) -> jax.Array:
    logits = apply_fn(params, row["ids"], row["visible"], lora=lora, positions=row["positions"])
    return slot_nll(logits, row["at"], row["target"])


def _row_arrays(packed: packing.Packed, k: int) -> dict:
    return {f: jnp.asarray(getattr(packed, f)[k : k + 1]) for f in ("ids", "positions", "visible", "at", "target")}


def _group_counts(packed: packing.Packed) -> np.ndarray:
    """Summed slot weight (#scored tokens) of every group, float64[groups]."""
    return np.bincount(packed.group.ravel(), packed.weight.ravel().astype(np.float64), minlength=packed.groups)


def _group_means(packed: packing.Packed, slot_values: np.ndarray) -> np.ndarray:
    """Weighted mean of the slot values f[r, t] of every group: each group's length-normalised NLL, f64[groups]."""
    weighted = packed.weight.astype(np.float64) * np.asarray(slot_values, np.float64).reshape(packed.weight.shape)
    return np.bincount(packed.group.ravel(), weighted.ravel(), minlength=packed.groups) / np.maximum(_group_counts(packed), 1e-30)


def packed_nll(apply_fn: ApplyFn, params: PyTree, packed: packing.Packed, lora=None, progress=None) -> np.ndarray:
    """Length-normalised NLL of every group of `packed`, f32[groups], one row per forward pass."""
    values = []
    for k in range(packed.ids.shape[0]):
        values.append(np.asarray(_packed_slot_nll(apply_fn, params, _row_arrays(packed, k), lora))[0])
        if progress is not None:
            progress.update(int(np.unique(packed.group[k][packed.weight[k] > 0]).size))
    return _group_means(packed, np.stack(values)).astype(np.float32)


def pack_tokens(tokens: Tokens, row_length: int = ROW_LENGTH) -> packing.Packed:
    """`tokens`' samples packed into rows (`jaxeif.packing`): group k = sample k."""
    return packing.samples(np.asarray(tokens.ids), tokens.lengths, np.asarray(tokens.score), row_length=row_length)


def nll(apply_fn: ApplyFn, params: PyTree, tokens: Tokens, *, row_length: int = ROW_LENGTH, progress=None) -> np.ndarray:
    """Loss of every sample, f32[n]: samples packed into shared rows of <= `row_length` tokens, each
    sample attending only to itself (exact; no padding to the longest sample). `apply_fn` must accept
    3-d attention masks and `positions` (jaxeif.models.phi3's does)."""
    tokens = check_tokens("tokens", tokens, model_vocab_size(apply_fn, params))
    return packed_nll(apply_fn, params, pack_tokens(tokens, row_length), progress=progress)


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
    train, evals = _checked(apply_fn, params, train, evals)
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
    train, evals = _checked(apply_fn, params, train, evals)
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
# layer) change densely, by the sum of per-token gradients. The factors x_t, g_t are read out of the
# (scanned) model with a flax method interceptor: each linear output gets a zero perturbation `eps`
# (its gradient is g_t) and a zero `probe` whose gradient is defined to be the input x_t (`_read_out`).
# All samples of a packed row (jaxeif.packing) share ONE backward pass: with block attention, the
# per-token factors of sample i's tokens are exactly those of sample i trained alone.
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
    """Zero per-token perturbations/probes for every tapped place of one packed row of t tokens: linear
    outputs/inputs, the layer-stack input, the final hidden states, and (per-token additive deltas of)
    every RMSNorm weight, whose gradients are then each token's contribution to the norm's gradient."""
    L, d = config.num_hidden_layers, config.hidden_size
    norm = lambda *lead: {"w": jnp.zeros((*lead, 1, t, d))}  # noqa: E731
    layers: dict = {"self_attn": {}, "mlp": {}, _TAP: {"eps": jnp.zeros((L, 1, t, d))},
                    "input_layernorm": norm(L), "post_attention_layernorm": norm(L)}
    for group, name in _LINEARS:
        n_in, n_out = _linear_dims(config, (group, name))
        layers[group][name] = {_TAP: {"eps": jnp.zeros((L, 1, t, n_out)), "probe": jnp.zeros((L, 1, t, n_in))}}
    taps = {"model": {"layers": layers, "norm": norm(), _TAP: {"probe": jnp.zeros((1, t, d))}}}
    if not config.tie_word_embeddings:
        taps["lm_head"] = {_TAP: {"eps": jnp.zeros((1, t, config.vocab_size)), "probe": jnp.zeros((1, t, d))}}
    return taps


@functools.partial(jax.jit, static_argnames=("apply_fn", "config"))
def _row_gradients(apply_fn, params, config, row: dict, slot_weight: jax.Array) -> tuple[dict, jax.Array]:
    """Per-token gradients of one packed row's loss sum_g L_g (slot_weight = weight / #scored of its group):
    every tap's gradient, and C = dL/dlogits f32[t, V]. Block attention makes the tokens of sample g
    depend on nothing else, so restricted to g's tokens these are exactly the gradients of L_g alone."""

    def loss(taps):
        with nn.intercept_methods(_tap_interceptor):
            logits = apply_fn(params, row["ids"], row["visible"], lora=taps, positions=row["positions"])
        return jnp.sum(slot_weight * slot_nll(logits, row["at"], row["target"])), logits

    g_taps, logits = jax.grad(loss, has_aux=True)(_zero_taps(config, row["ids"].shape[1]))
    g_logits = jax.grad(lambda z: jnp.sum(slot_weight * slot_nll(z, row["at"], row["target"])))(logits)
    return g_taps, g_logits[0]


def _gather_deltas(config, g_taps: dict, g_logits: jax.Array, ids: jax.Array, idx: jax.Array, valid: jax.Array,
                   lr: jax.Array) -> dict:
    """The exact low-rank delta of one SGD step on the sample at row tokens `idx` int32[R] (`valid`
    f32[R] masks padding slots: they add exact zeros), as an apply_fn `lora` dict."""
    take = lambda x: jnp.take(x, idx, axis=-2) * valid[:, None]  # noqa: E731  [..., t, f] -> [..., R, f]
    total = lambda x: jnp.sum(take(x), axis=-2)  # noqa: E731  this sample's summed per-token gradient
    lay = g_taps["model"]["layers"]
    layers: dict = {"self_attn": {}, "mlp": {}}
    for group, name in _LINEARS:
        tap = lay[group][name][_TAP]
        layers[group][name] = {"a": jnp.swapaxes(take(tap["probe"][:, 0]), 1, 2), "b": -lr * take(tap["eps"][:, 0])}
    for name in ("input_layernorm", "post_attention_layernorm"):
        layers[name] = {"w": -lr * total(lay[name]["w"][:, 0])}
    g_embed_out = take(lay[_TAP]["eps"][0, 0])  # dL/d(input of layer 0) = dL/d(embedding output): [R, d]
    onehot = jax.nn.one_hot(jnp.take(ids, idx), config.vocab_size, dtype=g_embed_out.dtype) * valid[:, None]
    if config.tie_word_embeddings:
        hidden = take(g_taps["model"][_TAP]["probe"][0])  # final hidden states H: [R, d]
        embed = {"a": jnp.concatenate([onehot, take(g_logits)], 0).T, "b": -lr * jnp.concatenate([g_embed_out, hidden], 0)}
    else:
        embed = {"a": onehot.T, "b": -lr * g_embed_out}
    deltas = {"model": {"embed_tokens": embed, "layers": layers, "norm": {"w": -lr * total(g_taps["model"]["norm"]["w"][0])}}}
    if not config.tie_word_embeddings:
        tap = g_taps["lm_head"][_TAP]
        deltas["lm_head"] = {"a": take(tap["probe"][0]).T, "b": -lr * take(tap["eps"][0])}
    return deltas


_gather_chunk = jax.jit(jax.vmap(_gather_deltas, in_axes=(None, None, None, None, 0, 0, 0)), static_argnums=0)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _lowrank_slot_nll(apply_fn, params, deltas, row: dict) -> jax.Array:
    """Slot NLLs of one packed eval row under each fine-tune of a chunk: f32[c, 1, t]."""
    return jax.vmap(lambda d: _packed_slot_nll(apply_fn, params, row, d))(deltas)


def _slot_weights(packed: packing.Packed) -> np.ndarray:
    """weight / (#scored tokens of the slot's group): the packed loss sum_g L_g, each L_g a mean."""
    return (packed.weight / np.maximum(_group_counts(packed)[packed.group], 1e-30)).astype(np.float32)


def sgd_step_lowrank(apply_fn: ApplyFn, params: PyTree, config, example: Tokens, lr) -> dict:
    """The low-rank delta of ONE SGD step on `example` (a Tokens row), exactly: `apply_fn(params, ids,
    lora=delta)` is then the fine-tuned model (norm weights enter as additive deltas)."""
    example = check_example("example", example, config.vocab_size)
    n = int(np.asarray(example.attention).sum())
    packed = packing.samples(np.asarray(example.ids)[None], np.array([n]), np.asarray(example.score)[None], multiple=1)
    g_taps, g_logits = _row_gradients(apply_fn, params, config, _row_arrays(packed, 0), jnp.asarray(_slot_weights(packed)))
    one = lambda x: jnp.asarray(x)[None]  # noqa: E731
    deltas = _gather_chunk(config, g_taps, g_logits, jnp.asarray(packed.ids[0]), one(np.arange(n)), one(np.ones(n, np.float32)),
                           one(np.float32(lr)))
    return jax.tree.map(lambda x: x[0], deltas)


def lowrank_sgd_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    config,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float | np.ndarray = 1e-3,
    chunk_size: int = 1,
    row_length: int = ROW_LENGTH,
    rank_bucket: int = 32,
    base: np.ndarray | None = None,
    progress=None,
) -> np.ndarray:
    """Dense single-step SGD EIF, f32[n, m], computed exactly in low-rank form (no weight copies).

    Equals `finetuned_eif(..., steps=1, optimizer=None)`. The train samples are packed into rows
    (`jaxeif.packing`) and ONE backward pass per row gives every sample's per-token factors; sample
    i's update is then rank <= its length (rounded up to `rank_bucket` with exact zeros), and `chunk_size`
    fine-tunes of one rank are vmapped over the packed evals. `base` (f32[m], the evals' losses before
    fine-tuning) is computed with `nll` when not given.
    """
    train, evals = _checked(apply_fn, params, train, evals, config.vocab_size)
    evals = train if evals is None else evals
    n = np.asarray(train.ids).shape[0]
    lr = np.broadcast_to(np.asarray(checks.learning_rate(lr, n), np.float32), (n,))
    packed_train = pack_tokens(train, row_length)
    packed_evals = packed_train if evals is train else pack_tokens(evals, row_length)
    if base is None:
        base = packed_nll(apply_fn, params, packed_evals)
    base = np.asarray(base, np.float32)
    eval_rows = [_row_arrays(packed_evals, k) for k in range(packed_evals.ids.shape[0])]
    weights = _slot_weights(packed_train)
    out = np.zeros((n, base.shape[0]), np.float32)
    for k in range(packed_train.ids.shape[0]):
        g_taps, g_logits = _row_gradients(apply_fn, params, config, _row_arrays(packed_train, k), jnp.asarray(weights[k : k + 1]))
        ids = jnp.asarray(packed_train.ids[k])
        members = np.flatnonzero(packed_train.spans[:, 0] == k)
        ranks = np.array([round_up(int(packed_train.spans[i, 2]), rank_bucket) for i in members])
        for rank in np.unique(ranks):
            same = members[ranks == rank]
            for start in range(0, len(same), chunk_size):
                rows = same[start : start + chunk_size]
                idx = np.concatenate([rows, np.full(chunk_size - len(rows), rows[0])])
                _, first, length = packed_train.spans[idx].T
                slots = np.arange(rank)
                tok_idx = np.minimum(first[:, None] + slots[None], packed_train.ids.shape[1] - 1).astype(np.int32)
                valid = (slots[None] < length[:, None]).astype(np.float32)
                deltas = _gather_chunk(config, g_taps, g_logits, ids, jnp.asarray(tok_idx), jnp.asarray(valid),
                                       jnp.asarray(lr[idx]))
                vals = np.concatenate([np.asarray(_lowrank_slot_nll(apply_fn, params, deltas, row)) for row in eval_rows],
                                      axis=1)  # [chunk, eval rows, t]
                after = np.stack([_group_means(packed_evals, v) for v in vals[: len(rows)]])
                out[rows] = after.astype(np.float32) - base[None]
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
    row_length: int = ROW_LENGTH,
    base: np.ndarray | None = None,
    progress=None,
) -> np.ndarray:
    """EIF_prompt[i, j] = L(p_j | context p_i) - L(p_j), f32[n, m]; context format: PROMPT_FORMAT.

    Each context is computed once and followed, in packed rows (`jaxeif.packing.prefixed`), by every
    p_j, each seeing only the context and itself: exactly the n * m separate sequences, at about half
    their cost. `base` (f32[m], L(p_j) alone) is computed when not given.
    """
    texts = list(texts)
    evals = texts if eval_texts is None else list(eval_texts)
    check_vocab(tokenizer, config)
    if base is None:
        base = nll(apply_fn, params, tokenize(tokenizer, evals, config=config), row_length=row_length)
    bos = bos_token_id(tokenizer, config)
    head, sep = ([] if bos is None else [bos]), encode(tokenizer, SEPARATOR)
    prefixes = [head + _body(tokenizer, t, k) + sep for k, t in enumerate(texts)]
    bodies = [_body(tokenizer, t, k) for k, t in enumerate(evals)]
    longest = max(map(len, prefixes)) + max(map(len, bodies))
    if longest > config.max_position_embeddings:
        raise ValueError(f"a context plus a sample is {longest} tokens long, longer than the model's context of "
                         f"{config.max_position_embeddings} tokens; shorten the samples")
    packed = packing.prefixed(prefixes, bodies, row_length=row_length)
    after = packed_nll(apply_fn, params, packed, progress=progress)
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
