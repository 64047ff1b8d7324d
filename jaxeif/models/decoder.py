"""One Flax decoder for the open causal LMs people fine-tune, computing what transformers' PyTorch
`LlamaForCausalLM`, `MistralForCausalLM`, `Phi3ForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` and
`Gemma2ForCausalLM` compute; the architectures differ only in `DecoderConfig`'s switches.

    from jaxeif.models import loading
    apply_fn, params, config = loading.from_pretrained(path)  # a Decoder; HF dir or .gguf; None: SmolLM2
    logits = apply_fn(params, input_ids)                      # int32[b, t] -> f32[b, t, vocab]

Params are a nested dict named like transformers' state dict, with the decoder layers STACKED
on a leading axis (one `nn.scan`), weights in transformers' [out, in] layout:

    params["model"]["embed_tokens"]["weight"]                  [vocab, d]
    params["model"]["layers"]["self_attn"]["qkv_proj"]["weight"] [L, (h + 2 kv) * hd, d]
    params["model"]["layers"]["self_attn"]["o_proj"]["weight"]   [L, d, h * hd]
    params["model"]["layers"]["mlp"]["gate_up_proj"]["weight"]   [L, 2 * ffn, d]   (gate rows first)
    params["model"]["layers"]["mlp"]["down_proj"]["weight"]      [L, d, ffn]
    params["model"]["layers"]["input_layernorm"|"post_attention_layernorm"]["weight"]  [L, d]
    (qkv_bias) params["model"]["layers"]["self_attn"]["qkv_proj"]["bias"]  [L, (h + 2 kv) * hd]
    (qk_norm) params["model"]["layers"]["self_attn"]["q_norm"|"k_norm"]["weight"]  [L, hd]
    (sandwich_norms) params["model"]["layers"]["pre_feedforward_layernorm"|"post_feedforward_layernorm"]["weight"]
    params["model"]["norm"]["weight"] [d];  params["lm_head"]["weight"] [vocab, d] (absent when tied)

Per-linear deltas and taps: the `delta=` hook.  `apply_fn(params, ids, attention_mask=None, delta=None)`
takes `delta` as a dict mirroring `params` (layer entries carry the leading L axis), or a
`jaxeif.models.lora.Adapters` (that dict plus a static `scale` = alpha / rank).  Modules absent from
it are unchanged; the base params are only read, never copied.  A module's entry may hold:
  * "a", "b"  a low-rank weight delta (LoRA adapters and one exact SGD step alike).  Every weight
    matmul is `lowrank_linear(x, w, delta, scale)`: y = x @ w.T + scale * (x @ a) @ b, a [in, r],
    b [r, out]; the embedding lookup is `lowrank_embed` (E[ids] + scale * a[ids] @ b, a [vocab, r],
    b [r, d]); with tied embeddings the embed delta also changes the output projection
    (logits = h E^T + scale * (h b^T) a^T), so it stays exactly E + a b.
  * "w"  (RMSNorm entries) added to the norm weight: [d], or per token [b, t, d] (q_norm / k_norm:
    [hd] or [b, t, hd], shared by the heads).
  * "bias"  (linears with a bias) added to the bias: [out], or per token [b, t, out].
  * "out"  added to the module's output ([b, t, out]; for embed_tokens the embedding output): a
    zero "out" is a tap whose gradient is dL/d(output).
  * "read"  a zero probe shaped like the module's input: the output is unchanged and the gradient
    with respect to "read" is the input itself (`read_input`), which reads per-token inputs out of
    the scanned layers in the same backward pass.
"out" and "read" work on the linears (qkv_proj, o_proj, gate_up_proj, down_proj), on "lm_head"
(the output projection, tied or not: "read" gives the final hidden states, "out" dL/d(logits before
soft-capping)) and "out" on embed_tokens (before Gemma's sqrt(hidden) scale).
`jax.vmap(apply_fn, in_axes=(None, None, None, 0))` runs many deltas over one shared model.  One SGD
step on a sample (inputs x_t, output-gradients g_t of a layer) is the
delta a = [x_1 .. x_T] (in, T), b = -lr * [g_1 .. g_T]^T (T, out): exact (`jaxeif.lm.lowrank`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeif.deprecation import JaxeifDeprecationWarning

Params = dict
Delta = dict  # one module's entry: {"a": [..., in, r], "b": [..., r, out]} and/or taps {"out", "read"}

ENTRY_KEYS = {"linear": {"a", "b", "bias", "out", "read"}, "embed": {"a", "b", "out"}, "norm": {"w"}}


ARCHITECTURES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma2")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static hyper-parameters of a decoder (hashable; everything the forward pass needs).

    The architecture switches (set by `jaxeif.models.loading` from config.json or GGUF metadata):
      qkv_bias: q/k/v projections carry biases (Qwen2); qk_norm: per-head RMSNorm of q and k before
      RoPE (Qwen3); norm_offset: RMSNorm multiplies by (norm_offset + w) (Gemma: 1); hidden_act: "silu"
      or "gelu_pytorch_tanh" (Gemma); embed_scale: embeddings times sqrt(hidden_size) (Gemma);
      sandwich_norms: norms after attention and around the MLP (Gemma 2's pre/post feed-forward norms);
      query_pre_attn_scalar: attention scale is its -1/2 power (default head_dim); attn_logit_softcapping /
      final_logit_softcapping: cap * tanh(x / cap) on attention scores / logits (Gemma 2);
      layer_types: per layer "full_attention" or "sliding_attention" (None: every layer slides when
      `sliding_window` is set); sliding_window: keys within this many positions of the query.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_type: str = "default"  # "default" or "longrope"
    short_factor: tuple | None = None
    long_factor: tuple | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 4096
    attention_factor: float = 1.0  # cos/sin multiplier (LongRoPE)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "phi3"  # one of ARCHITECTURES: where the weights came from
    bos_token_id: int | None = None
    eos_token_id: Any = None
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    hidden_act: str = "silu"
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"DecoderConfig: hidden_act={self.hidden_act!r} is not supported; use one of {ACTIVATIONS}"
            )
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if len(self.layer_types) != self.num_hidden_layers or bad:
                raise ValueError(
                    f"DecoderConfig: layer_types must list one of {LAYER_TYPES} per layer "
                    f"({self.num_hidden_layers}), got {self.layer_types!r}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("DecoderConfig: layer_types has sliding_attention layers but sliding_window is None")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its attention is limited to the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_hidden_layers
        if self.layer_types is None:
            return (True,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def norms(self) -> tuple[str, ...]:
        """The names of each layer's hidden-size RMSNorms."""
        extra = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if self.sandwich_norms else ()
        return ("input_layernorm", "post_attention_layernorm") + extra


