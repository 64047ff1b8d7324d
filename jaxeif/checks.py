"""Input checks shared by the public functions: one clear message naming the argument."""

from __future__ import annotations

import collections.abc
import numbers
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif.errors import Error


class NonFiniteInfluenceError(Error, FloatingPointError):
    """Some fine-tunes diverged; `.rows` names them and `.matrix` holds the raw result."""

    def __init__(self, message: str, rows: np.ndarray, matrix: np.ndarray):
        super().__init__(message)
        self.rows = rows
        self.matrix = matrix


def is_traced(x: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def _describe(tree: Any) -> str:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ", ".join(f"{jax.tree_util.keystr(p) or 'leaf'}: {tuple(np.shape(x))}" for p, x in paths[:8])


def take(tree: Any, rows: Any) -> Any:
    """The examples `rows` (an index array or a slice of the leading axis) of every leaf of `tree`."""
    return jax.tree.map(lambda x: x[rows], tree)


def leading_axis(name: str, tree: Any) -> int:
    """The common leading-axis size of every leaf of `tree` (a batch of examples)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays; pass a pytree of arrays with a leading example axis")
    sizes = []
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{name}` has a scalar leaf; every leaf needs a leading example axis (shapes: {_describe(tree)})"
            )
        sizes.append(shape[0])
    if len(set(sizes)) > 1:
        raise ValueError(
            f"the leaves of `{name}` disagree on the number of examples (leading axis): "
            f"{_describe(tree)}; give every leaf the same first dimension{unbatched_hint(name)}"
        )
    if sizes[0] == 0:
        raise ValueError(f"`{name}` is empty (0 examples); pass at least one example")
    return sizes[0]


def unbatched_hint(name: str) -> str:
    """What to do when the leaves disagree because `name` is ONE example without its example axis."""
    return f" (if `{name}` is a single example, add a leading example axis: jax.tree.map(lambda x: x[None], {name}))"


def float_params(params: Any) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("`params` has no arrays to fine-tune")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"`params`{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "every parameter must be floating point to be fine-tuned"
            )


def learning_rate(lr: Any, n: int) -> jax.Array:
    """lr as an array of shape () or (n,), finite and non-negative where it can be seen."""
    if lr is None:
        raise TypeError(f"`lr` must be a number or an array of shape ({n},), got None")
    try:
        arr = jnp.asarray(lr)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`lr` must be a number or an array of shape ({n},), got {type(lr).__name__}") from e
    if not jnp.issubdtype(arr.dtype, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"`lr` must be real-valued, got dtype {arr.dtype}")
    if arr.shape not in ((), (n,)):
        raise ValueError(f"`lr` has shape {arr.shape}; use a scalar or one rate per train example, shape ({n},)")
    if not is_traced(arr):
        host = np.asarray(arr)
        if not np.all(np.isfinite(host)):
            raise ValueError(
                f"`lr` has non-finite values at {np.flatnonzero(~np.isfinite(host.ravel())).tolist()[:10]}"
            )
        if np.any(host < 0):
            raise ValueError("`lr` must be >= 0 (to ascend the loss, negate loss_fn instead)")
    return arr if jnp.issubdtype(arr.dtype, jnp.floating) else arr.astype(jnp.float32)


def learning_rates(lrs: Any, n: int) -> jax.Array:
    """The learning rates of a sweep: f[k] or f[k, n], finite and non-negative where they can be seen; an
    error names the index of the first bad rate."""
    try:
        arr = jnp.asarray(lrs)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`lrs` must be an array of shape (k,) or (k, {n}), got {type(lrs).__name__}") from e
    if not jnp.issubdtype(arr.dtype, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"`lrs` must be real-valued, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[0] == 0 or (arr.ndim == 2 and arr.shape[1] != n):
        raise ValueError(
            f"`lrs` has shape {arr.shape}; use one rate per sweep point (k,) or per point and train example (k, {n})"
        )
    if not is_traced(arr):
        host = np.asarray(arr)
        for rule, bad in (
            ("finite", ~np.isfinite(host)),
            (">= 0 (to ascend the loss, negate loss_fn instead)", np.isfinite(host) & (host < 0)),
        ):
            if bad.any():
                at = tuple(int(i) for i in np.argwhere(bad)[0])
                where = ", ".join(map(str, at))
                raise ValueError(f"`lrs[{where}]` is {float(host[at]):.6g}; every learning rate must be {rule}")
    return arr if jnp.issubdtype(arr.dtype, jnp.floating) else arr.astype(jnp.float32)


def finite(name: str, tree: Any) -> None:
    """ValueError naming the first floating leaf of `tree` with NaN or inf (traced leaves skipped)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_traced(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        bad = ~np.isfinite(np.asarray(leaf))
        if bad.any():
            first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))
            raise ValueError(
                f"`{name}`{jax.tree_util.keystr(path)} has {int(bad.sum())} non-finite values (first at {first}); "
                "remove or fix them: the EIF of non-finite inputs is undefined"
            )


