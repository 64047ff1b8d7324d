"""`jaxeif store`: look at an influence store, or plan one on paper.

jaxeif store status PATH [--workers K] [--verify]
    shape, tile grid, tiles complete / missing (per worker of K), damaged tiles (--verify reads
    and checks every marked tile), and the call that fills it (versions, precision, steps).
jaxeif store plan --n N [--m M] --pairs-per-second R [--devices D] [--tile ROWS COLS]
    device-hours, wall hours, tiles, bytes on disk (jaxeif.store.plan) from a measured rate.
"""

from __future__ import annotations

import argparse
import collections
import json

from jaxeif import store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="what is complete, missing or damaged in a store")
    status.add_argument("path", help="the store's folder (what jaxeif.store.fill was given as path=)")
    status.add_argument("--workers", type=int, default=None, help="also count missing tiles per worker of K")
    status.add_argument("--verify", action="store_true", help="read every marked tile and check its checksum")
    plan = actions.add_parser("plan", help="devices x hours, tiles and bytes of an n x m store, on paper")
    plan.add_argument("--n", type=int, required=True, help="train rows")
    plan.add_argument("--m", type=int, default=None, help="eval columns (default: n)")
    plan.add_argument(
        "--pairs-per-second", type=float, required=True, help="a measured rate of one device (warm jaxeif.eif)"
    )
    plan.add_argument("--devices", type=int, default=1, help="devices or worker processes at once")
    plan.add_argument("--tile", type=int, nargs=2, default=(4096, 4096), metavar=("ROWS", "COLS"))
    plan.add_argument("--program-bytes", type=int, default=None, help="the EIF program's peak on one tile (XLA)")


def run(args: argparse.Namespace) -> dict:
    return _status(args) if args.action == "status" else _plan(args)


def _plan(args: argparse.Namespace) -> dict:
    p = store.plan(
        args.n,
        args.m,
        pairs_per_second=args.pairs_per_second,
        devices=args.devices,
        tile=tuple(args.tile),
        program_bytes=args.program_bytes,
    )
    print(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in p._asdict().items()}


def _status(args: argparse.Namespace) -> dict:
    s = store.open(args.path)
    grid, marked = s.grid, s.marked()
    missing = s.missing()
    call = s.manifest.get("fingerprint", {})
    report = {
        "path": str(s.path),
        "shape": f"{s.shape[0]} x {s.shape[1]} {s.dtype}",
        "tile": f"{grid.rows} x {grid.cols} ({grid.shape[0]} x {grid.shape[1]} = {grid.count} tiles)",
        "complete": len(marked),
        "missing": len(missing),
        "done": f"{100 * len(marked) / grid.count:.1f}%",
        "steps": call.get("steps"),
        "precision": call.get("precision"),
        "versions": json.dumps(call.get("versions", {})),
    }
    by = collections.Counter()
    for t in marked:  # who filled what, from the markers (worker i of k, or SPMD process)
        record = s.record(t) or {}
        who = (
            f"worker {record['worker']}"
            if "worker" in record
            else f"process {record['process']}"
            if "process" in record
            else "unknown"
        )
        by[who] += 1
    for who, count in sorted(by.items()):
        report[f"tiles by {who}"] = count
    if args.workers is not None:
        if args.workers < 1:
            raise store.StoreError(f"--workers must be >= 1, got {args.workers}")
        gone = set(missing)
        for w in range(args.workers):
            report[f"missing of worker {w}/{args.workers}"] = sum(t in gone for t in grid.share(w, args.workers))
    if args.verify:
        damaged = s.verify()
        report["damaged"] = len(damaged)
        for t, why in sorted(damaged.items()):
            report[f"damaged {t[0]}.{t[1]}"] = why
    if missing:
        report["next"] = "run the same fill again (any worker split): it computes only what is missing or damaged"
    return report
