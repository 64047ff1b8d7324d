"""The execution paths used for speed give the straightforward per-sample result (values and gradients).

jaxeif.eif(chunk_size=1) (one fine-tune at a time, all evals batched: the fastest on CPU for the
CNN) must equal a plain Python loop of grad/update/evaluate and the default all-rows vmap, and
the benchmark's straightforward jax.vmap baseline must compute the same matrix.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif.benchmarks.cnn import naive_vmap_rows
from jaxeif.models import cnn


def loop_eif(loss_fn, params, train, evals, lr):
    """Per-sample Python loop: grad on train[i], SGD update, loss on each eval."""
    grad, loss = jax.jit(jax.grad(loss_fn)), jax.jit(loss_fn)
    pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    rows = []
    for i in range(jax.tree.leaves(train)[0].shape[0]):
        tuned = jax.tree.map(lambda p, d: p - lr * d, params, grad(params, pick(train, i)))
        rows.append(
            [
                float(loss(tuned, pick(evals, j)) - loss(params, pick(evals, j)))
                for j in range(jax.tree.leaves(evals)[0].shape[0])
            ]
        )
    return np.array(rows)


def test_cnn_paths_equal_plain_loop():
    params = cnn.init_params(jax.random.key(0))
    # path equality does not depend on the data: random images keep this test free of the tfds start-up
    x = jax.random.uniform(jax.random.key(2), (5, 28, 28, 1))
    y = jnp.arange(5, dtype=jnp.int32)
    train, evals = (jnp.asarray(x[:3]), jnp.asarray(y[:3])), (jnp.asarray(x[:5]), jnp.asarray(y[:5]))
    reference = loop_eif(cnn.loss_fn, params, train, evals, 0.2)
    assert np.abs(reference).max() > 1e-4  # the fine-tunes really move the losses
    for name, got in [
        ("chunk_size=1", jaxeif.eif(cnn.loss_fn, params, train, evals, lr=0.2, chunk_size=1)),
        ("chunk_size=None", jaxeif.eif(cnn.loss_fn, params, train, evals, lr=0.2)),
        ("naive vmap", jax.jit(naive_vmap_rows, static_argnums=3)(params, train, evals, 0.2)),
    ]:
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=2e-6, err_msg=name)


def conv_loss(params, example):
    """A tiny conv net (same ops as the CNN: conv, relu, max-pool, dense) on 6x6x1 images."""
    x, y = example
    h = jax.lax.conv_general_dilated(x[None], params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h).reshape(1, 3, 2, 3, 2, 2).max(axis=(2, 4)).reshape(-1)
    return (h @ params["w"] - y) ** 2


@pytest.mark.slow  # 13 s: four chunk layouts differentiated
def test_chunk_paths_same_gradients_in_lr_and_params():
    k = jax.random.split(jax.random.key(1), 4)
    params = {"k": jax.random.normal(k[0], (3, 3, 1, 2)), "w": jax.random.normal(k[1], (18,))}
    train = (jax.random.normal(k[2], (4, 6, 6, 1)), jax.random.normal(k[3], (4,)))
    lr = jnp.array([0.01, 0.02, 0.03, 0.04])

    def total(lr, p, chunk):
        return (jaxeif.eif(conv_loss, p, train, lr=lr, chunk_size=chunk) ** 2).sum()

    grads = {c: jax.grad(total, argnums=(0, 1))(lr, params, c) for c in (None, 1, 3)}
    for c in (1, 3):
        chex.assert_trees_all_close(grads[None], grads[c], rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(grads[1][0]).max()) > 0
