"""`lm.memory_estimate` against measured peaks: each LM EIF path on random decoders of three sizes (CPU).

Measured peak = the params' bytes + the growth of the process's peak resident memory (VmHWM) while
the path runs, in a fresh subprocess: the path runs once first (compiling), its results are freed,
the kernel's peak counter is reset (/proc/self/clear_refs), and the second run is measured. glibc's
mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so freed buffers go back to the system. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import io, lm, packing
from jaxeif.benchmarks import common
from jaxeif.experiments import options
from jaxeif.lm import loss as lm_loss
from jaxeif.lm import memory
from jaxeif.models import phi3, upcast

# name -> (layers, hidden, intermediate, heads, vocab): three sizes, each model well above the process's noise
SIZES = {"small": (2, 256, 768, 4, 8192), "medium": (4, 512, 1536, 8, 16384), "large": (4, 768, 2304, 12, 32064)}
TEST_SIZES = {"s2": (2, 256, 768, 4, 8192), "s3": (2, 384, 1024, 6, 12288), "s4": (2, 512, 1536, 8, 16384)}
# name -> (params dtype, compute dtype); "bf16-weights" computes through jaxeif.models.upcast
DTYPES = {
    "float32": (jnp.float32, jnp.float32),
    "bfloat16": (jnp.bfloat16, jnp.bfloat16),
    "bf16-weights": (jnp.bfloat16, jnp.float32),
}
# not measured: the low-rank path of a bfloat16-compute model (its estimate is not compared with a measured peak)
UNSUPPORTED = {("lowrank", "bfloat16")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES) + list(TEST_SIZES))
    parser.add_argument("--paths", nargs="+", default=list(memory.PATHS), choices=memory.PATHS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--n", type=options.positive_int, default=8, help="fine-tunes")
    parser.add_argument("--m", type=options.positive_int, default=16, help="evals")
    parser.add_argument("--tokens", type=options.positive_int, default=32, help="tokens per sample")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec


def config_of(size: str) -> phi3.Phi3Config:
    layers, d, f, h, vocab = {**SIZES, **TEST_SIZES}[size]
    return phi3.Phi3Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=h,
        num_key_value_heads=h,
        head_dim=d // h,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def random_tokens(config, n: int, tokens: int, seed: int = 0) -> lm.Tokens:
    """n random samples of exactly `tokens` tokens (every token after the first scored)."""
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (n, tokens)).astype(np.int32)
    score = np.ones((n, tokens), np.float32)
    score[:, 0] = 0
    return lm.Tokens(ids, np.ones((n, tokens), np.int32), score)


def run_path(path: str, apply_fn, params, config, toks: lm.Tokens, n: int, m: int):
    """The path's EIF of the first n samples against the first m (prompted: the packed forward passes of n x m
    pairs)."""
    train, evals = (lm.Tokens(*(x[:k] for x in toks)) for k in (n, m))
    if path == "dense":
        return np.asarray(
            lm.finetuned_eif(apply_fn, params, train, evals, lr=1e-4, chunk_size=1, path="dense", config=config)
        )
    if path == "lowrank":
        return lm.lowrank_sgd_eif(apply_fn, params, train, evals, config=config, lr=1e-4, chunk_size=1)
    ids = [list(map(int, row)) for row in np.asarray(toks.ids)]
    packed = packing.prefixed(ids[:n], ids[:m])  # what lm.prompted_eif runs, from token ids
    return lm_loss.packed_nll(apply_fn, params, packed)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(size: str, path: str, dtype: str, n: int, m: int, tokens: int) -> dict:
    """In this process: params bytes + growth of peak RSS during the path's second run (see module doc)."""
    config = config_of(size)
    params_dtype, compute_dtype = DTYPES[dtype]
    params = phi3.init_params(jax.random.key(0), config, params_dtype)
    apply_fn = phi3.make_apply_fn(config, compute_dtype)
    apply_fn = jax.jit(apply_fn if params_dtype == compute_dtype else upcast.upcast_apply_fn(apply_fn, compute_dtype))
    toks = random_tokens(config, max(n, m), tokens)
    jax.block_until_ready(run_path(path, apply_fn, params, config, toks, n, m))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    jax.block_until_ready(run_path(path, apply_fn, params, config, toks, n, m))
    growth = _rss("VmHWM") - before
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        "size": size,
        "path": path,
        "dtype": dtype,
        "n": n,
        "m": m,
        "tokens": tokens,
        "params_bytes": param_bytes,
        "growth_bytes": growth,
        "measured_bytes": param_bytes + growth,
    }


def measure_subprocess(specs: list[dict]) -> list[dict]:
    """`measure` of each spec (keyword dicts) in one fresh Python process, one after another (each run's
    buffers are freed before the next is measured; nothing of this process's memory is counted)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "jaxeif.benchmarks.lm_memory", "--child", json.dumps(specs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {specs} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def estimate(row: dict) -> int:
    options = dict(zip(("dtype", "compute_dtype"), DTYPES[row["dtype"]]))
    if row["path"] == "dense":
        options["tokens"] = row["tokens"]
    else:
        options["rank"] = packing.round_up(row["tokens"], 32)
    return memory.memory_estimate(config_of(row["size"]), row["n"], row["m"], path=row["path"], **options)


def run(args: argparse.Namespace) -> dict:
    if args.child:
        for spec in json.loads(args.child):
            print(json.dumps(measure(**spec)), flush=True)
        return {}
    rows = []
    for size in args.sizes:  # one process per size
        specs = [
            dict(size=size, path=p, dtype=d, n=args.n, m=args.m, tokens=args.tokens)
            for d in args.dtypes
            for p in args.paths
            if (p, d) not in UNSUPPORTED
        ]
        for row in measure_subprocess(specs):
            row["estimate_bytes"] = estimate(row)
            row["ratio"] = row["estimate_bytes"] / row["measured_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.json:
            io.save_json(args.json, {"machine": common.machine(), "rows": rows})
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print(
        common.table(
            ["size", "dtype", "path", "params MiB", "measured MiB", "estimate MiB", "estimate / measured"],
            [
                [
                    r["size"],
                    r["dtype"],
                    r["path"],
                    mib(r["params_bytes"]),
                    mib(r["measured_bytes"]),
                    mib(r["estimate_bytes"]),
                    f"{r['ratio']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    return {"rows": len(rows), "worst_ratio": max(rows, key=lambda r: abs(np.log(r["ratio"])))["ratio"]}


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
