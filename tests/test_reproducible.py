"""The same command twice gives identical numbers; the results JSON records how they were made."""

from __future__ import annotations

import json
import pathlib
import subprocess

import jax
import numpy as np
import pytest
from toy_experiment import command, env, toy_problem

pytestmark = pytest.mark.slow  # every test runs the toy study twice in subprocesses


def run_once(out: pathlib.Path, *extra: str) -> dict:
    proc = subprocess.run(command(out, *extra), env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_same_command_twice_identical_numbers_and_full_record(tmp_path):
    args = ("--seed", "3", "--lr", "0.25", "--block-size", "5", "--n", "9")
    first, second = run_once(tmp_path / "a", *args), run_once(tmp_path / "b", *args)
    m1, m2 = np.load(tmp_path / "a" / "eif.npy"), np.load(tmp_path / "b" / "eif.npy")
    assert m1.shape == (9, 9) and np.isfinite(m1).all()
    np.testing.assert_array_equal(m1.view(np.uint32), m2.view(np.uint32))
    assert first["matrix_sum"] == second["matrix_sum"]

    meta = first["metadata"]
    assert meta["seed"] == 3 and meta["lr"] == 0.25 and meta["block_size"] == 5 and meta["steps"] == 2
    assert meta["model"] == "toy tanh MLP 6-8-1" and meta["optimizer"] == "sgd"
    assert meta["versions"]["jax"] == jax.__version__
    for pkg in ("python", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "jaxeif"):
        assert meta["versions"][pkg]
    assert meta["device"] == second["metadata"]["device"] and meta["device"]["platform"] == "cpu"
    assert meta["time_utc"] and "--seed" in meta["argv"]
    assert first["config"]["seed"] == 3 and first["config"]["out"] != second["config"]["out"]
    # everything but the time and the output folder is the same
    for rec in (first, second):
        rec["metadata"].pop("time_utc"), rec["metadata"].pop("argv"), rec["config"].pop("out")
    assert first == second


def test_another_seed_gives_other_numbers(tmp_path):
    """Guards the test above against a seed that is ignored (identical numbers by accident)."""
    p0, t0 = toy_problem(0, 4)
    p1, t1 = toy_problem(1, 4)
    assert not np.array_equal(np.asarray(p0["w"]), np.asarray(p1["w"]))
    assert not np.array_equal(np.asarray(t0[0]), np.asarray(t1[0]))