Phi3Config = DecoderConfig  # the Phi-3 port's name (jaxeif.models.phi3)


# ----------------------------------------------------------------------------- low-rank matmuls and taps
def check_entry(delta: Delta | None, kind: str) -> Delta | None:
    """`delta` itself; a ValueError for keys that module kind ("linear", "embed", "norm") does not take."""
    if delta is not None and not set(delta) <= ENTRY_KEYS[kind]:
        raise ValueError(f"`delta`: a {kind} entry takes keys {sorted(ENTRY_KEYS[kind])}, got {sorted(delta)}")
    return delta


def lowrank_linear(x: jax.Array, w: jax.Array, delta: Delta | None = None, scale: float = 1.0) -> jax.Array:
    """y[..., out] = x @ w.T (+ scale * (x @ a) @ b): the only weight matmul of the model."""
    y = jnp.einsum("...i,oi->...o", x, w)
    if delta is not None and "a" in delta:
        y = y + scale * ((x @ delta["a"].astype(x.dtype)) @ delta["b"].astype(x.dtype))
    return y


def lowrank_embed(ids: jax.Array, e: jax.Array, delta: Delta | None = None, scale: float = 1.0) -> jax.Array:
    """(E + scale * a b)[ids] without forming a b: the embedding lookup's low-rank form."""
    y = jnp.take(e, ids, axis=0)
    if delta is not None and "a" in delta:
        y = y + scale * (jnp.take(delta["a"], ids, axis=0).astype(y.dtype) @ delta["b"].astype(y.dtype))
    return y


