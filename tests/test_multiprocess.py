"""Several processes on one store: independent workers killed with SIGKILL and restarted, and one SPMD
program over 2 and 3 jax.distributed processes (gloo CPU collectives); both leave the store bit-identical
to a single-process jaxeif.eif of the same call."""
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import store

TESTS = pathlib.Path(__file__).resolve().parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))


def loss(params, example):
    x, y = example
    return (jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2


def problem(n=24, m=20):
    k = jax.random.split(jax.random.key(7), 5)
    params = {"w": jax.random.normal(k[0], (3, 8)), "v": jax.random.normal(k[1], (8,))}
    train = (jax.random.normal(k[2], (n, 3)), jax.random.normal(k[3], (n,)))
    evals = (jax.random.normal(k[4], (m, 3)), jnp.linspace(-1.0, 1.0, m))
    return params, train, evals, jnp.linspace(0.01, 0.2, n)


TILE = (3, 4)  # 8 x 5 = 40 tiles: 10 per worker
WORKER = textwrap.dedent("""
    import json, sys
    from jaxeif import store
    from test_multiprocess import problem, loss, TILE
    path, worker, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params, train, evals, lr = problem()
    r = store.fill(loss, params, train, evals, lr=lr, path=path, tile=TILE, worker=worker, workers=workers, progress=True)
    print("RESULT", json.dumps({"computed": len(r.computed), "reused": len(r.reused), "repaired": len(r.repaired)}))
""")


def _worker(path, worker, workers):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(worker), str(workers)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_four_workers_two_killed_and_restarted(tmp_path):
    path = tmp_path / "store"
    procs = {w: _worker(path, w, 4) for w in range(4)}
    rng = random.Random(int(time.time()))
    victims = rng.sample(range(4), 2)
    for w in victims:  # kill at a random moment: before the store exists, mid-tile, or after some tiles
        time.sleep(rng.uniform(0.5, 5.0))
        procs[w].send_signal(signal.SIGKILL)
        procs[w].wait()
    killed_done = {w: len(list((path / "tiles").glob("*.json"))) if path.exists() else 0 for w in victims}
    for w in victims:
        procs[w] = _worker(path, w, 4)
    results = {}
    for w, p in procs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results[w] = json.loads(out.split("RESULT", 1)[1])
    assert all(r["computed"] + r["reused"] + r["repaired"] == 10 for r in results.values()), results
    s = store.open(path)
    assert s.missing() == [] and s.verify() == {}
    params, train, evals, lr = problem()
    reference = store.fill(loss, params, train, evals, lr=lr, path=tmp_path / "single", tile=TILE).store.to_numpy()
    assert np.array_equal(s.to_numpy(), reference)  # bit for bit, after two SIGKILLs
    whole = np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))  # column tiles: equal up to rounding
    assert np.all(np.abs(reference - whole) <= np.asarray(jaxeif.noise_floor(loss, params, train, evals, lr=lr)))
    assert not list(path.parent.glob(".store.*.tmp")), "a losing creator's temp folder was left behind"
    print("killed", victims, "tiles marked when killed", killed_done, "results", results)
