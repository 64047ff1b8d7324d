"""fingerprint.digest tells apart what changes a result (optimizer kind and hyper-parameters, a loss's
code and the arrays it reads) and is the same in every process (no ids, no hash-seed order)."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeif import fingerprint

WEIGHTS = np.arange(3.0)


def loss_a(p, x):
    return jnp.sum((x * WEIGHTS - p) ** 2)


def loss_b(p, x):
    return jnp.sum(jnp.abs(x * WEIGHTS - p))


def test_digest_separates_optimizers_losses_and_closed_over_arrays():
    d = fingerprint.digest
    assert d(optax.sgd(1.0)) == d(optax.sgd(1.0))
    assert (
        len(
            {
                d(optax.sgd(1.0)),
                d(optax.adam(1.0)),
                d(optax.adam(0.5)),
                d(optax.adam(1.0, b1=0.8)),
                d(optax.sgd(1.0, momentum=0.9)),
            }
        )
        == 5
    )
    assert d(loss_a) != d(loss_b)

    def scaled(s):
        return lambda p, x: loss_a(p, x) * s

    assert d(scaled(1.0)) == d(scaled(1.0)) and d(scaled(1.0)) != d(scaled(2.0))
    assert d((np.ones(3),)) != d((np.ones(3) * 3,)) and d(np.ones(3)) != d(np.ones(3, np.float64).astype(np.float32))


@pytest.mark.slow
def test_digest_is_the_same_in_every_process():
    script = (
        "import optax\nfrom jaxeif import fingerprint\n"
        "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta', 'eps'}\n"
        "print(fingerprint.digest(f, optax.adamw(1.0), {'b': 1, 'a': {2, 3}}))\n"
    )
    root = pathlib.Path(__file__).parents[1]
    outs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(outs) == 1 and len(outs.pop().strip()) == 32
