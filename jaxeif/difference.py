"""Exact differences without cancellation: f(p + d) - f(p) by propagating the change through f's jaxpr.

Computing `f(p + d) - f(p)` as two values and a subtraction loses everything below the rounding of f
itself: an EIF entry smaller than ~1e-7 x the loss is noise in float32. `propagate` instead walks the
jaxpr of f carrying, for every intermediate value, its base value v and its change dv, with one rule
per primitive that computes dv accurately from (v, dv) of the inputs:

- linear maps (add, reshape, slices, gathers, sums, ...) are exact: d(L x) = L dx;
- bilinear maps (mul, dot_general, conv_general_dilated) by the product rule with the second-order
  term kept: d(x y) = dx (y + dy) + x dy;
- max-like maps (max, min, reduce_max, reduce_window_max, select_n, abs) by the argmax form:
  max(r + dr) - max(r) = max_k((r_k - r_max) + dr_k), exact where the argmax does not change;
- transcendentals in closed forms with expm1 / log1p (exp: e^x expm1(dx); log: log1p(dx / x); ...).

A change of None means "unchanged" (e.g. the data argument), so data-only parts of the graph are
computed once, as in f; base values never depend on the deltas, so under `jax.vmap` over deltas XLA
computes them once for all rows. Integer and boolean values carry their *new* value instead of a
difference (comparisons, argmax, label indexing). A primitive without a rule is an error naming it.

Primitives computed directly from new inputs (no cancellation possible): those with integer or
boolean outputs, and sign/floor/ceil/round (their differences are small integers, exact).
Not covered (a clear error): erf and other special functions without a cancellation-free closed form
(use the tanh form of GELU), while/cond, sort, reduce_prod, cumulative max/prod, and gathers or
dynamic slices whose indices move with the delta. Accuracy is per primitive: where the model's own
expression cancels (cross-entropy lse(z) - z_y of a prediction with 1 - p_y near eps), the relative
accuracy of that entry drops to about eps / (1 - p_y), still far above the direct difference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

from jaxeif.errors import Error

PyTree = Any
Slot = Any  # float values: the difference (None: zero); integer/bool values: the new value (None: unchanged)


class UnsupportedPrimitiveError(Error, NotImplementedError):
    """The function uses a primitive that has no difference rule, or uses it in an unsupported way.

    The message names the primitive; `supported_primitives()` lists those with a rule.
    """


# ----------------------------------------------------------------------------- public API
def propagate(f: Callable, primals: Sequence[PyTree], deltas: Sequence[PyTree | None]) -> PyTree:
    """f(*(p + d)) - f(*p), computed by propagating the differences d through the jaxpr of f.

    No two outputs are subtracted: each intermediate carries its base value and its change, with one exact
    rule per primitive, so a tiny change keeps the dtype's relative accuracy. Jittable, vmappable and
    differentiable in primals and deltas.

    Args:
        f: a JAX-traceable function.
        primals: its arguments p, a tuple of pytrees.
        deltas: one change per argument, same structure as its primal; None (or a None leaf) leaves it
            unchanged. Integer leaves are added to the primal exactly.

    Returns:
        The change of every output: float outputs their difference, integer outputs new - old, boolean
        outputs new != old.

    Raises:
        ValueError: `primals` and `deltas` differ in length or structure.
        UnsupportedPrimitiveError: f uses a primitive without a rule.
    """
    primals, deltas = tuple(primals), tuple(deltas)
    if len(primals) != len(deltas):
        raise ValueError(
            f"propagate: {len(primals)} primals but {len(deltas)} deltas; pass one delta (or None) per argument"
        )
    leaves, in_tree = jax.tree.flatten(primals)
    slots = _flatten_deltas(primals, deltas, leaves)
    specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    def flat_f(*xs):
        return f(*jax.tree.unflatten(in_tree, xs))

    closed, out_shape = jax.make_jaxpr(flat_f, return_shape=True)(*specs)
    leaves = [jnp.asarray(x) for x in leaves]
    outs = _eval(closed.jaxpr, closed.consts, leaves, slots)
    diffs = [_as_difference(b, s) for b, s in outs]
    return jax.tree.unflatten(jax.tree.structure(out_shape), diffs)


def loss_difference(loss_fn: Callable, params: PyTree, delta: PyTree, example: PyTree) -> jax.Array:
    """loss_fn(params + delta, example) - loss_fn(params, example), to the relative accuracy of the dtype.

    What `precision=jaxeif.Precision(difference=True)` computes per entry of the EIF. Vmappable over delta
    (rows) and example (evals), jittable, differentiable in delta and params.

    Args:
        loss_fn: `loss_fn(params, example) -> scalar`.
        params: the base params.
        delta: the change of the params (e.g. a fine-tune's summed updates), same structure.
        example: one example.

    Returns:
        f32[] (the loss's dtype) the change of the loss.

    Raises:
        UnsupportedPrimitiveError: loss_fn uses a primitive without a rule.
    """
    return propagate(loss_fn, (params, example), (delta, None))


def supported_primitives() -> list[str]:
    """Names of the primitives with a difference rule.

    Returns:
        Sorted primitive names.
    """
    return sorted(set(_RULES) | set(_CALLS))


# ----------------------------------------------------------------------------- helpers
def _flatten_deltas(primals, deltas, leaves) -> list[Slot]:
    slots = []
    for p, d in zip(primals, deltas):
        treedef = jax.tree.structure(p)
        if d is None:
            slots += [None] * treedef.num_leaves
            continue
        try:
            ds = treedef.flatten_up_to(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"propagate: a delta does not have the structure of its primal {treedef}: {e}") from None
        slots += ds
    out = []
    for x, d in zip(leaves, slots):
        if d is None:
            out.append(None)
        elif _is_float(x):
            out.append(jnp.asarray(d, jnp.result_type(x)))
        else:
            out.append(jnp.asarray(x) + jnp.asarray(d, jnp.result_type(x)))
    return out


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _as_difference(base, slot):
    """The output difference: new - old; for booleans new != old (the outputs that flipped)."""
    if slot is None:
        return jnp.zeros_like(base)
    if _is_float(base):
        return slot
    return slot != base if jnp.result_type(base) == jnp.bool_ else slot - base


def _zeros(x):
    return jnp.zeros(jnp.shape(x), jnp.result_type(x))


def _or_zeros(base, slot):
    return _zeros(base) if slot is None else slot


def _new(base, slot):
    """The new value: base + difference for floats, the carried new value otherwise."""
    if slot is None:
        return base
    return base + slot if _is_float(base) else slot


def _materialize(base, slot):
    """A slot that is never None (zeros / the base value where unchanged)."""
    if slot is not None:
        return slot
    return _zeros(base) if _is_float(base) else base


def _read(env, v):
    if isinstance(v, jex.Literal):
        return jnp.asarray(v.val, v.aval.dtype), None
    return env[v]


def _eval(jaxpr: jex.Jaxpr, consts, bases, slots) -> list[tuple[Any, Slot]]:
    """Walk the equations of `jaxpr`: [(base, slot)] of its outputs."""
    env = {}

    def write(v, b, s):
        if not isinstance(v, jex.DropVar):
            env[v] = (b, s)

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c, None)
    for v, b, s in zip(jaxpr.invars, bases, slots):
        write(v, b, s)
    for eqn in jaxpr.eqns:
        ins = [_read(env, v) for v in eqn.invars]
        bs, ss = [b for b, _ in ins], [s for _, s in ins]
        outs_b, outs_s = _apply(eqn, bs, ss)
        for v, b, s in zip(eqn.outvars, outs_b, outs_s):
            write(v, b, s)
    return [_read(env, v) for v in jaxpr.outvars]


def _apply(eqn, bases, slots):
    """One equation: (output bases, output slots)."""
    prim, params = eqn.primitive, eqn.params
    name = prim.name
    if name in _CALLS:
        return _CALLS[name](eqn, bases, slots)
    out = prim.bind(*bases, **params)
    outs = list(out) if prim.multiple_results else [out]
    if all(s is None for s in slots):
        return outs, [None] * len(outs)
    if not any(_is_float(o) for o in outs):  # integer / boolean results: recompute from the new inputs
        new = prim.bind(*[_new(b, s) for b, s in zip(bases, slots)], **params)
        return outs, list(new) if prim.multiple_results else [new]
    if name not in _RULES:
        raise UnsupportedPrimitiveError(
            f"jaxeif.difference: no difference rule for primitive '{name}' (it sees a changed input); "
            f"supported: {', '.join(supported_primitives())}"
        )
    if name not in _INDEX_CHANGE_OK:
        for b, s in zip(bases, slots):
            if s is not None and not _is_float(b):
                raise UnsupportedPrimitiveError(
                    f"jaxeif.difference: primitive '{name}' has an integer/boolean operand (an index or mask) that "
                    "changes with the delta; only select_n and convert_element_type support that"
                )
    d = _RULES[name](out, bases, slots, **params)
    return outs, list(d) if prim.multiple_results else [d]


# ----------------------------------------------------------------------------- rules
# A rule gets (out, bases, slots, **params) and returns the output's difference (list if multiple results).
_RULES: dict[str, Callable] = {}
_CALLS: dict[str, Callable] = {}
_INDEX_CHANGE_OK = {"select_n", "convert_element_type"}


def _rule(*names):
    def register(fn):
        for n in names:
            _RULES[n] = fn
        return fn

    return register


def _linear_in(prim_name: str, positions: Sequence[int] | None):
    """Rule of a primitive linear in the operands at `positions` (None: all), the others held fixed."""

    def rule(out, bases, slots, **params):
        lin = range(len(bases)) if positions is None else positions
        for i, s in enumerate(slots):
            if i not in lin and s is not None:
                raise UnsupportedPrimitiveError(
                    f"jaxeif.difference: '{prim_name}' is linear only in operands {list(lin)}; "
                    f"operand {i} changes with the delta"
                )
        args = [_or_zeros(b, s) if i in lin else b for i, (b, s) in enumerate(zip(bases, slots))]
        return _PRIMS[prim_name].bind(*args, **params)

    return rule


_PRIMS: dict[str, Any] = {}


def _register_linear(name: str, positions: Sequence[int] | None = None):
    prim = getattr(lax, name.replace("-", "_") + "_p", None)
    if prim is not None:
        _PRIMS[name] = prim
        _RULES[name] = _linear_in(name, positions)


for _name in (
    "add",
    "sub",
    "neg",
    "reshape",
    "squeeze",
    "expand_dims",
    "broadcast_in_dim",
    "transpose",
    "rev",
    "slice",
    "reduce_sum",
    "concatenate",
    "pad",
    "cumsum",
    "copy",
    "reduce_window_sum",
    "real",
    "imag",
    "conj",
    "complex",
    "split",
):
    _register_linear(_name)
_register_linear("dynamic_slice", (0,))
_register_linear("dynamic_update_slice", (0, 1))
_register_linear("gather", (0,))
_register_linear("scatter-add", (0, 2))
_register_linear("scatter", (0, 2))


def _identity(out, bases, slots, **params):
    """Identity-like primitives found by name only (add_any, optimization_barrier, sharding_constraint)."""
    if len(bases) == 2 and not isinstance(out, (list, tuple)):  # add_any
        return _or_zeros(bases[0], slots[0]) + _or_zeros(bases[1], slots[1])
    ds = [_or_zeros(b, s) for b, s in zip(bases, slots)]
    return ds if isinstance(out, (list, tuple)) else ds[0]


for _name in ("add_any", "optimization_barrier", "sharding_constraint"):
    _RULES[_name] = _identity


@_rule("stop_gradient")
def _stop_gradient(out, bases, slots, **params):
    return lax.stop_gradient(slots[0])


@_rule("convert_element_type")
def _convert(out, bases, slots, new_dtype, **params):
    (x,), (s,) = bases, slots
    if _is_float(x):
        return lax.convert_element_type(s, new_dtype)
    return lax.convert_element_type(s, new_dtype) - out  # int/bool -> float, changed: small exact integers


# --- bilinear
def _bilinear(prim):
    def rule(out, bases, slots, **params):
        (x, y), (dx, dy) = bases, slots
        if dy is None:
            return prim.bind(dx, y, **params)
        if dx is None:
            return prim.bind(x, dy, **params)
        return prim.bind(dx, y + dy, **params) + prim.bind(x, dy, **params)

    _RULES[prim.name] = rule


for _p in (lax.mul_p, lax.dot_general_p, lax.conv_general_dilated_p):
    _bilinear(_p)


@_rule("div")
def _div(out, bases, slots, **params):
    """x/y: (dx y - x dy) / (y (y + dy)); dx / y when y is fixed."""
    (x, y), (dx, dy) = bases, slots
    if dy is None:
        return jnp.broadcast_to(dx, out.shape) / y
    x, y, dx, dy = (jnp.broadcast_to(a, out.shape) for a in (x, y, _or_zeros(x, dx), dy))
    return (dx * y - x * dy) / (y * (y + dy))


# --- max-like: the argmax form
def _bshape(out, *xs):
    return [jnp.broadcast_to(x, out.shape) for x in xs]


@_rule("max")
def _max(out, bases, slots, **params):
    (x, y), (dx, dy) = bases, slots
    x, y, dx, dy = _bshape(out, x, y, _or_zeros(x, dx), _or_zeros(y, dy))
    return jnp.maximum((x - out) + dx, (y - out) + dy)


@_rule("min")
def _min(out, bases, slots, **params):
    (x, y), (dx, dy) = bases, slots
    x, y, dx, dy = _bshape(out, x, y, _or_zeros(x, dx), _or_zeros(y, dy))
    return jnp.minimum((x - out) + dx, (y - out) + dy)


@_rule("clamp")
def _clamp(out, bases, slots, **params):
    """clamp(lo, x, hi) = min(max(x, lo), hi), each by the argmax form."""
    (lo, x, hi), (dlo, dx, dhi) = bases, slots
    t = lax.max(x, jnp.broadcast_to(lo, x.shape))
    dt = _max(t, [x, lo], [dx, dlo])
    return _min(out, [t, hi], [dt, dhi])


@_rule("reduce_max")
def _reduce_max(out, bases, slots, axes, **params):
    (r,), (dr,) = bases, slots
    return jnp.max((r - jnp.expand_dims(out, axes)) + dr, axis=axes)


@_rule("reduce_min")
def _reduce_min(out, bases, slots, axes, **params):
    (r,), (dr,) = bases, slots
    return jnp.min((r - jnp.expand_dims(out, axes)) + dr, axis=axes)


def _window_elements(x, fill, out_shape, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """For each offset inside the window, the [out_shape] array of the input element at that offset."""
    if any(b != 1 for b in base_dilation):
        raise UnsupportedPrimitiveError("jaxeif.difference: reduce_window with base_dilation != 1 is not supported")
    x = lax.pad(x, jnp.asarray(fill, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    for offset in itertools.product(*[range(w) for w in window_dimensions]):
        start = [k * d for k, d in zip(offset, window_dilation)]
        limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, window_strides)]
        yield lax.slice(x, start, limit, window_strides)


def _reduce_window_arg(reduce):
    def rule(out, bases, slots, **params):
        (r,), (dr,) = bases, slots
        fill = -jnp.inf if reduce is jnp.maximum else jnp.inf
        best = None
        for rk, drk in zip(
            _window_elements(r, fill, out.shape, **params), _window_elements(dr, 0, out.shape, **params)
        ):
            term = (rk - out) + drk
            best = term if best is None else reduce(best, term)
        return best

    return rule


_RULES["reduce_window_max"] = _reduce_window_arg(jnp.maximum)
_RULES["reduce_window_min"] = _reduce_window_arg(jnp.minimum)


@_rule("select_n")
def _select_n(out, bases, slots, **params):
    """Unchanged predicate: select the differences. Changed: compute directly only where it flips."""
    pred, *cases = bases
    dpred, *dcases = slots
    same = lax.select_n(pred, *[_or_zeros(c, d) for c, d in zip(cases, dcases)])
    if dpred is None:
        return same
    direct = lax.select_n(dpred, *[_new(c, d) for c, d in zip(cases, dcases)]) - out
    return jnp.where(dpred == pred, same, direct)


@_rule("abs")
def _abs(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    new = x + dx
    return jnp.where(jnp.sign(new) == jnp.sign(x), jnp.sign(x) * dx, jnp.abs(new) - out)


def _direct(fn):
    """Piecewise-constant maps: new - old is a small exact integer."""

    def rule(out, bases, slots, **params):
        return fn(bases[0] + slots[0]) - out

    return rule


_RULES["sign"] = _direct(jnp.sign)
_RULES["floor"] = _direct(jnp.floor)
_RULES["ceil"] = _direct(jnp.ceil)
_RULES["round"] = lambda out, bases, slots, **params: lax.round(bases[0] + slots[0], params["rounding_method"]) - out


# --- transcendentals in closed forms
# A closed form avoids cancellation when the change is small; for a large change (|dx| >= 1, or a
# relative change >= 1/2 for log) the direct difference loses nothing (its terms differ by a factor)
# and cannot overflow into 0 * inf the way a closed form can (e.g. exp(x) underflowed times expm1(dx)).


def _small_or_direct(small, closed, direct):
    """closed(where small) else direct; the closed form sees 0 where it is not used (no NaN in grads)."""
    return jnp.where(small, closed(small), direct)


@_rule("exp")
def _exp(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    return _small_or_direct(jnp.abs(dx) < 1, lambda s: out * jnp.expm1(jnp.where(s, dx, 0)), jnp.exp(x + dx) - out)


@_rule("exp2")
def _exp2(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    dx_e = dx * jnp.asarray(math.log(2.0), out.dtype)
    return _small_or_direct(jnp.abs(dx_e) < 1, lambda s: out * jnp.expm1(jnp.where(s, dx_e, 0)), jnp.exp2(x + dx) - out)


@_rule("expm1")
def _expm1(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    return _small_or_direct(
        jnp.abs(dx) < 1, lambda s: jnp.exp(x) * jnp.expm1(jnp.where(s, dx, 0)), jnp.expm1(x + dx) - out
    )


@_rule("log")
def _log(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    ratio = dx / x
    return _small_or_direct(jnp.abs(ratio) < 0.5, lambda s: jnp.log1p(jnp.where(s, ratio, 0)), jnp.log(x + dx) - out)


@_rule("log1p")
def _log1p(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    ratio = dx / (1 + x)
    return _small_or_direct(jnp.abs(ratio) < 0.5, lambda s: jnp.log1p(jnp.where(s, ratio, 0)), jnp.log1p(x + dx) - out)


def _sech2(x):
    """1 - tanh(x)^2 without cancellation or overflow: 4 e^{-2|x|} / (1 + e^{-2|x|})^2."""
    a = jnp.exp(-2 * jnp.abs(x))
    return 4 * a / (1 + a) ** 2


@_rule("tanh")
def _tanh(out, bases, slots, **params):
    """tanh(x + dx) - tanh(x) = tanh(dx) sech^2(x) / (1 + tanh(x) tanh(dx)) for |dx| < 1 (denominator > 0.23)."""
    (x,), (dx,) = bases, slots

    def closed(small):
        t = jnp.tanh(jnp.where(small, dx, 0))
        return t * _sech2(x) / (1 + out * t)

    return _small_or_direct(jnp.abs(dx) < 1, closed, jnp.tanh(x + dx) - out)


@_rule("logistic")
def _logistic(out, bases, slots, **params):
    """s(x + dx) - s(x) = -expm1(-dx) s(-x) s(x + dx) for |dx| < 1."""
    (x,), (dx,) = bases, slots
    closed = lambda small: -jnp.expm1(-jnp.where(small, dx, 0)) * jax.nn.sigmoid(-x) * jax.nn.sigmoid(x + dx)  # noqa: E731
    return _small_or_direct(jnp.abs(dx) < 1, closed, jax.nn.sigmoid(x + dx) - out)


@_rule("sqrt")
def _sqrt(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    den = jnp.sqrt(x + dx) + out
    return jnp.where(den == 0, jnp.zeros_like(dx), dx / jnp.where(den == 0, 1, den))


@_rule("rsqrt")
def _rsqrt(out, bases, slots, **params):
    """1/sqrt(x+dx) - 1/sqrt(x) = -dx rsqrt(x) rsqrt(x+dx) / (sqrt(x) + sqrt(x+dx))."""
    (x,), (dx,) = bases, slots
    new = x + dx
    return -dx * out * lax.rsqrt(new) / (jnp.sqrt(x) + jnp.sqrt(new))


def _pow_diff(x, dx, n: int):
    """(x + dx)^n - x^n for an integer n >= 1 by the binomial sum (no cancellation)."""
    total = jnp.zeros_like(dx)
    for k in range(n, 0, -1):  # Horner in dx: sum_k C(n,k) x^(n-k) dx^k
        total = (total + math.comb(n, k) * x ** (n - k)) * dx
    return total


@_rule("integer_pow")
def _integer_pow(out, bases, slots, y, **params):
    (x,), (dx,) = bases, slots
    if y == 0:
        return jnp.zeros_like(dx)
    if y > 0:
        return _pow_diff(x, dx, y)
    m = -y
    return -_pow_diff(x, dx, m) / (x**m * (x + dx) ** m)


@_rule("square")
def _square(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    return (x + x + dx) * dx


@_rule("pow")
def _pow(out, bases, slots, **params):
    """x^y for x > 0: x^y expm1(y log1p(dx/x) + dy log(x + dx))."""
    (x, y), (dx, dy) = bases, slots
    x, y, dx, dy = _bshape(out, x, y, _or_zeros(x, dx), _or_zeros(y, dy))
    return out * jnp.expm1(y * jnp.log1p(dx / x) + dy * jnp.log(x + dx))


@_rule("sin")
def _sin(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    return 2 * jnp.cos(x + dx / 2) * jnp.sin(dx / 2)


@_rule("cos")
def _cos(out, bases, slots, **params):
    (x,), (dx,) = bases, slots
    return -2 * jnp.sin(x + dx / 2) * jnp.sin(dx / 2)


# ----------------------------------------------------------------------------- nested jaxprs
def _call(eqn, bases, slots):
    """jit / closed_call / custom_jvp_call / custom_vjp_call / checkpoint: recurse into the primal jaxpr."""
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jex.ClosedJaxpr):
        jaxpr, consts = sub.jaxpr, sub.consts
    elif isinstance(sub, jex.Jaxpr):
        jaxpr, consts = sub, []
    else:
        raise UnsupportedPrimitiveError(f"jaxeif.difference: cannot find the jaxpr of '{eqn.primitive.name}'")
    outs = _eval(jaxpr, consts, bases, slots)
    return [b for b, _ in outs], [s for _, s in outs]


for _name in (
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "checkpoint",
    "remat",
):
    _CALLS[_name] = _call


def _scan(eqn, bases, slots):
    """lax.scan: a scan over (base, slot) pairs; which carries change is found by a fixed point."""
    p = eqn.params
    body: jex.ClosedJaxpr = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    c_b, k_b, x_b = bases[:nc], bases[nc : nc + nk], bases[nc + nk :]
    c_s, k_s, x_s = slots[:nc], slots[nc : nc + nk], slots[nc + nk :]
    k_changed = [s is not None for s in k_s]
    x_at = [jax.ShapeDtypeStruct(jnp.shape(b)[1:], jnp.result_type(b)) for b in x_b]

    def body_fn(changed, carry, xs):
        kb, ks = carry
        xb, xs_ = xs
        ks_full = _unpack(ks, changed)
        xs_full = _unpack(xs_, [s is not None for s in x_s])
        outs = _eval(body.jaxpr, body.consts, [*c_b, *kb, *xb], [*c_s, *ks_full, *xs_full])
        ob, os_ = [b for b, _ in outs], [s for _, s in outs]
        return ob, os_

    for _ in range(nk + 1):  # fixed point: a carry that changes once changes from then on
        k_shapes = [jax.ShapeDtypeStruct(jnp.shape(b), jnp.result_type(b)) for b in k_b]
        found = []

        def probe(kb, ks, xb, xs_, changed=tuple(k_changed)):
            ob, os_ = body_fn(list(changed), (kb, ks), (xb, xs_))
            found.append([s is not None for s in os_])
            return ob

        jax.eval_shape(
            probe,
            k_shapes,
            [k for k, c in zip(k_shapes, k_changed) if c],
            x_at,
            [x for x, s in zip(x_at, x_s) if s is not None],
        )
        new_changed = [a or b for a, b in zip(k_changed, found[0][:nk])]
        if new_changed == k_changed:
            break
        k_changed = new_changed
    y_changed = found[0][nk:]

    def step(carry, xs):
        ob, os_ = body_fn(k_changed, carry, xs)
        kb, yb = ob[:nk], ob[nk:]
        ks = [_materialize(b, s) for b, s, c in zip(kb, os_[:nk], k_changed) if c]
        ys = [s for s, c in zip(os_[nk:], y_changed) if c]
        return (kb, ks), (yb, ys)

    init = (list(k_b), [_materialize(b, s) for b, s, c in zip(k_b, k_s, k_changed) if c])
    xs = (list(x_b), [s for s in x_s if s is not None])
    (kb, ks), (yb, ys) = lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1))
    return [*kb, *yb], [*_unpack(ks, k_changed), *_unpack(ys, y_changed)]


def _unpack(present: list, changed: Sequence[bool]) -> list:
    it = iter(present)
    return [next(it) if c else None for c in changed]


_CALLS["scan"] = _scan
