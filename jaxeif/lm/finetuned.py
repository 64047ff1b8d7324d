"""Fine-tuned EIF of a language model: `finetuned_eif` (dense through `jaxeif.eif`, or the exact low-rank
path, chosen by `jaxeif.lm.dispatch`) and `lora_eif` (only the adapters trained, the base params shared
by every fine-tune)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxeif
from jaxeif import precision as precision_lib
from jaxeif.finetune import PyTree
from jaxeif.lm.dispatch import choose_path
from jaxeif.lm.loss import NLL, sequence_nll
from jaxeif.lm.lowrank import lowrank_sgd_eif
from jaxeif.lm.tokens import ApplyFn, Tokens, checked
from jaxeif.models.lora import Adapters
from jaxeif.models.phi3 import Phi3Config


def finetuned_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: float = 1e-4,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | str | None = "auto",
    precision: str = "highest",
    path: str = "auto",
    config: Phi3Config | None = None,
    progress: bool = False,
) -> jax.Array:
    """Fine-tuned EIF, f32[n, m], with the length-normalised NLL (whole sample trained).

    `path`: "auto" picks the faster exact path (`jaxeif.lm.dispatch`: low-rank for one plain SGD step on
    CPU, else dense); "dense" / "lowrank" force one ("lowrank" needs optimizer=None, steps=1).
    `optimizer` None is plain SGD. `chunk_size`: fine-tunes per step ("auto": jaxeif.chunking).
    `precision`: a jaxeif.precision mode. `config`: only the low-rank path needs it (default apply_fn.config).
    """
    train, evals = checked(apply_fn, params, train, evals)
    config = getattr(apply_fn, "config", None) if config is None else config
    chosen = choose_path(path, optimizer=optimizer, steps=steps, backend=jax.default_backend(),
                         longest=int(train.lengths.max()), config=config)
    if chosen == "lowrank":
        return lowrank_sgd_eif(apply_fn, params, train, evals, lr=lr, chunk_size=chunk_size, precision=precision,
                               config=config, progress=progress)
    return _eif(NLL(apply_fn), params, train, evals, lr=lr, steps=steps, optimizer=optimizer, chunk_size=chunk_size,
                precision=precision, progress=progress)


def lora_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    adapters,
    lr: float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | str | None = "auto",
    precision: str = "highest",
    progress: bool = False,
) -> jax.Array:
    """LoRA EIF, f32[n, m]: only the adapters are fine-tuned (vmapped over samples); base params shared.

    `adapters` is a `jaxeif.models.lora.Adapters` (deltas + static scale) or a plain delta dict.
    """
    deltas, scale = (adapters.deltas, float(adapters.scale)) if hasattr(adapters, "deltas") else (adapters, 1.0)
    train, evals = checked(apply_fn, params, train, evals)
    if precision == "float64":  # jaxeif.eif casts the adapters; the shared base params must be float64 too
        with precision_lib.context(precision):
            params = precision_lib.cast_inputs(precision, params)
        loss_fn = _lora_loss.__wrapped__(apply_fn, params, scale)
    else:
        loss_fn = _lora_loss(apply_fn, params, scale)
    return _eif(loss_fn, deltas, train, evals, lr=lr, steps=steps, optimizer=optimizer,
                chunk_size=chunk_size, precision=precision, progress=progress)


def _eif(loss_fn, params, train: Tokens, evals: Tokens | None, *, progress: bool, **kwargs) -> jax.Array:
    """`jaxeif.eif` on Tokens; one compiled program, so a progress bar completes when it returns."""
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True or False, got {progress!r}")
    with tqdm(total=int(np.asarray(train.ids).shape[0]), desc="fine-tuned EIF", disable=not progress) as bar:
        out = jaxeif.eif(loss_fn, params, _as_jnp(train), None if evals is None else _as_jnp(evals), **kwargs)
        bar.update(bar.total)
    return out


_LORA_LOSSES: dict = {}


def _cached(make):
    """`make(apply_fn, params, scale)` memoised on (apply_fn, params identity, scale), so eif's jit cache is
    reused across calls; `.__wrapped__` builds a fresh one (for params that are not kept)."""

    def cached(apply_fn, params, scale):
        key = (apply_fn, id(params), scale)
        if key not in _LORA_LOSSES or _LORA_LOSSES[key][0] is not params:
            _LORA_LOSSES[key] = (params, make(apply_fn, params, scale))
        return _LORA_LOSSES[key][1]

    cached.__wrapped__ = make
    return cached


@_cached
def _lora_loss(apply_fn, params, scale):
    """loss_fn(adapter deltas, example) of the decoder with `params` and LoRA `scale`."""

    def loss_fn(deltas, example):
        logits = apply_fn(params, example.ids[None], example.attention[None], delta=Adapters(deltas, scale))[0]
        return sequence_nll(logits, example.ids, example.score)

    return loss_fn


def _as_jnp(tokens: Tokens) -> Tokens:
    return Tokens(*(jnp.asarray(x) for x in tokens))
