"""The shared keyword options of every EIF function: their types and their one validation.

Every EIF function (jaxeif.eif, eif_sweep, eif_linearized, eif_sharded, noise_floor,
runs.sweep_eif and the jaxeif.lm ones) takes the same keywords with the same defaults and
meaning; each is checked here, once, with a message naming the argument and the fix:

    lr             required, keyword-only: a scalar or one rate per train example f[n]
    steps          1                optimizer steps per fine-tune
    optimizer      None             an optax.GradientTransformation (None: SGD with unit rate)
    chunk_size     "auto"           rows per step: "auto" picks the fastest layout that fits
                                    `memory_budget` by XLA's memory analysis (jaxeif.chunking);
                                    None: all at once; an int: that many
    precision      Precision()      the arithmetic (jaxeif.precision)
    progress       False            a progress bar on stderr
    memory_budget  None             bytes "auto" may plan for (None: 75% of the free memory)
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Literal

import optax

from jaxeif import chunking
from jaxeif import progress as progress_lib
from jaxeif.deprecation import JaxeifDeprecationWarning
from jaxeif.errors import Error
from jaxeif.precision import NAMES, Precision

ChunkSize = int | Literal["auto"] | None

DEFAULTS: dict[str, Any] = {
    "steps": 1,
    "optimizer": None,
    "chunk_size": "auto",
    "precision": Precision(),
    "progress": False,
    "memory_budget": None,
}


class PrecisionError(Error, ValueError):
    """`precision=` is not a supported Precision; the message lists the supported ones."""


def check_chunk_size(chunk_size: Any) -> ChunkSize:
    """`chunk_size` checked: "auto", None or an int >= 1.

    Raises:
        TypeError: not one of those kinds.
        ValueError: an int below 1.
    """
    chunking.check_chunk_size(chunk_size)
    return chunk_size


def check_memory_budget(memory_budget: Any) -> float | None:
    """`memory_budget` checked: None or a positive number of bytes.

    Raises:
        ValueError: anything else.
    """
    chunking.check_memory_budget(memory_budget)
    return memory_budget


def check_optimizer(optimizer: Any) -> optax.GradientTransformation | None:
    """`optimizer` checked: None or an optax.GradientTransformation.

    Raises:
        TypeError: anything else (a string such as "adam" included: pass optax.adam(1.0)).
    """
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        hint = f" (pass optax.{optimizer}(1.0), a unit-rate optax optimizer)" if isinstance(optimizer, str) else ""
        raise TypeError(f"`optimizer` must be an optax.GradientTransformation or None, got {optimizer!r}{hint}")
    return optimizer


def check_progress(progress: Any, *, traced: bool = False) -> bool:
    """`progress` checked: a bool (and no bar inside jax.jit/grad).

    Raises:
        TypeError: not a bool.
        ValueError: a bar requested while traced.
    """
    progress_lib.check(progress, traced=traced)
    return progress


def check_precision(precision: Any) -> Precision:
    """`precision` as a supported Precision.

    A short name ("highest", "tf32", "bfloat16", "float64", "difference", "difference-tf32") is
    accepted for one release with a DeprecationWarning naming the equivalent Precision(...).

    Returns:
        The Precision.

    Raises:
        PrecisionError (a ValueError): an unknown name, a non-Precision value, or an unsupported
            combination (the message lists the supported ones).
    """
    supported = ", ".join(f"{_spell(p)}" for p in NAMES.values())
    if isinstance(precision, str):
        if precision not in NAMES:
            raise PrecisionError(
                f"`precision` must be one of {', '.join(map(repr, NAMES))} or a jaxeif.Precision; got {precision!r}"
            )
        warn_deprecated(f"precision={precision!r} is deprecated; pass precision=jaxeif.{_spell(NAMES[precision])}")
        return NAMES[precision]
    if not isinstance(precision, Precision):
        raise PrecisionError(
            f"`precision` must be one of {', '.join(map(repr, NAMES))} or a jaxeif.Precision; "
            f"got {type(precision).__name__} {precision!r}"
        )
    if precision not in NAMES.values():
        raise PrecisionError(f"precision={_spell(precision)} is not a supported combination; use one of {supported}")
    return precision


def _spell(precision: Precision) -> str:
    """Precision(...) as code, listing only the fields that differ from the default."""
    args = ", ".join(f"{k}={v!r}" for k, v in precision._asdict().items() if v != Precision._field_defaults[k])
    return f"Precision({args})"


_CORE = os.path.dirname(os.path.abspath(__file__))


def warn_deprecated(message: str) -> None:
    """A DeprecationWarning attributed to the first caller outside the jaxeif core (so it names the user's line)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_CORE + os.sep):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, JaxeifDeprecationWarning, stacklevel=level)
