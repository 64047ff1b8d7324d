"""Controls of fine-tuning "speed and location" that meta/ learns through jaxeif.eif.

- free per-sample rates: lr = exp(log_lr), one learnable number per train sample;
- an amortised predictor: lr = base_lr * exp(f_phi(features of the sample)), a small Flax MLP
  that generalises to samples it never saw;
- per-layer multipliers: one scalar per top-level layer of any params pytree, shared by all
  samples, applied by an optax transformation passed to eif as `optimizer=`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import io

PyTree = Any


# --- free per-sample learning rates -------------------------------------------------------


def init_log_lr(n: int, lr: float) -> jax.Array:
    """f32[n] of log(lr): the free per-sample controls, every sample starting at the same rate.

    Learning the log keeps every rate positive (`per_sample_lr` takes the exp).

    Args:
        n: number of train samples.
        lr: the starting rate, > 0.

    Returns:
        f32[n], every entry log(lr).

    Raises:
        ValueError: `lr` <= 0.
    """
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0 to take its log, got {lr}")
    return jnp.full((n,), np.log(lr), jnp.float32)


def per_sample_lr(log_lr: jax.Array) -> jax.Array:
    """The per-sample rates exp(log_lr), positive by construction; pass them as `jaxeif.eif(..., lr=...)`.

    Args:
        log_lr: f32[n] log-rates (from `init_log_lr` or learned by `meta.fit`).

    Returns:
        f32[n] rates.
    """
    return jnp.exp(log_lr)


# --- amortised predictor ------------------------------------------------------------------


def image_features(images: jax.Array) -> jax.Array:
    """f32[n, 6] simple statistics of each image: mean, std, mean |dx|+|dy|, share of pixels outside [0, 1], min, max.

    The features of the amortised lr predictor of the image meta studies: noise raises roughness and range.

    Args:
        images: f[n, h, w, c] images.

    Returns:
        f32[n, 6].

    Raises:
        ValueError: `images` is not 4-d.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"`images` must be f[n, h, w, c], got shape {images.shape}")
    x = images.reshape(images.shape[0], -1)
    dx = jnp.abs(jnp.diff(images, axis=1)).mean(axis=(1, 2, 3))
    dy = jnp.abs(jnp.diff(images, axis=2)).mean(axis=(1, 2, 3))
    outside = jnp.mean((x < 0) | (x > 1), axis=1)
    return jnp.stack([x.mean(1), x.std(1), dx + dy, outside, x.min(1), x.max(1)], axis=1).astype(jnp.float32)


class Standardizer(NamedTuple):
    """Per-feature mean and std fitted on the meta-training samples (fixed, not learned).

    Attributes:
        mean: f32[k] feature means.
        std: f32[k] feature standard deviations (at least 1e-6).
    """

    mean: jax.Array
    std: jax.Array

    @classmethod
    def fit(cls, features: jax.Array) -> Standardizer:
        features = jnp.asarray(features)
        return cls(features.mean(0), jnp.maximum(features.std(0), 1e-6))

    def __call__(self, features: jax.Array) -> jax.Array:
        return (features - self.mean) / self.std


