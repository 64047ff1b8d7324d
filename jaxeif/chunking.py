"""How many fine-tunes (rows) and evals go through the device at once: `chunk_size="auto"`.

The EIF's memory grows as rows x evals x the largest activation. "auto" asks XLA: it compiles
the real program at the layout it would like best, reads the compiled program's memory analysis,
and runs that very program when it fits the budget (one compile); only when it does not is a
smaller layout compiled:
- CPU: one row at a time (measured fastest: vmapped rows become slow grouped convolutions);
- GPU/TPU: the most rows that fit (throughput grows with the chunk), up to MAX_ROWS: first
  min(n, MAX_ROWS), then the rows that XLA's analysis says fit (temporaries grow linearly with rows).
  When the traced program shows that the most rows cannot fit (`jaxpr_floor`: a convolution's or
  matrix product's result alone is over budget), a small probe of PROBE_ROWS rows is compiled instead,
  and the rows that fit are read off its analysis: the full-size program is compiled once.
When even one row over all evals does not fit, the eval axis is tiled too. If the device still runs
out of memory (XLA's estimate was low), jaxeif.eif plans again within half the estimate, with a warning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import numpy as np

from jaxeif.errors import Error

MAX_ROWS = 1024  # beyond this, bigger chunks only cost compile time and memory
PROBE_ROWS = 8  # a probe's rows: a small program to plan from when the most rows surely do not fit
DEFAULT_FRACTION = 0.75  # of the memory free on the device when the call starts


class Chunks(NamedTuple):
    """A layout of the EIF program: how many fine-tunes and evals run at once.

    Attributes:
        rows: fine-tunes vmapped together (None: all).
        evals: evals per tile (None: all).
    """

    rows: int | None
    evals: int | None = None


class MemoryBudgetError(Error, MemoryError):
    """The EIF does not fit in the memory budget; the message gives the estimate and what to change."""


def gib(nbytes: float) -> str:
    """`nbytes` as a short GiB string ("1.25 GiB") for error messages and reports.

    Args:
        nbytes: a size in bytes.

    Returns:
        The size in GiB with two decimals and its unit.
    """
    return f"{nbytes / 2**30:.2f} GiB"


def free_bytes(device: jax.Device | None = None) -> int:
    """Memory free for new buffers on a device.

    Args:
        device: the device; None: the first of `jax.devices()`.

    Returns:
        The allocator's limit minus what is in use on an accelerator, else the host's available RAM, in bytes.
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return host_free_bytes()


