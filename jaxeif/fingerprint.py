"""What determines a result, as a digest, so that a resumed run can refuse another computation's numbers.

`digest(*objs)` hashes a JSON description of each object (`describe`). The rule, per kind of value:

- numbers, strings, None: by value; numpy and jax arrays (PRNG keys included): dtype, shape and bytes.
- dicts, lists, tuples, NamedTuples (optax's GradientTransformation), sets: their items, to any depth.
- functions: module, qualified name, bytecode and constants, defaults and closure cells (what they hold,
  recursively: an optax transformation's hyper-parameters and schedules live there). A function of the
  user's code (not of an installed package, the standard library or jaxeif) also brings every
  module-level value its code names (`co_names`, nested lambdas included), recursively: a module-level
  activation or constant that a loss calls or reads is part of the loss.
- `functools.partial` / `jax.tree_util.Partial`, bound methods, `__wrapped__` (jax.jit, functools.wraps):
  the function and what is bound to it.
- dataclasses (flax and equinox modules), and objects with a `__dict__` or `__slots__` (a callable
  class's instance, its state): the class (for the user's classes, also their functions) and every field.
- anything else of the user's code: `FingerprintError`; nothing can be seen of what it computes, so a
  resume is refused rather than trusted. Opaque objects of installed packages are recorded by type.

What cannot be seen: values reached through a module attribute of another module (`mymod.SCALE`), files
the loss reads, and the state of objects outside Python. Start a fresh run (a new folder, or
`runs.sweep_eif(..., fresh=True)`) after changing those.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
import types
from typing import Any

import jax
import numpy as np

from jaxeif.errors import Error

MAX_DEPTH = 256  # nesting levels of one description; deeper is refused (cycles are cut before)

FRESH_HINT = (
    "start a fresh run instead: a new results folder (--out) or checkpoint_dir, or "
    "runs.sweep_eif(..., fresh=True); or make it a dataclass or a jax.tree_util.Partial of arrays"
)


class FingerprintError(Error, TypeError):
    """A value that determines a result has nothing that can be hashed, so a resume cannot be checked."""


_MEMO: dict = {}  # id -> (object, description) during one digest() call (keeps the object alive)
_LIBRARY_TOPS = frozenset({"jaxeif", "builtins", "jax", "jaxlib", "numpy", "optax", "flax", "equinox"})


def digest(*objs: Any) -> str:
    """A short hex digest of `describe(obj)` for every obj; FingerprintError if one cannot be described."""
    _MEMO.clear()
    try:
        text = json.dumps([describe(o, where=f"argument {i}") for i, o in enumerate(objs)], sort_keys=True, default=str)
    finally:
        _MEMO.clear()
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def array_digest(x: Any) -> list:
    """[dtype, shape, blake2b of the bytes] of one array (PRNG keys by their key data)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    arr = np.ascontiguousarray(np.asarray(x))
    return [str(arr.dtype), list(arr.shape), hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()]