class LRPredictor(nn.Module):
    """Flax MLP: the log-rate offset of each sample from its standardised features, f32[n, k] -> f32[n].

    The last layer starts at zero, so an untrained predictor gives exactly the uniform base rate; the offset
    is bounded to +-max_log_gain (tanh), so no rate can run away.

    Attributes:
        hidden: widths of the tanh hidden layers.
        max_log_gain: bound on |log(lr / base_lr)|.
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
    """An amortised rate predictor: lr = base_lr * exp(predictor(standardizer(features))), f32[n].

    `init(key, features)` gives the learnable params phi; `lr(phi, features)` the rates of any samples,
    seen or unseen. Build it with `amortised`.

    Attributes:
        predictor: the `LRPredictor` MLP.
        standardizer: the fixed feature standardisation.
        base_lr: the rate of an untrained predictor.
    """

    predictor: LRPredictor
    standardizer: Standardizer
    base_lr: float

    def init(self, key: jax.Array, features: jax.Array) -> PyTree:
        return self.predictor.init(key, self.standardizer(jnp.asarray(features)))

    def lr(self, phi: PyTree, features: jax.Array) -> jax.Array:
        return self.base_lr * jnp.exp(self.predictor.apply(phi, self.standardizer(features)))


def amortised(
    train_features: jax.Array, base_lr: float, *, hidden: Sequence[int] = (32,), max_log_gain: float = 3.0
) -> Amortised:
    """An `Amortised` rate predictor whose features are standardised on `train_features`.

    Args:
        train_features: f32[n, k] features of the meta-training samples (e.g. `image_features`).
        base_lr: the uniform rate the untrained predictor gives, > 0.
        hidden: widths of the MLP's hidden layers.
        max_log_gain: bound on |log(lr / base_lr)|.

    Returns:
        The predictor; `predictor.init(key, train_features)` gives its params.

    Raises:
        ValueError: `train_features` is not 2-d or `base_lr` <= 0.
    """
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
    """Names of the top-level layers (modules) of a params dict, looking inside a lone Flax "params" collection.

    Args:
        params: a non-empty dict of layers.

    Returns:
        The layer names, in the dict's order.

    Raises:
        TypeError: `params` is not a non-empty dict.
    """
    return tuple(_layers(params))


def init_layer_log_scales(params: PyTree) -> dict[str, jax.Array]:
    """{layer: f32[] 0.0}: log-multipliers of every top-level layer, all starting at x1.

    Args:
        params: the model's params dict.

    Returns:
        One zero scalar per layer name of `layer_names(params)`.
    """
    return {name: jnp.zeros((), jnp.float32) for name in layer_names(params)}


def scale_by_layer(log_scales: dict[str, jax.Array]) -> optax.GradientTransformationExtraArgs:
    """An optax transformation multiplying each top-level layer's update by exp(log_scales[layer]).

    Build it inside the function you differentiate: it closes over the scales, so the meta-gradient flows
    into them.

    Args:
        log_scales: {layer: f32[]} log-multipliers naming exactly the layers of the params.

    Returns:
        The transformation; its `init` checks the layer names.

    Raises:
        ValueError: (at `init`) `log_scales` names other layers than the params have.
    """

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
        scaled = {
            name: jax.tree.map(functools.partial(_scaled, jnp.exp(log_scales[name])), sub)
            for name, sub in layers.items()
        }
        return ({"params": scaled} if layers is not updates else scaled), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_optimizer(
    log_scales: dict[str, jax.Array], base: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
    """`base` (default unit-rate SGD, as in `jaxeif.eif`) followed by the per-layer multipliers.

    Args:
        log_scales: {layer: f32[]} log-multipliers (`init_layer_log_scales`).
        base: a unit-rate optax transformation; None: `optax.sgd(1.0)`.

    Returns:
        An optax transformation to pass as `jaxeif.eif(..., optimizer=...)`.
    """
    return optax.chain(optax.sgd(1.0) if base is None else base, scale_by_layer(log_scales))


# --- saving an amortised predictor --------------------------------------------------------


def save_amortised(path, predictor: Amortised, phi: PyTree) -> None:
    """Write an amortised predictor and its learned params to an .npz file that `load_amortised` reads back.

    The file holds numpy arrays only (architecture, base rate, standardizer, phi), so loading it runs no code;
    it is written atomically.

    Args:
        path: the .npz file to write.
        predictor: the `Amortised` predictor.
        phi: its learned params.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(phi)
    arrays = {"phi/" + "/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v) for keys, v in flat}
    arrays.update(
        standardizer_mean=np.asarray(predictor.standardizer.mean),
        standardizer_std=np.asarray(predictor.standardizer.std),
        hidden=np.asarray(predictor.predictor.hidden, np.int64),
        max_log_gain=np.asarray(predictor.predictor.max_log_gain, np.float64),
        base_lr=np.asarray(predictor.base_lr, np.float64),
    )
    with io.atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_amortised(path) -> tuple[Amortised, PyTree]:
    """Read a predictor and its params written by `save_amortised`.

    Args:
        path: the .npz file.

    Returns:
        (predictor, phi).

    Raises:
        ValueError: the file is not a saved amortised predictor, or its params do not fit its architecture.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = {"hidden", "max_log_gain", "standardizer_mean", "standardizer_std", "base_lr"} - set(arrays)
    if missing:
        raise ValueError(
            f"{path} is not a saved amortised predictor (no {', '.join(sorted(missing))}); write it with save_amortised"
        )
    predictor = Amortised(
        LRPredictor(tuple(int(h) for h in arrays.pop("hidden")), float(arrays.pop("max_log_gain"))),
        Standardizer(jnp.asarray(arrays.pop("standardizer_mean")), jnp.asarray(arrays.pop("standardizer_std"))),
        float(arrays.pop("base_lr")),
    )
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


def _scaled(scale: jax.Array, update: jax.Array) -> jax.Array:
    """`update` times a layer's multiplier, in the update's own dtype."""
    return (scale * update).astype(update.dtype)