def lowrank_unembed(h: jax.Array, e: jax.Array, delta: Delta | None = None, scale: float = 1.0) -> jax.Array:
    """h @ (E + scale * a b).T for a tied output projection (E: [vocab, d])."""
    y = jnp.einsum("...d,vd->...v", h, e)
    if delta is not None and "a" in delta:
        y = y + scale * ((h @ delta["b"].astype(h.dtype).T) @ delta["a"].astype(h.dtype).T)
    return y


@jax.custom_vjp
def read_input(y: jax.Array, x: jax.Array, probe: jax.Array) -> jax.Array:
    """Identity in y; the gradient with respect to `probe` (zeros shaped like x) is x itself."""
    return y


def _read_input_fwd(y, x, probe):
    return y, x


def _read_input_bwd(x, ct):
    return ct, jnp.zeros_like(x), x


read_input.defvjp(_read_input_fwd, _read_input_bwd)


def tapped(y: jax.Array, x: jax.Array, delta: Delta | None) -> jax.Array:
    """A module's output y (input x) with its entry's taps: + delta["out"], and delta["read"] reading x."""
    if delta is None:
        return y
    if "out" in delta:
        y = y + delta["out"].astype(y.dtype)
    if "read" in delta:
        y = read_input(y, x, delta["read"])
    return y


# ----------------------------------------------------------------------------- rotary embeddings
def _rope_dtype(dtype):
    """float64 for a float64 model (tables computed and kept in float64), else float32 (as transformers)."""
    return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


def inv_freq(config: DecoderConfig, seq_len: int, dtype=np.float32) -> np.ndarray:
    """[rotary_dim / 2] inverse frequencies in `dtype` (float32 as transformers, or float64); LongRoPE
    takes the long factors past the original context."""
    dim = config.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(dtype) / dtype(dim)
    base = dtype(config.rope_theta) ** exponent
    if config.rope_type == "default":
        return (dtype(1.0) / base).astype(dtype)
    if config.rope_type == "longrope":
        long = seq_len > config.original_max_position_embeddings
        ext = np.asarray(config.long_factor if long else config.short_factor, dtype)
        return (dtype(1.0) / (ext * base)).astype(dtype)
    raise ValueError(f"unsupported rope_type {config.rope_type!r}: use 'default' or 'longrope'")


def rope_tables(config: DecoderConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin): [b, t, rotary_dim] at int32[b, t] positions, scaled by the attention factor.

    Computed in float32 and cast to `dtype` (transformers' rule), except for a float64 `dtype`: then in
    float64 throughout. LongRoPE switches to its long factors when max(positions) + 1 exceeds the
    original context (transformers' rule; with positions 0..t-1 that is t)."""
    rd = _rope_dtype(dtype)
    pos = positions.astype(rd)[..., None]
    inv = jnp.asarray(inv_freq(config, 1, rd))
    if config.rope_type == "longrope":
        long = jnp.max(positions) + 1 > config.original_max_position_embeddings
        inv = jnp.where(long, jnp.asarray(inv_freq(config, config.original_max_position_embeddings + 1, rd)), inv)
    freqs = pos * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    factor = jnp.asarray(config.attention_factor, rd)
    return (jnp.cos(emb) * factor).astype(dtype), (jnp.sin(emb) * factor).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim features of x: [b, t, heads, hd] (half-split convention); cos, sin [b, t, r]."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([rot * c + rotated * s, rest], axis=-1)


def attention_mask_4d(attention_mask: jax.Array | None, positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool[b, 1, t, t]: key k visible to query q. Always causal in index order (k <= q) and, with a
    sliding window, within it by position. `attention_mask` is either int/bool[b, t] (key padding, as
    transformers) or bool[b, t, t] (which keys each query may see: packed samples, shared prefixes)."""
    b, t = positions.shape
    allowed = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    allowed = jnp.broadcast_to(allowed[None], (b, t, t))
    if sliding_window is not None:
        allowed = allowed & (positions[:, None, :] > positions[:, :, None] - sliding_window)
    if attention_mask is not None:
        m = jnp.asarray(attention_mask).astype(bool)
        allowed = allowed & (m if m.ndim == 3 else m[:, None, :])
    return allowed[:, None]


def positions_or_default(positions: jax.Array | None, b: int, t: int) -> jax.Array:
    """int32[b, t] token positions; None means 0..t-1 in every row."""
    if positions is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return jnp.asarray(positions, jnp.int32)


# ----------------------------------------------------------------------------- Flax modules
def _sub(tree: dict | None, *keys: str):
    for key in keys:
        if tree is None:
            return None
        tree = tree.get(key)
    return tree


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's soft-capping); x itself when cap is None."""
    if cap is None:
        return x
    c = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / c) * c


class Linear(nn.Module):
    """A dense layer holding `weight` [out, in] (transformers' layout) and, with `use_bias`, `bias` [out].

    A delta entry's "bias" ([out], or per token [b, t, out]) is added to the bias."""

    out_features: int
    in_features: int
    dtype: Any = jnp.float32
    scale: float = 1.0
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, delta: Delta | None = None):
        w = self.param("weight", nn.initializers.normal(0.02), (self.out_features, self.in_features), self.dtype)
        delta = check_entry(delta, "linear")
        y = lowrank_linear(x, w, delta, self.scale)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.normal(0.02), (self.out_features,), self.dtype)
            if delta is not None and "bias" in delta:
                bias = bias + delta["bias"].astype(bias.dtype)
            y = y + bias.astype(y.dtype)
        elif delta is not None and "bias" in delta:
            raise ValueError("`delta`: a 'bias' entry on a linear without a bias (this architecture has none there)")
        return tapped(y, x, delta)


