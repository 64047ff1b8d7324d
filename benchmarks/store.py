"""Store benchmark: k independent worker processes fill an n x n CNN store (jaxeif.store.fill) vs one process.

Not a timed test: it prints (and with --json writes) what it measured on this machine:
- first-call latency of a fresh worker: time from process start to its first tile written, with the
  persistent compilation cache off (JAXEIF_COMPILE_CACHE='') and on (a cache filled by a previous worker);
- throughput of one process (all cores) and of k processes sharing the same cores on the same store size,
  in pairs/s, each run from an empty store.
The CNN is jaxeif.models.cnn at random init (speed does not depend on the weights) on the first n
Fashion-MNIST test images, train = evals. Default sizes are the issue's (8 workers, 4,096 x 4,096);
`python -m jaxeif.benchmarks.store --n 256 --tile 64 --workers 4` finishes in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

WORKER = """
import json, sys, time
start = float(sys.argv[5])
import jax, numpy as np
from jaxeif import store
from jaxeif.models import cnn
data = np.load(sys.argv[1])
x, y = data["x"], data["y"]
params = cnn.init_params(jax.random.key(0))
tile = int(sys.argv[4])
r = store.fill(cnn.loss_fn, params, (x, y), lr=float(data["lr"]), path=sys.argv[2], tile=(tile, tile),
               worker=int(sys.argv[3].split("/")[0]), workers=int(sys.argv[3].split("/")[1]), progress=True)
print("RESULT", json.dumps({"tiles": len(r.computed), "end": time.time() - start}), flush=True)
"""


def _launch(
    data: pathlib.Path, path: pathlib.Path, worker: int, workers: int, tile: int, env: dict
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(data), str(path), f"{worker}/{workers}", str(tile), repr(time.time())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(data, path, workers: int, tile: int, env: dict) -> dict:
    """Start `workers` processes on an empty store: wall seconds and each worker's result."""
    start = time.time()
    procs = [_launch(data, path, w, workers, tile, env) for w in range(workers)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.split("RESULT", 1)[1]))
    return {"wall_s": time.time() - start, "workers": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jaxeif.benchmarks.store", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="train = eval samples (Fashion-MNIST test images)")
    parser.add_argument("--tile", type=int, default=512, help="tile rows = cols")
    parser.add_argument("--workers", type=int, default=8, help="worker processes of the parallel run")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    parser.add_argument(
        "--machine", default="not described (pass --machine)", help="what else ran on the machine, for the record"
    )
    args = parser.parse_args(argv)
    import numpy as np

    from jaxeif.data import images

    work = pathlib.Path(tempfile.mkdtemp(prefix="jaxeif-store-bench-"))
    x, y = images.load_head("fashion_mnist", "test", args.n)
    data = work / "data.npz"
    np.savez(data, x=np.asarray(x), y=np.asarray(y), lr=args.lr)
    pairs = args.n * args.n
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    report: dict = {
        "n": args.n,
        "tile": args.tile,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": args.machine,
    }

    # first-call latency: one worker, one tile's worth of store (a 1 x 1 tile grid), fresh process each time
    small = work / "small.npz"
    np.savez(small, x=np.asarray(x[: args.tile]), y=np.asarray(y[: args.tile]), lr=args.lr)
    for label, cache in (("cache_off", ""), ("cache_cold", str(work / "xla")), ("cache_warm", str(work / "xla"))):
        res = _run(small, work / f"first_{label}", 1, args.tile, dict(env, JAXEIF_COMPILE_CACHE=cache))
        report[f"first_tile_{label}_s"] = round(res["workers"][0]["end"], 2)
        report[f"first_tile_{label}_compute_s"] = json.loads(
            next((work / f"first_{label}" / "tiles").glob("*.json")).read_text()
        )["seconds"]
        print(
            f"first tile, {label}: {report[f'first_tile_{label}_s']:.1f} s from process start "
            f"({report[f'first_tile_{label}_compute_s']:.1f} s in jaxeif.eif incl. compiling)",
            flush=True,
        )

    # throughput: one process vs `workers` processes on the same cores, empty stores, warm compile cache
    warm = dict(env, JAXEIF_COMPILE_CACHE=str(work / "xla"))
    for label, k in (("one_process", 1), (f"{args.workers}_processes", args.workers)):
        res = _run(data, work / label, k, args.tile, warm)
        report[f"{label}_wall_s"] = round(res["wall_s"], 2)
        report[f"{label}_pairs_per_s"] = round(pairs / res["wall_s"])
        print(
            f"{label}: {res['wall_s']:.1f} s wall for {args.n} x {args.n} = {pairs / res['wall_s']:,.0f} pairs/s "
            "(incl. process start and loading from the compile cache)",
            flush=True,
        )
    from jaxeif import store

    a = store.open(work / "one_process").to_numpy()
    b = store.open(work / f"{args.workers}_processes").to_numpy()
    report["stores_bit_identical"] = bool(np.array_equal(a, b))
    print("stores bit-identical:", report["stores_bit_identical"])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