def describe(obj: Any, depth: int = 0, seen: frozenset = frozenset(), where: str = "value") -> Any:
    """A JSON-able description of `obj` that changes when what it computes (as far as can be seen) changes."""
    if depth > MAX_DEPTH:
        raise FingerprintError(
            f"{where} nests deeper than {MAX_DEPTH} levels, so it cannot be fingerprinted; " + FRESH_HINT
        )
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (float, complex, np.generic, bytes)):
        return repr(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        if isinstance(obj, jax.core.Tracer):
            return {"traced": str(obj.aval)}
        return {"array": array_digest(obj)}
    if id(obj) in seen:
        return "<cycle>"
    if id(obj) in _MEMO:  # an object reached along several paths is described once
        return _MEMO[id(obj)][1]

    def more(items: list, label: str) -> list:
        return [describe(x, depth + 1, seen | {id(obj)}, f"{where}{label}[{i}]") for i, x in enumerate(items)]

    out = _describe(obj, more, where)
    if not isinstance(obj, (dict, list, tuple, set, frozenset)):
        _MEMO[id(obj)] = (obj, out)
    return out


def _describe(obj: Any, more, where: str) -> Any:
    if isinstance(obj, type):
        return _class(obj, more)
    if isinstance(obj, (np.dtype, types.ModuleType)):
        return str(obj)
    if isinstance(obj, dict):
        keys = sorted(obj, key=str)
        return {"dict": [[str(k), v] for k, v in zip(keys, more([obj[k] for k in keys], ".values"))]}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple, e.g. optax's GradientTransformation
        return {_name(type(obj)): dict(zip(obj._fields, more(list(obj), "")))}
    if isinstance(obj, (list, tuple)):
        return more(list(obj), "")
    if isinstance(obj, (set, frozenset)):
        return sorted(map(str, obj))
    if isinstance(obj, functools.partial):
        return {"partial": more([obj.func, list(obj.args), obj.keywords], ".partial")}
    if inspect.ismethod(obj):
        return {"method": more([obj.__func__, obj.__self__], ".method")}
    if isinstance(obj, types.FunctionType):
        return _function(obj, more)
    if isinstance(obj, (types.BuiltinFunctionType, np.ufunc)):
        return {"builtin": f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', obj.__name__)}"}
    if hasattr(obj, "__wrapped__"):  # jax.jit, functools.wraps
        return {"wrapped": more([obj.__wrapped__], ".__wrapped__")}
    cls = type(obj)
    if dataclasses.is_dataclass(obj):
        fields = [f.name for f in dataclasses.fields(obj) if f.name not in ("parent", "name")]
        return {
            _name(cls): dict(zip(fields, more([getattr(obj, f, None) for f in fields], ".fields"))),
            "class": _class(cls, more),
        }
    state = _state(obj)
    if state is not None:
        keys = sorted(state)
        return {
            "object": _name(cls),
            "class": _class(cls, more),
            "state": dict(zip(keys, more([state[k] for k in keys], ".__dict__"))),
        }
    if _is_library(cls.__module__):
        return {"opaque": _name(cls)}
    raise FingerprintError(
        f"{where} is a {_name(cls)}, which has no code, fields or state that jaxeif can hash, so a resumed run "
        f"could not tell whether it changed; {FRESH_HINT}"
    )


def _state(obj: Any) -> dict | None:
    """The instance attributes of `obj` (`__dict__` and `__slots__`), or None when it has neither."""
    state = dict(vars(obj)) if hasattr(obj, "__dict__") and isinstance(vars(obj), dict) else None
    slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
    slots = [s for s in slots if s not in ("__dict__", "__weakref__") and hasattr(obj, s)]
    if slots:
        state = {**(state or {}), **{s: getattr(obj, s) for s in slots}}
    return state


def _class(cls: type, more) -> Any:
    """A class by name; the user's classes also by their own functions and class-level values."""
    if _is_library(cls.__module__):
        return _name(cls)
    own = {
        k: v
        for k, v in vars(cls).items()
        if not (k.startswith("__") and k.endswith("__")) or k in ("__call__", "__init__", "__post_init__")
    }
    own = {
        k: (v.__func__ if isinstance(v, (staticmethod, classmethod)) else v)
        for k, v in own.items()
        if not isinstance(v, (property, types.MemberDescriptorType, types.GetSetDescriptorType))
    }
    keys = sorted(own)
    return {
        "class": _name(cls),
        "bases": [_name(b) for b in cls.__bases__],
        "own": dict(zip(keys, more([own[k] for k in keys], f".{cls.__qualname__}"))),
    }


def _name(t: Any) -> str:
    return f"{getattr(t, '__module__', None)}.{getattr(t, '__qualname__', getattr(t, '__name__', '?'))}"


@functools.cache
def _is_library(module: str | None) -> bool:
    """Whether `module` belongs to an installed package, the standard library or jaxeif (versioned code,
    whose module-level values are not walked), rather than to the user's own code."""
    if not module:
        return True
    top = module.split(".")[0]
    if top == "__main__":
        return False
    if top in _LIBRARY_TOPS or top in sys.stdlib_module_names:
        return True
    file = getattr(sys.modules.get(top), "__file__", None) or ""
    return any(part in ("site-packages", "dist-packages") for part in os.path.normpath(file).split(os.sep))


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


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name that `code` and the code objects nested in it use."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _function(fn: types.FunctionType, more) -> dict:
    """A function by name, code, defaults, closure, and (for the user's code) the module-level values it reads."""
    cells = [c.cell_contents if cell_filled(c) else None for c in fn.__closure__ or ()]
    out = {
        "function": f"{fn.__module__}.{fn.__qualname__}",
        "code": _code(fn.__code__),
        "rest": more([list(fn.__defaults__ or ()), fn.__kwdefaults__, cells], f".{fn.__qualname__}"),
    }
    if not _is_library(fn.__module__):
        names = sorted(n for n in _names(fn.__code__) if n in fn.__globals__)
        out["globals"] = dict(zip(names, more([fn.__globals__[n] for n in names], f".{fn.__qualname__}.globals")))
    return out


def cell_filled(cell) -> bool:
    """Whether a closure cell holds a value (reading an empty one raises ValueError)."""
    try:
        cell.cell_contents  # noqa: B018  (the read is the test)
    except ValueError:
        return False
    return True
