"""eif_sharded over 4 forced host devices gives the single-device eif matrix (rows padded and dropped)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif.sharding import eif_sharded

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    from jaxeif.sharding import eif_sharded
    from test_sharding import problem, loss, weights
    params, train, evals, lr = problem()
    M = eif_sharded(loss, params, train, evals, lr=lr, chunk_size=2, progress=True)
    grad = jax.grad(lambda lr: (eif_sharded(loss, params, train, evals, lr=lr) * weights()).sum())(lr)
    json.dump({"devices": jax.device_count(), "jax_array": isinstance(M, jax.Array), "matrix": np.asarray(M).tolist(),
               "grad": np.asarray(grad).tolist()}, open(sys.argv[1], "w"))
""")


def loss(params, example):
    x, y = example
    return (jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2


def problem():
    k = jax.random.split(jax.random.key(3), 5)
    params = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4,))}
    train = (jax.random.normal(k[2], (7, 3)), jax.random.normal(k[3], (7,)))  # 7 rows: not a multiple of 4
    evals = (jax.random.normal(k[4], (5, 3)), jnp.arange(5.0))
    return params, train, evals, jnp.linspace(0.01, 0.1, 7)


def weights():
    return jnp.cos(jnp.arange(35.0)).reshape(7, 5)


@pytest.mark.slow
def test_four_devices_match_single_device(tmp_path):
    params, train, evals, lr = problem()
    single = np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]),
    )
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 4 and result["jax_array"]
    np.testing.assert_allclose(np.array(result["matrix"]), single, rtol=1e-5, atol=1e-7)
    want = jax.grad(lambda lr: (jaxeif.eif(loss, params, train, evals, lr=lr) * weights()).sum())(lr)
    np.testing.assert_allclose(np.array(result["grad"]), want, rtol=1e-5, atol=1e-6)  # a meta-gradient over 4 devices
    assert "eif rows: 100%" in proc.stderr and "8/8" in proc.stderr  # the bar counts every row, padding included


def test_one_device_and_bad_devices():
    params, train, evals, lr = problem()
    np.testing.assert_allclose(
        eif_sharded(loss, params, train, evals, lr=lr),
        jaxeif.eif(loss, params, train, evals, lr=lr),
        rtol=1e-6,
        atol=1e-8,
    )
    with pytest.raises(ValueError, match="`devices`"):
        eif_sharded(loss, params, train, evals, lr=lr, devices=[])
