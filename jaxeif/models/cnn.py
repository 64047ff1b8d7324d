"""A small Flax CNN for Fashion-MNIST (the base model of the paper's figure 1), trained once and cached with orbax.

conv16 3x3 -> relu -> maxpool 2x2 -> conv32 3x3 -> relu -> maxpool 2x2 -> dense 64 -> relu -> dense 10.
The model knows nothing of influence: `loss_fn(params, example)` is the per-example loss eif() needs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeif import io, runs
from jaxeif.data import images as data

Params = Any
_META = "meta.json"
_WEIGHTS = "params"


class ShiftedConv3x3(nn.Module):
    """A 3x3 'SAME' convolution written as nine shifted multiply-adds; the same params and result as
    `nn.Conv(features, (3, 3), padding="SAME")` (kernel [3, 3, c, f], bias [f]). For one input channel
    XLA:CPU's convolution is memory-bound; this is one fused elementwise pass, several times faster
    (benchmarks/cnn.py --profile)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        h, w = x.shape[1], x.shape[2]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = bias
        for di in range(3):
            for dj in range(3):
                patch = padded[:, di : di + h, dj : dj + w, :]
                # one channel: a broadcast multiply (no reduction, so XLA fuses all nine into one pass)
                out = out + (patch * kernel[di, dj] if c == 1 else jnp.einsum("bhwc,cf->bhwf", patch, kernel[di, dj]))
        return out


class CNN(nn.Module):
    """conv16-pool-conv32-pool-dense64-dense10 on 28x28x1 images; returns logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.max_pool(nn.relu(ShiftedConv3x3(16, name="Conv_0")(x)), (2, 2), strides=(2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="Conv_1")(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def init_params(key: jax.Array) -> Params:
    """Fresh float32 parameters of `CNN`."""
    return CNN().init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]


def apply_fn(params: Params, images: jax.Array) -> jax.Array:
    """logits f32[b, 10] of images f32[b, 28, 28, 1]."""
    return CNN().apply({"params": params}, images)


def loss_fn(params: Params, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of ONE example (image f32[28, 28, 1], label int32[]): a scalar."""
    image, label = example
    logits = apply_fn(params, image[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def batch_loss(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of a batch (used for training)."""
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, images), labels).mean()


_predict = jax.jit(lambda params, images: jnp.argmax(apply_fn(params, images), axis=-1))


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 1000) -> float:
    """Fraction of images whose argmax logit equals the label."""
    if len(images) != len(labels):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    if len(images) == 0:
        raise ValueError("accuracy of an empty set is undefined; pass at least one image")
    hits = 0
    for s in range(0, len(images), batch_size):
        hits += int(np.sum(np.asarray(_predict(params, images[s : s + batch_size])) == labels[s : s + batch_size]))
    return hits / len(images)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> Params:
    """Adam on shuffled mini-batches (the last partial batch is dropped); deterministic given seed."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} training images are fewer than one batch of {batch_size}")
    optimizer = optax.adam(learning_rate)
    params = init_params(jax.random.key(seed))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(batch_loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    n_batches = len(images) // batch_size
    bar = tqdm(total=epochs * n_batches, desc="train CNN", unit="batch", disable=not progress)
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, state, loss = step(params, state, images[idx], labels[idx])
            if b % 50 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
            bar.update(1)
    bar.close()
    return params


def _config(epochs: int, batch_size: int, seed: int, learning_rate: float, train_size: int | None) -> dict:
    return {
        "dataset": "fashion_mnist",
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "train_size": train_size,
        "optimizer": "adam",
        "architecture": "conv16-pool-conv32-pool-dense64-dense10",
    }


_KIND = {"kind": "jaxeif.models.cnn base model"}


def checkpoint_info(ckpt_dir: str | os.PathLike) -> dict | None:
    """The saved meta data of a checkpoint (config, test accuracy, training time), or None if absent.

    Raises jaxeif.runs.ChecksumError when the file is damaged, RunDirError when the folder is not a CNN cache."""
    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    if not (ckpt_dir / _META).exists():
        return None
    return runs.RunDir.open(ckpt_dir, _KIND).load_json(_META)


def load_or_train(
    ckpt_dir: str | os.PathLike,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    learning_rate: float = 1e-3,
    train_size: int | None = None,
) -> Params:
    """Restore the CNN from `ckpt_dir`, or train it on Fashion-MNIST train and save it there.

    The folder is a `jaxeif.runs.RunDir` (locked; the orbax weights and meta.json checksummed, so a
    damaged file is an error naming it, never other weights). `train_size` limits training to the
    first n train images (tests). A checkpoint made with another configuration is refused rather than
    silently reused.
    """
    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    config = _config(epochs, batch_size, seed, learning_rate, train_size)
    run = runs.RunDir.open(ckpt_dir, _KIND)
    weights = run.file(_WEIGHTS)
    if run.has(_META) and weights.exists():
        info = run.load_json(_META)
        if info["config"] != config:
            raise ValueError(
                f"the CNN checkpoint in {ckpt_dir} was trained with {info['config']}, not the requested "
                f"{config}; pass another checkpoint folder or delete {ckpt_dir} to retrain"
            )
        run.verify_files(weights)
        target = init_params(jax.random.key(seed))
        return io.restore_checkpoint(weights, target)

    if train_size is None:
        x_train, y_train = data.load("fashion_mnist", "train")
    else:
        x_train, y_train = data.load_head("fashion_mnist", "train", train_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    params = train(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        progress=progress,
    )
    jax.block_until_ready(params)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    x_test, y_test = data.load("fashion_mnist", "test")
    acc = accuracy(params, x_test, y_test)

    if weights.exists():  # this cache's weights without meta: an interrupted save; redo it
        run.discard(_WEIGHTS)
        shutil.rmtree(weights, ignore_errors=True)
    io.save_checkpoint(weights, params)
    run.record_files(weights)
    meta = {
        "config": config,
        "test_accuracy": acc,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "n_train": int(len(x_train)),
        "backend": jax.default_backend(),
    }
    run.save_json(_META, meta)  # meta last: its presence marks a complete checkpoint
    return params
