"""Weights stored in bfloat16, computed in float32: an apply_fn that widens the params inside each call.

`decoder.make_apply_fn(config, dtype)` uses one dtype for weights and activations. Wrapping the float32
apply_fn, `upcast_apply_fn(decoder.make_apply_fn(config, jnp.float32))` takes bfloat16 params (half the
memory at rest) and runs the whole forward pass, accumulations and logits in float32. Gradients
with respect to the params keep the params' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxeif.models.decoder import DecoderApply, attached_config


def upcast_apply_fn(apply_fn: Callable, dtype=jnp.float32) -> Callable:
    """`apply_fn` with every floating param cast to `dtype` at the start of the call.

    Args:
      apply_fn: `apply_fn(params, *args, **kwargs)`, e.g. from `decoder.make_apply_fn` or `from_pretrained`.
      dtype: the compute dtype the params are widened to.
    Returns:
      The wrapped apply_fn; a decoder's apply_fn stays a `DecoderApply` of the same config.
    """

    def upcast(params, *args, **kwargs):
        wide = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        return apply_fn(wide, *args, **kwargs)

    config = attached_config(apply_fn)
    return upcast if config is None else DecoderApply(upcast, config)
