"""Peak device memory of each language-model EIF path, estimated from the model's shape before it runs.

    nbytes = lm.memory_estimate(config, n, m, path="dense", dtype=jnp.bfloat16)
    lm.check_memory(config, n, m, path="dense", dtype=jnp.bfloat16)   # MemoryBudgetError if it cannot fit

What each path holds at its peak (P params of `dtype`; activations in `compute_dtype`, logits float32):
- "dense" (`lm.finetuned_eif`, `jaxeif.eif`): the params, and per fine-tune in a chunk the gradient
  (the update) and the optimizer state, each P values: XLA forms the fine-tuned weights inside the
  layer loop, one layer at a time, so no whole fine-tuned copy is held (measured on CPU); the
  backward pass of one sample or the forward pass of the evals (all m at once unless `eval_chunk`),
  with float32 logits over the whole vocabulary at every token; the n x m result.
- "lowrank" (`lm.lowrank_sgd_eif`): the params; the per-token factors of one packed train row
  (inputs and output-gradients of every linear layer, float32), their backward pass and logits; per
  fine-tune in a chunk its rank-r factors; the forward pass of one packed eval row per fine-tune.
  No weight copy, no weight-sized gradient: memory does not grow with n or m.
- "prompted" (`lm.prompted_eif`): the params and the forward pass of one packed row.
bfloat16 params computing in float32 (`jaxeif.models.upcast`) add one float32 copy of the params on the
dense and prompted paths (measured). A bfloat16-compute model is estimated with bfloat16 activations,
as on a GPU; XLA:CPU computes bfloat16 in float32 with extra converted copies, so CPU peaks run higher.
Sequences: samples padded to `tokens` (dense), rows of `row_length` tokens (lowrank, prompted).
The coefficients count the buffers XLA keeps alive in these programs; the estimate is checked
against measured peaks on CPU (tests/test_lm_memory.py, `jaxeif bench-lm-memory`, README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import chunking
from jaxeif import options as options_lib
from jaxeif.lm.loss import ROW_LENGTH

PATHS = ("dense", "lowrank", "prompted")
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}  # weight-sized buffers of optimizer state
F32 = 4


def param_count(config) -> int:
    """Number of parameters of a decoder with this config (jaxeif.models.decoder: biases, q/k and extra norms)."""
    c = config
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
    layer = d * qkv + c.num_attention_heads * hd * d + 3 * d * f + len(getattr(c, "norms", ("", ""))) * d
    layer += qkv if getattr(c, "qkv_bias", False) else 0
    layer += 2 * hd if getattr(c, "qk_norm", False) else 0
    embed = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * layer + embed + d


def _linear_widths(config) -> int:
    """Sum of (inputs + outputs) over a layer's four linear maps: the per-token factors of one layer."""
    c = config
    d, f, hd, h, kv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    return (d + (h + 2 * kv) * hd) + (h * hd + d) + (d + 2 * f) + (f + d)


def _layer_live(config, tokens: int, act: int, keys: int) -> int:
    """Bytes alive inside one layer of a forward pass over `tokens` tokens, each attending to `keys` keys."""
    c = config
    width = (
        3 * c.hidden_size + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + 3 * c.intermediate_size
    )
    return tokens * width * act + 2 * tokens * c.num_attention_heads * keys * F32


def _forward_live(config, tokens: int, act: int, keys: int, logits: int) -> int:
    """Bytes of a forward pass (no gradient): one layer's buffers and `logits` float32 [tokens, vocab] buffers."""
    return _layer_live(config, tokens, act, keys) + logits * tokens * config.vocab_size * F32


def _backward_live(config, tokens: int, act: int, keys: int, logits: int) -> int:
    """Bytes of a backward pass: every layer's saved activations, plus the forward pass's output buffers."""
    c = config
    saved = (
        tokens
        * (
            4 * c.hidden_size
            + 2 * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
            + 4 * c.intermediate_size
        )
        * act
        + tokens * c.num_attention_heads * keys * F32
    )
    return c.num_hidden_layers * saved + _forward_live(config, tokens, act, keys, logits)


