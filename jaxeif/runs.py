"""Results folders that survive crashes and never return another run's numbers: verified atomic writes
(jaxeif.io), a sha256 per file checked on every read, resume-or-refuse by config and by fingerprint
(jaxeif.fingerprint), checkpointed EIF sweeps. The one resume mechanism of jaxeif: sweeps, meta.fit, the
base CNN cache and the studies' matrix caches all keep their files in a RunDir (docs/caching.md)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import importlib.metadata
import io as stdio
import json
import os
import pathlib
import platform
import shutil
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeif import checks, fingerprint, io, options
from jaxeif import precision as precision_lib
from jaxeif import progress as progress_lib
from jaxeif.errors import Error
from jaxeif.influence import eif
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision

CONFIG_FILE = "config.json"
_LOCK_FILE = ".lock"
_HELD_LOCKS: dict[pathlib.Path, int] = {}  # folder -> fd of its flock, one per process


class RunDirError(Error, ValueError):
    """A results folder cannot be used as asked (exists with another config, unwritable, ...)."""


class CorruptCheckpointError(Error, ValueError):
    """A saved block or matrix cannot be read back; the message says which file to delete."""


class ChecksumError(CorruptCheckpointError):
    """A results file's bytes differ from the sha256 recorded in the folder's manifest when it was written."""


MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------- run folders


class RunDir:
    """One results folder: its config.json, atomic checksummed saves, and a per-process lock.

    Every file saved through a RunDir is written by `io.write_atomic` (read back and compared before
    its rename) and recorded with its size and sha256 in `manifest.json`; every load verifies that
    record, so a damaged or truncated file is a `ChecksumError` naming it, never numbers."""

    def __init__(self, path: pathlib.Path, config: dict, resumed: bool):
        self.path = path
        self.config = config
        self.resumed = resumed

    @classmethod
    def open(cls, path: os.PathLike | str, config: dict, *, resume: bool = True) -> RunDir:
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
            raise RunDirError(
                f"cannot create results folder {path}: {e.strerror or e}; pass a writable --out"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"results folder {path} is not writable; pass a writable --out or fix its permissions")
        _lock(path)
        saved_file = path / CONFIG_FILE
        if saved_file.exists():
            _remove_drafts(path)  # a jaxeif run: drafts of a process killed mid-write, never renamed into place
            run = cls(path, config, resumed=True)
            run._adopt_config()
            saved = _read_config(run, saved_file)
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
            return run
        others = [p.name for p in path.iterdir() if p.name != _LOCK_FILE and not io.is_draft(p.name)]
        if others:  # (a draft alone: a first write was killed; it stays, never read)
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
        if rel.as_posix() == MANIFEST_FILE:
            raise ValueError(f"{MANIFEST_FILE!r} is the folder's record of checksums; name the file otherwise")
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

    # -- the manifest: size and sha256 of every file saved
    def _manifest(self) -> dict:
        """{relative path: {"bytes", "sha256"}} of the files saved in this folder."""
        file = self.path / MANIFEST_FILE
        if not file.exists():
            return {}
        try:
            files = json.loads(file.read_bytes())["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a dict")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ChecksumError(
                f"{file} (the record of every result's checksum) is damaged ({e}), so no result in {self.path} can "
                "be verified; delete that folder (or pass another --out) to start over"
            ) from None
        return files

    def _record(self, entries: dict[str, dict]) -> None:
        """Add or replace the records of `entries` ({relative path: {"bytes", "sha256"}}) in the manifest."""
        files = self._manifest()
        files.update(entries)
        io.write_atomic(self.path / MANIFEST_FILE, io.json_text({"files": files}, MANIFEST_FILE).encode())

    def _rel(self, target: pathlib.Path) -> str:
        return target.absolute().relative_to(self.path).as_posix()

    def _adopt_config(self) -> None:
        """Record config.json in a folder that has no manifest yet (killed between the two writes); refuse a
        folder holding results without one."""
        if (self.path / MANIFEST_FILE).exists():
            return
        others = sorted(p.name for p in self.path.iterdir() if p.name not in (_LOCK_FILE, CONFIG_FILE))
        if others:
            raise RunDirError(
                f"results folder {self.path} holds results ({others[:5]}) without {MANIFEST_FILE}, so they cannot be "
                "checked; pass another --out, or delete that folder to start over"
            )
        config = self.path / CONFIG_FILE
        self._record({CONFIG_FILE: {"bytes": config.stat().st_size, "sha256": io.sha256_file(config)}})

    def record_files(self, folder: os.PathLike | str) -> None:
        """Record the size and sha256 of every file under `folder` (inside the run; written by another
        library, e.g. an orbax checkpoint), so that `verify_files` can check them."""
        folder = pathlib.Path(folder)
        self._record(
            {
                self._rel(f): {"bytes": f.stat().st_size, "sha256": io.sha256_file(f)}
                for f in sorted(folder.rglob("*"))
                if f.is_file()
            }
        )

    def recorded_files(self, prefix: str = "") -> list[str]:
        """The recorded files (paths relative to the folder) whose path starts with `prefix`."""
        return sorted(k for k in self._manifest() if k.startswith(prefix))

    def recorded(self, folder: os.PathLike | str) -> bool:
        """Whether any file under `folder` was recorded by `record_files`."""
        prefix = self._rel(pathlib.Path(folder)) + "/"
        return any(k.startswith(prefix) for k in self._manifest())

    def verify_files(self, folder: os.PathLike | str) -> None:
        """ChecksumError unless the files under `folder` are exactly those recorded, byte for byte."""
        folder = pathlib.Path(folder)
        prefix = self._rel(folder) + "/"
        files = {k: v for k, v in self._manifest().items() if k.startswith(prefix)}
        present = {self._rel(f) for f in folder.rglob("*") if f.is_file()}
        for rel in sorted(set(files) | present):
            if rel not in files or rel not in present:
                what = "was added after it was written" if rel not in files else "is missing"
                raise ChecksumError(
                    f"{self.path / rel} {what}; the checkpoint in {folder} cannot be trusted: delete "
                    f"{folder} and run the same command again to recompute it"
                )
            self._check(self.path / rel, files[rel], (self.path / rel).read_bytes(), fix=f"delete {folder}")

    def _check(self, target: pathlib.Path, entry: dict | None, data: bytes, fix: str | None = None) -> None:
        fix = fix or f"delete {target}"
        if entry is None:
            raise ChecksumError(
                f"{target} is not recorded in {self.path / MANIFEST_FILE} (written by a process killed before it "
                f"was recorded, or not by jaxeif), so it cannot be trusted; {fix} and run the same command again"
            )
        if len(data) != entry.get("bytes") or io.sha256_bytes(data) != entry.get("sha256"):
            raise ChecksumError(
                f"{target} is damaged: its {len(data)} bytes do not match the {entry.get('bytes')} bytes and sha256 "
                f"recorded when it was written; {fix} and run the same command again to recompute it"
            )

    def _verified(self, target: pathlib.Path) -> bytes:
        """The bytes of a saved file, checked against the manifest."""
        if not target.exists():
            raise FileNotFoundError(f"{target} was not saved in this run")
        data = target.read_bytes()
        self._check(target, self._manifest().get(self._rel(target)), data)
        return data

    # -- saving
    def _save_bytes(self, target: pathlib.Path, data: bytes) -> pathlib.Path:
        sha = io.write_atomic(target, data)
        self._record({self._rel(target): {"bytes": len(data), "sha256": sha}})
        return target

    def save_json(self, name: str, obj: Any) -> pathlib.Path:
        """Write `obj` as JSON (atomic, checksummed); a TypeError names the key that cannot be saved."""
        return self._save_bytes(self.file(name, ".json"), io.json_text(obj, name).encode("utf-8"))

    def save_npy(self, name: str, array: Any) -> pathlib.Path:
        """Write `array` as .npy (atomic, checksummed; no pickles)."""
        buffer = stdio.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        return self._save_bytes(self.file(name, ".npy"), buffer.getvalue())

    def save_figure(self, name: str, fig: Any, *, dpi: int = 150) -> pathlib.Path:
        """Write `fig` with `jaxeif.plot.save` (atomic, closes it) in the format of the suffix (.png when
        none), and record its checksum."""
        from jaxeif import plot  # matplotlib: slow to import, and only figures need it

        target = plot.save(fig, self.file(name, ".png"), dpi=dpi)
        self._record({self._rel(target): {"bytes": target.stat().st_size, "sha256": io.sha256_file(target)}})
        return target

    # -- loading
    def load_npy(self, name: str) -> np.ndarray:
        """The array saved as `name`, after checking its checksum (ChecksumError names a damaged file)."""
        target = self.file(name, ".npy")
        data = self._verified(target)
        try:
            return np.load(stdio.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptCheckpointError(
                f"{target} is damaged ({e}); delete it and run the same command again"
            ) from None

    def load_json(self, name: str) -> Any:
        """The JSON saved as `name`, after checking its checksum (ChecksumError names a damaged file)."""
        target = self.file(name, ".json")
        data = self._verified(target)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(
                f"{target} is damaged ({e}); delete it and run the same command again"
            ) from None

    def cached(self, name: str, compute: Callable[[], Any]) -> np.ndarray:
        """The array saved as `name` (checksum verified), computed by `compute()` and saved first when missing.

        What the array depends on must be in the folder's config (a resume with another config is refused)."""
        if not self.has(name):
            self.save_npy(name, np.asarray(compute()))
        return self.load_npy(name)

    def discard(self, name: str) -> None:
        """Delete the file `name`, or the files under the folder `name`, that this folder's manifest records
        (files jaxeif wrote), with their records; folders left empty go too. Any other file stays."""
        target = self.file(name)
        rel = self._rel(target)
        files = self._manifest()
        mine = [k for k in files if k == rel or k.startswith(rel + "/")]
        for k in mine:
            (self.path / k).unlink(missing_ok=True)
        self._forget_exact(mine)
        if target.is_dir():
            for folder in sorted((p for p in target.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                target.rmdir()

    def _forget_exact(self, names: list[str]) -> None:
        if names:
            kept = {k: v for k, v in self._manifest().items() if k not in set(names)}
            io.write_atomic(self.path / MANIFEST_FILE, io.json_text({"files": kept}, MANIFEST_FILE).encode())

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resumed={self.resumed})"


def _remove_drafts(path: pathlib.Path) -> None:
    """Delete jaxeif's own draft files and folders (`io.is_draft` names) left by a killed writer."""
    for draft in sorted(path.rglob("*" + io.DRAFT_SUFFIX), reverse=True):
        if not io.is_draft(draft.name):
            continue
        if draft.is_dir():
            shutil.rmtree(draft, ignore_errors=True)
        else:
            draft.unlink(missing_ok=True)


def _read_config(run: RunDir, file: pathlib.Path) -> Any:
    try:
        return json.loads(run._verified(file))
    except ChecksumError as e:
        raise RunDirError(f"{e}; or pass another --out") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{file} is damaged ({e}); pass another --out, or delete that folder to start over") from None


def _config_diff(saved: Any, new: Any) -> str:
    if not isinstance(saved, dict):
        return "saved config is not a dict"
    keys = sorted(set(saved) | set(new))
    diff = [
        f"{k}: saved {saved.get(k, '<missing>')!r} != now {new.get(k, '<missing>')!r}"
        for k in keys
        if saved.get(k, object()) != new.get(k, object())
    ]
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
        raise RunDirError(
            f"results folder {path} is in use by another running process; wait for it or pass another --out"
        ) from None
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
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    progress: bool = False,
    memory_budget: float | None = None,
    block_size: int = 64,
    run: RunDir | None = None,
    name: str = "eif",
    eif_fn: Callable = eif,
    on_block: BlockHook | None = None,
    fresh: bool = False,
) -> jax.Array:
    """The EIF by `eif_fn` on blocks of `block_size` train rows, each checkpointed in `run`.

    A killed sweep resumes from its finished blocks (bit-identical result).

    A resume must match everything that determines the numbers (jaxeif.fingerprint: `eif_fn`, the
    loss with its state and the module-level values it reads, the optimizer to any depth, the arrays,
    lr, steps, block_size, precision), else RunDirError; every file is checked against its sha256
    (ChecksumError names a damaged one). `fresh=True` discards this sweep's saved results in `run`
    and recomputes them (also the way to run a loss that jaxeif.fingerprint cannot hash).

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: rows per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        precision: the arithmetic, a jaxeif.Precision (part of what a resume must match).
        progress: a bar of blocks.
        block_size: train rows per checkpointed block.
        run: the RunDir to checkpoint in (None: nothing saved).
        name: the file stem of this sweep's files in `run`.
        eif_fn: any function with jaxeif.eif's signature and values (e.g. jaxeif.eif_sharded).
        on_block: on_block(b, rows) runs after block b is computed (and saved).
        fresh: discard this sweep's saved results in `run` and recompute them.

    Returns:
        f32[n, m].

    Raises:
        NonFiniteInfluenceError: some fine-tunes diverged, as in `jaxeif.eif`; raised after every block
            ran and the matrix was saved, with `.rows` the diverged rows and `.matrix` the matrix with
            those rows NaN (also saved as <name>.npy, the rows in <name>_nonfinite.json). A resumed
            sweep raises the same error.
        RunDirError, CorruptCheckpointError: `run` holds another sweep's results, or damaged ones.
    """
    precision = options.check_precision(precision)
    options.check_memory_budget(memory_budget)
    checks.model_inputs(params, loss_fn)  # before the run's fingerprint reads them
    evals, lr_vec = _check_sweep(
        train, evals, lr, steps=steps, block_size=block_size, progress=progress, run=run, name=name
    )
    if not isinstance(fresh, bool):
        raise TypeError(f"`fresh` must be True or False, got {fresh!r}")
    n, m = lr_vec.shape[0], checks.leading_axis("evals", evals)
    train = jax.tree.map(np.asarray, train)  # blocks are sliced on the host, once each
    blocks = _Blocks(n, min(block_size, n))
    manager = None
    if run is not None:
        if fresh:
            for suffix in (".npy", "_nonfinite.json", "_sweep.json", "_blocks"):
                run.discard(name + suffix)
        info = _sweep_info(
            loss_fn,
            params,
            train,
            evals,
            lr_vec,
            steps=steps,
            optimizer=optimizer,
            block_size=blocks.size,
            precision=precision,
            eif_fn=eif_fn,
            fresh=fresh,
        )
        finished = _resume_or_start(run, name, info, (n, m))
        if finished is not None:
            _raise_nonfinite(name, finished, lr_vec, run)
            return jnp.asarray(finished)
        manager = _manager(run.file(f"{name}_blocks"))
    compute = functools.partial(
        _compute_block,
        eif_fn,
        loss_fn,
        params,
        train,
        evals,
        lr_vec,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        memory_budget=memory_budget,
    )
    matrix = _run_blocks(compute, blocks, manager, m, name=name, progress=progress, on_block=on_block, run=run)
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


def _sweep_info(
    loss_fn, params, train, evals, lr_vec, *, steps, optimizer, block_size, precision, eif_fn, fresh: bool
) -> dict:
    """What a resumed sweep must match, saved as <name>_sweep.json (digests by jaxeif.fingerprint). With
    `fresh`, a function the fingerprint cannot hash is recorded as unverifiable (never resumed)."""

    def digest(*objs):
        try:
            return fingerprint.digest(*objs)
        except fingerprint.FingerprintError:
            if not fresh:
                raise
            return "unverifiable (run with fresh=True)"

    return {
        "n_train": lr_vec.shape[0],
        "n_eval": checks.leading_axis("evals", evals),
        "block_size": block_size,
        "steps": steps,
        "eif_fn": digest(eif_fn),
        "optimizer": None if optimizer is None else digest(optimizer),
        "loss_fn": digest(loss_fn),
        "precision": precision_lib.name(precision),
        "fingerprint": fingerprint.digest(params, train, evals, lr_vec),
    }


def _resume_or_start(run: RunDir, name: str, info: dict, shape: tuple[int, int]) -> np.ndarray | None:
    """The finished matrix of this sweep if `run` holds one; else None, after refusing other inputs' results."""
    if run.has(f"{name}_sweep.json"):
        saved = run.load_json(f"{name}_sweep.json")
        if saved != info or "unverifiable" in str(info):
            raise RunDirError(
                f"{run.path} holds a sweep '{name}' of other inputs ({_config_diff(saved, info)}); "
                f"pass another --out or name, fresh=True to recompute it, or delete that folder to start over"
            )
        if run.has(f"{name}.npy") and run.has(f"{name}_nonfinite.json"):
            matrix = run.load_npy(name)
            run.load_json(f"{name}_nonfinite.json")  # checked: a damaged record is an error, not a finished run
            if matrix.shape != shape or matrix.dtype != np.float32:
                raise CorruptCheckpointError(
                    f"{run.file(name, '.npy')} holds {matrix.dtype}{list(matrix.shape)}, "
                    f"expected float32{list(shape)}; delete it and run again"
                )
            if run.file(f"{name}_blocks").exists():
                run.discard(f"{name}_blocks")
            return matrix
    elif run.file(f"{name}_blocks").exists() or run.has(f"{name}.npy"):
        raise RunDirError(
            f"{run.path} holds results of sweep '{name}' without its {name}_sweep.json, so they cannot be "
            "checked against these inputs; pass another --out or name, fresh=True, or delete that folder"
        )
    else:
        run.save_json(f"{name}_sweep.json", info)
    return None


def _compute_block(
    eif_fn: Callable,
    loss_fn,
    params,
    train,
    evals,
    lr_vec,
    idx: np.ndarray,
    *,
    steps,
    optimizer,
    chunk_size,
    precision: Precision,
    memory_budget,
) -> np.ndarray:
    """Rows `idx` of the EIF; diverged rows come back as all-NaN rows (sweep_eif raises once all blocks ran)."""
    try:
        block = eif_fn(
            loss_fn,
            params,
            checks.take(train, idx),
            evals,
            lr=lr_vec[idx],
            steps=steps,
            optimizer=optimizer,
            chunk_size=chunk_size,
            precision=precision,
            memory_budget=memory_budget,
        )
        block = np.array(block, dtype=np.float32)
    except checks.NonFiniteInfluenceError as e:
        block = np.array(e.matrix, dtype=np.float32)
        block[np.asarray(e.rows)] = np.nan
    return block


def _run_blocks(
    compute: Callable[[np.ndarray], np.ndarray],
    blocks: _Blocks,
    manager,
    m: int,
    *,
    name: str,
    progress: bool,
    on_block: BlockHook | None,
    run: RunDir | None = None,
) -> np.ndarray:
    """The whole f32[n, m]: saved blocks restored from `manager` (after checking their checksums in `run`),
    the others computed (and saved, then recorded)."""
    done = set()
    if manager is not None:
        for b in manager.all_steps():
            if run.recorded(_block_folder(manager, b)):
                done.add(b)
            else:  # saved by a process killed before recording it: never trusted, recomputed
                manager.delete(b)
    parts = []
    bar = tqdm(
        total=blocks.count,
        initial=len(done & set(range(blocks.count))),
        desc=f"{name} blocks",
        unit="block",
        file=sys.stderr,
        disable=not progress,
    )
    try:
        for b in range(blocks.count):
            start, stop = blocks.rows(b)
            if b in done:
                run.verify_files(_block_folder(manager, b))
                parts.append(_restore_block(manager, b, (stop - start, m)))
                continue
            rows = compute(blocks.padded(b))[: stop - start]
            if manager is not None:
                _save_block(manager, b, rows)
                run.record_files(_block_folder(manager, b))
            if on_block is not None:
                on_block(b, rows)
            parts.append(rows)
            bar.update(1)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return np.concatenate(parts, axis=0)


def _block_folder(manager, b: int) -> pathlib.Path:
    return pathlib.Path(manager.directory) / str(b)


def _finish(run: RunDir | None, name: str, matrix: np.ndarray, lr_vec: np.ndarray) -> None:
    """Save the matrix and its diverged rows in `run` (each verified on disk before the blocks are dropped),
    then raise NonFiniteInfluenceError naming those rows, as jaxeif.eif does."""
    bad = checks.nonfinite_rows(matrix)
    if run is not None:
        run.save_json(
            f"{name}_nonfinite.json",
            {
                "rows": bad.tolist(),
                "lr": lr_vec[bad].tolist(),
                "n_train": lr_vec.shape[0],
                "message": "fine-tunes on these train rows diverged; their rows are NaN"
                if bad.size
                else "no diverged rows",
            },
        )
        run.save_npy(name, matrix)
        if not np.array_equal(run.load_npy(name), matrix, equal_nan=True):  # what a resume will read
            raise CorruptCheckpointError(
                f"{run.file(name, '.npy')} reads back other numbers than were written; the blocks in "
                f"{run.file(name + '_blocks')} are kept: run the same command again"
            )
        run.discard(f"{name}_blocks")
    _raise_nonfinite(name, matrix, lr_vec, run)


def _raise_nonfinite(name: str, matrix: np.ndarray, lr_vec: np.ndarray, run: RunDir | None) -> None:
    """NonFiniteInfluenceError naming the diverged rows, as jaxeif.eif raises (`.matrix`: their rows NaN)."""
    bad = checks.nonfinite_rows(matrix)
    if not bad.size:
        return
    where = (
        f"; the matrix is saved as {run.file(name, '.npy')}, the rows in {run.file(name + '_nonfinite.json')}"
        if run is not None
        else ""
    )
    raise checks.NonFiniteInfluenceError(
        f"sweep_eif '{name}': {bad.size} of {lr_vec.shape[0]} fine-tunes diverged (non-finite influence) in rows "
        f"{bad.tolist()[:20]}{' ...' if bad.size > 20 else ''} with lr {lr_vec[bad][:5].tolist()}; lower lr or steps "
        f"for those samples (`.matrix` holds the result with those rows NaN{where})",
        bad,
        np.asarray(matrix),
    )


def _manager(folder: pathlib.Path):
    """A synchronous orbax CheckpointManager (jaxeif.io) that drops the temp folders of killed writers."""
    try:
        return io.checkpoint_manager(folder, cleanup_tmp_directories=True)
    except Exception as e:  # orbax raises assorted types on damaged metadata
        raise CorruptCheckpointError(
            f"checkpoints in {folder} cannot be read ({type(e).__name__}: {e}); delete {folder} to recompute them"
        ) from None


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
        raise CorruptCheckpointError(
            f"checkpoint of block {b} at {where} has shape {rows.shape}, expected {shape}; delete it and run again"
        )
    return rows
