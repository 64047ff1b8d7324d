"""SIGKILL a checkpointed EIF sweep mid-way, rerun the same command: bit-identical result
(the command runs tests/toy_experiment.py)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest
from toy_experiment import command, env, toy_loss, toy_problem

from jaxeif import eif, runs

pytestmark = pytest.mark.slow  # SIGKILLs a study subprocess and reruns it


def finished_blocks(out: pathlib.Path) -> list[int]:
    """Blocks that orbax finalised and the run recorded in its manifest: the ones a rerun may trust.
    (A block folder that orbax renamed into place but the run had not yet recorded is recomputed.)"""
    try:
        files = json.loads((out / runs.MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return []
    return sorted({int(k.split("/")[1]) for k in files if k.startswith("eif_blocks/") and k.split("/")[1].isdigit()})


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
    run_to_end(command(killed, "--slow", "0.5"))
    assert json.loads((killed / "results.json").read_text())["computed_blocks"] == n_blocks - len(done)

    # The uninterrupted run, in this process (tests/test_reproducible.py runs it twice as a command).
    params, train = toy_problem(0, n)
    want = runs.sweep_eif(toy_loss, params, train, lr=0.1, steps=2, block_size=chunk)
    got = np.load(killed / "eif.npy")
    assert got.shape == want.shape == (n, n)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert not (killed / "eif_blocks").exists(), "block checkpoints are removed once the matrix is saved"
    assert not list(killed.glob(".*.tmp")), "no temp files left behind"

    # And the resumed matrix is the EIF itself (the straightforward computation, in process).
    np.testing.assert_allclose(got, np.asarray(eif(toy_loss, params, train, lr=0.1, steps=2)), rtol=1e-5, atol=1e-5)
