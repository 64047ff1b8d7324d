"""(loss_fn, params) for jaxeif from a Flax nnx module or an Equinox module.

jaxeif fine-tunes every leaf of `params` and calls `loss_fn(params, example)`. A framework model mixes
the weights with other state (BatchNorm statistics, RNG streams, frozen layers) and with static parts
(activations, the graph's structure). These adapters split off exactly the weights to fine-tune and
bind everything else in a `jax.tree_util.Partial`, so frozen arrays enter the compiled program as
inputs (not constants baked into it) and nothing but the weights is fine-tuned. flax.nnx and equinox
are imported only when an adapter is called (equinox is optional). Recipes: docs/your_model.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

ModelLoss = Callable[[Any, Any], jax.Array]  # loss(model, example) -> f32[]: the loss of ONE example


class _NnxLoss:
    """loss(nnx.merge(graphdef, params, rest), example): the static part of nnx_loss's Partial.

    Compared by identity (as a jit static argument): one compiled program per nnx_loss call."""

    def __init__(self, graphdef: Any, loss: ModelLoss):
        self.graphdef = graphdef
        self.loss = loss

    def __call__(self, rest: Any, params: Any, example: Any) -> jax.Array:
        from flax import nnx

        return self.loss(nnx.merge(self.graphdef, params, rest), example)


class _EqxLoss:
    """loss(eqx.combine(params, frozen, static), example): the static part of eqx_loss's Partial."""

    def __init__(self, static: Any, loss: ModelLoss):
        self.static = static
        self.loss = loss

    def __call__(self, frozen: Any, params: Any, example: Any) -> jax.Array:
        import equinox as eqx

        return self.loss(eqx.combine(params, frozen, self.static), example)


def nnx_loss(model: Any, loss: ModelLoss, wrt: Any = None) -> tuple[jax.tree_util.Partial, Any]:
    """(loss_fn, params) for jaxeif from an nnx module: params are the variables `wrt` selects, nothing else.

    `graphdef, params, rest = nnx.split(model, wrt, ...)`; loss_fn(params, example) rebuilds the model
    with nnx.merge and returns `loss(model, example)`. `rest` (BatchNorm statistics, RNG state, the
    variables `wrt` leaves out) is bound in a jax.tree_util.Partial: frozen, and an input of the program.
    Call `model.eval()` first when the model has BatchNorm (see Raises/warnings) or Dropout that should
    be off; for Dropout on, pass a per-example key inside `example` (docs/your_model.md).

    Args:
      model: an nnx.Module.
      loss: loss(model, example) -> f32[], the loss of ONE example (no leading example axis).
      wrt: an nnx filter of the variables to fine-tune (default nnx.Param; e.g. nnx.LoRAParam, or
        nnx.All(nnx.Param, nnx.PathContains("head")) to fine-tune the head only).

    Returns:
      (loss_fn, params): a jax.tree_util.Partial taking (params, example), and the nnx.State to fine-tune.

    Raises:
      TypeError: `model` is not an nnx.Module or `loss` is not callable.
    Warns:
      UserWarning: a BatchNorm is in train mode (use_running_average=False): on the one example a
        loss sees it normalises by that example's own statistics, which for features without a
        spatial axis makes the output independent of the input.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"`model` must be an nnx.Module, got {type(model).__name__}; for a Linen model pass "
            "variables['params'] as params and bind the other collections in a Partial "
            "(docs/your_model.md)"
        )
    if not callable(loss):
        raise TypeError(f"`loss` must be callable as loss(model, example), got {type(loss).__name__}")
    train_mode = [
        ".".join(map(str, path)) or "model"
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average
    ]
    if train_mode:
        warnings.warn(
            f"jaxeif.frameworks.nnx_loss: BatchNorm {train_mode[:4]} in train mode (use_running_average=False). "
            "Each fine-tune and each eval loss sees ONE example, so BatchNorm would normalise it by its own mean and "
            "variance: for a dense layer the output no longer depends on the input. Call model.eval() first to use "
            "the running statistics (they stay frozen, bound in the loss)",
            UserWarning,
            stacklevel=2,
        )
    graphdef, params, rest = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
    return jax.tree_util.Partial(_NnxLoss(graphdef, loss), rest), params


def eqx_loss(model: Any, loss: ModelLoss, wrt: Any = None) -> tuple[jax.tree_util.Partial, Any]:
    """(loss_fn, params) for jaxeif from an Equinox module: params are the arrays `wrt` selects, nothing else.

    `params, rest = eqx.partition(model, wrt)`, then `frozen, static = eqx.partition(rest, eqx.is_array)`:
    frozen arrays are bound in a jax.tree_util.Partial (inputs of the program), the static rest
    (activations, Python settings) in its function. loss_fn(params, example) is
    `loss(eqx.combine(params, frozen, static), example)`.

    Args:
      model: an equinox.Module (or any pytree equinox can partition).
      loss: loss(model, example) -> f32[], the loss of ONE example (no leading example axis).
      wrt: an equinox filter (a function of a leaf or a pytree of bools) of the arrays to fine-tune,
        default eqx.is_inexact_array (every floating array).

    Returns:
      (loss_fn, params): a jax.tree_util.Partial taking (params, example), and the pytree to fine-tune
      (the model's structure, None where a leaf is not fine-tuned).

    Raises:
      TypeError: `loss` is not callable.
    """
    import equinox as eqx

    if not callable(loss):
        raise TypeError(f"`loss` must be callable as loss(model, example), got {type(loss).__name__}")
    params, rest = eqx.partition(model, eqx.is_inexact_array if wrt is None else wrt)
    frozen, static = eqx.partition(rest, eqx.is_array)
    return jax.tree_util.Partial(_EqxLoss(static, loss), frozen), params
