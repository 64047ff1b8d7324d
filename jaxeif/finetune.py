"""The inner loop of the EIF: a few optax steps on one example, the update scaled by lr."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def default_optimizer() -> optax.GradientTransformation:
    """Plain SGD with unit rate: the per-sample lr alone sets the step size."""
    return optax.sgd(1.0)


def finetune(
    loss_fn: LossFn,
    params: PyTree,
    example: PyTree,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
) -> PyTree:
    """Params after `steps` optimizer steps on `example` alone; each update is multiplied by lr.

    Pass optimizers with unit learning rate (e.g. `optax.adam(1.0)`): `lr` is the rate.
    Differentiable in `lr` and `params` (the steps are an unrolled `lax.scan`); with an explicit
    `optimizer`, in reverse mode (`jax.grad`), see `zero_gradients_are_constant`.
    """
    return apply_delta(params, finetune_delta(loss_fn, params, example, lr=lr, steps=steps, optimizer=optimizer))


def round_to(x: jax.Array, dtype: Any) -> jax.Array:
    """`x` in `dtype`, rounded to it even inside a fused XLA program.

    XLA may keep a 16-bit float in float32 between fused ops ("excess precision"), so params + lr * update
    in bfloat16 could reach the loss unrounded, and the result would depend on how the program is laid
    out. An explicit reduce-precision makes the value the one the dtype holds.

    Args:
        x: an array.
        dtype: the dtype to round to.

    Returns:
        `x.astype(dtype)`, its value exactly representable in `dtype`.
    """
    x = jnp.asarray(x).astype(dtype)
    if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        info = jnp.finfo(dtype)
        x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x


def apply_delta(params: PyTree, delta: PyTree) -> PyTree:
    """params + delta, each leaf rounded to its param's dtype (`round_to`): the fine-tuned params."""
    return jax.tree.map(lambda p, d: round_to(p + d, p.dtype), params, delta)


def first_update(loss_fn: LossFn, params: PyTree, example: PyTree, optimizer=None) -> PyTree:
    """The optimizer's first update on `example` at unit rate; a one-step fine-tune at rate lr is
    params + lr * this update, so a sweep over lr computes it once."""
    guard = gradient_guard(optimizer)
    optimizer = default_optimizer() if optimizer is None else optimizer
    updates, _ = optimizer.update(guard(jax.grad(loss_fn)(params, example)), optimizer.init(params), params)
    return updates


def gradient_guard(optimizer: optax.GradientTransformation | None) -> Callable[[PyTree], PyTree]:
    """What the inner loop applies to each gradient: nothing for the default SGD (whose derivative
    is finite everywhere), `zero_gradients_are_constant` for any other optimizer."""
    return (lambda g: g) if optimizer is None else zero_gradients_are_constant


def scale_updates(updates: PyTree, lr: jax.Array | float) -> PyTree:
    """Each update multiplied by lr, in the update's own dtype."""
    return jax.tree.map(lambda u: round_to(lr * u, u.dtype), updates)


@jax.custom_vjp
def zero_gradients_are_constant(grads: PyTree) -> PyTree:
    """Identity; backward, a non-finite cotangent reaching an exactly-zero gradient entry becomes 0.

    Adam-like optimizers take sqrt(v), whose derivative is infinite at v = 0, so an exactly-zero
    gradient entry (a dead ReLU unit, an input that is always 0, an unused embedding row) turns the
    meta-gradient into 0 * inf = NaN. Such zeros are constant near the current params, so their
    true contribution is 0. Finite cotangents pass unchanged.
    """
    return grads


def _guard_fwd(grads):
    return grads, grads


def _guard_bwd(grads, cotangent):
    fix = lambda g, ct: jnp.where((g == 0) & ~jnp.isfinite(ct), jnp.zeros_like(ct), ct)  # noqa: E731
    return (jax.tree.map(fix, grads, cotangent),)


zero_gradients_are_constant.defvjp(_guard_fwd, _guard_bwd)


def losses(loss_fn: LossFn, params: PyTree, examples: PyTree) -> jax.Array:
    """Loss of every example (leading axis m) under one set of params: f32[m]."""
    return jax.vmap(loss_fn, in_axes=(None, 0))(params, examples)


def finetune_delta(
    loss_fn: LossFn,
    params: PyTree,
    example: PyTree,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
) -> PyTree:
    """The change of the params that `finetune` makes, as a pytree: the sum of the scaled updates lr * u.

    Accumulated directly rather than as (fine-tuned params) - params, so a small delta keeps full
    relative accuracy (for `jaxeif.difference.loss_difference`). Step k takes its gradient at
    params + delta_k. Differentiable in `lr` and `params`.
    """
    guard = gradient_guard(optimizer)
    optimizer = default_optimizer() if optimizer is None else optimizer
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        delta, state = carry
        p = apply_delta(params, delta)
        updates, state = optimizer.update(guard(grad_fn(p, example)), state, p)
        delta = jax.tree.map(lambda d, u: round_to(d + lr * u, d.dtype), delta, updates)
        return (delta, state), None

    delta0 = jax.tree.map(jnp.zeros_like, params)
    (delta, _), _ = jax.lax.scan(step, (delta0, optimizer.init(params)), None, length=steps)
    return delta
