"""CNN EIF speed: jaxeif against a plain jax.vmap, a PyTorch loop and torch.func.vmap, one table.

Every contender computes the same rows (fine-tune one SGD step on train[i], loss on all m evals)
for `--rows` train rows against m = n evals (per-row cost is constant, so pairs/s carries over
to the full n x n matrix); the PyTorch results are checked against jaxeif's in the run.
`--scale 128,256,...` adds the full n x n curve of jaxeif.eif, each n in a fresh process (peak RSS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxeif
from jaxeif.benchmarks import common
from jaxeif.benchmarks.torch_cnn import torch_func_vmap, torch_loop, torch_net
from jaxeif.data import images
from jaxeif.experiments import options
from jaxeif.linearized import eif_linearized
from jaxeif.models import cnn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n", type=options.positive_int, default=512, help="n = m: train and eval samples (Fashion-MNIST test)"
    )
    parser.add_argument(
        "--rows", type=options.positive_int, default=64, help="train rows each contender computes (against all m evals)"
    )
    parser.add_argument(
        "--chunk-size",
        type=options.chunk_size,
        default="auto",
        help="jaxeif.eif chunk_size: rows vmapped together, or auto",
    )
    parser.add_argument("--lr", type=options.positive_float, default=1e-2)
    parser.add_argument(
        "--ckpt", default=None, help="trained CNN checkpoint dir (default: random init; speed does not depend on it)"
    )
    parser.add_argument(
        "--scale",
        default="",
        help="comma-separated n for the n x n curve of jaxeif.eif, e.g. 128,256,4096; "
        "n:r computes only r train rows against all n evals (memory and per-pair cost at large n)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument(
        "--matmul-size", type=options.positive_int, default=2048, help="size of the reference float32 matmul"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time each stage of one row (fine-tune, conv1, pool, conv2, pool, dense) on the m evals",
    )
    parser.add_argument("--scale-point", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--device-report",
        action="store_true",
        help="instead: the accelerator report (benchmarks/device_report.py) on --data",
    )
    parser.add_argument("--data", default=None, help="with --device-report: .npz from `jaxeif export-data`")
    parser.add_argument("--json", default=None, help="with --device-report: write every number to this file")
    parser.add_argument(
        "--stages",
        default="train,full,speed,precision,sweep_vs_calls,meta,sweep",
        help="with --device-report: which parts to run",
    )
    parser.add_argument(
        "--sizes",
        default="auto",
        choices=("auto", "gpu", "gpu-quick", "cpu", "tiny"),
        help="with --device-report: problem sizes (auto: gpu on an accelerator, cpu otherwise)",
    )


def _data(n: int):
    if not 1 <= n <= 10_000:
        raise ValueError(f"--n must be in 1..10000 (the Fashion-MNIST test images), got {n}")
    x, y = images.load_head("fashion_mnist", "test", n)
    return jnp.asarray(x), jnp.asarray(y)


def _params(args):
    return cnn.load_or_train(args.ckpt, progress=False) if args.ckpt else cnn.init_params(jax.random.key(0))


def naive_vmap_rows(params, train, evals, lr: float) -> jax.Array:
    """The straightforward version: vmap over rows of (grad on one sample, SGD update, evaluate all)."""
    base = jaxeif.losses(cnn.loss_fn, params, evals)

    def row(example):
        g = jax.grad(cnn.loss_fn)(params, example)
        tuned = jax.tree.map(lambda p, d: p - lr * d, params, g)
        return jaxeif.losses(cnn.loss_fn, tuned, evals) - base

    return jax.vmap(row)(train)


# ----------------------------------------------------------------------------- runs
def stage_profile(params, x, y, lr: float, matmul: float) -> list[list]:
    """Wall time of each stage of one EIF row (fine-tune on one sample, then the m evals' forward pass,
    stage by stage, each its own jitted program), per pair; the stages compose to cnn.loss_fn (checked)."""
    import flax.linen as nn
    import optax

    m = x.shape[0]
    relu_pool = lambda p, a: nn.max_pool(nn.relu(a), (2, 2), strides=(2, 2))  # noqa: E731
    dense = lambda name, size: lambda p, a: nn.Dense(size).apply({"params": p[name]}, a)  # noqa: E731
    stages = [
        (
            "fine-tune (grad + SGD update, once per row)",
            lambda p, a: jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(cnn.loss_fn)(p, (x[0], y[0]))),
            None,
        ),
        (
            "conv1 3x3, 1 -> 16 channels (cnn.ShiftedConv3x3)",
            lambda p, a: cnn.ShiftedConv3x3(16).apply({"params": p["Conv_0"]}, a),
            2 * 28 * 28 * 16 * 9,
        ),
        ("relu + maxpool 2x2", relu_pool, None),
        (
            "conv2 3x3, 16 -> 32 channels",
            lambda p, a: nn.Conv(32, (3, 3), padding="SAME").apply({"params": p["Conv_1"]}, a),
            2 * 14 * 14 * 32 * 16 * 9,
        ),
        ("relu + maxpool 2x2", relu_pool, None),
        (
            "dense 64, dense 10, loss",
            lambda p, a: optax.softmax_cross_entropy_with_integer_labels(
                dense("Dense_1", 10)(p, nn.relu(dense("Dense_0", 64)(p, a.reshape(m, -1)))), y
            ),
            2 * (7 * 7 * 32 * 64 + 64 * 10),
        ),
    ]
    rows, a = [], x
    for name, fn, flops in stages:
        f = jax.jit(fn)
        seconds = common.timed(lambda: f(params, a))
        out = f(params, a)
        per_pair = seconds / (1 if name.startswith("fine-tune") else m)
        rows.append(
            [
                name,
                per_pair * 1e6,
                f"{flops / per_pair / 1e9:.1f}" if flops else "-",
                f"{flops / per_pair / 1e9 / matmul:.0%}" if flops else "-",
            ]
        )
        if not name.startswith("fine-tune"):
            a = out
    np.testing.assert_allclose(a, jax.vmap(cnn.loss_fn, in_axes=(None, 0))(params, (x, y)), rtol=1e-4, atol=1e-5)
    return rows


def _scale_point(point: str, chunk_size: int | str, lr: float) -> dict:
    """jaxeif.eif of r (default n) train rows x n evals in this process, timed end to end (compilation included)."""
    n, _, r = point.partition(":")
    n, r = int(n), int(r or n)
    params = cnn.init_params(jax.random.key(0))
    x, y = _data(n)
    start = time.perf_counter()
    jax.block_until_ready(jaxeif.eif(cnn.loss_fn, params, (x[:r], y[:r]), (x, y), lr=lr, chunk_size=chunk_size))
    seconds = time.perf_counter() - start
    return {"n": n, "rows": r, "seconds": seconds, "pairs_per_s": n * r / seconds, "peak_rss_mb": common.peak_rss_mb()}


def _scale_curve(points: list[str], chunk_size: int, lr: float) -> list[dict]:
    out = []
    for n in points:
        cmd = [
            sys.executable,
            "-m",
            "jaxeif.benchmarks.cnn",
            "--scale-point",
            n,
            "--chunk-size",
            str(chunk_size),
            "--lr",
            str(lr),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scale point n={n} failed:\n{proc.stderr[-2000:]}")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("SCALE_POINT "))
        out.append(json.loads(line.removeprefix("SCALE_POINT ")))
    return out


def _check_args(args: argparse.Namespace) -> None:
    """The flags' ranges that depend on each other or on the data (argparse checked each number)."""
    if args.n > 10_000:
        raise ValueError(f"--n must be in 1..10000 (the Fashion-MNIST test images), got {args.n}")
    if args.rows > args.n:
        raise ValueError(f"--rows must be in 1..--n ({args.n}), got {args.rows}")
    for point in filter(None, (p.strip() for p in args.scale.split(","))):
        n, _, r = point.partition(":")
        if not (n.isdigit() and 1 <= int(n) <= 10_000 and (not r or (r.isdigit() and 1 <= int(r) <= int(n)))):
            raise ValueError(f"--scale takes comma-separated n or n:rows with 1 <= rows <= n <= 10000, got {point!r}")


