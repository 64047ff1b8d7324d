"""What determines a result, as a digest: arrays by their bytes, functions by their code, closures,
defaults and module-level values they read, optax transformations through their closures. Used to
refuse resuming a run whose inputs changed (`runs.sweep_eif`, `meta.fit`)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import types
from typing import Any

import jax
import numpy as np

MAX_DEPTH = 12


_MEMO: dict = {}  # id -> (function, description) during one digest() call


def digest(*objs: Any) -> str:
    """A short hex digest of `describe(obj)` for every obj."""
    _MEMO.clear()
    try:
        text = json.dumps([describe(o) for o in objs], sort_keys=True, default=str)
    finally:
        _MEMO.clear()
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def describe(obj: Any, depth: int = 0, seen: frozenset = frozenset()) -> Any:
    """A JSON-able description of `obj` that changes when what it computes (as far as can be seen) changes."""
    if depth > MAX_DEPTH:
        return "<deep>"
    more = functools.partial(_describe_all, depth=depth + 1, seen=seen | {id(obj)})
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (float, complex, np.generic)):
        return repr(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _array(obj)
    if id(obj) in seen:
        return "<cycle>"
    if isinstance(obj, (type, np.dtype, types.ModuleType)):
        return str(obj)
    if isinstance(obj, dict):
        return {"dict": sorted(([str(k), v] for k, v in zip(obj, more(list(obj.values())))), key=lambda kv: kv[0])}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple, e.g. optax's GradientTransformation
        return {_name(type(obj)): dict(zip(obj._fields, more(list(obj))))}
    if isinstance(obj, (list, tuple)):
        return more(list(obj))
    if isinstance(obj, (set, frozenset)):
        return sorted(map(str, obj))
    if isinstance(obj, functools.partial):
        return {"partial": more([obj.func, list(obj.args), obj.keywords])}
    if inspect.ismethod(obj):
        return {"method": more([obj.__func__, obj.__self__])}
    if isinstance(obj, types.FunctionType):
        if id(obj) not in _MEMO:  # a function reached along several paths is described once
            _MEMO[id(obj)] = (obj, _function(obj, more))
        return _MEMO[id(obj)][1]
    if hasattr(obj, "__wrapped__"):  # jax.jit, functools.wraps
        return {"wrapped": more([obj.__wrapped__])}
    if dataclasses.is_dataclass(obj):
        fields = [f.name for f in dataclasses.fields(obj) if f.name not in ("parent", "name")]
        return {_name(type(obj)): dict(zip(fields, more([getattr(obj, f, None) for f in fields])))}
    return {"type": _name(type(obj))}


def _describe_all(items: list, depth: int, seen: frozenset) -> list:
    return [describe(x, depth, seen) for x in items]


def _name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _array(x: Any) -> Any:
    if isinstance(x, jax.core.Tracer):
        return {"traced": str(x.aval)}
    arr = np.ascontiguousarray(np.asarray(x))
    return {"array": [str(arr.dtype), list(arr.shape), hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()]}


def _code(code: types.CodeType) -> str:
    """The bytecode, constants (nested code included) and names of a code object, hashed."""
    h = hashlib.blake2b(code.co_code, digest_size=16)
    for c in code.co_consts:
        h.update(_constant(c).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()


def _constant(c: Any) -> str:
    """A code constant as text, the same in every process (frozensets are ordered by string hashing)."""
    if isinstance(c, types.CodeType):
        return _code(c)
    if isinstance(c, frozenset):
        return "frozenset" + repr(sorted(map(_constant, c)))
    if isinstance(c, tuple):
        return "(" + ",".join(map(_constant, c)) + ")"
    return repr(c)


def _function(fn: types.FunctionType, more) -> dict:
    """A function by name, code, defaults, closure and the module-level values and functions it reads."""
    cells = [c.cell_contents if _filled(c) else None for c in fn.__closure__ or ()]
    globals_read = {name: fn.__globals__[name] for name in fn.__code__.co_names if name in fn.__globals__}
    globals_read = {k: v for k, v in globals_read.items() if _is_data(v) or _same_module_function(v, fn)}
    return {"function": f"{fn.__module__}.{fn.__qualname__}", "code": _code(fn.__code__),
            "rest": more([list(fn.__defaults__ or ()), fn.__kwdefaults__, cells, globals_read])}


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_data(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, np.ndarray, jax.Array, np.generic, tuple, list, dict))


def _same_module_function(v: Any, fn: types.FunctionType) -> bool:
    return isinstance(v, types.FunctionType) and v.__module__ == fn.__module__
