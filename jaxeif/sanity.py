"""Checks that the numbers an EIF call is about to produce can mean something, before it runs.

- `closed_over_tracer`: a loss_fn holding a value traced by an enclosing jax.grad/jit cannot be compiled
  into eif's program as a constant; TypeError pointing to `jax.tree_util.Partial`.
- `warn_if_updates_round_away`: with low-precision params (bfloat16, float16) a small lr times the update
  can round to nothing, so theta_i == theta and the row is exactly 0; RuntimeWarning with the fix.
- `warn_if_float64_differs`: precision="float64" evaluates the loss under `jax.enable_x64`; a loss that
  draws random numbers from a fixed key draws other numbers there, and a loss that casts to float32
  inside gives float32 results: either way the float64 reference (and `noise_floor`) is meaningless.
- `loss_version`: a fingerprint of what a loss reads, so that eif's compiled program is keyed on it.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import fingerprint
from jaxeif import precision as precision_lib
from jaxeif.finetune import first_update, scale_updates

_TRACER_DEPTH = 8


def closed_over_tracer(loss_fn: Any) -> None:
    """TypeError when `loss_fn` (its closure cells, defaults, partial arguments, instance state) holds a jax
    tracer while eif's own inputs are concrete: eif would compile it as a constant of its program."""
    where = _find_tracer(loss_fn, "loss_fn", 0, set())
    if where is not None:
        raise TypeError(
            f"{where} is a value traced by an enclosing jax transformation (jax.grad, jax.jit, jax.vmap), but eif "
            "compiles loss_fn into its own program, where that value does not exist. Pass it as an input instead: "
            "loss_fn = jax.tree_util.Partial(fn, value) (a Partial's bound arrays enter eif's program as inputs), "
            "or pass the traced value in params/train"
        )


def _find_tracer(obj: Any, where: str, depth: int, seen: set) -> str | None:
    if isinstance(obj, jax.core.Tracer):
        return where
    if depth > _TRACER_DEPTH or id(obj) in seen or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return None
    seen.add(id(obj))
    if isinstance(obj, jax.tree_util.Partial):  # bound values are program inputs; only the function is static
        return _find_tracer(obj.func, f"{where}.func", depth + 1, seen)
    items: list[tuple[str, Any]] = []
    if isinstance(obj, functools.partial):
        items = [(f"{where}.func", obj.func)] + [(f"{where}.args[{i}]", a) for i, a in enumerate(obj.args)]
        items += [(f"{where}.keywords[{k!r}]", v) for k, v in obj.keywords.items()]
    elif isinstance(obj, types.MethodType):
        items = [(f"{where}.__func__", obj.__func__), (f"{where}.__self__", obj.__self__)]
    elif isinstance(obj, types.FunctionType):
        names = obj.__code__.co_freevars
        items = [
            (f"{where} (closure variable {names[i]!r})", c.cell_contents)
            for i, c in enumerate(obj.__closure__ or ())
            if fingerprint.cell_filled(c)
        ]
        items += [(f"{where} (default {i})", d) for i, d in enumerate(obj.__defaults__ or ())]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{where}[{i}]", x) for i, x in enumerate(obj)]
    elif isinstance(obj, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in obj.items()]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        items = [(f"{where}.{k}", v) for k, v in vars(obj).items()]
    for name, value in items:
        found = _find_tracer(value, name, depth + 1, seen)
        if found is not None:
            return found
    return None


def warn_if_updates_round_away(loss_fn: Any, params: Any, train: Any, lrs: Any, optimizer: Any, precision: Any) -> None:
    """RuntimeWarning when params hold a floating dtype narrower than float32 and train[0]'s update at the
    largest lr leaves every parameter unchanged in that dtype (the influence row would be exactly 0)."""
    leaves = jax.tree.leaves(params)
    narrow = sorted(
        {
            str(jnp.result_type(x))
            for x in leaves
            if jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.finfo(jnp.result_type(x)).bits < 32
        }
    )
    if not narrow or precision_lib.is_float64(precision):
        return
    lr = float(np.max(np.asarray(lrs)))
    if lr == 0:
        return
    example = jax.tree.map(lambda x: x[0], train)
    moved = optax.apply_updates(params, scale_updates(first_update(loss_fn, params, example, optimizer), lr))
    if all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, jax.tree.leaves(moved))):
        warnings.warn(
            f"jaxeif: with {'/'.join(narrow)} params, lr={lr:g} times the update of train[0] rounds away in every "
            f"parameter (the fine-tuned params equal params exactly), so its influence row is exactly 0, not a "
            "measurement. Fine-tune float32 params (jax.tree.map(lambda x: x.astype(jnp.float32), params)), pass "
            "precision=jaxeif.Precision(dtype='float64'), or use a larger lr",
            RuntimeWarning,
            stacklevel=4,
        )


def warn_if_float64_differs(loss_fn: Any, params: Any, example: Any) -> None:
    """RuntimeWarning when the loss of `example` under `jax.enable_x64` (float64 inputs) is not a float64
    value, or differs from its float32 value by far more than float32 rounding (random draws that change
    with x64, say): float64 precision and noise_floor would then compare different computations."""
    f32 = float(loss_fn(params, example))
    with jax.enable_x64(True):
        cast = functools.partial(
            jax.tree.map,
            lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        )
        out = loss_fn(cast(params), cast(example))
        dtype, f64 = jnp.result_type(out), float(out)
    if dtype != jnp.float64 or (f64 == float(np.float32(f64)) and f64 != float(np.float16(f64))):
        warnings.warn(
            "jaxeif: under precision=Precision(dtype='float64') loss_fn returns "
            f"{'a ' + str(dtype) if dtype != jnp.float64 else 'a '}"
            f"{'' if dtype != jnp.float64 else 'float64 value with float32 rounding'} (loss {f64!r}): it casts to "
            "float32 inside, so the float64 reference carries float32 rounding and noise_floor would be 0. Keep "
            "the loss in its inputs' dtype (no .astype(jnp.float32), no float32 constants forced)",
            RuntimeWarning,
            stacklevel=4,
        )
    elif abs(f64 - f32) > 1e-3 * max(abs(f32), abs(f64)) + 1e-30:
        warnings.warn(
            f"jaxeif: loss_fn(params, train[0]) is {f32!r} in float32 but {f64!r} under "
            "precision=Precision(dtype='float64'), far "
            "more apart than float32 rounding: the loss computes something else with x64 enabled (random draws "
            "from a fixed key draw other numbers). The float64 EIF and noise_floor are then not references for "
            "the float32 one; draw the randomness outside the loss (pass it in train) or keep the default "
            "float32 precision",
            RuntimeWarning,
            stacklevel=4,
        )


def loss_version(loss_fn: Any) -> str | None:
    """A fingerprint of a loss_fn (a Partial: of its function) and the module-level values, closure cells
    and attributes it reads, or None where it cannot be fingerprinted. eif keys its compiled program on it,
    so a change of a value the loss reads recompiles instead of reusing the old constants."""
    fn = loss_fn.func if isinstance(loss_fn, jax.tree_util.Partial) else loss_fn
    try:
        return fingerprint.digest(fn)
    except fingerprint.FingerprintError:
        return None
