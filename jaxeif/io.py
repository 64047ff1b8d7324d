"""Files that survive crashes, in one place: atomic files and folders, JSON, and orbax checkpoints.

A write goes to a temp file (or folder) beside its target and is renamed into place when complete,
so a reader sees the old content or the new, never half of it; a process killed mid-write leaves a
`.NAME.<16 hex>.draft.tmp` behind, which never looks complete (`RunDir.open` removes them, and only them).
A file is read back and compared with what was meant (size and sha256) before its rename.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as stdio
import json
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxeif.errors import Error

# ----------------------------------------------------------------------------- atomic files and folders
DRAFT_SUFFIX = ".draft.tmp"
_DRAFT = re.compile(r"^\..+\.[0-9a-f]{16}" + re.escape(DRAFT_SUFFIX) + "$")


class WriteError(Error, OSError):
    """A file could not be written in full (disk full, file-size limit, ...); the previous file is intact."""


def is_draft(name: str) -> bool:
    """Whether a file name is one of jaxeif's temp files (`.NAME.<16 hex>.draft.tmp`), never a user's file."""
    return bool(_DRAFT.match(name))


def sha256_bytes(data: bytes) -> str:
    """The sha256 of `data` as hex (what `write_atomic` returns and a RunDir's manifest records)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: os.PathLike | str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _write_error(path: pathlib.Path, nbytes: int, e: OSError) -> WriteError:
    """A WriteError naming the file, the bytes it needed and the fix for the OS's reason."""
    fixes = {
        errno.ENOSPC: "free space on that file system or write elsewhere (--out)",
        errno.EDQUOT: "free space within your disk quota or write elsewhere (--out)",
        errno.EFBIG: "raise the file-size limit (`ulimit -f unlimited`) or write elsewhere (--out)",
        errno.EACCES: "make the folder writable or write elsewhere (--out)",
        errno.EROFS: "the file system is read-only; write elsewhere (--out)",
    }
    fix = fixes.get(e.errno, "check the folder and the file system, then run the same command again")
    err = WriteError(
        e.errno or errno.EIO,
        f"could not write {path} ({e.strerror or e}): {nbytes} bytes needed; "
        f"{fix}. The previous {path.name}, if any, is unchanged",
    )
    return err


def write_atomic(path: os.PathLike | str, data: bytes) -> str:
    """Write `data` to `path` through a draft file beside it; returns its sha256.

    The draft is created with mode 0o666 less the umask (as any program's files), written in full,
    fsynced, read back and compared (size and sha256) before it is renamed into place, so a short
    write (file-size limit, full disk) never replaces the previous file. Raises WriteError naming the
    file, the bytes needed and the fix."""
    path = pathlib.Path(path)
    data = bytes(data)
    expected = sha256_bytes(data)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{DRAFT_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        size = os.stat(tmp).st_size
        if size != len(data) or sha256_file(tmp) != expected:
            raise WriteError(
                errno.EIO,
                f"{path} read back as {size} bytes that differ from the {len(data)} "
                "written (a full disk or a failing file system); free space or write elsewhere (--out)."
                f" The previous {path.name}, if any, is unchanged",
            )
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, len(data), e) from None
        raise
    fsync_dir(path.parent)
    return expected


@contextlib.contextmanager
def atomic_file(path: os.PathLike | str, mode: str = "wb") -> Iterator[Any]:
    """A buffer to fill; on success its content is written to `path` by `write_atomic` (verified, then
    renamed into place). `mode` "wb" gives a binary buffer, "w" a text one (UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    buffer = stdio.BytesIO() if mode == "wb" else stdio.StringIO()
    yield buffer
    data = buffer.getvalue()
    write_atomic(path, data if mode == "wb" else data.encode("utf-8"))


def fsync_dir(folder: pathlib.Path) -> None:
    """Make a rename or a new file in `folder` durable (fsync the folder itself; a no-op where the OS refuses).

    Args:
        folder: the folder whose entries changed.
    """
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
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}{DRAFT_SUFFIX}"
    tmp.mkdir()  # 0o777 less the umask, as any program's folders
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
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which cannot be saved as JSON; use numbers, strings, lists or dicts"
    )


def json_text(obj: Any, where: str = "value") -> str:
    """`obj` as indented JSON with sorted keys (NaN allowed), after `to_jsonable`."""
    return json.dumps(to_jsonable(obj, where), indent=2, sort_keys=True, allow_nan=True) + "\n"


def save_json(path: os.PathLike | str, obj: Any, where: str | None = None) -> pathlib.Path:
    """Write `obj` as JSON to `path` atomically; a TypeError names the key that cannot be saved."""
    path = pathlib.Path(path)
    write_atomic(path, json_text(obj, path.name if where is None else where).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- orbax checkpoints
def _ocp():
    """orbax.checkpoint, imported on first use: it pulls in tensorstore (about 0.25 s on import) and only
    checkpointing needs it."""
    import orbax.checkpoint as ocp

    return ocp


def checkpoint_manager(
    folder: os.PathLike | str,
    *,
    max_to_keep: int | None = None,
    save_interval_steps: int = 1,
    cleanup_tmp_directories: bool = False,
):
    """A synchronous orbax CheckpointManager over `folder`: each step is written to a temp folder and
    finalised by rename; `cleanup_tmp_directories` drops those of a killed writer."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=cleanup_tmp_directories,
    )
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
