"""One report of jaxeif's CNN EIF on the machine at hand (made for one GPU; smaller sizes on CPU).

Needs only jax, flax, optax, orbax (and torch for the PyTorch rows); the data comes from an .npz
written by `jaxeif export-data`. Prints one table and writes every number to --json:
device and versions; the default `eif` call against a PyTorch loop, torch.func.vmap and the
large-batch forward rate; the full n x n default call (seconds, peak device memory); each
precision mode's error against float64, with the noise floor; an lr sweep with eif_sweep; one
meta-gradient through eif.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxeif
from jaxeif import chunking
from jaxeif import precision as precision_lib
from jaxeif.benchmarks import common, export_data, torch_cnn
from jaxeif.models import cnn

# sizes: (speed n = m, PyTorch rows, full n, sweep n, sweep lrs, precision n, meta n, train epochs)
GPU_SIZES = dict(
    speed=2048, torch_rows=128, full=10_000, sweep=10_000, sweep_points=13, precision=512, meta=1000, epochs=3
)
GPU_QUICK_SIZES = dict(GPU_SIZES, sweep=2048)
CPU_SIZES = dict(speed=128, torch_rows=8, full=256, sweep=128, sweep_points=3, precision=48, meta=24, epochs=1)
TINY_SIZES = dict(
    speed=12, torch_rows=2, full=12, sweep=12, sweep_points=2, precision=12, meta=12, epochs=1
)  # tests: one n, so the stages share compiled programs
PRECISION_LRS = (1e-4, 1e-3, 1e-2)
MODES = ("highest", "tf32", "bfloat16", "difference", "difference-tf32")
STAGES = ("train", "full", "speed", "precision", "sweep_vs_calls", "meta", "sweep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help=".npz from `jaxeif export-data`")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument(
        "--sizes",
        choices=("auto", "gpu", "gpu-quick", "cpu", "tiny"),
        default="auto",
        help="problem sizes: gpu (n up to 10,000), gpu-quick (lr sweep on 2,048) or cpu (smoke sizes); auto by backend",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)} (train always runs)"
    )


def _say(*parts) -> None:
    print(*parts, flush=True)


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def _wall(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _versions() -> dict:
    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }
    for name in ("jaxlib", "flax", "optax", "torch"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _train(data: dict, epochs: int, holder: dict) -> dict:
    """Train the CNN on the exported train images (Adam 1e-3, batch 128); params into holder."""
    start = time.perf_counter()
    holder["params"] = cnn.train(
        data["train_images"], data["train_labels"], epochs=epochs, batch_size=128, progress=False
    )
    return {
        "train_images": len(data["train_images"]),
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
        "test_accuracy": cnn.accuracy(holder["params"], data["test_images"], data["test_labels"]),
    }


def _speed(params, x, y, n: int, torch_rows: int, use_torch: bool) -> dict:
    """pairs/s of the default eif call and its contenders at n = m, with the forward rate."""
    train, evals = (x[:n], y[:n]), (x[:n], y[:n])
    lr = 1e-2
    out = {"n": n}
    forward = jax.jit(lambda p, a, b: jaxeif.losses(cnn.loss_fn, p, (a, b)))
    with jax.default_matmul_precision("highest"):
        _wall(lambda: forward(params, x, y))
        _, sec = _wall(lambda: forward(params, x, y))
    out["forward_images_per_s_highest"] = len(x) / sec
    _, first = _wall(lambda: jaxeif.eif(cnn.loss_fn, params, train, evals, lr=lr))
    M, sec = _wall(lambda: jaxeif.eif(cnn.loss_fn, params, train, evals, lr=lr))
    out.update(eif_first_call_s=first, eif_pairs_per_s=n * n / sec)
    chunks, nbytes = jaxeif.chunk_plan(cnn.loss_fn, params, train, evals, lr=lr)
    out.update(auto_chunks=list(chunks), auto_bytes_gib=nbytes / 2**30)
    for mode in MODES[1:] + ("float64",):
        try:
            _wall(lambda: jaxeif.eif(cnn.loss_fn, params, train, evals, lr=lr, precision=precision_lib.named(mode)))
            _, sec = _wall(
                lambda: jaxeif.eif(cnn.loss_fn, params, train, evals, lr=lr, precision=precision_lib.named(mode))
            )
            out[f"eif_{mode}_pairs_per_s"] = n * n / sec
        except Exception as e:  # a mode the backend refuses is reported, not hidden
            out[f"eif_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    with jax.default_matmul_precision("tensorfloat32"):
        _wall(lambda: forward(params, x, y))
        _, sec = _wall(lambda: forward(params, x, y))
    out["forward_images_per_s_tf32"] = len(x) / sec
    if use_torch:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # true float32, as precision="highest"
        net = torch_cnn.torch_net(params).to(dev)
        t = lambda a, dtype=None: (
            torch.from_numpy(np.array(a)).to(dev) if dtype is None else torch.from_numpy(np.array(a)).to(dev).to(dtype)
        )  # noqa: E731
        t_train = (t(train[0][:torch_rows]), t(train[1][:torch_rows], torch.long))
        t_evals = (t(evals[0]), t(evals[1], torch.long))
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for name, fn in (("torch_loop", torch_cnn.torch_loop), ("torch_func_vmap", torch_cnn.torch_func_vmap)):
            fn(net, t_train, t_evals, lr)
            sync()
            start = time.perf_counter()
            rows = fn(net, t_train, t_evals, lr)
            sync()
            out[f"{name}_pairs_per_s"] = torch_rows * n / (time.perf_counter() - start)
            out[f"{name}_max_diff"] = float(np.max(np.abs(rows - np.asarray(M[:torch_rows]))))
    return out


def _full(params, x, y) -> dict:
    n = len(x)
    M, first = _wall(lambda: jaxeif.eif(cnn.loss_fn, params, (x, y), lr=1e-2))
    del M
    M, warm = _wall(lambda: jaxeif.eif(cnn.loss_fn, params, (x, y), lr=1e-2))
    finite = bool(jnp.all(jnp.isfinite(M)))
    del M
    return {
        "n": n,
        "first_call_s": first,
        "warm_s": warm,
        "pairs_per_s": n * n / warm,
        "peak_device_gib": _peak_gib(),
        "finite": finite,
    }


def _precision(params, x, y) -> list[dict]:
    """Each mode's error against float64 on n x n entries, at each lr; the floor of "highest"."""
    train = (x, y)
    off = ~np.eye(len(x), dtype=bool)
    rows = []
    for lr in PRECISION_LRS:
        ref, sec64 = _wall(
            lambda: jaxeif.eif(cnn.loss_fn, params, train, lr=lr, precision=jaxeif.Precision(dtype="float64"))
        )
        ref = np.asarray(ref, np.float64)
        scale = np.abs(ref).max()
        for mode in MODES:
            try:
                M, sec = _wall(
                    lambda: jaxeif.eif(cnn.loss_fn, params, train, lr=lr, precision=precision_lib.named(mode))
                )
            except Exception as e:
                rows.append({"lr": lr, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            M = np.asarray(M, np.float64)
            err = np.abs(M - ref)
            row = {
                "lr": lr,
                "mode": mode,
                "max_rel_error": float(err.max() / scale),
                "median_entry_rel_error": float(np.median(err[off] / np.maximum(np.abs(ref[off]), 1e-30))),
                "sign_agreement": float(np.mean(np.sign(M[off]) == np.sign(ref[off]))),
                "seconds": sec,
                "float64_seconds": sec64,
            }
            if mode == "highest":
                floor = np.asarray(
                    jaxeif.noise_floor(cnn.loss_fn, params, train, lr=lr, precision=precision_lib.named(mode))
                )
                above = (np.abs(M) > floor) & off
                row["share_above_floor"] = float(above.sum() / off.sum())
                row["sign_agreement_above_floor"] = float(np.mean(np.sign(M[above]) == np.sign(ref[above])))
            rows.append(row)
    return rows


def _sweep(params, x, y, points: int) -> dict:
    lrs = jnp.asarray(10.0 ** np.linspace(-6, 0, points), jnp.float32) if points > 1 else jnp.asarray([1e-2])
    n = len(x)
    start, diverged = time.perf_counter(), 0
    try:
        jax.block_until_ready(jaxeif.eif_sweep(cnn.loss_fn, params, (x, y), lrs=lrs))
    except jaxeif.NonFiniteInfluenceError as e:  # large lrs may diverge: counted, not fatal
        diverged = int(len(e.rows))
    first = time.perf_counter() - start
    return {
        "n": n,
        "points": points,
        "lrs": np.asarray(lrs).tolist(),
        "seconds_first_call": first,
        "pairs_per_s": points * n * n / first,
        "diverged_rows": diverged,
        "peak_device_gib": _peak_gib(),
    }


def _sweep_vs_calls(params, x, y, points: int) -> dict:
    """eif_sweep against `points` separate eif calls, warm, on the same rows."""
    lrs = 10.0 ** np.linspace(-6, -2, points)
    sweep = lambda: jaxeif.eif_sweep(cnn.loss_fn, params, (x, y), lrs=jnp.asarray(lrs, jnp.float32))  # noqa: E731
    calls = lambda: [jaxeif.eif(cnn.loss_fn, params, (x, y), lr=float(lr)) for lr in lrs]  # noqa: E731
    S, _ = _wall(sweep)
    Ms, _ = _wall(calls)
    _, t_sweep = _wall(sweep)
    _, t_calls = _wall(calls)
    diff = max(float(jnp.max(jnp.abs(S[a] - Ms[a]))) for a in range(points))
    return {
        "n": len(x),
        "points": points,
        "sweep_s": t_sweep,
        "calls_s": t_calls,
        "speedup": t_calls / t_sweep,
        "max_diff": diff,
    }


def _meta(params, x, y) -> dict:
    n = len(x)
    grad = jax.jit(jax.grad(lambda lr: jaxeif.eif(cnn.loss_fn, params, (x, y), lr=lr).trace()))
    g, first = _wall(lambda: grad(jnp.full((n,), 1e-2)))
    g, warm = _wall(lambda: grad(jnp.full((n,), 1e-2)))
    return {
        "n": n,
        "first_call_s": first,
        "warm_s": warm,
        "finite": bool(jnp.all(jnp.isfinite(g))),
        "peak_device_gib": _peak_gib(),
    }


def run(args: argparse.Namespace) -> dict:
    sizes = {"gpu": GPU_SIZES, "gpu-quick": GPU_QUICK_SIZES, "cpu": CPU_SIZES, "tiny": TINY_SIZES}.get(
        args.sizes, GPU_SIZES if jax.default_backend() != "cpu" else CPU_SIZES
    )
    data = export_data.load(args.data)
    if "train_images" not in data:
        raise ValueError(f"{args.data} has no train images to train the CNN on; export with --train N")
    x, y = jnp.asarray(data["test_images"]), jnp.asarray(data["test_labels"])
    report = {"versions": _versions(), "sizes": sizes, "free_device_gib": chunking.free_bytes() / 2**30}
    _say("device report:", json.dumps(report["versions"]))

    stages = set(getattr(args, "stages", ",".join(STAGES)).split(",")) | {"train"}
    if stages - set(STAGES):
        raise ValueError(f"--stages: unknown {sorted(stages - set(STAGES))}; choose from {', '.join(STAGES)}")

    def stage(name, fn):
        if name not in stages:
            return
        start = time.perf_counter()
        report[name] = fn()
        _say(f"[{time.perf_counter() - start:6.1f} s] {name}: {json.dumps(report[name])}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)

    trained = {}
    stage("train", lambda: _train(data, sizes["epochs"], trained))
    params = trained["params"]
    n_full = min(sizes["full"], len(x))
    stage("full", lambda: _full(params, x[:n_full], y[:n_full]))
    stage("speed", lambda: _speed(params, x, y, min(sizes["speed"], len(x)), sizes["torch_rows"], not args.no_torch))
    p = sizes["precision"]
    stage("precision", lambda: _precision(params, x[:p], y[:p]))
    stage("sweep_vs_calls", lambda: _sweep_vs_calls(params, x[:p], y[:p], 5))
    stage("meta", lambda: _meta(params, x[: sizes["meta"]], y[: sizes["meta"]]))
    s = min(sizes["sweep"], len(x))
    stage("sweep", lambda: _sweep(params, x[:s], y[:s], sizes["sweep_points"]))
    _say(summary(report))
    return {"report": report}


def summary(r: dict) -> str:
    """The report as one table (the stages that ran)."""
    v = r["versions"]
    rows = [
        ["device", f"{v['device']} ({v['backend']}), jax {v['jax']}, torch {v['torch']}"],
        ["CNN test accuracy", f"{r['train']['test_accuracy']:.4f}"],
    ]
    if "speed" in r:
        s = r["speed"]
        fwd = s["forward_images_per_s_highest"]
        rows.append(
            [
                f"default eif, n = m = {s['n']} (auto chunks {s['auto_chunks']})",
                f"{s['eif_pairs_per_s']:,.0f} pairs/s = {s['eif_pairs_per_s'] / fwd:.0%} of forward rate "
                f"{fwd:,.0f}/s (highest)",
            ]
        )
        if "torch_loop_pairs_per_s" in s:
            rows.append(
                [
                    "x PyTorch loop / x torch.func.vmap",
                    f"{s['eif_pairs_per_s'] / s['torch_loop_pairs_per_s']:.1f}x / "
                    f"{s['eif_pairs_per_s'] / s['torch_func_vmap_pairs_per_s']:.1f}x (max diff "
                    f"{s['torch_loop_max_diff']:.1e})",
                ]
            )
        for mode in MODES[1:] + ("float64",):
            if f"eif_{mode}_pairs_per_s" in s:
                rows.append([f"eif precision={mode}", f"{s[f'eif_{mode}_pairs_per_s']:,.0f} pairs/s"])
    if "full" in r:
        f = r["full"]
        rows.append(
            [
                f"full {f['n']} x {f['n']} default call",
                f"{f['first_call_s']:.1f} s first call, {f['warm_s']:.1f} s warm, "
                f"peak {f['peak_device_gib'] or 0:.1f} GiB",
            ]
        )
    for p in r.get("precision", []):
        if "error" in p:
            rows.append([f"lr {p['lr']:g} {p['mode']}", p["error"]])
            continue
        extra = (
            f"; above floor {p['share_above_floor']:.0%}, signs there {p['sign_agreement_above_floor']:.2%}"
            if "share_above_floor" in p
            else ""
        )
        rows.append(
            [
                f"lr {p['lr']:g} {p['mode']} vs float64",
                f"max rel {p['max_rel_error']:.1e}, median rel "
                f"{p['median_entry_rel_error']:.1e}, signs {p['sign_agreement']:.1%}, {p['seconds']:.2f} s "
                f"(float64 {p['float64_seconds']:.2f} s){extra}",
            ]
        )
    if "sweep_vs_calls" in r:
        c = r["sweep_vs_calls"]
        rows.append(
            [f"eif_sweep vs {c['points']} eif calls (n={c['n']})", f"{c['speedup']:.2f}x, max diff {c['max_diff']:.1e}"]
        )
    if "sweep" in r:
        w = r["sweep"]
        rows.append(
            [
                f"{w['points']}-lr sweep, {w['n']} x {w['n']}",
                f"{w['seconds_first_call']:.1f} s incl. compile, "
                f"{w['diverged_rows']} diverged rows, peak {w['peak_device_gib'] or 0:.1f} GiB",
            ]
        )
    if "meta" in r:
        m = r["meta"]
        rows.append(
            [
                f"meta-gradient through eif, n = m = {m['n']}",
                f"{m['first_call_s']:.1f} s first, {m['warm_s']:.1f} s warm, peak {m['peak_device_gib'] or 0:.1f} GiB",
            ]
        )
    return common.table(["what", "measured"], rows)
