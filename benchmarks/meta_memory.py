"""Memory of a meta-gradient: jax.grad of a scalar of jaxeif.eif w.r.t. per-sample lr, CNN, n = m.

Before: the same chunked row loop without rematerialisation (what eif did until 2026-11-26):
reverse mode keeps every row's activations over all evals, memory ~ n x m. After: jaxeif.eif,
each chunk of rows recomputed in the backward pass. Both columns are XLA's memory analysis of
the compiled gradient program (compiled, not run); `--run` also runs the "after" program, each n
in a fresh process, and reports its peak RSS and time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxeif
from jaxeif.benchmarks import common
from jaxeif.models import cnn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="100,200,400", help="comma-separated n = m")
    parser.add_argument(
        "--run", action="store_true", help="also run the jaxeif program (peak RSS, seconds), one process per n"
    )
    parser.add_argument("--point", type=int, default=0, help=argparse.SUPPRESS)


def _problem(n: int):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(k[1], (n, 28, 28, 1))
    return cnn.init_params(k[0]), (x, jax.random.randint(k[2], (n,), 0, 10))


def _before(params, train, lr):
    """The pre-remat program: rows one at a time (lax.map), no jax.checkpoint."""
    base = jaxeif.losses(cnn.loss_fn, params, train)
    row = lambda a: jaxeif.losses(cnn.loss_fn, jaxeif.finetune(cnn.loss_fn, params, a[0], lr=a[1]), train) - base  # noqa: E731
    return jax.lax.map(row, (train, lr), batch_size=1).sum()


def _after(params, train, lr):
    return jaxeif.eif(cnn.loss_fn, params, train, lr=lr).sum()


def _estimate(fn, n: int) -> float:
    params, train = _problem(n)
    grad = jax.jit(jax.grad(fn, argnums=2))
    return common.compiled_bytes(grad, params, train, jnp.full((n,), 1e-3)) / 2**30


def _point(n: int) -> dict:
    params, train = _problem(n)
    grad = jax.jit(jax.grad(_after, argnums=2))
    start = time.perf_counter()
    g = jax.block_until_ready(grad(params, train, jnp.full((n,), 1e-3)))
    return {
        "n": n,
        "seconds": time.perf_counter() - start,
        "peak_rss_gib": common.peak_rss_mb() / 1024,
        "finite": bool(np.all(np.isfinite(np.asarray(g)))),
    }


def run(args: argparse.Namespace) -> dict:
    if args.point:
        out = _point(args.point)
        print("POINT " + json.dumps(out))
        return out
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated positive ints, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes takes comma-separated positive ints, got {args.sizes!r}")
    rows = []
    for n in sizes:
        row = {"n": n, "before_gib": _estimate(_before, n), "after_gib": _estimate(_after, n)}
        if args.run:
            proc = subprocess.run(
                [sys.executable, "-m", "jaxeif.benchmarks.meta_memory", "--point", str(n)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                raise RuntimeError(f"n={n} failed:\n{proc.stderr[-2000:]}")
            row.update(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("POINT "))[6:]))
        rows.append(row)
    print(f"meta-gradient memory, CNN, jax.grad of eif(...).sum() w.r.t. per-sample lr; {common.machine()}")
    headers = ["n = m", "before: XLA estimate GiB", "after: XLA estimate GiB"] + (
        ["after: peak RSS GiB", "after: s"] if args.run else []
    )
    print(
        common.table(
            headers,
            [
                [r["n"], r["before_gib"], r["after_gib"]] + ([r["peak_rss_gib"], r["seconds"]] if args.run else [])
                for r in rows
            ],
        )
    )
    return {"rows": rows}


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
