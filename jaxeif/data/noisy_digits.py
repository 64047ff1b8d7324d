"""The fine-tune set of the CNN study (paper figure 1): MNIST test digits, clean and with Gaussian pixel noise."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif.data.images import load


class FinetuneSet(NamedTuple):
    """The figure-1 fine-tune set, ordered noise-level-major (clean by digit, then each noise std).

    Attributes:
        images: f32[n, 28, 28, 1]; the noisy ones are not clipped.
        labels: int32[n] the digit, which is the Fashion-MNIST class it is trained toward.
        noise_std: f32[n] the noise's standard deviation, 0 for clean.
        source: int32[n] row (in this set) of the clean image each sample came from.
    """

    images: np.ndarray  # f32[n, 28, 28, 1], noisy ones not clipped
    labels: np.ndarray  # int32[n], the digit = the Fashion-MNIST class it is trained toward
    noise_std: np.ndarray  # f32[n], 0 for clean
    source: np.ndarray  # int32[n], row of the clean image (in this set) each sample came from


def add_gaussian_noise(images, std: float, key) -> jax.Array:
    """images + pixel-wise i.i.d. N(0, std^2) noise, not clipped.

    Args:
        images: f[n, h, w, c] in [0, 1].
        std: the noise's standard deviation, finite and >= 0.
        key: a JAX PRNG key.

    Returns:
        The noisy images, same shape.

    Raises:
        ValueError: `std` is negative or not finite.
        TypeError: `images` is not floating point.
    """
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"noise `std` must be a finite number >= 0, got {std}")
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"`images` must be floating point (scaled to [0, 1]), got dtype {images.dtype}")
    return images + std * jax.random.normal(key, images.shape, images.dtype)


def _float_images(images, name: str = "images"):
    """images as a floating jax array f[n, h, w, c] (values in [0, 1]), else a clear error."""
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be floating point (scaled to [0, 1]), got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"`{name}` must be f[n, h, w, c], got shape {images.shape}")
    return images


def add_salt_and_pepper(images, p: float, key) -> jax.Array:
    """Salt-and-pepper noise: each pixel independently, with probability `p`, is set to 0 or 1 (equally likely).

    Unlike Gaussian noise it keeps every pixel inside [0, 1].

    Args:
        images: f[n, h, w, c] in [0, 1].
        p: the share of pixels hit, in [0, 1].
        key: a JAX PRNG key.

    Returns:
        The corrupted images, same shape.

    Raises:
        ValueError: `p` is not a number in [0, 1], or `images` is not 4-d.
        TypeError: `images` is not floating point.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not np.isfinite(p) or not 0 <= p <= 1:
        raise ValueError(f"salt-and-pepper fraction `p` must be a number in [0, 1], got {p!r}")
    images = _float_images(images)
    hit_key, value_key = jax.random.split(key)
    hit = jax.random.uniform(hit_key, images.shape) < p
    salt = jax.random.bernoulli(value_key, 0.5, images.shape).astype(images.dtype)
    return jnp.where(hit, salt, images)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian of standard deviation `sigma` pixels, radius r = ceil(3 sigma).

    Args:
        sigma: the standard deviation in pixels, finite and > 0.

    Returns:
        f32[2r+1], summing to 1.

    Raises:
        ValueError: `sigma` is not a finite number > 0.
    """
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float, np.floating))
        or not np.isfinite(sigma)
        or sigma <= 0
    ):
        raise ValueError(f"blur `sigma` must be a finite number > 0 (pixels), got {sigma!r}")
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(images, sigma: float) -> jax.Array:
    """Blur each image and channel with a separable Gaussian of standard deviation `sigma` pixels.

    The border is mirrored (half-sample symmetric), which with a symmetric kernel keeps every image's pixel
    sum, so its mean, unchanged.

    Args:
        images: f[n, h, w, c].
        sigma: the standard deviation in pixels, finite and > 0.

    Returns:
        The blurred images, same shape.

    Raises:
        ValueError: `sigma` is not a finite number > 0, or its radius ceil(3 sigma) is not smaller than the
            image's height and width, or `images` is not 4-d.
        TypeError: `images` is not floating point.
    """
    kernel = gaussian_kernel(sigma)
    images = _float_images(images)
    r = len(kernel) // 2
    if r >= min(images.shape[1:3]):
        raise ValueError(
            f"blur `sigma` {sigma} has radius {r} pixels, not smaller than the image "
            f"({images.shape[1]}x{images.shape[2]}); use sigma < {min(images.shape[1:3]) / 3:g}"
        )
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = jnp.pad(out, pad, mode="symmetric")
        size = out.shape[axis]
        out = sum(float(w) * jnp.take(padded, jnp.arange(i, i + size), axis=axis) for i, w in enumerate(kernel))
    return out.astype(images.dtype)


def first_per_class(labels: np.ndarray, per_class: int, classes: int = 10) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, sorted by class (then by index).

    Args:
        labels: int[n] labels.
        per_class: examples per class.
        classes: number of classes (labels 0 .. classes - 1).

    Returns:
        int[classes * per_class] indices.

    Raises:
        ValueError: a class has fewer than `per_class` examples.
    """
    picked = []
    for c in range(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, {per_class} requested")
        picked.append(idx)
    return np.concatenate(picked)


def finetune_set(per_digit: int = 5, noise_stds: tuple[float, ...] = (0.5, 1.0), seed: int = 0) -> FinetuneSet:
    """The figure-1 fine-tune set: MNIST test digits, clean then with each level of Gaussian noise.

    The first `per_digit` test images of each digit, sorted by digit. Noise level k uses key
    fold_in(key(seed), k), so each level is an independent, reproducible draw.

    Args:
        per_digit: digits of each class, >= 1.
        noise_stds: the noise levels' standard deviations.
        seed: the noise seed.

    Returns:
        The set, 10 * per_digit * (1 + len(noise_stds)) samples.

    Raises:
        ValueError: `per_digit` < 1.
    """
    if per_digit < 1:
        raise ValueError(f"`per_digit` must be >= 1, got {per_digit}")
    x, y = load("mnist", "test")
    idx = first_per_class(y, per_digit)
    clean, digits = x[idx], y[idx]
    key = jax.random.key(seed)
    blocks = [clean] + [
        np.asarray(add_gaussian_noise(clean, s, jax.random.fold_in(key, k))) for k, s in enumerate(noise_stds, start=1)
    ]
    levels = (0.0,) + tuple(float(s) for s in noise_stds)
    n = len(idx)
    return FinetuneSet(
        images=np.concatenate(blocks).astype(np.float32),
        labels=np.tile(digits, len(levels)).astype(np.int32),
        noise_std=np.repeat(np.asarray(levels, np.float32), n),
        source=np.tile(np.arange(n, dtype=np.int32), len(levels)),
    )
