"""A toy experiment module (add_arguments / run) for the tests of resuming, reproducibility and the CLI;
run as `python tests/toy_experiment.py --out DIR` (with the repository on PYTHONPATH: `env()`) through
`jaxeif.cli.experiment_main`."""

from __future__ import annotations

import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from jaxeif import cli, runs

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent


def toy_problem(seed: int, n: int, d_in: int = 6, hidden: int = 8):
    """A 2-layer tanh regression net and n examples, all drawn from `seed`."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(k[0], (d_in, hidden)) / 2.0, "v": jax.random.normal(k[1], (hidden,)) / 2.0}
    train = (jax.random.normal(k[2], (n, d_in)), jax.random.normal(k[3], (n,)))
    return params, train


def toy_loss(params, example):
    x, y = example
    return jnp.square(jnp.tanh(x @ params["w"]) @ params["v"] - y)


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=2, help="fine-tunes per checkpointed block")
    parser.add_argument("--slow", type=float, default=0.0, help="test harness: sleep after each saved block")


def run(args) -> dict:
    config = {k: v for k, v in vars(args).items() if k != "slow"}
    rundir = runs.RunDir.open(args.out, config)
    computed = []

    def on_block(b, rows):  # counts the blocks this process computed; --slow widens the window to kill it
        computed.append(b)
        time.sleep(args.slow)

    params, train = toy_problem(args.seed, args.n)
    matrix = runs.sweep_eif(
        toy_loss, params, train, lr=args.lr, steps=args.steps, block_size=args.block_size, run=rundir, on_block=on_block
    )
    meta = runs.run_metadata(
        seed=args.seed,
        model="toy tanh MLP 6-8-1",
        lr=args.lr,
        optimizer="sgd",
        steps=args.steps,
        block_size=args.block_size,
    )
    results = {"metadata": meta, "config": config, "matrix_sum": float(matrix.sum()), "computed_blocks": len(computed)}
    rundir.save_json("results", results)
    return {"out": str(rundir.path), "computed_blocks": len(computed), "matrix_sum": results["matrix_sum"]}


def command(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE), "--out", str(out), *extra]


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    e.pop("JAXEIF_DEBUG", None)
    return e


if __name__ == "__main__":
    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