def memory_estimate(
    config,
    n: int,
    m: int,
    *,
    path: str,
    dtype=jnp.float32,
    compute_dtype=None,
    tokens: int = 64,
    chunk_size: int = 1,
    eval_chunk: int | None = None,
    optimizer: optax.GradientTransformation | int | None = None,
    steps: int = 1,
    row_length: int = ROW_LENGTH,
    rank: int = 64,
) -> int:
    """Estimated peak device bytes of one LM EIF call of n fine-tunes against m evals.

    `dtype`: the params' (float32 or bfloat16); `compute_dtype` the activations' (default: `dtype`).
    `tokens`: padded sample length (dense); `chunk_size`: fine-tunes at once; `eval_chunk`: evals per
    forward (dense; None: all m); `rank`: a fine-tune's factor rank (lowrank: the sample's length, rounded
    up to the rank bucket).

    Args:
        optimizer: the fine-tunes' optax optimizer (None: plain SGD), whose weight-sized state buffers are
            counted from `optimizer.init`'s shapes; or that count. The names "sgd", "momentum", "adam" are
            accepted for one release with a DeprecationWarning.

    Returns:
        The estimated peak bytes.

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """
    optimizer = _state_buffers(optimizer)
    _check(
        config,
        n,
        m,
        path=path,
        tokens=tokens,
        chunk_size=chunk_size,
        eval_chunk=eval_chunk,
        optimizer=optimizer,
        steps=steps,
        row_length=row_length,
        rank=rank,
    )
    _check_dtype("dtype", dtype)
    _check_dtype("compute_dtype", compute_dtype, allow_none=True)
    w = np.dtype(dtype).itemsize
    act = np.dtype(dtype if compute_dtype is None else compute_dtype).itemsize
    params = param_count(config) * w
    widened = param_count(config) * act if act > w else 0  # upcast params (jaxeif.models.upcast), held whole
    c = chunk_size
    if path == "prompted":
        return params + widened + _forward_live(config, row_length, act, row_length, logits=2)
    if path == "lowrank":  # XLA widens each layer's weights inside the layer loop: no whole widened copy
        L = config.num_hidden_layers
        factors = L * row_length * (_linear_widths(config) + 3 * config.hidden_size) * F32
        gradients = _backward_live(config, row_length, F32, row_length, logits=2)
        embed_rank = 2 * rank if config.tie_word_embeddings else rank
        deltas = c * (L * rank * _linear_widths(config) + embed_rank * (config.vocab_size + config.hidden_size)) * F32
        evals = c * _forward_live(config, row_length, act, row_length, logits=2)
        return params + factors + max(gradients, deltas + evals)
    states = int(optimizer)
    copies = 1 + states + (1 if steps > 1 else 0)  # update, optimizer state, summed delta
    tile = m if eval_chunk is None else min(eval_chunk, m)
    tune = c * _backward_live(config, tokens, act, tokens, logits=2)
    evals = c * _forward_live(config, tile * tokens, act, tokens, logits=1)
    return params + widened + c * copies * params + max(tune, evals) + (n + 1) * m * F32


_PROBE = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}  # one weight matrix: factored states count too
_EQUIVALENT = {"sgd": "None", "momentum": "optax.sgd(1.0, momentum=0.9)", "adam": "optax.adam(1.0)"}


