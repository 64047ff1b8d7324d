"""`progress=True` of the EIF functions: a tqdm bar on the host, ticked from inside the compiled program.

Each finished row calls back to the host (jax.experimental.io_callback), so the bar follows the
program as it runs. Only concrete calls show one: under jit, grad or vmap the program runs after
the call returns, so `progress=True` there is refused.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import io_callback
from tqdm.auto import tqdm

_OPEN: list = []  # bars of the calls now running, innermost last


def check(progress: Any, *, traced: bool = False) -> bool:
    """`progress` as a bool, or an error naming it.

    Args:
        progress: the `progress=` argument.
        traced: whether the call is traced (under jit, grad or vmap), where a bar cannot follow the program.

    Returns:
        `progress`.

    Raises:
        TypeError: `progress` is not a bool.
        ValueError: `progress=True` in a traced call.
    """
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True or False, got {progress!r}")
    if progress and traced:
        raise ValueError(
            "`progress=True` needs a concrete call (not under jit, grad or vmap, which run the program "
            "after the call returns); pass progress=False"
        )
    return progress


@contextlib.contextmanager
def bar(total: int, desc: str, enabled: bool, unit: str = "row") -> Iterator[Callable[[int], None]]:
    """A tqdm bar of `total` units for the duration of the block (none unless `enabled`).

    Compiled programs advance it with `tick`; host loops with the function the block receives.

    Args:
        total: units in all.
        desc: the bar's label.
        enabled: show the bar; False gives a no-op advance function.
        unit: the unit's name.

    Yields:
        `advance(k=1)`, which moves the bar by k units.
    """
    if not enabled:
        yield lambda k=1: None
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) as shown:
        _OPEN.append(shown)
        try:
            yield lambda k=1: shown.update(k)
        finally:
            _OPEN.remove(shown)


def tick(row: jax.Array) -> None:
    """Inside a compiled program: advance the open bar by one once `row` is computed.

    The callback depends on `row`, so XLA runs it only after the row is finished.

    Args:
        row: a finished row's result (any array).
    """
    io_callback(_advance, None, jnp.ravel(row)[0])


def _advance(_: Any) -> None:
    if _OPEN:
        _OPEN[-1].update(1)