def run(args: argparse.Namespace) -> dict:
    _check_args(args)
    if args.device_report:
        if not args.data:
            raise ValueError(
                "--device-report needs --data FILE.npz (write one with `jaxeif export-data --out FILE.npz`)"
            )
        from jaxeif.benchmarks import device_report

        return device_report.run(
            argparse.Namespace(
                data=args.data, json=args.json, sizes=args.sizes, no_torch=args.no_torch, stages=args.stages
            )
        )
    if args.scale_point:
        result = _scale_point(args.scale_point, args.chunk_size, args.lr)
        print("SCALE_POINT " + json.dumps(result))
        return result
    params = _params(args)
    x, y = _data(args.n)
    train, evals = (x[: args.rows], y[: args.rows]), (x, y)
    pairs = args.rows * args.n
    one = (x[0], y[0])
    pair_flops = common.compiled_flops(cnn.loss_fn, params, one)
    row_flops = common.compiled_flops(jax.grad(cnn.loss_fn), params, one)
    flops = args.rows * row_flops + pairs * pair_flops
    matmul = common.matmul_gflops(args.matmul_size)

    results, matrices = {}, {}
    eif_fn = lambda: jaxeif.eif(cnn.loss_fn, params, train, evals, lr=args.lr, chunk_size=args.chunk_size)
    naive = jax.jit(lambda p, tr, ev: naive_vmap_rows(p, tr, ev, args.lr))
    contenders = [
        (f"jaxeif.eif (chunk_size={args.chunk_size})", eif_fn),
        ("jax.vmap, straightforward", lambda: naive(params, train, evals)),
        ("jaxeif.eif_linearized (approximate)", lambda: eif_linearized(cnn.loss_fn, params, train, evals, lr=args.lr)),
    ]
    if not args.no_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        net = torch_net(params)
        t_train = (torch.from_numpy(np.array(train[0])), torch.from_numpy(np.array(train[1])).long())
        t_evals = (torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long())
        contenders += [
            ("PyTorch loop (deepcopy, SGD step, eval)", lambda: torch_loop(net, t_train, t_evals, args.lr)),
            ("torch.func.vmap", lambda: torch_func_vmap(net, t_train, t_evals, args.lr)),
        ]
    for name, fn in contenders:
        seconds = common.timed(fn)
        results[name] = pairs / seconds
        matrices[name] = np.asarray(fn())
    exact = matrices[contenders[0][0]]
    torch_loop_rate = results.get("PyTorch loop (deepcopy, SGD step, eval)")
    naive_rate = results["jax.vmap, straightforward"]
    rows, diffs = [], {}
    for name, rate in results.items():
        diff = float(np.max(np.abs(matrices[name] - exact)))
        approx = "linearized" in name
        if not approx:
            diffs[name] = diff
        rows.append(
            [
                name,
                rate,
                rate / naive_rate,
                rate / torch_loop_rate if torch_loop_rate else "-",
                "-" if approx else flops / (pairs / rate) / 1e9,
                "-" if approx else flops / (pairs / rate) / 1e9 / matmul,
                f"corr {np.corrcoef(matrices[name].ravel(), exact.ravel())[0, 1]:.4f}" if approx else f"{diff:.1e}",
            ]
        )
    stamp = datetime.date.today().isoformat()
    print(
        f"CNN EIF benchmark, {stamp}, {common.machine()}, {os.cpu_count()} CPU cores; n=m={args.n}, "
        f"{args.rows} rows timed x {args.n} evals, 1 SGD step, lr={args.lr}, "
        f"{'trained' if args.ckpt else 'random-init'} CNN; {pair_flops / 1e6:.2f} MFLOP/pair (XLA count), "
        f"matmul {args.matmul_size}^2: {matmul:.1f} GFLOP/s"
    )
    print(
        common.table(
            ["contender", "pairs/s", "x jax.vmap", "x PyTorch loop", "GFLOP/s", "of matmul", "max |diff| vs eif"], rows
        )
    )
    out = {
        "pairs_per_s": results,
        "max_abs_diff_vs_eif": diffs,
        "matmul_gflops": matmul,
        "pair_mflop": pair_flops / 1e6,
    }
    if args.profile:
        profile = stage_profile(params, x, y, args.lr, matmul)
        print(f"stage profile of one row (fine-tune once, then m={args.n} evals; us per pair, the fine-tune per row):")
        print(common.table(["stage", "us", "GFLOP/s", "of matmul"], profile))
        out["profile_us"] = {r[0]: r[1] for r in profile}
    if args.scale:
        curve = _scale_curve([v.strip() for v in args.scale.split(",")], args.chunk_size, args.lr)
        print(
            common.table(
                ["evals m = n", "train rows", "seconds (incl. compile)", "pairs/s", "us/pair", "peak RSS MB"],
                [
                    [c["n"], c["rows"], c["seconds"], c["pairs_per_s"], 1e6 / c["pairs_per_s"], c["peak_rss_mb"]]
                    for c in curve
                ],
            )
        )
        out["scale"] = curve
    out["peak_rss_mb"] = common.peak_rss_mb()
    print(f"peak RSS of this process: {out['peak_rss_mb']:.0f} MB")
    return out


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