class Embed(nn.Module):
    """Holds the token embedding `weight` [vocab, d]; returns it (lookup is `lowrank_embed`)."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.initializers.normal(0.02), (self.vocab_size, self.features), self.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) in at least float32, times (offset + `weight`) (transformers' Llama/Phi3 RMSNorm with
    offset 0, cast back before the weight; Gemma's with offset 1, weighted in float32, cast after).

    `delta` {"w": ...} is added to the weight (broadcast: [d], or per token [b, t, d]; on a per-head
    input [b, t, heads, d] a per-token delta is shared by the heads)."""

    eps: float
    dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x, delta: dict | None = None):
        w = self.param(
            "weight", nn.initializers.ones if self.offset == 0 else nn.initializers.zeros, (x.shape[-1],), self.dtype
        )
        if check_entry(delta, "norm") is not None:
            dw = delta["w"]
            if dw.ndim == 3 and x.ndim == 4:
                dw = dw[:, :, None, :]
            w = w + dw.astype(w.dtype)
        wide = jnp.promote_types(x.dtype, jnp.float32)  # at least float32 (float64 stays float64)
        h = x.astype(wide)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + jnp.asarray(self.eps, wide))
        if self.offset == 0:
            return w * h.astype(x.dtype)
        return (h * (jnp.asarray(self.offset, wide) + w.astype(wide))).astype(x.dtype)


class Attention(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, cos, sin, mask, delta):
        c = self.config
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, t, d = x.shape
        qkv_proj = Linear((h + 2 * kv) * hd, d, self.dtype, self.scale, c.qkv_bias, name="qkv_proj")
        qkv = qkv_proj(x, _sub(delta, "qkv_proj"))
        q = qkv[..., : h * hd].reshape(b, t, h, hd)
        k = qkv[..., h * hd : (h + kv) * hd].reshape(b, t, kv, hd)
        v = qkv[..., (h + kv) * hd :].reshape(b, t, kv, hd)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="q_norm")(q, _sub(delta, "q_norm"))
            k = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="k_norm")(k, _sub(delta, "k_norm"))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(b, t, kv, h // kv, hd)  # query head j uses kv head j // (h // kv)
        scalar = hd if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k) * jnp.asarray(scalar**-0.5, q.dtype)
        scores = softcap(scores, c.attn_logit_softcapping)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1).astype(q.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, t, h * hd)
        return Linear(d, h * hd, self.dtype, self.scale, name="o_proj")(out, _sub(delta, "o_proj"))


def activation(name: str) -> Callable:
    """The MLP's gate activation: transformers' "silu" or "gelu_pytorch_tanh" (the tanh approximation)."""
    return jax.nn.silu if name == "silu" else functools.partial(jax.nn.gelu, approximate=True)


