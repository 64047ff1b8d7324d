"""SIGKILL a checkpointed EIF sweep mid-way, rerun the same command: bit-identical result.

This file is also a toy experiment module (add_arguments / run), run as
`python tests/test_resume.py --out DIR` through `jaxeif.cli.experiment_main`.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent


# ----------------------------------------------------------------------------- toy experiment


def toy_problem(seed: int, n: int):
    """A 2-layer tanh regression net and n examples, all drawn from `seed`."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(k[0], (6, 8)) / 2.0, "v": jax.random.normal(k[1], (8,)) / 2.0}
    train = (jax.random.normal(k[2], (n, 6)), jax.random.normal(k[3], (n,)))
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
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--slow", type=float, default=0.0, help="test harness: sleep after each saved block")


def run(args) -> dict:
    from jaxeif import runs

    config = {k: v for k, v in vars(args).items() if k != "slow"}
    rundir = runs.RunDir.open(args.out, config)
    computed = []
    compute, save = runs._compute_block, runs._save_block

    def counting_compute(*a, **kw):
        computed.append(1)
        return compute(*a, **kw)

    def slow_save(*a, **kw):
        save(*a, **kw)
        time.sleep(args.slow)

    runs._compute_block, runs._save_block = counting_compute, slow_save
    try:
        params, train = toy_problem(args.seed, args.n)
        matrix = runs.sweep_eif(
            toy_loss, params, train, lr=args.lr, steps=args.steps, chunk_size=args.chunk_size, run=rundir, progress=False
        )
    finally:  # this module also runs in-process under tests/test_bad_input.py
        runs._compute_block, runs._save_block = compute, save
    meta = runs.run_metadata(
        seed=args.seed, model="toy tanh MLP 6-8-1", lr=args.lr, optimizer="sgd", steps=args.steps, chunk_size=args.chunk_size
    )
    rundir.save_json("results", {"metadata": meta, "config": config, "matrix_sum": float(matrix.sum())})
    return {"out": str(rundir.path), "computed_blocks": len(computed), "matrix_sum": float(matrix.sum())}


# ----------------------------------------------------------------------------- helpers


def command(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE), "--out", str(out), *extra]


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    e.pop("JAXEIF_DEBUG", None)
    return e


def finished_blocks(out: pathlib.Path) -> list[int]:
    """Steps that orbax finalised (renamed into place) in the sweep's block folder."""
    folder = out / "eif_blocks"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def stdout_value(proc: subprocess.CompletedProcess, key: str) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{key}: ")]
    assert lines, proc.stdout
    return lines[-1].split(": ", 1)[1]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


# ----------------------------------------------------------------------------- the test


def test_sigkill_then_same_command_resumes_bit_identical(tmp_path):
    n, chunk = 12, 2
    n_blocks = n // chunk
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, "--slow", "0.5"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while len(finished_blocks(killed)) < 2:
            assert proc.poll() is None, f"toy run ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.time() < deadline, "no block checkpoint appeared in 180 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    done = finished_blocks(killed)
    assert 2 <= len(done) < n_blocks, done
    assert not (killed / "eif.npy").exists(), "the killed run must not have finished"
    # Same command again (the sleep only paces the harness; it is not part of the config).
    resumed = run_to_end(command(killed, "--slow", "0.5"))
    assert int(stdout_value(resumed, "computed_blocks")) == n_blocks - len(done)

    # The uninterrupted run, in this process (tests/test_reproducible.py runs it twice as a command).
    from jaxeif import runs

    params, train = toy_problem(0, n)
    want = runs.sweep_eif(toy_loss, params, train, lr=0.1, steps=2, chunk_size=chunk, progress=False)
    got = np.load(killed / "eif.npy")
    assert got.shape == want.shape == (n, n)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert not (killed / "eif_blocks").exists(), "block checkpoints are removed once the matrix is saved"
    assert not list(killed.glob(".*.tmp")), "no temp files left behind"

    # And the resumed matrix is the EIF itself (the straightforward computation, in process).
    from jaxeif import eif

    np.testing.assert_allclose(got, np.asarray(eif(toy_loss, params, train, lr=0.1, steps=2)), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
