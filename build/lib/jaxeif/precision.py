"""The arithmetic an EIF is computed in: `precision=` of every EIF entry point.

An EIF entry is a small difference of two losses, so the arithmetic matters more than usual:
- "highest"  (default) true float32 matmuls and convolutions on every backend; GPU and CPU agree
             to float32 rounding. (XLA on NVIDIA GPUs would otherwise use TF32.)
- "tf32"     TF32 matmuls/convolutions where the hardware has them (faster on GPU; float32 on CPU).
- "bfloat16" bfloat16 operands with float32 accumulation (BF16_BF16_F32) on accelerators; on CPU,
             whose XLA lacks that algorithm for small products, the default (float32) precision.
- "float64"  inputs cast to float64 inside `jax.enable_x64`; the result comes back as float32 (it
             keeps float32 relative accuracy per entry). Several times slower on GPUs.
- "difference" no two losses are subtracted: the change of the loss is propagated through the
             loss function's jaxpr (jaxeif.difference), so each entry has float32 *relative*
             accuracy however small it is. "difference-tf32": the same with TF32 matmuls (its error
             is relative to the entry, not to the loss).
The README lists each mode's measured error against float64.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp

# mode -> jax.default_matmul_precision value
MATMUL = {"highest": "highest", "tf32": "tensorfloat32", "bfloat16": "BF16_BF16_F32", "float64": "highest",
          "difference": "highest", "difference-tf32": "tensorfloat32"}
MODES = tuple(MATMUL)


def check(precision: Any) -> str:
    """The precision mode, or a ValueError listing the valid ones."""
    if not isinstance(precision, str) or precision not in MATMUL:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, MODES))}; got {precision!r}")
    return precision


@contextlib.contextmanager
def context(precision: str) -> Iterator[None]:
    """Trace and run under this mode's matmul precision (and float64 enabled for "float64")."""
    with contextlib.ExitStack() as stack:
        cpu_fallback = precision == "bfloat16" and jax.default_backend() == "cpu"
        stack.enter_context(jax.default_matmul_precision("bfloat16" if cpu_fallback else MATMUL[precision]))
        if precision == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def propagates_difference(precision: str) -> bool:
    """Whether this mode propagates the loss change instead of subtracting two losses."""
    return precision.startswith("difference")


def direct_counterpart(precision: str) -> str:
    """The mode that subtracts two losses in the same matmul arithmetic ("difference" -> "highest")."""
    return {"difference": "highest", "difference-tf32": "tf32"}.get(precision, precision)


def cast_inputs(precision: str, tree: Any) -> Any:
    """Floating leaves as float64 in "float64" mode (call inside `context`); unchanged otherwise."""
    if precision != "float64":
        return tree
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)