def host_free_bytes() -> int:
    """The host's available RAM in bytes (MemAvailable; free pages where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory_budget(memory_budget: Any) -> None:
    """Check a `memory_budget=` argument.

    Args:
        memory_budget: a positive number of bytes, or None (a share of the free memory).

    Raises:
        ValueError: anything else (a bool, a non-number, a number <= 0).
    """
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise ValueError(
            f"`memory_budget` must be a positive number of bytes or None (a fraction of free memory), "
            f"got {memory_budget!r}"
        )


def budget_bytes(memory_budget: float | int | None, device: jax.Device | None = None) -> int:
    """The memory budget in bytes.

    Args:
        memory_budget: bytes, or None for `DEFAULT_FRACTION` of the free memory.
        device: the device whose free memory counts; None: the first device.

    Returns:
        The budget in bytes.

    Raises:
        ValueError: `memory_budget` is not None or a positive number.
    """
    check_memory_budget(memory_budget)
    return int(DEFAULT_FRACTION * free_bytes(device)) if memory_budget is None else int(memory_budget)


class Footprint(NamedTuple):
    """A compiled program's memory from XLA's analysis.

    Attributes:
        total: peak bytes (arguments + outputs + temporaries - aliased).
        fixed: the part that does not grow with the rows in flight (arguments + outputs - aliased).
    """

    total: int
    fixed: int


def footprint(compiled: Any) -> Footprint:
    """`compiled`'s Footprint; (0, 0) when the backend gives no analysis.

    Args:
        compiled: a compiled JAX program (`jax.jit(f).lower(...).compile()`).

    Returns:
        Footprint(total, fixed) in bytes.
    """
    ma = compiled.memory_analysis()
    if ma is None:
        return Footprint(0, 0)
    fixed = int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    return Footprint(fixed + int(ma.temp_size_in_bytes), fixed)


def program_bytes(compiled: Any) -> int:
    """Peak memory of a compiled program from XLA's own analysis: arguments + outputs + temporaries - aliased.

    Args:
        compiled: a compiled JAX program (`jax.jit(f).lower(...).compile()`).

    Returns:
        Bytes; 0 when the backend gives no analysis.
    """
    return footprint(compiled).total


def check_chunk_size(chunk_size: Any) -> None:
    """Check a `chunk_size=` argument before anything compiles.

    Args:
        chunk_size: "auto" (rows per step from XLA's memory analysis), None (all rows at once) or an int >= 1.

    Raises:
        TypeError: `chunk_size` is neither "auto", None nor an int (a bool is refused too).
        ValueError: `chunk_size` is an int below 1.
    """
    if chunk_size is None or chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f'`chunk_size` must be "auto", None (all rows at once) or an int >= 1, got {chunk_size!r}')
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 (rows per step), got {chunk_size}")


def _even(rows: int, n: int) -> int:
    """The smallest chunk that takes as many steps over n rows as `rows` does (less padding)."""
    return math.ceil(n / math.ceil(n / rows))


def choose(
    compile_at: Callable[[Chunks], tuple[Any, Footprint]],
    n: int,
    m: int,
    *,
    budget: int,
    accelerator: bool,
    floor_at: Callable[[Chunks], int] | None = None,
) -> tuple[Chunks, Any, int]:
    """The fastest layout within `budget`, compiled; its first compile is the program that runs whenever
    that fits.

    CPU: one fine-tune at a time over all evals. Accelerator: min(n, MAX_ROWS) rows at once. When that
    does not fit, the rows that fit are estimated from XLA's analysis (temporaries linear in rows; from
    two layouts once two were compiled), and compiled; when even one row over all evals does not fit,
    the evals are tiled (halved until it fits). A compile that runs out of memory counts as not fitting.
    When `floor_at` shows, before any compile, that the most rows cannot fit, a probe of PROBE_ROWS rows
    is compiled first and the estimate starts from its analysis (so no full-size program is compiled
    only to learn that it does not fit).

    Args:
        compile_at: `compile_at(chunks) -> (program, Footprint)` compiles the EIF program at a layout.
        n: train rows.
        m: evals.
        budget: bytes the program may use.
        accelerator: whether to try more than one row at once.
        floor_at: `floor_at(chunks) -> bytes` the layout needs at least, without compiling (`jaxpr_floor`
            of the traced program); None: no such check.

    Returns:
        (chunks, compiled program, its estimated bytes).

    Raises:
        MemoryBudgetError: one fine-tune against one eval does not fit.
    """
    most = _even(min(n, MAX_ROWS), n) if accelerator else 1
    probing = floor_at is not None and most > PROBE_ROWS and floor_at(Chunks(most, None)) > budget
    rows, evals = (_even(PROBE_ROWS, n) if probing else most), m
    tried: list[tuple[int, int]] = []  # (rows, bytes) of the layouts compiled over all evals
    probe = None  # (chunks, program, bytes) of a probe that fits, run when nothing larger does
    while True:
        chunks = Chunks(rows, None if evals >= m else evals)
        try:
            program, used = compile_at(chunks)
        except Exception as e:  # compiling may itself need device memory (autotuning): too big a layout
            if not out_of_memory(e):
                raise
            program, used = None, None
        if used is not None and used.total <= budget:
            if not probing:
                return chunks, program, used.total
            probing, probe = False, (chunks, program, used.total)
            tried.append((rows, used.total))
            larger = _even(max(1, min(_rows_that_fit(tried, used.fixed, budget), most)), n)
            if larger <= rows:
                return probe
            rows = larger
            continue
        probing = False
        if rows > 1:
            if used is None:
                rows = _even(rows // 2, n)
            else:
                tried.append((rows, used.total))
                rows = _even(max(1, min(_rows_that_fit(tried, used.fixed, budget), rows - 1)), n)
            if probe is not None and rows <= probe[0].rows:
                return probe
        elif evals > 1:  # one row over all evals is too much: tile the evals
            evals = math.ceil(evals / 2)
        else:
            need = "ran out of memory while compiling" if used is None else f"needs an estimated {gib(used.total)}"
            raise MemoryBudgetError(
                f"one fine-tune against one eval {need}, over the memory budget of "
                f"{gib(budget)}; free device memory, raise `memory_budget`, or use a smaller model"
            )


def _rows_that_fit(tried: list[tuple[int, int]], fixed: int, budget: int) -> int:
    """Rows whose bytes stay within `budget` on the line through the last two layouts tried (one layout:
    through its `fixed` bytes at zero rows)."""
    (r1, u1), (r0, u0) = (tried[-2], tried[-1]) if len(tried) > 1 else ((0, fixed), tried[-1])
    per_row = (u1 - u0) / (r1 - r0) if r1 != r0 else 0.0
    if per_row <= 0:  # no usable slope: halve
        return r0 // 2
    return int((budget - (u0 - per_row * r0)) // per_row)


_WRITTEN_WHOLE = ("conv_general_dilated", "dot_general")  # results a device writes whole (no fusion splits them)


def jaxpr_floor(jaxpr: jex.ClosedJaxpr) -> int:
    """Bytes a program surely needs, read from its jaxpr without compiling: its arguments and results,
    plus the largest result of one convolution or matrix product (XLA fuses elementwise work away, but
    such a result is written whole, inside loops and vmapped rows included).

    A floor, not an estimate: XLA's analysis of the compiled program is at least this (tested), often
    more. `choose` uses it only to skip compiling a layout that cannot fit.

    Args:
        jaxpr: the traced program (`jax.jit(f).trace(...).jaxpr`).

    Returns:
        Bytes.
    """

    def nbytes(avals) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in avals if hasattr(a, "shape"))

    def largest(inner: jex.Jaxpr) -> int:
        out = 0
        for eqn in inner.eqns:
            if eqn.primitive.name in _WRITTEN_WHOLE:
                out = max(out, nbytes(v.aval for v in eqn.outvars))
            for sub in jex.jaxprs_in_params(eqn.params):
                out = max(out, largest(sub))
        return out

    return nbytes(jaxpr.in_avals) + nbytes(jaxpr.out_avals) + largest(jaxpr.jaxpr)


def out_of_memory(error: BaseException) -> bool:
    """Whether an XLA runtime error is an allocation failure (so it can be re-raised as `MemoryBudgetError`).

    Args:
        error: the exception XLA raised.

    Returns:
        True for an out-of-memory error.
    """
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