def _state_buffers(optimizer) -> int:
    """Weight-sized optimizer state buffers of `optimizer` (an optax optimizer, None, a count, or a deprecated name)."""
    if isinstance(optimizer, str) and optimizer in OPTIMIZER_STATES:
        options_lib.warn_deprecated(f"optimizer={optimizer!r} is deprecated; pass optimizer={_EQUIVALENT[optimizer]}")
        return OPTIMIZER_STATES[optimizer]
    if isinstance(optimizer, (int, np.integer)) and not isinstance(optimizer, bool):
        if optimizer < 0:
            raise ValueError(f"`optimizer` as a count of weight-sized state buffers must be >= 0, got {optimizer}")
        return int(optimizer)
    if isinstance(optimizer, str):
        raise ValueError(
            f"`optimizer` must be an optax.GradientTransformation, None (plain SGD) or a count of "
            f"weight-sized state buffers, got {optimizer!r}; pass e.g. optax.adam(1.0)"
        )
    options_lib.check_optimizer(optimizer)
    return optimizer_states(optimizer, _PROBE)


def optimizer_states(optimizer, params) -> int:
    """Weight-sized buffers of an optax optimizer's state on `params` (None: plain SGD, 0), from its shapes."""
    if optimizer is None:
        return 0
    state = jax.eval_shape(optimizer.init, params)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))  # noqa: E731
    return round(size(state) / max(size(params), 1))


def check_memory(config, n: int, m: int, *, path: str, budget: int | None = None, **options) -> int:
    """`memory_estimate(...)` if it fits `budget` bytes (default: chunking's share of the device's free
    memory); else a MemoryBudgetError giving the estimate, the budget and what would fit."""
    if "optimizer" in options:
        options["optimizer"] = _state_buffers(options["optimizer"])
    need = memory_estimate(config, n, m, path=path, **options)
    budget = chunking.budget_bytes(budget)
    if need <= budget:
        return need
    fixes = []
    if options.get("chunk_size", 1) > 1:
        fixes.append("chunk_size=1")
    if path == "dense" and options.get("eval_chunk") != 1 and m > 1:
        fixes.append("fewer evals at once (eval_chunk / chunk_size='auto')")
    if np.dtype(options.get("dtype", jnp.float32)).itemsize > 2:
        half = memory_estimate(config, n, m, path=path, **{**options, "dtype": jnp.bfloat16})
        fixes.append(f"bfloat16 params ({chunking.gib(half)})")
    if path == "dense":
        low = memory_estimate(
            config,
            n,
            m,
            path="lowrank",
            **{k: v for k, v in options.items() if k in ("dtype", "compute_dtype", "row_length")},
        )
        fixes.append(f"path='lowrank' ({chunking.gib(low)}; plain SGD, one step)")
    raise chunking.MemoryBudgetError(
        f"the {path} LM EIF of {n} x {m} needs an estimated {chunking.gib(need)} (jaxeif.lm.memory_estimate), over the "
        f"budget of {chunking.gib(budget)}; try " + ", or ".join(fixes or ["a smaller model"])
    )


def _check(config, n, m, *, path, tokens, chunk_size, eval_chunk, optimizer, steps, row_length, rank) -> None:
    if path not in PATHS:
        raise ValueError(f"`path` must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    for name, value in (
        ("n", n),
        ("m", m),
        ("tokens", tokens),
        ("chunk_size", chunk_size),
        ("steps", steps),
        ("row_length", row_length),
        ("rank", rank),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if eval_chunk is not None and (
        isinstance(eval_chunk, bool) or not isinstance(eval_chunk, (int, np.integer)) or eval_chunk < 1
    ):
        raise ValueError(f"`eval_chunk` must be None (all evals at once) or an int >= 1, got {eval_chunk!r}")
    for name in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        if not hasattr(config, name):
            raise TypeError(
                f"`config` must be a jaxeif.models.decoder.DecoderConfig (no `{name}`), got {type(config).__name__}"
            )
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`config.{name}` must be an int >= 1, got {value!r}; fix the model config")


def _check_dtype(name: str, dtype, allow_none: bool = False) -> None:
    """`dtype` must be a floating dtype (None only where it means "as the params")."""
    if dtype is None and allow_none:
        return
    try:
        ok = dtype is not None and jnp.issubdtype(np.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"`{name}` must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}")