class MLP(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, delta):
        c = self.config
        f, d = c.intermediate_size, c.hidden_size
        gate_up = Linear(2 * f, d, self.dtype, self.scale, name="gate_up_proj")(x, _sub(delta, "gate_up_proj"))
        gate, up = gate_up[..., :f], gate_up[..., f:]
        act = activation(c.hidden_act)
        return Linear(d, f, self.dtype, self.scale, name="down_proj")(up * act(gate), _sub(delta, "down_proj"))


class DecoderLayer(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, scanned, cos, sin, masks):
        delta, sliding = scanned
        c = self.config

        def norm(name):
            return functools.partial(
                RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name=name), delta=_sub(delta, name)
            )

        mask = masks[0] if masks[1] is None else jnp.where(sliding, masks[1], masks[0])
        attn = Attention(c, self.dtype, self.scale, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, _sub(delta, "self_attn")
        )
        mlp = MLP(c, self.dtype, self.scale, name="mlp")
        if c.sandwich_norms:  # Gemma 2: norm the attention output; norm before and after the MLP
            x = x + norm("post_attention_layernorm")(attn)
            x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x), _sub(delta, "mlp")))
        else:
            x = x + attn
            x = x + mlp(norm("post_attention_layernorm")(x), _sub(delta, "mlp"))
        return x, None


class DecoderModel(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    scale: float = 1.0

    @nn.compact
    def __call__(self, input_ids, attention_mask, delta, positions=None):
        c = self.config
        e = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")()
        embed = check_entry(_sub(delta, "embed_tokens"), "embed")
        x = tapped(lowrank_embed(input_ids, e, embed, self.scale), input_ids, embed)
        if c.embed_scale:  # Gemma: sqrt(hidden) rounded to the activations' dtype, after the taps
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        b, t = input_ids.shape
        positions = positions_or_default(positions, b, t)
        cos, sin = rope_tables(c, positions, x.dtype)
        sliding = c.sliding_layers
        full = attention_mask_4d(attention_mask, positions, None)
        window = attention_mask_4d(attention_mask, positions, c.sliding_window) if any(sliding) else None
        if all(sliding):
            full, window = window, None
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
        )
        scanned = (_sub(delta, "layers"), jnp.asarray(sliding))
        x, _ = layers(c, self.dtype, self.scale, name="layers")(x, scanned, cos, sin, (full, window))
        return RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="norm")(x, _sub(delta, "norm")), e


