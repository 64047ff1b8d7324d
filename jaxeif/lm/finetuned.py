"""Fine-tuned EIF of a language model: `finetuned_eif` (dense through `jaxeif.eif`, or the exact low-rank
path, chosen by `jaxeif.lm.dispatch`) and `lora_eif` (only the adapters trained, the base params shared
by every fine-tune)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

import jaxeif
from jaxeif import options
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.finetune import PyTree
from jaxeif.lm.dispatch import choose_path
from jaxeif.lm.loss import NLL, sequence_nll
from jaxeif.lm.lowrank import RANK_BUCKET, decoder_config, lowrank_sgd_eif
from jaxeif.lm.memory import check_memory, optimizer_states
from jaxeif.lm.per_token import TokenInfluence, check_per_token, from_columns, token_evals
from jaxeif.lm.tokens import ApplyFn, Tokens, checked
from jaxeif.models import peft
from jaxeif.models.decoder import DecoderConfig
from jaxeif.models.lora import Adapters
from jaxeif.options import ChunkSize
from jaxeif.packing import round_up
from jaxeif.precision import Precision


def finetuned_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    path: Literal["auto", "dense", "lowrank"] = "auto",
    config: DecoderConfig | None = None,
    progress: bool = False,
    memory_budget: float | None = None,
    per_token: bool = False,
) -> jax.Array | TokenInfluence:
    """Fine-tuned EIF of a language model with the length-normalised NLL (whole sample trained).

    Args:
        apply_fn: the decoder, apply_fn(params, ids, attention_mask=None, delta=None, positions=None).
        params: its parameters (every floating leaf is fine-tuned).
        train: the fine-tune samples, jaxeif.lm.Tokens.
        evals: the evaluated samples, jaxeif.lm.Tokens (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: fine-tunes per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        precision: the arithmetic, a jaxeif.Precision.
        progress: show a progress bar on stderr.
        path: "auto" picks the faster exact path (`jaxeif.lm.dispatch`: low-rank for one plain SGD step on
            CPU, else dense); "dense" / "lowrank" force one ("lowrank" needs optimizer=None, steps=1).
        config: the decoder's DecoderConfig (from `loading.from_pretrained`; omitted for a jaxeif
            decoder, it is taken from the apply_fn with a DeprecationWarning; None for any other model:
            the dense path, no memory check).
        memory_budget: with a config, a run whose `lm.memory_estimate` exceeds this many bytes (default: 3/4
            of the free device memory) is refused before anything compiles; also the budget of "auto".
        per_token: return a `lm.TokenInfluence` (every scored eval token's NLL change, f32[n, m, T], whose
            `.matrix()` is M; jaxeif.lm.per_token says what each path costs).

    Returns:
        f32[n, m], or a TokenInfluence with per_token=True.

    Raises:
        MemoryBudgetError: the estimate exceeds the budget (the message gives it).
        NonFiniteInfluenceError, TypeError, ValueError: as in `jaxeif.eif`.
    """
    progress_lib.check(progress)
    precision = options.check_precision(precision)
    per_token = check_per_token(per_token)
    config = decoder_config(apply_fn, config)
    train, evals = checked(
        apply_fn, params, train, evals, context=None if config is None else config.max_position_embeddings
    )
    chosen = choose_path(
        path,
        optimizer=optimizer,
        steps=steps,
        backend=jax.default_backend(),
        longest=int(train.lengths.max()),
        config=config,
    )
    if per_token and chosen == "dense":  # each scored token an eval of its own (exact; costs T x the evals)
        te = token_evals(train if evals is None else evals)
        m = finetuned_eif(
            apply_fn,
            params,
            train,
            te.evals,
            lr=lr,
            steps=steps,
            optimizer=optimizer,
            chunk_size=chunk_size,
            precision=precision,
            path=chosen,
            config=config,
            progress=progress,
            memory_budget=memory_budget,
        )
        return from_columns(m, te)
    if config is not None:
        _check_fits(
            apply_fn,
            params,
            train,
            evals,
            config,
            path=chosen,
            optimizer=optimizer,
            steps=steps,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            float64=precision_lib.is_float64(precision),
        )
    if chosen == "lowrank":
        return lowrank_sgd_eif(
            apply_fn,
            params,
            train,
            evals,
            lr=lr,
            chunk_size=chunk_size,
            precision=precision,
            config=config,
            progress=progress,
            memory_budget=memory_budget,
            per_token=per_token,
        )
    return _eif(
        NLL(apply_fn),
        params,
        train,
        evals,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        progress=progress,
        memory_budget=memory_budget,
    )


def _check_fits(
    apply_fn,
    params,
    train: Tokens,
    evals: Tokens | None,
    config,
    *,
    path,
    optimizer,
    steps,
    chunk_size,
    memory_budget,
    float64: bool,
) -> int:
    """`lm.check_memory` for this call: the smallest layout "auto" can pick, or the chunk asked for (float64:
    precision "float64" runs params and activations in float64)."""
    n, length = train.ids.shape
    m = n if evals is None else evals.ids.shape[0]
    auto = chunk_size == "auto"
    rows = 1 if auto else (n if chunk_size is None else int(chunk_size))
    weights = max((x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)), key=lambda x: x.size)
    probe = jnp.zeros((1, 1), jnp.int32)
    logits = jax.eval_shape(lambda p: apply_fn(p, probe), params)  # the activations' dtype (upcast models: float32)
    rank = round_up(int(train.lengths.max()), RANK_BUCKET)
    dtype, compute_dtype = (jnp.float64, jnp.float64) if float64 else (weights.dtype, logits.dtype)
    return check_memory(
        config,
        n,
        m,
        path=path,
        budget=memory_budget,
        dtype=dtype,
        compute_dtype=compute_dtype,
        tokens=max(length, evals.ids.shape[1] if evals is not None else 1),
        chunk_size=rows,
        eval_chunk=1 if auto else None,
        optimizer=optimizer_states(optimizer, params),
        steps=steps,
        rank=rank,
    )


def lora_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    train: Tokens,
    evals: Tokens | None = None,
    *,
    adapters,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    progress: bool = False,
    memory_budget: float | None = None,
    per_token: bool = False,
) -> jax.Array | TokenInfluence:
    """LoRA EIF: only the adapters are fine-tuned (vmapped over samples); the base params are shared.

    Args:
        apply_fn: the decoder, apply_fn(params, ids, attention_mask=None, delta=None, positions=None).
        params: the base parameters, shared by every fine-tune.
        train: the fine-tune samples, jaxeif.lm.Tokens.
        evals: the evaluated samples, jaxeif.lm.Tokens (None: `train`).
        adapters: a `jaxeif.models.lora.Adapters` (deltas + static scale), a plain delta dict, or a
            `jaxeif.models.peft.PeftLora` (a user's peft adapter, `peft.load_adapter`): then exactly peft's
            per-module A and B are fine-tuned from their loaded values, and M is measured from the model
            with the loaded adapter.
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: rows per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        precision: the arithmetic, a jaxeif.Precision.
        progress: show a progress bar on stderr.
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        per_token: a `lm.TokenInfluence` instead of M (as `finetuned_eif`).

    Returns:
        f32[n, m], or a TokenInfluence with per_token=True.

    Raises:
        NonFiniteInfluenceError, MemoryBudgetError, TypeError, ValueError: as in `jaxeif.eif`.
    """
    deltas, loss_fn = lora_parts(apply_fn, params, adapters)
    per_token = check_per_token(per_token)
    train, evals = checked(apply_fn, params, train, evals)
    te = token_evals(train if evals is None else evals) if per_token else None
    m = _eif(
        loss_fn,
        deltas,
        train,
        evals if te is None else te.evals,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        progress=progress,
        memory_budget=memory_budget,
    )
    return m if te is None else from_columns(m, te)


def lora_parts(apply_fn: ApplyFn, params: PyTree, adapters) -> tuple[PyTree, jax.tree_util.Partial]:
    """(the trained adapter weights, loss_fn(weights, example)) of `lora_eif`'s `adapters`."""
    if isinstance(adapters, peft.PeftLora):
        return adapters.weights, jax.tree_util.Partial(LoraNLL(apply_fn, 1.0, adapters.layout), params)
    deltas, scale = (adapters.deltas, float(adapters.scale)) if hasattr(adapters, "deltas") else (adapters, 1.0)
    return deltas, _lora_loss(apply_fn, params, scale)


def _eif(loss_fn, params, train: Tokens, evals: Tokens | None, **kwargs) -> jax.Array:
    """`jaxeif.eif` on Tokens (its progress bar ticks per finished row: jaxeif.progress)."""
    return jaxeif.eif(loss_fn, params, _as_jnp(train), None if evals is None else _as_jnp(evals), **kwargs)


@dataclasses.dataclass(frozen=True)
class LoraNLL:
    """loss(base params, adapter deltas, example): the NLL of the decoder with its adapters; hashable, so
    `jax.tree_util.Partial(LoraNLL(apply_fn, scale), params)` reuses eif's compiled program."""

    apply_fn: ApplyFn
    scale: float
    layout: peft.Layout | None = None  # a peft adapter's layout: deltas are its per-module weights

    def __call__(self, params: PyTree, deltas: PyTree, example: Tokens) -> jax.Array:
        if jax.tree.leaves(deltas)[0].dtype == jnp.float64:  # precision "float64": the base params too
            params = jax.tree.map(lambda w: w.astype(jnp.float64), params)
        if self.layout is not None:
            deltas = self.layout.delta(deltas)
        logits = self.apply_fn(params, example.ids[None], example.attention[None], delta=Adapters(deltas, self.scale))[
            0
        ]
        return sequence_nll(logits, example.ids, example.score)


def _lora_loss(apply_fn, params, scale):
    """loss_fn(deltas, example) with the base params bound as a Partial: they enter eif's program as an
    input, not as constants compiled into it (jaxeif.influence.split_loss)."""
    return jax.tree_util.Partial(LoraNLL(apply_fn, scale), params)


def _as_jnp(tokens: Tokens) -> Tokens:
    return Tokens(*(jnp.asarray(x) for x in tokens))
