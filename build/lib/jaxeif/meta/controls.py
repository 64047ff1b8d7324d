"""Controls of fine-tuning "speed and location" that meta/ learns through jaxeif.eif.

- free per-sample rates: lr = exp(log_lr), one learnable number per train sample;
- an amortised predictor: lr = base_lr * exp(f_phi(features of the sample)), a small Flax MLP
  that generalises to samples it never saw;
- per-layer multipliers: one scalar per top-level layer of any params pytree, shared by all
  samples, applied by an optax transformation passed to eif as `optimizer=`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import io

PyTree = Any


# --- free per-sample learning rates -------------------------------------------------------

def init_log_lr(n: int, lr: float) -> jax.Array:
    """f32[n] of log(lr): every sample starts at the same rate."""
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0 to take its log, got {lr}")
    return jnp.full((n,), np.log(lr), jnp.float32)


def per_sample_lr(log_lr: jax.Array) -> jax.Array:
    """The per-sample rates f32[n] = exp(log_lr), positive by construction."""
    return jnp.exp(log_lr)


# --- amortised predictor ------------------------------------------------------------------

def image_features(images: jax.Array) -> jax.Array:
    """f32[n, 6] simple statistics of images f32[n, h, w, c]: mean, std, mean |dx|+|dy|,
    fraction of pixels outside [0, 1], min and max. Noise raises roughness and range."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"`images` must be f[n, h, w, c], got shape {images.shape}")
    x = images.reshape(images.shape[0], -1)
    dx = jnp.abs(jnp.diff(images, axis=1)).mean(axis=(1, 2, 3))
    dy = jnp.abs(jnp.diff(images, axis=2)).mean(axis=(1, 2, 3))
    outside = jnp.mean((x < 0) | (x > 1), axis=1)
    return jnp.stack([x.mean(1), x.std(1), dx + dy, outside, x.min(1), x.max(1)], axis=1).astype(jnp.float32)


class Standardizer(NamedTuple):
    """Per-feature mean and std fitted on the meta-training samples (fixed, not learned)."""

    mean: jax.Array
    std: jax.Array

    @classmethod
    def fit(cls, features: jax.Array) -> "Standardizer":
        features = jnp.asarray(features)
        return cls(features.mean(0), jnp.maximum(features.std(0), 1e-6))

    def __call__(self, features: jax.Array) -> jax.Array:
        return (features - self.mean) / self.std


class LRPredictor(nn.Module):
    """log-rate offset of each sample from its standardised features: f32[n, k] -> f32[n].

    The last layer starts at zero, so an untrained predictor gives exactly the uniform base
    rate; the offset is bounded to +-max_log_gain (tanh) so no rate can run away.
    """

    hidden: Sequence[int] = (32,)
    max_log_gain: float = 3.0

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        h = features
        for width in self.hidden:
            h = nn.tanh(nn.Dense(width)(h))
        raw = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(h)[:, 0]
        return self.max_log_gain * jnp.tanh(raw / self.max_log_gain)


class Amortised(NamedTuple):
    """lr = base_lr * exp(predictor(standardizer(features))): f32[n]; phi is the learned part."""

    predictor: LRPredictor
    standardizer: Standardizer
    base_lr: float

    def init(self, key: jax.Array, features: jax.Array) -> PyTree:
        return self.predictor.init(key, self.standardizer(jnp.asarray(features)))

    def lr(self, phi: PyTree, features: jax.Array) -> jax.Array:
        return self.base_lr * jnp.exp(self.predictor.apply(phi, self.standardizer(features)))


def amortised(train_features: jax.Array, base_lr: float, *, hidden: Sequence[int] = (32,), max_log_gain: float = 3.0) -> Amortised:
    """An amortised rate predictor whose features are standardised on `train_features` f32[n, k]."""
    train_features = jnp.asarray(train_features)
    if train_features.ndim != 2:
        raise ValueError(f"`train_features` must be f32[n, k], got shape {train_features.shape}")
    if base_lr <= 0:
        raise ValueError(f"`base_lr` must be > 0, got {base_lr}")
    return Amortised(LRPredictor(tuple(hidden), max_log_gain), Standardizer.fit(train_features), float(base_lr))


