"""Shared benchmark helpers: timing, the matmul reference rate, peak memory, table printing."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def timed(fn: Callable[[], object], *, warmup: bool = True) -> float:
    """Wall seconds of one call of fn() (results blocked on), after one untimed warm-up call."""
    if warmup:
        jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 size x size matmul rate of jax on this machine, GFLOP/s (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    best = min(timed(lambda: mm(a), warmup=(i == 0)) for i in range(repeats))
    return 2 * size**3 / best / 1e9


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs of fn(*args) as counted by XLA's cost analysis of the compiled program."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan")))


def compiled_bytes(fn: Callable, *args) -> float:
    """Peak bytes of fn(*args) by XLA's memory analysis of the compiled program (arguments, outputs, temporaries)."""
    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    return float(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (VmHWM; ru_maxrss would carry a forking parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {jax.device_count()}x {jax.devices()[0].platform}, jax {jax.__version__}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table (markdown pipes) of rows under headers."""
    cells = [[str(h) for h in headers]] + [[f"{v:,.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )
