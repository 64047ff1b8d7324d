"""Results folders that survive crashes: atomic writes (jaxeif.io), resume-or-refuse, checkpointed EIF sweeps."""
from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import sys
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxeif import checks, fingerprint, io
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.influence import eif
from jaxeif.errors import Error

CONFIG_FILE = "config.json"
_LOCK_FILE = ".lock"
_HELD_LOCKS: dict[pathlib.Path, int] = {}  # folder -> fd of its flock, one per process


class RunDirError(Error, ValueError):
    """A results folder cannot be used as asked (exists with another config, unwritable, ...)."""


class CorruptCheckpointError(Error, ValueError):
    """A saved block or matrix cannot be read back; the message says which file to delete."""


# ----------------------------------------------------------------------------- run folders


class RunDir:
    """One results folder: its config.json, atomic saves, and a per-process lock."""

    def __init__(self, path: pathlib.Path, config: dict, resumed: bool):
        self.path = path
        self.config = config
        self.resumed = resumed

    @classmethod
    def open(cls, path: os.PathLike | str, config: dict, *, resume: bool = True) -> "RunDir":
        """A new folder, or an existing one whose saved config equals `config` (resume=True); else refuse."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(f"the results folder must be a path, got {path!r}")
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict of plain values, got {type(config).__name__}")
        if not isinstance(resume, bool):
            raise TypeError(f"`resume` must be True or False, got {resume!r}")
        path = pathlib.Path(path).expanduser().absolute()
        config = json.loads(io.json_text(config, "config"))  # normalise tuples, numpy scalars, paths
        if path.exists() and not path.is_dir():
            raise RunDirError(f"results folder {path} is an existing file; pass another --out")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create results folder {path}: {e.strerror or e}; pass a writable --out") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"results folder {path} is not writable; pass a writable --out or fix its permissions")
        _lock(path)
        for stale in path.glob(".*.tmp"):  # left by a process killed mid-write; never renamed into place
            stale.unlink(missing_ok=True)
        saved_file = path / CONFIG_FILE
        if saved_file.exists():
            saved = _read_config(saved_file)
            if saved != config:
                raise RunDirError(
                    f"results folder {path} holds a run with another config ({_config_diff(saved, config)}); "
                    "pass another --out, or delete that folder to start over"
                )
            if not resume:
                raise RunDirError(
                    f"results folder {path} already holds this run and resume=False; "
                    "pass another --out, or delete that folder to start over"
                )
            return cls(path, config, resumed=True)
        others = [p.name for p in path.iterdir() if p.name != _LOCK_FILE]
        if others:
            raise RunDirError(
                f"results folder {path} is not empty and has no {CONFIG_FILE} (holds {sorted(others)[:5]}); "
                "it is not a jaxeif run: pass another --out"
            )
        run = cls(path, config, resumed=False)
        run.save_json(CONFIG_FILE, config)
        return run

    # -- names and files
    def file(self, name: str, suffix: str = "") -> pathlib.Path:
        """The path of `name` inside the folder (adds `suffix` when name has none)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a results file name must be a non-empty string, got {name!r}")
        rel = pathlib.PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or name.startswith("."):
            raise ValueError(f"results file name {name!r} must be relative to the run folder, without '..'")
        if suffix and not rel.suffix:
            rel = rel.with_suffix(suffix)
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def has(self, name: str) -> bool:
        """Whether `name` (or `name` + .npy/.json/.png/.pdf when it has no suffix) was saved."""
        target = self.file(name)
        if target.exists():
            return True
        return not pathlib.PurePath(name).suffix and any(
            target.with_suffix(s).exists() for s in (".npy", ".json", ".png", ".pdf", ".svg")
        )

    # -- saving
    def save_json(self, name: str, obj: Any) -> pathlib.Path:
        return io.save_json(self.file(name, ".json"), obj, name)

    def save_npy(self, name: str, array: Any) -> pathlib.Path:
        target = self.file(name, ".npy")
        array = np.asarray(array)
        with io.atomic_file(target, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        return target

    def save_figure(self, name: str, fig: Any, **savefig_kwargs: Any) -> pathlib.Path:
        """Write `fig` atomically, then close it (pyplot would keep every figure of a long study alive)."""
        import matplotlib.pyplot as plt  # slow to import; `fig` came from it, so it is loaded already

        target = self.file(name, ".png")
        savefig_kwargs.setdefault("bbox_inches", "tight")
        with io.atomic_file(target, "wb") as fh:
            fig.savefig(fh, format=target.suffix.lstrip("."), **savefig_kwargs)
        plt.close(fig)
        return target

    # -- loading
    def load_npy(self, name: str) -> np.ndarray:
        target = self.file(name, ".npy")
        if not target.exists():
            raise FileNotFoundError(f"{target} was not saved in this run")
        try:
            return np.load(target, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptCheckpointError(f"{target} is damaged ({e}); delete it and run the same command again") from None

    def load_json(self, name: str) -> Any:
        target = self.file(name, ".json")
        if not target.exists():
            raise FileNotFoundError(f"{target} was not saved in this run")
        try:
            return json.loads(target.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{target} is damaged ({e}); delete it and run the same command again") from None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"


def _read_config(file: pathlib.Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{file} is damaged ({e}); pass another --out, or delete that folder to start over") from None


def _config_diff(saved: Any, new: Any) -> str:
    if not isinstance(saved, dict):
        return "saved config is not a dict"
    keys = sorted(set(saved) | set(new))
    diff = [f"{k}: saved {saved.get(k, '<missing>')!r} != now {new.get(k, '<missing>')!r}" for k in keys if saved.get(k, object()) != new.get(k, object())]
    return "; ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")


def _lock(path: pathlib.Path) -> None:
    """flock the folder for this process's lifetime (freed by the OS on exit, even SIGKILL)."""
    if path in _HELD_LOCKS:
        return
    try:
        fd = os.open(path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"results folder {path} is not writable ({e.strerror or e}); pass a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"results folder {path} is in use by another running process; wait for it or pass another --out") from None
    _HELD_LOCKS[path] = fd


# ----------------------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(seed: int | None = None, **extra: Any) -> dict:
    """Versions, device, time, command line and seed, plus `extra` (model, lr, optimizer, ...)."""
    devices = jax.devices()
    meta = {
        "seed": seed,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("jaxeif", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")},
        },
        "device": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "x64": bool(jax.config.jax_enable_x64),
        },
        "host": {"system": platform.system(), "machine": platform.machine()},
    }
    meta.update(io.to_jsonable(extra, "run_metadata extra"))
    return meta


# ----------------------------------------------------------------------------- EIF sweep

BlockHook = Callable[[int, np.ndarray], None]


def sweep_eif(
    loss_fn: Callable,
    params: Any,
    train: Any,
    evals: Any = None,
    *,
    lr: Any,
    steps: int = 1,
    optimizer: Any = None,
    chunk_size: int | str | None = "auto",
    precision: str = "highest",
    progress: bool = False,
    block_size: int = 64,
    run: RunDir | None = None,
    name: str = "eif",
    eif_fn: Callable = eif,
    on_block: BlockHook | None = None,
) -> jax.Array:
    """The EIF f32[n, m] by `eif_fn` on blocks of `block_size` train rows, each checkpointed in `run`.

    `chunk_size` and `precision` pass through to `eif_fn` (precision is part of what a resume must
    match); `progress` shows a bar of blocks. `eif_fn`: any function with jaxeif.eif's signature and
    values (e.g. jaxeif.eif_sharded); `on_block(b, rows)` runs after block b is computed (and saved).
    A killed sweep resumes from its finished blocks (bit-identical result). Diverged rows are
    NaN rows, listed in run.path/"<name>_nonfinite.json" and in a RuntimeWarning.
    """
    checks.model_inputs(params, loss_fn)  # before the run's fingerprint reads them
    evals, lr_vec = _check_sweep(train, evals, lr, steps=steps, block_size=block_size, progress=progress, run=run,
                                 name=name)
    n, m = lr_vec.shape[0], checks.leading_axis("evals", evals)
    train = jax.tree.map(np.asarray, train)  # blocks are sliced on the host, once each
    blocks = _Blocks(n, min(block_size, n))
    manager = None
    if run is not None:
        info = _sweep_info(loss_fn, params, train, evals, lr_vec, steps=steps, optimizer=optimizer,
                           block_size=blocks.size, precision=precision)
        finished = _resume_or_start(run, name, info, (n, m))
        if finished is not None:
            _warn_nonfinite(name, checks.nonfinite_rows(finished), lr_vec, run)
            return jnp.asarray(finished)
        manager = _manager(run.file(f"{name}_blocks"))
    compute = functools.partial(_compute_block, eif_fn, loss_fn, params, train, evals, lr_vec, steps=steps,
                                optimizer=optimizer, chunk_size=chunk_size, precision=precision)
    matrix = _run_blocks(compute, blocks, manager, m, name=name, progress=progress, on_block=on_block)
    _finish(run, name, matrix, lr_vec)
    return jnp.asarray(matrix)


class _Blocks(NamedTuple):
    """n train rows in blocks of `size` rows (the last one shorter)."""

    n: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.n // self.size)

    def rows(self, b: int) -> tuple[int, int]:
        """(start, stop) of block b."""
        return b * self.size, min((b + 1) * self.size, self.n)

    def padded(self, b: int) -> np.ndarray:
        """Block b's row indices padded to `size` by repeating the last row, so one compiled shape serves all."""
        start = b * self.size
        return np.minimum(np.arange(start, start + self.size), self.n - 1)


def _check_sweep(train, evals, lr, *, steps, block_size, progress, run, name) -> tuple[Any, np.ndarray]:
    """sweep_eif's own argument checks (eif_fn checks the rest): returns (evals, lr f[n])."""
    evals = train if evals is None else evals
    n = checks.leading_axis("train", train)
    checks.leading_axis("evals", evals)
    checks.positive_int("block_size", block_size)
    checks.positive_int("steps", steps)
    progress_lib.check(progress)
    if run is not None and not isinstance(run, RunDir):
        raise TypeError(f"`run` must be a jaxeif.runs.RunDir (from RunDir.open), got {type(run).__name__}")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"`name` must be a plain file stem such as 'eif', got {name!r}")
    return evals, np.broadcast_to(np.asarray(checks.learning_rate(lr, n)), (n,))


def _fingerprint(*trees: Any) -> str:
    """A digest of the shapes, dtypes and bytes of every leaf (to refuse resuming other inputs)."""
    h = hashlib.blake2b(digest_size=16)
    for tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        h.update(str(treedef).encode())
        for leaf in leaves:
            arr = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{arr.dtype}{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def _sweep_info(loss_fn, params, train, evals, lr_vec, *, steps, optimizer, block_size, precision) -> dict:
    """What a resumed sweep must match, saved as <name>_sweep.json."""
    return {
        "n_train": lr_vec.shape[0],
        "n_eval": checks.leading_axis("evals", evals),
        "block_size": block_size,
        "steps": steps,
        "optimizer": None if optimizer is None else fingerprint.digest(optimizer),
        "loss_fn": fingerprint.digest(loss_fn),
        "precision": precision_lib.check(precision),
        "fingerprint": _fingerprint(params, train, evals, lr_vec),
    }


def _resume_or_start(run: RunDir, name: str, info: dict, shape: tuple[int, int]) -> np.ndarray | None:
    """The finished matrix of this sweep if `run` holds one; else None, after refusing other inputs' results."""
    if run.has(f"{name}_sweep.json"):
        saved = run.load_json(f"{name}_sweep.json")
        if isinstance(saved, dict) and "chunk_size" in saved:  # written before the key was renamed
            saved["block_size"] = saved.pop("chunk_size")
        if saved != info:
            raise RunDirError(
                f"{run.path} holds a sweep '{name}' of other inputs ({_config_diff(saved, info)}); "
                "pass another --out or name, or delete that folder to start over"
            )
        if run.has(f"{name}.npy") and run.has(f"{name}_nonfinite.json"):
            matrix = run.load_npy(name)
            if matrix.shape != shape:
                raise CorruptCheckpointError(f"{run.file(name, '.npy')} has shape {matrix.shape}, expected {shape}; delete it and run again")
            shutil.rmtree(run.file(f"{name}_blocks"), ignore_errors=True)
            return matrix
    elif run.file(f"{name}_blocks").exists() or run.has(f"{name}.npy"):
        raise RunDirError(
            f"{run.path} holds results of sweep '{name}' without its {name}_sweep.json, so they cannot be "
            "checked against these inputs; pass another --out or name, or delete that folder"
        )
    else:
        run.save_json(f"{name}_sweep.json", info)
    return None


def _compute_block(eif_fn: Callable, loss_fn, params, train, evals, lr_vec, idx: np.ndarray, *, steps, optimizer,
                   chunk_size, precision: str) -> np.ndarray:
    """Rows `idx` of the EIF; diverged rows come back as all-NaN rows."""
    try:
        block = eif_fn(loss_fn, params, _take(train, idx), evals, lr=lr_vec[idx], steps=steps, optimizer=optimizer,
                       chunk_size=chunk_size, precision=precision)
        block = np.array(block, dtype=np.float32)
    except checks.NonFiniteInfluenceError as e:
        block = np.array(e.matrix, dtype=np.float32)
        block[np.asarray(e.rows)] = np.nan
    return block


def _take(tree: Any, idx: np.ndarray) -> Any:
    return jax.tree.map(lambda x: x[idx], tree)


def _run_blocks(compute: Callable[[np.ndarray], np.ndarray], blocks: _Blocks, manager, m: int, *, name: str,
                progress: bool, on_block: BlockHook | None) -> np.ndarray:
    """The whole f32[n, m]: saved blocks restored from `manager`, the others computed (and saved)."""
    done = set(manager.all_steps()) if manager is not None else set()
    parts = []
    bar = tqdm(total=blocks.count, initial=len(done & set(range(blocks.count))), desc=f"{name} blocks", unit="block",
               file=sys.stderr, disable=not progress)
    try:
        for b in range(blocks.count):
            start, stop = blocks.rows(b)
            if b in done:
                parts.append(_restore_block(manager, b, (stop - start, m)))
                continue
            rows = compute(blocks.padded(b))[: stop - start]
            if manager is not None:
                _save_block(manager, b, rows)
            if on_block is not None:
                on_block(b, rows)
            parts.append(rows)
            bar.update(1)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return np.concatenate(parts, axis=0)


def _finish(run: RunDir | None, name: str, matrix: np.ndarray, lr_vec: np.ndarray) -> None:
    """Save the matrix and its diverged rows in `run` (dropping the blocks), and warn of those rows."""
    bad = checks.nonfinite_rows(matrix)
    if run is not None:
        run.save_json(f"{name}_nonfinite.json", {
            "rows": bad.tolist(),
            "lr": lr_vec[bad].tolist(),
            "n_train": lr_vec.shape[0],
            "message": "fine-tunes on these train rows diverged; their rows are NaN" if bad.size else "no diverged rows",
        })
        run.save_npy(name, matrix)
        shutil.rmtree(run.file(f"{name}_blocks"), ignore_errors=True)
    _warn_nonfinite(name, bad, lr_vec, run)


def _warn_nonfinite(name: str, bad: np.ndarray, lr_vec: np.ndarray, run: RunDir | None) -> None:
    """A RuntimeWarning naming the diverged rows (never silent)."""
    if not bad.size:
        return
    where = f"; listed in {run.file(name + '_nonfinite.json')}" if run is not None else ""
    warnings.warn(
        f"sweep_eif '{name}': {bad.size} of {lr_vec.shape[0]} fine-tunes diverged (rows {bad.tolist()[:20]}"
        f"{' ...' if bad.size > 20 else ''}, lr {lr_vec[bad][:5].tolist()}); kept as NaN rows{where}. "
        "Lower lr or steps for them.",
        RuntimeWarning,
        stacklevel=3,
    )


def _manager(folder: pathlib.Path):
    """A synchronous orbax CheckpointManager (jaxeif.io) that drops the temp folders of killed writers."""
    try:
        return io.checkpoint_manager(folder, cleanup_tmp_directories=True)
    except Exception as e:  # orbax raises assorted types on damaged metadata
        raise CorruptCheckpointError(f"checkpoints in {folder} cannot be read ({type(e).__name__}: {e}); delete {folder} to recompute them") from None


def _save_block(manager, b: int, rows: np.ndarray) -> None:
    io.save_step(manager, b, {"rows": rows})
    manager.wait_until_finished()


def _restore_block(manager, b: int, shape: tuple[int, int]) -> np.ndarray:
    where = pathlib.Path(manager.directory) / str(b)
    try:
        out = io.restore_step(manager, b, {"rows": np.zeros(shape, np.float32)})
        rows = np.asarray(out["rows"], dtype=np.float32)
    except Exception as e:  # tensorstore / orbax raise assorted types on damaged files
        raise CorruptCheckpointError(
            f"checkpoint of block {b} at {where} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"delete {where} and run the same command again to recompute that block"
        ) from None
    if rows.shape != shape:
        raise CorruptCheckpointError(f"checkpoint of block {b} at {where} has shape {rows.shape}, expected {shape}; delete it and run again")
    return rows
