"""The arithmetic an EIF is computed in: `precision=` of every EIF entry point.

An EIF entry is a small difference of two losses, so the arithmetic matters more than usual.
`Precision` holds three orthogonal choices:
- `matmul`: "highest" (default) true float32 matmuls and convolutions on every backend, so GPU and
  CPU agree to float32 rounding (XLA on NVIDIA GPUs would otherwise use TF32); "tf32": TF32
  matmuls/convolutions where the hardware has them (faster on GPU; float32 on CPU).
- `dtype`: "float32" (default); "bfloat16": bfloat16 operands with float32 accumulation
  (BF16_BF16_F32) on accelerators, float32 on CPU, whose XLA lacks that algorithm for small
  products; "float64": inputs cast to float64 inside `jax.enable_x64`, the result rounded back to
  float32 (it keeps float32 relative accuracy per entry; several times slower on GPUs).
- `difference`: False (default) subtracts two losses; True propagates the change of the loss
  through the loss function's jaxpr (jaxeif.difference), so each entry has float32 *relative*
  accuracy however small it is (with matmul "tf32" the error is relative to the entry, not to the
  loss).

Supported combinations are the six in `NAMES` (docs/precision.md lists each one's measured error
against float64). The short names ("highest", "tf32", "bfloat16", "float64", "difference",
"difference-tf32") are accepted by the EIF functions for one release with a DeprecationWarning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

Matmul = Literal["highest", "tf32"]
Dtype = Literal["float32", "bfloat16", "float64"]
Name = Literal["highest", "tf32", "bfloat16", "float64", "difference", "difference-tf32"]


class Precision(NamedTuple):
    """The arithmetic of an EIF: matmul precision, dtype, and whether the loss change is propagated.

    Attributes:
        matmul: "highest" (true float32 matmuls) or "tf32" (TF32 where the hardware has it).
        dtype: "float32", "bfloat16" (bfloat16 operands, float32 accumulation) or "float64"
            (computed in float64, returned as float32).
        difference: propagate the change of the loss instead of subtracting two losses.

    Example:
        >>> jaxeif.eif(loss_fn, params, train, lr=1e-3, precision=jaxeif.Precision(difference=True))
    """

    matmul: Matmul = "highest"
    dtype: Dtype = "float32"
    difference: bool = False


# short name -> Precision: the six supported combinations (names are also what run folders record)
NAMES: dict[str, Precision] = {
    "highest": Precision(),
    "tf32": Precision(matmul="tf32"),
    "bfloat16": Precision(dtype="bfloat16"),
    "float64": Precision(dtype="float64"),
    "difference": Precision(difference=True),
    "difference-tf32": Precision(matmul="tf32", difference=True),
}
MODES = tuple(NAMES)


def name(precision: Precision) -> str:
    """The short name of a supported Precision ("difference" for Precision(difference=True)).

    Args:
        precision: one of the supported combinations (see `NAMES`).

    Returns:
        Its key in `NAMES`: a stable identifier for file names, config files and run records.
    """
    return next(k for k, v in NAMES.items() if v == precision)


def named(short: Name) -> Precision:
    """The Precision of a short name, for command lines and config files (no deprecation warning).

    Args:
        short: one of `MODES`.

    Returns:
        The equivalent Precision.

    Raises:
        ValueError: `short` is not one of `MODES`.
    """
    if short not in NAMES:
        raise ValueError(f"precision name must be one of {', '.join(map(repr, MODES))}; got {short!r}")
    return NAMES[short]


def _matmul_setting(precision: Precision) -> str:
    """The jax.default_matmul_precision value of a checked Precision."""
    if precision.dtype == "bfloat16":
        return "bfloat16" if jax.default_backend() == "cpu" else "BF16_BF16_F32"
    return "tensorfloat32" if precision.matmul == "tf32" else "highest"


@contextlib.contextmanager
def context(precision: Precision) -> Iterator[None]:
    """Trace and run under this Precision's matmul precision (and float64 enabled for dtype "float64")."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_matmul_precision(_matmul_setting(precision)))
        if precision.dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def propagates_difference(precision: Precision) -> bool:
    """Whether this Precision propagates the loss change instead of subtracting two losses."""
    return precision.difference


def direct_counterpart(precision: Precision) -> Precision:
    """The Precision that subtracts two losses in the same matmul arithmetic (difference=False)."""
    return precision._replace(difference=False)


def is_float64(precision: Precision) -> bool:
    """Whether this Precision computes in float64 (and returns float32)."""
    return precision.dtype == "float64"


def cast_inputs(precision: Precision, tree: Any) -> Any:
    """Floating leaves as float64 for dtype "float64" (call inside `context`); unchanged otherwise."""
    if precision.dtype != "float64":
        return tree
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )
