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


def slow_writes(seconds: float) -> None:
    """Make this process's store.Store.write_tile sleep `seconds` first (a slow disk)."""
    write = store.Store.write_tile

    def slow_write(self, *args, **kwargs):
        time.sleep(seconds)
        return write(self, *args, **kwargs)

    store.Store.write_tile = slow_write


WORKER = textwrap.dedent("""
    import json, sys
    from jaxeif import store
    from test_multiprocess import problem, loss, TILE, slow_writes
    path, worker, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params, train, evals, lr = problem()
    slow_writes(0.2)  # a slow disk, so that kills land mid-run
    r = store.fill(loss, params, train, evals, lr=lr, path=path, tile=TILE, worker=worker, workers=workers,
                   progress=True)
    print("RESULT", json.dumps({"computed": len(r.computed), "reused": len(r.reused), "repaired": len(r.repaired)}))
""")


def _marked(path, worker) -> int:
    """Tiles of `worker` with a completion marker so far."""
    count = 0
    for f in (path / "tiles").glob("*.json") if (path / "tiles").exists() else ():
        try:
            count += json.loads(f.read_text())["worker"] == worker
        except (OSError, ValueError, KeyError):
            pass
    return count


def _worker(path, worker, workers):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), str(worker), str(workers)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_workers_two_killed_and_restarted(tmp_path):
    path = tmp_path / "store"
    procs = {w: _worker(path, w, 4) for w in range(4)}
    rng = random.Random(int(time.time()))
    victims = rng.sample(range(4), 2)
    before = {}
    for w in victims:  # kill at a random moment after the worker has finished at least one tile
        deadline = time.time() + 120
        while time.time() < deadline and not _marked(path, w):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        procs[w].send_signal(signal.SIGKILL)
        procs[w].wait()
        before[w] = _marked(path, w)
    for w in victims:
        procs[w] = _worker(path, w, 4)
    results = {}
    for w, p in procs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results[w] = json.loads(out.split("RESULT", 1)[1])
    assert all(r["computed"] + r["reused"] + r["repaired"] == 10 for r in results.values()), results
    for w in victims:  # the restarted worker kept every tile marked before the kill: it lost at most one tile's work
        assert results[w]["reused"] >= before[w] >= 1 and results[w]["computed"] <= 10 - before[w], (w, before, results)
    s = store.open(path)
    assert s.missing() == [] and s.verify() == {}
    params, train, evals, lr = problem()
    reference = store.fill(loss, params, train, evals, lr=lr, path=tmp_path / "single", tile=TILE).store.to_numpy()
    assert np.array_equal(s.to_numpy(), reference)  # bit for bit, after two SIGKILLs
    whole = np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))  # column tiles: equal up to rounding
    floor = np.asarray(jaxeif.noise_floor(loss, params, train, evals, lr=lr, samples=24))
    assert np.all(np.abs(reference - whole) <= 2 * floor)  # two float32 results, each within the floor of float64's
    assert not list(path.parent.glob(".store.*.tmp")), "a losing creator's temp folder was left behind"
    print("killed", victims, "tiles marked when killed", before, "results", results)


SPMD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    port, nproc, pid, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    from jax.experimental.multihost_utils import process_allgather
    import jaxeif
    from jaxeif import store, multihost
    from test_multiprocess import problem, loss, weights, slow_writes
    params, train, evals, lr = problem()
    if pid == nproc - 1:  # the last process writes slowly: the others must still return a whole store
        slow_writes(0.5)
    first = store.fill_spmd(loss, params, train, evals, lr=lr, path=path, tile=(3, 20))
    missing_on_return = store.open(path).missing()
    again = store.fill_spmd(loss, params, train, evals, lr=lr, path=path, tile=(3, 20))
    n = lr.shape[0]
    M = multihost.eif_rows(loss, params, train, evals, lr=lr)
    objective = lambda lr: jnp.sum(multihost.eif_rows(loss, params, train, evals, lr=lr)[:n] * weights())
    grad = jax.jit(jax.grad(objective))(lr)
    gathered = jaxeif.eif_sharded(loss, params, train, evals, lr=lr)  # the whole matrix, on every process
    jaxeif.chunking.host_free_bytes = lambda: gathered.nbytes  # too little to gather it: every process refuses
    try:
        jaxeif.eif_sharded(loss, params, train, evals, lr=lr)
        refused = ""
    except jaxeif.chunking.MemoryBudgetError as e:
        refused = str(e)
    print("RESULT", json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(),
        "addressable": M.is_fully_addressable, "local_rows": sum(s.data.shape[0] for s in M.addressable_shards),
        "computed": first.computed, "missing_on_return": missing_on_return,
        "reused": len(again.reused), "recomputed": len(again.computed),
        "grad": np.asarray(process_allgather(grad, tiled=True)).tolist(),
        "gathered": np.asarray(gathered).tolist(), "refused": refused}))  # f[n]: small, unlike the matrix
""")


def weights(n=24, m=20):
    return jnp.cos(jnp.arange(n * m, dtype=jnp.float32)).reshape(n, m)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_spmd_processes_fill_store_bit_identical(tmp_path, processes):
    path, port = tmp_path / "store", _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SPMD, str(port), str(processes), str(p), str(path)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1]))
    params, train, evals, lr = problem()
    whole = np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))
    assert np.array_equal(store.open(path).to_numpy(), whole)  # bit for bit: rows are independent fine-tunes
    tiles = [tuple(t) for r in results for t in r["computed"]]
    assert sorted(tiles) == store.Grid(24, 20, 3, 20).tiles()  # each tile written once, by the process that computed it
    for r in results:
        assert r["devices"] == 2 * processes and r["local"] == 2 and not r["addressable"]
        assert r["local_rows"] == 2 * (24 + -24 % (2 * processes)) // (2 * processes)  # its devices' rows only
        assert r["missing_on_return"] == []  # every process returns once the whole store is written
        assert r["reused"] == len(r["computed"]) and r["recomputed"] == 0  # a rerun computes nothing
    for r in results:  # eif_sharded across processes: the whole matrix on each, or a refusal on all
        assert np.array_equal(np.asarray(r["gathered"], np.float32), whole)
        assert "eif_sharded gathers the whole [24, 20] matrix" in r["refused"] and "multihost.eif_rows" in r["refused"]
    expected = jax.grad(lambda lr: jnp.sum(jaxeif.eif(loss, params, train, evals, lr=lr) * weights()))(lr)
    for r in results:
        np.testing.assert_allclose(r["grad"], expected, rtol=1e-5, atol=1e-6)
