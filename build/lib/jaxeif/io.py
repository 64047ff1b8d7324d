"""Files that survive crashes, in one place: atomic files and folders, JSON, and orbax checkpoints.

A write goes to a temp file (or folder) beside its target and is renamed into place when complete,
so a reader sees the old content or the new, never half of it; a process killed mid-write leaves a
`.NAME.*.tmp` behind, which never looks complete (`RunDir.open` removes them).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np


# ----------------------------------------------------------------------------- atomic files and folders
@contextlib.contextmanager
def atomic_file(path: os.PathLike | str, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and os.replace it into place."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: os.PathLike | str) -> Iterator[pathlib.Path]:
    """A temp folder beside `target` to fill; renamed into place when the block succeeds. When another
    writer got there first (`target` exists), its folder is kept and this one dropped."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Plain JSON types from numpy/jax scalars and arrays, tuples, paths; TypeError names the key."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{where} is a PRNG key, which cannot be saved as JSON; save the integer seed instead")
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist(), where) if arr.dtype == object else arr.tolist()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}; JSON keys must be strings")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where} is a {type(obj).__name__}, which cannot be saved as JSON; use numbers, strings, lists or dicts")


def json_text(obj: Any, where: str = "value") -> str:
    """`obj` as indented JSON with sorted keys (NaN allowed), after `to_jsonable`."""
    return json.dumps(to_jsonable(obj, where), indent=2, sort_keys=True, allow_nan=True) + "\n"


def save_json(path: os.PathLike | str, obj: Any, where: str | None = None) -> pathlib.Path:
    """Write `obj` as JSON to `path` atomically; a TypeError names the key that cannot be saved."""
    path = pathlib.Path(path)
    text = json_text(obj, path.name if where is None else where)
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return path


# ----------------------------------------------------------------------------- orbax checkpoints
def _ocp():
    """orbax.checkpoint, imported on first use: it pulls in tensorstore (about 0.25 s on import) and only
    checkpointing needs it."""
    import orbax.checkpoint as ocp

    return ocp


def checkpoint_manager(folder: os.PathLike | str, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
                       cleanup_tmp_directories: bool = False):
    """A synchronous orbax CheckpointManager over `folder`: each step is written to a temp folder and
    finalised by rename; `cleanup_tmp_directories` drops those of a killed writer."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=cleanup_tmp_directories)
    return ocp.CheckpointManager(pathlib.Path(folder).absolute(), options=options)


def save_step(manager, step: int, tree: Any, *, force: bool = False) -> None:
    """Save a pytree of arrays as `step` of `manager` (skipped off its save interval unless `force`)."""
    manager.save(step, args=_ocp().args.StandardSave(tree), force=force)


def restore_step(manager, step: int, like: Any) -> Any:
    """The pytree saved as `step` of `manager`, shaped like `like`."""
    return manager.restore(step, args=_ocp().args.StandardRestore(like))


def save_checkpoint(path: os.PathLike | str, tree: Any) -> None:
    """Save a pytree of arrays to the folder `path` (orbax; finalised by rename)."""
    checkpointer = _ocp().StandardCheckpointer()
    checkpointer.save(pathlib.Path(path).absolute(), tree)
    checkpointer.wait_until_finished()


def restore_checkpoint(path: os.PathLike | str, like: Any) -> Any:
    """The pytree saved by `save_checkpoint` in `path`, shaped like `like`."""
    return _ocp().StandardCheckpointer().restore(pathlib.Path(path).absolute(), like)


def checkpoint_metadata(path: os.PathLike | str) -> Any:
    """orbax's metadata of the checkpoint in `path` (shapes and dtypes, no arrays read)."""
    return _ocp().StandardCheckpointer().metadata(pathlib.Path(path).absolute())
