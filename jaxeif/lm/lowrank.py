"""Dense single-step SGD EIF computed exactly in low-rank form: no per-sample copy of the weights.

One SGD step on sample i changes every weight matrix W [out, in] of a linear layer by
-lr * sum_t g_t x_t^T (x_t: the layer's input at position t, g_t: dL_i/d(output_t)): rank <= T.
The fine-tuned layer applied to x is W x - lr * sum_t g_t (x_t . x), which phi3's low-rank hook
computes from a = [x_1..x_T] (in, T), b = -lr [g_1..g_T]^T (T, out) without forming W - lr G.
The (tied) embedding E [V, d] changes by -lr (onehot(ids)^T G0 + C^T H), G0 = dL/d(embedding
output), C = dL/d(logits), H = final hidden states: rank <= 2T. RMSNorm weights (d floats per
layer) change densely, by the sum of per-token gradients. The factors x_t, g_t are read out of the
(scanned) model with a flax method interceptor: each linear output gets a zero perturbation `eps`
(its gradient is g_t) and a zero `probe` whose gradient is defined to be the input x_t (`_read_out`).
All samples of a packed row (jaxeif.packing) share ONE backward pass: with block attention, the
per-token factors of sample i's tokens are exactly those of sample i trained alone.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import checks, packing
from jaxeif.finetune import PyTree
from jaxeif.lm.loss import ROW_LENGTH, group_counts, group_means, pack_tokens, packed_nll, packed_slot_nll, row_arrays, slot_nll
from jaxeif.lm.tokens import ApplyFn, Tokens, check_example, checked
from jaxeif.models import phi3
from jaxeif.packing import round_up


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
    return jax.vmap(lambda d: packed_slot_nll(apply_fn, params, row, d))(deltas)


def _slot_weights(packed: packing.Packed) -> np.ndarray:
    """weight / (#scored tokens of the slot's group): the packed loss sum_g L_g, each L_g a mean."""
    return (packed.weight / np.maximum(group_counts(packed)[packed.group], 1e-30)).astype(np.float32)


def sgd_step_lowrank(apply_fn: ApplyFn, params: PyTree, config, example: Tokens, lr) -> dict:
    """The low-rank delta of ONE SGD step on `example` (a Tokens row), exactly: `apply_fn(params, ids,
    lora=delta)` is then the fine-tuned model (norm weights enter as additive deltas)."""
    example = check_example("example", example, config.vocab_size)
    n = int(np.asarray(example.attention).sum())
    packed = packing.samples(np.asarray(example.ids)[None], np.array([n]), np.asarray(example.score)[None], multiple=1)
    g_taps, g_logits = _row_gradients(apply_fn, params, config, row_arrays(packed, 0), jnp.asarray(_slot_weights(packed)))
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
    train, evals = checked(apply_fn, params, train, evals, config.vocab_size)
    evals = train if evals is None else evals
    n = np.asarray(train.ids).shape[0]
    lr = np.broadcast_to(np.asarray(checks.learning_rate(lr, n), np.float32), (n,))
    packed_train = pack_tokens(train, row_length)
    packed_evals = packed_train if evals is train else pack_tokens(evals, row_length)
    if base is None:
        base = packed_nll(apply_fn, params, packed_evals)
    base = np.asarray(base, np.float32)
    eval_rows = [row_arrays(packed_evals, k) for k in range(packed_evals.ids.shape[0])]
    weights = _slot_weights(packed_train)
    out = np.zeros((n, base.shape[0]), np.float32)
    for k in range(packed_train.ids.shape[0]):
        g_taps, g_logits = _row_gradients(apply_fn, params, config, row_arrays(packed_train, k), jnp.asarray(weights[k : k + 1]))
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
                after = np.stack([group_means(packed_evals, v) for v in vals[: len(rows)]])
                out[rows] = after.astype(np.float32) - base[None]
                if progress is not None:
                    progress.update(len(rows))
    return out

