"""LoRA adapters for the Flax Phi-3 decoder, as a pytree beside (never inside) the base params.

    adapters = lora.init(key, params, rank=8, alpha=16, targets=("qkv", "o", "gate_up", "down"))
    logits = apply_fn(params, ids, lora=adapters)          # y = x W^T + (alpha/rank) (x A) B
    merged = lora.merge(params, adapters)                  # apply_fn(merged, ids) == the above

`Adapters.deltas` mirrors `params` ({"model": {"layers": {"self_attn": {"qkv_proj": {"a": [L, in, r],
"b": [L, r, out]}}}}}); `scale` is static, so `jax.vmap(apply_fn, in_axes=(None, None, None, 0))`
maps over stacked adapters while all of them share one copy of the base params, and optax
updates only A and B.  B starts at zero, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

TARGETS = {
    "qkv": ("model", "layers", "self_attn", "qkv_proj"),
    "o": ("model", "layers", "self_attn", "o_proj"),
    "gate_up": ("model", "layers", "mlp", "gate_up_proj"),
    "down": ("model", "layers", "mlp", "down_proj"),
}


@flax.struct.dataclass
class Adapters:
    """Low-rank deltas {"a", "b"} per target module (mirroring params) and the static LoRA scale."""

    deltas: dict
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init(
    key: jax.Array,
    params: dict,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets=("qkv", "o", "gate_up", "down"),
    dtype=jnp.float32,
) -> Adapters:
    """Adapters with A ~ U(-1/sqrt(in), 1/sqrt(in)) and B = 0 for each target (scale alpha / rank)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose among {sorted(TARGETS)}")
    shapes = {t: _get(params, TARGETS[t])["weight"].shape for t in targets}  # [L, out, in]

    @jax.jit
    def draw(key):
        deltas: dict = {}
        for k, t in zip(jax.random.split(key, len(targets)), targets):
            n_layers, out, inp = shapes[t]
            bound = 1.0 / inp**0.5
            a = jax.random.uniform(k, (n_layers, inp, rank), dtype, -bound, bound)
            _set(deltas, TARGETS[t], {"a": a, "b": jnp.zeros((n_layers, rank, out), dtype)})
        return deltas

    return Adapters(deltas=draw(key), scale=float(alpha) / rank)


def merge(params: dict, adapters) -> dict:
    """New params with W + scale * (A B)^T folded in (E + scale * A B for embed_tokens); base untouched."""
    deltas, scale = (adapters, 1.0) if isinstance(adapters, dict) else (adapters.deltas, adapters.scale)
    out = jax.tree.map(lambda x: x, params)  # new containers; arrays are shared, not copied

    def walk(node: dict, path: tuple):
        if set(node) == {"a", "b"}:
            w = _get(out, path)["weight"]
            ab = (node["a"].astype(jnp.float32) @ node["b"].astype(jnp.float32)) * scale
            if path[-1] != "embed_tokens":
                ab = jnp.swapaxes(ab, -1, -2)
            _set(out, path, {**_get(out, path), "weight": (w.astype(jnp.float32) + ab).astype(w.dtype)})  # keeps a bias
            return
        for k, v in node.items():
            walk(v, path + (k,))

    walk(deltas, ())
    return out