def device_list(devices: Any) -> list:
    """`devices` (None: all of jax.devices()) as a non-empty list of distinct jax.Device; errors name the
    entry that is not one."""
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, (str, bytes, jax.Device)):
        raise TypeError(
            f"`devices` must be a list of jax.Device (e.g. jax.devices() or jax.devices('cpu')), got "
            f"{devices!r}; pass [device] for one device"
        )
    try:
        out = list(devices)
    except TypeError:
        raise TypeError(f"`devices` must be a list of jax.Device, got {type(devices).__name__}") from None
    if not out:
        raise ValueError("`devices` is empty; pass at least one jax.Device or None for all devices")
    for k, d in enumerate(out):
        if not isinstance(d, jax.Device):
            raise TypeError(
                f"`devices[{k}]` is a {type(d).__name__} ({d!r}), not a jax.Device; pass devices from jax.devices()"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"`devices` lists a device twice ({out}); pass each device once")
    return out


def positive_real(name: str, value: Any) -> float:
    """`value` as a float, finite and > 0; a TypeError or ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number > 0, got {value!r} ({type(value).__name__})")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")


def scalar_loss(loss_fn: Any, params: Any, example: Any, name: str) -> None:
    """loss_fn(params, example) must be a floating scalar; checked abstractly (no compute)."""
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(params, example), got {type(loss_fn).__name__}")
    try:
        out = jax.eval_shape(loss_fn, params, example)
    except Exception as e:
        e.add_note(f"jaxeif: raised by loss_fn(params, {name}[0]); loss_fn takes ONE example (no leading axis)")
        raise
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != () or not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"loss_fn(params, {name}[0]) must return a float scalar, got {out}; "
            "reduce the loss of one example to a scalar (e.g. with .mean())"
        )


def nonfinite_rows(matrix: jax.Array) -> np.ndarray:
    """Indices of rows holding a NaN or infinity."""
    return np.flatnonzero(~np.all(np.isfinite(np.asarray(matrix)), axis=1))


def raise_if_nonfinite(matrix: jax.Array, lr: jax.Array) -> None:
    rows = nonfinite_rows(matrix)
    if rows.size:
        lr_np = np.broadcast_to(np.asarray(lr), (matrix.shape[0],))
        raise NonFiniteInfluenceError(
            f"{rows.size} of {matrix.shape[0]} fine-tunes diverged (non-finite influence) in rows "
            f"{rows.tolist()[:20]}{' ...' if rows.size > 20 else ''} with lr {lr_np[rows][:5].tolist()}; "
            "lower lr or steps for those samples",
            rows,
            np.asarray(matrix),
        )


# ----------------------------------------------------------------------------- framework state in params


class ParamsLeafError(Error, TypeError):
    """A leaf of `params` (or of a Partial loss's bound values) is not an array: a function, module, string..."""


class ModelStateError(Error, ValueError):
    """`params` holds model state that is not weights (Linen collections, nnx BatchStat / Rng / Cache variables)."""


# Linen collections that hold state, not weights; fine-tuning them by SGD is never what a user meant.
LINEN_STATE_COLLECTIONS = ("batch_stats", "intermediates", "cache")
# nnx Variable types that hold state, not weights (looked up on flax.nnx when it is loaded).
NNX_STATE_TYPES = ("BatchStat", "RngState", "Cache", "Intermediate")

_SPLIT_HINT = (
    "Keep only the arrays to fine-tune in params and pass the rest another way: an Equinox module through "
    "`params, static = eqx.partition(model, eqx.is_inexact_array)` (or jaxeif.frameworks.eqx_loss), an nnx module "
    "through `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` (or jaxeif.frameworks.nnx_loss), other "
    "values (functions, strings, settings) closed over by loss_fn or bound with functools.partial; "
    "see docs/your_model.md"
)


def _is_array_leaf(leaf: Any) -> bool:
    """An array jax can take as a program input: jax/numpy arrays (not dtype object) and Python numbers."""
    if isinstance(leaf, (jax.Array, np.generic, numbers.Number)):
        return True
    return isinstance(leaf, np.ndarray) and leaf.dtype != object


def _leaf_kind(leaf: Any) -> str:
    """The type of a leaf and a short repr (a function's name where it has one)."""
    name = getattr(leaf, "__name__", None)
    text = f"{name!r}" if isinstance(name, str) else repr(leaf)
    return f"{type(leaf).__module__}.{type(leaf).__qualname__} ({text[:60] + '...' if len(text) > 60 else text})"


def check_param_leaves(params: Any, loss_fn: Any = None) -> None:
    """ParamsLeafError naming the first leaf of `params`, or of a `jax.tree_util.Partial` loss_fn's bound values,
    that is not an array (in params, Python numbers are refused too; bound in a Partial they become arrays).

    Every leaf of params is fine-tuned and every bound value of a Partial enters the compiled program as an
    input, so both must be arrays; a function (an Equinox module's activation), a module object or a string
    there otherwise fails deep inside jax with a message that names neither the leaf nor the fix.

    Raises:
        ParamsLeafError: naming the leaf's path (jax.tree_util.keystr), its type, and how to split it off.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, numbers.Number) and not isinstance(leaf, (jax.Array, np.generic)):
            raise ParamsLeafError(
                f"`params`{jax.tree_util.keystr(path)} is a Python {type(leaf).__name__} ({leaf!r}), not an array: "
                "jaxeif fine-tunes every leaf of params, and a Python number there is usually a setting (an Equinox "
                "Dropout's rate or inference flag). If it is a weight to fine-tune, pass jnp.asarray(value); "
                f"otherwise split it off. {_SPLIT_HINT}"
            )
        if not _is_array_leaf(leaf):
            raise ParamsLeafError(
                f"`params`{jax.tree_util.keystr(path)} is {_leaf_kind(leaf)}, not an array: jaxeif fine-tunes every "
                f"leaf of params. {_SPLIT_HINT}"
            )
    if isinstance(loss_fn, jax.tree_util.Partial):
        bound = [(f"args[{i}]", a) for i, a in enumerate(loss_fn.args)]
        bound += [(f"keywords[{k!r}]", v) for k, v in loss_fn.keywords.items()]
        for where, value in bound:
            for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
                if not _is_array_leaf(leaf):
                    raise ParamsLeafError(
                        f"`loss_fn` (a jax.tree_util.Partial) binds {where}{jax.tree_util.keystr(path)} = "
                        f"{_leaf_kind(leaf)}, not an array: a Partial's bound values enter the compiled program as "
                        "array inputs. Bind only arrays (frozen weights, batch_stats) with Partial and fix the rest "
                        "first with functools.partial or a closure, e.g. "
                        "`jax.tree_util.Partial(functools.partial(f, activation), frozen_arrays)`; for a module, "
                        "split its arrays from its static part (eqx.partition / nnx.split)"
                    )


def check_not_model_state(params: Any) -> None:
    """ModelStateError when `params` holds model state besides weights, which jaxeif would fine-tune as weights.

    Two shapes are recognised: a Flax Linen `variables` dict (top-level "params" beside "batch_stats",
    "intermediates" or "cache"), and Flax nnx state or modules holding BatchStat, RngState, Cache or
    Intermediate variables (looked for only when flax.nnx is imported).

    Raises:
        ModelStateError: naming the collection or the variable's path and type, and the fix.
    """
    if isinstance(params, collections.abc.Mapping) and "params" in params:
        state = [k for k in LINEN_STATE_COLLECTIONS if k in params]
        if state:
            raise ModelStateError(
                f"`params` looks like a Flax Linen `variables` dict: it holds the collection(s) {state} beside "
                f"'params', and jaxeif would fine-tune {state[0]!r} as if it were weights. Pass "
                "`variables['params']` as params and bind the rest in the loss as an input, e.g. "
                "`loss_fn = jax.tree_util.Partial(lambda state, params, ex: loss(model.apply({'params': params, "
                "**state}, ex['x']), ex), {k: v for k, v in variables.items() if k != 'params'})` "
                "(docs/your_model.md); if these really are weights, store them under other keys"
            )
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return
    kinds = tuple(getattr(nnx, name) for name in NNX_STATE_TYPES if hasattr(nnx, name))
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
        if isinstance(leaf, kinds):
            raise ModelStateError(
                f"`params`{jax.tree_util.keystr(path)} is an nnx.{type(leaf).__name__}, model state that jaxeif would "
                "fine-tune as if it were weights. Split the weights off: `graphdef, params, rest = nnx.split(model, "
                "nnx.Param, ...)` and rebuild the model in the loss with nnx.merge(graphdef, params, rest), with rest "
                "bound in a jax.tree_util.Partial, or use jaxeif.frameworks.nnx_loss(model, loss) (docs/your_model.md)"
            )


def model_inputs(params: Any, loss_fn: Any = None) -> None:
    """check_not_model_state and check_param_leaves: what params and a Partial loss's bound values may hold."""
    check_not_model_state(params)
    check_param_leaves(params, loss_fn)
