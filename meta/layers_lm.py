"""Per-layer lr multipliers for params whose layers are STACKED on a leading axis (one nn.scan),
as in jaxeif.models.phi3: one multiplier per decoder layer index, plus one per other module.

    log_scales = init_stacked_log_scales(params)        # {"model/layers": f32[L], "model/embed_tokens": f32[],
                                                        #  "model/norm": f32[], ("lm_head": f32[] if untied)}
    M = jaxeif.eif(loss_fn, params, train, evals, lr=lr, optimizer=stacked_layer_optimizer(log_scales))

meta.layer_optimizer would give one multiplier for the whole "model" subtree; this gives the
"location" of learning layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxeif.finetune import round_to

PyTree = Any
STACKED = ("model", "layers")  # where jaxeif.models.phi3 keeps its scanned decoder layers


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def _walk(params: PyTree, stacked: Sequence[str]) -> tuple[list[str], PyTree]:
    """(names of the sibling modules along the path to `stacked`, the stacked subtree)."""
    names, node = [], params
    for depth, key in enumerate(stacked):
        if not isinstance(node, dict) or key not in node:
            where = "/".join(stacked[:depth]) or "the top level"
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ValueError(
                f"params have no {key!r} at {where} (found {have}); pass `stacked=` the path of "
                f"the stacked layers (default {'/'.join(STACKED)}, as in jaxeif.models.phi3)"
            )
        names += ["/".join([*stacked[:depth], k]) for k in node if k != key]
        node = node[key]
    return names, node


def num_stacked(params: PyTree, stacked: Sequence[str] = STACKED) -> int:
    """L: the common leading size of every leaf under the stacked path."""
    _, sub = _walk(params, stacked)
    sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(sub)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"the leaves under {'/'.join(stacked)} must share one leading (layer) axis; got sizes {sizes}")
    return int(sizes.pop())


def stacked_group_names(params: PyTree, stacked: Sequence[str] = STACKED) -> tuple[str, ...]:
    """Group names: "/".join(stacked) (a vector of L multipliers) and every other module on the way."""
    names, _ = _walk(params, stacked)
    return ("/".join(stacked), *names)


def init_stacked_log_scales(params: PyTree, stacked: Sequence[str] = STACKED) -> dict[str, jax.Array]:
    """{group: log-multiplier}, all 0 (x1); the stacked group is f32[L], the others f32[]."""
    L = num_stacked(params, stacked)
    out = {name: jnp.zeros((), jnp.float32) for name in stacked_group_names(params, stacked)}
    out["/".join(stacked)] = jnp.zeros((L,), jnp.float32)
    return out


def _group_of(path, groups: Sequence[str]) -> str:
    keys = [_key(k) for k in path]
    for g in groups:
        parts = g.split("/")
        if keys[: len(parts)] == parts:
            return g
    raise ValueError(f"parameter {'/'.join(keys)} belongs to no group of {list(groups)}")


def scale_by_stacked_layer(
    log_scales: dict[str, jax.Array], stacked: Sequence[str] = STACKED
) -> optax.GradientTransformation:
    """Multiply layer l's update by exp(log_scales[stacked][l]) and every other module's by its own scale."""
    stack_name = "/".join(stacked)

    def init_fn(params):
        expected = set(stacked_group_names(params, stacked))
        if expected != set(log_scales):
            raise ValueError(
                f"`log_scales` must name exactly the groups {sorted(expected)}, got {sorted(log_scales)} "
                "(build them with init_stacked_log_scales(params))"
            )
        L = num_stacked(params, stacked)
        if jnp.shape(log_scales[stack_name]) != (L,):
            raise ValueError(
                f"`log_scales[{stack_name!r}]` must have shape ({L},) (one per layer), "
                f"got {jnp.shape(log_scales[stack_name])}"
            )
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        groups = sorted(log_scales, key=lambda g: -g.count("/"))  # most specific first

        def scale(path, u):
            g = _group_of(path, groups)
            s = jnp.exp(log_scales[g])
            if g == stack_name:
                s = s.reshape((-1,) + (1,) * (u.ndim - 1))
            return round_to(s * u, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def stacked_layer_optimizer(
    log_scales: dict[str, jax.Array], base: optax.GradientTransformation | None = None, stacked: Sequence[str] = STACKED
) -> optax.GradientTransformation:
    """`base` (default unit-rate SGD, as in jaxeif.eif) followed by the per-layer multipliers."""
    return optax.chain(optax.sgd(1.0) if base is None else base, scale_by_stacked_layer(log_scales, stacked))