class DecoderForCausalLM(nn.Module):
    """Decoder + output projection; logits are returned in float32 (float64 for a float64 model)."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    scale: float = 1.0

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, delta=None, logits_at=None, positions=None):
        c = self.config
        h, e = DecoderModel(c, self.dtype, self.scale, name="model")(
            input_ids, attention_mask, _sub(delta, "model"), positions
        )
        if logits_at is not None:  # only these positions reach the output projection: h [b, k, d]
            h = jnp.take_along_axis(h, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
        head = _sub(delta, "lm_head")
        if c.tie_word_embeddings:  # the embed delta is the output projection's; lm_head holds only taps
            if head is not None and not set(head) <= {"out", "read"}:
                raise ValueError(
                    f"`delta`: with tied embeddings lm_head takes only taps 'out', 'read' (the low-rank "
                    f"delta of the output projection is embed_tokens'), got {sorted(head)}"
                )
            logits = tapped(lowrank_unembed(h, e, _sub(delta, "model", "embed_tokens"), self.scale), h, head)
        else:
            logits = Linear(c.vocab_size, c.hidden_size, self.dtype, self.scale, name="lm_head")(h, head)
        logits = softcap(logits, c.final_logit_softcapping)  # after the taps: "out" is dL/d(raw logits)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 models keep float64


Phi3ForCausalLM = DecoderForCausalLM
Phi3Model = DecoderModel


# ----------------------------------------------------------------------------- public API
def _split_delta(delta) -> tuple[dict | None, float]:
    if delta is None:
        return None, 1.0
    if isinstance(delta, dict):
        return delta, 1.0
    return delta.deltas, float(delta.scale)  # jaxeif.models.lora.Adapters


class DecoderApply:
    """The pure forward function of one decoder config: `apply_fn(params, input_ids, attention_mask=None,
    delta=None, logits_at=None, positions=None) -> f32[b, t, vocab]` (see `make_apply_fn`).

    Hashable by identity (a static argument of jitted programs). `config` is kept for the deprecated
    `apply_fn.config`; pass the config explicitly (`config=`) to the functions that need it."""

    def __init__(self, fn: Callable, config: DecoderConfig):
        self._fn = fn
        self._decoder_config = config
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    @property
    def config(self) -> DecoderConfig:
        warnings.warn(
            "`apply_fn.config` is deprecated and will be removed: use the config returned by "
            "loading.from_pretrained (Decoder.config) and pass it as `config=`",
            JaxeifDeprecationWarning,
            stacklevel=2,
        )
        return self._decoder_config


def attached_config(apply_fn) -> DecoderConfig | None:
    """The config an apply_fn made by `make_apply_fn` / `from_pretrained` / `upcast_apply_fn` was built
    with, without the deprecation warning; None for any other function."""
    return getattr(apply_fn, "_decoder_config", None)


def make_apply_fn(config: DecoderConfig, dtype=jnp.float32) -> DecoderApply:
    """Pure `apply_fn(params, input_ids, attention_mask=None, delta=None, logits_at=None, positions=None)
    -> f32[b, t, vocab]` of the decoder `config` with weights in `dtype`.

    `delta`: per-module low-rank deltas and taps (LoRA adapters, exact SGD steps; see the module doc).

    `logits_at` int32[b, k] (indices in 0..t-1) returns only those positions' logits, f32[b, k, vocab]:
    equal to `apply_fn(...)[b_idx, logits_at]`, without the output projection of the other positions.
    `attention_mask` is int[b, t] (key padding) or bool[b, t, t] (keys visible to each query; causal
    order is always enforced); `positions` int32[b, t] are the rotary positions (default 0..t-1).
    Together they run several samples packed into one row (`jaxeif.packing`).
    """

    def apply_fn(
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        delta=None,
        logits_at: jax.Array | None = None,
        positions: jax.Array | None = None,
    ):
        deltas, scale = _split_delta(delta)
        module = DecoderForCausalLM(config, dtype, scale)
        return module.apply(
            {"params": params}, jnp.asarray(input_ids, jnp.int32), attention_mask, deltas, logits_at, positions
        )

    return DecoderApply(apply_fn, config)


def param_shapes(config: DecoderConfig, dtype=jnp.float32) -> Params:
    """The params pytree of ShapeDtypeStructs for `config` (no memory allocated)."""
    module = DecoderForCausalLM(config, dtype)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda k, i: module.init(k, i)["params"], jax.random.key(0), ids)


def init_params(key: jax.Array, config: DecoderConfig, dtype=jnp.float32) -> Params:
    """Random params (normal(0.02) weights, unit norms), e.g. for tests."""
    module = DecoderForCausalLM(config, dtype)
    return jax.jit(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(key)


def greedy_generate(
    apply_fn: Callable,
    params: Params,
    input_ids,
    max_new_tokens: int,
    eos_token_id=None,
    config: DecoderConfig | None = None,
) -> np.ndarray:
    """Greedy decoding without a KV cache (short tests and demos); stops a single row at `eos_token_id`.

    With `config` given, every step runs on one fixed-length buffer (one compilation): causal
    attention makes the logits at position p independent of later tokens.  This is skipped when
    the buffer would cross LongRoPE's switch to the long factors, which depends on the length.
    """
    ids = np.asarray(input_ids, np.int32)
    b, t0 = ids.shape
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    total = t0 + max_new_tokens
    fixed = config is not None and not (
        config.rope_type == "longrope" and total > config.original_max_position_embeddings >= t0
    )
    buf = np.zeros((b, total), np.int32)
    buf[:, :t0] = ids
    for t in range(t0, total):
        logits = apply_fn(params, buf if fixed else buf[:, :t])
        buf[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1), np.int32)
        if b == 1 and int(buf[0, t]) in eos:
            return buf[:, : t + 1]
    return buf
