"""Fine-tuned EIF of a language model through `jaxeif.eif`: dense (every weight trained) and LoRA (only
the adapters trained, the base params shared by every fine-tune)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jaxeif
from jaxeif.lm.loss import NLL, sequence_nll
from jaxeif.lm.tokens import ApplyFn, Tokens, checked
from jaxeif.finetune import PyTree
from jaxeif.models.lora import Adapters


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
    train, evals = checked(apply_fn, params, train, evals)
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
    train, evals = checked(apply_fn, params, train, evals)
    loss_fn = _lora_loss(apply_fn, params, scale)
    return jaxeif.eif(loss_fn, deltas, _as_jnp(train), None if evals is None else _as_jnp(evals),
                      lr=lr, steps=steps, optimizer=optimizer, chunk_size=chunk_size)


_LORA_LOSSES: dict = {}


def _lora_loss(apply_fn, params, scale):
    """One loss_fn per (apply_fn, params, scale) so eif's jit cache is reused across calls."""
    key = (apply_fn, id(params), scale)
    if key not in _LORA_LOSSES or _LORA_LOSSES[key][0] is not params:
        def loss_fn(deltas, example, _apply=apply_fn, _params=params, _scale=scale):
            lora = Adapters(deltas, _scale)
            logits = _apply(_params, example.ids[None], example.attention[None], lora=lora)[0]
            return sequence_nll(logits, example.ids, example.score)

        _LORA_LOSSES[key] = (params, loss_fn)
    return _LORA_LOSSES[key][1]


def _as_jnp(tokens: Tokens) -> Tokens:
    return Tokens(*(jnp.asarray(x) for x in tokens))