# --- per-layer multipliers ----------------------------------------------------------------

def _layers(tree: PyTree) -> dict:
    """The dict of top-level layers, looking through a lone Flax "params" collection."""
    if not isinstance(tree, dict) or not tree:
        raise TypeError(f"per-layer multipliers need params as a non-empty dict of layers, got {type(tree).__name__}")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        return tree["params"]
    return tree


def layer_names(params: PyTree) -> tuple[str, ...]:
    """Names of the top-level layers (modules) of a params dict (inside "params" for Flax)."""
    return tuple(_layers(params))


def init_layer_log_scales(params: PyTree) -> dict[str, jax.Array]:
    """{layer: f32[] 0.0}: log-multipliers of every top-level layer, all starting at x1."""
    return {name: jnp.zeros((), jnp.float32) for name in layer_names(params)}


def scale_by_layer(log_scales: dict[str, jax.Array]) -> optax.GradientTransformationExtraArgs:
    """Multiply each top-level layer's update by exp(log_scales[layer]); build it inside the
    function you differentiate (it closes over the scales)."""

    def init_fn(params):
        missing = set(layer_names(params)) ^ set(log_scales)
        if missing:
            raise ValueError(
                f"`log_scales` must name exactly the layers {sorted(layer_names(params))}; "
                f"mismatch: {sorted(missing)} (build them with init_layer_log_scales(params))"
            )
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        layers = _layers(updates)
        scaled = {name: jax.tree.map(lambda u, s=jnp.exp(log_scales[name]): (s * u).astype(u.dtype), sub) for name, sub in layers.items()}
        return ({"params": scaled} if layers is not updates else scaled), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_optimizer(log_scales: dict[str, jax.Array], base: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """`base` (default unit-rate SGD, as in jaxeif.eif) followed by the per-layer multipliers."""
    return optax.chain(optax.sgd(1.0) if base is None else base, scale_by_layer(log_scales))


# --- saving an amortised predictor --------------------------------------------------------

def save_amortised(path, predictor: Amortised, phi: PyTree) -> None:
    """Write `predictor` (architecture, base rate, standardizer) and its learned `phi` to an .npz
    file that load_amortised reads back (numpy arrays only: nothing in it runs code)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(phi)
    arrays = {"phi/" + "/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v) for keys, v in flat}
    arrays.update(standardizer_mean=np.asarray(predictor.standardizer.mean),
                  standardizer_std=np.asarray(predictor.standardizer.std),
                  hidden=np.asarray(predictor.predictor.hidden, np.int64),
                  max_log_gain=np.asarray(predictor.predictor.max_log_gain, np.float64),
                  base_lr=np.asarray(predictor.base_lr, np.float64))
    with io.atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_amortised(path) -> tuple[Amortised, PyTree]:
    """(predictor, phi) saved by save_amortised."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = {"hidden", "max_log_gain", "standardizer_mean", "standardizer_std", "base_lr"} - set(arrays)
    if missing:
        raise ValueError(f"{path} is not a saved amortised predictor (no {', '.join(sorted(missing))}); write it with save_amortised")
    predictor = Amortised(LRPredictor(tuple(int(h) for h in arrays.pop("hidden")), float(arrays.pop("max_log_gain"))),
                          Standardizer(jnp.asarray(arrays.pop("standardizer_mean")), jnp.asarray(arrays.pop("standardizer_std"))),
                          float(arrays.pop("base_lr")))
    phi: dict = {}
    for key, value in arrays.items():
        if not key.startswith("phi/"):
            raise ValueError(f"{path} is not a saved amortised predictor (unexpected entry {key!r})")
        node = phi
        *parents, leaf = key.split("/")[1:]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    template = predictor.init(jax.random.key(0), jnp.zeros((1, predictor.standardizer.mean.shape[0])))
    if jax.tree.structure(template) != jax.tree.structure(phi):
        raise ValueError(f"{path} holds parameters that do not fit its predictor's architecture")
    return predictor, phi
