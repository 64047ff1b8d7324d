"""The fine-tune set of the CNN study (paper figure 1): MNIST test digits, clean and with Gaussian pixel noise."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif.data.images import load


class FinetuneSet(NamedTuple):
    """The figure-1 fine-tune set, ordered noise-level-major (clean by digit, then each noise std)."""

    images: np.ndarray  # f32[n, 28, 28, 1], noisy ones not clipped
    labels: np.ndarray  # int32[n], the digit = the Fashion-MNIST class it is trained toward
    noise_std: np.ndarray  # f32[n], 0 for clean
    source: np.ndarray  # int32[n], row of the clean image (in this set) each sample came from


def add_gaussian_noise(images, std: float, key) -> jax.Array:
    """images + pixel-wise i.i.d. N(0, std^2) noise (std is a standard deviation), not clipped."""
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"noise `std` must be a finite number >= 0, got {std}")
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"`images` must be floating point (scaled to [0, 1]), got dtype {images.dtype}")
    return images + std * jax.random.normal(key, images.shape, images.dtype)


def first_per_class(labels: np.ndarray, per_class: int, classes: int = 10) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, sorted by class (then by index)."""
    picked = []
    for c in range(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, {per_class} requested")
        picked.append(idx)
    return np.concatenate(picked)


def finetune_set(per_digit: int = 5, noise_stds: tuple[float, ...] = (0.5, 1.0), seed: int = 0) -> FinetuneSet:
    """MNIST test digits (the first `per_digit` of each, sorted by digit), clean then each noise std.

    Noise for level k uses key fold_in(key(seed), k), so each level is an independent, reproducible draw.
    """
    if per_digit < 1:
        raise ValueError(f"`per_digit` must be >= 1, got {per_digit}")
    x, y = load("mnist", "test")
    idx = first_per_class(y, per_digit)
    clean, digits = x[idx], y[idx]
    key = jax.random.key(seed)
    blocks = [clean] + [np.asarray(add_gaussian_noise(clean, s, jax.random.fold_in(key, k)))
                        for k, s in enumerate(noise_stds, start=1)]
    levels = (0.0,) + tuple(float(s) for s in noise_stds)
    n = len(idx)
    return FinetuneSet(
        images=np.concatenate(blocks).astype(np.float32),
        labels=np.tile(digits, len(levels)).astype(np.int32),
        noise_std=np.repeat(np.asarray(levels, np.float32), n),
        source=np.tile(np.arange(n, dtype=np.int32), len(levels)),
    )
