"""The outer loop: optax on the controls, the gradient flowing through jaxeif.eif's unrolled
fine-tunes, one jitted meta-step, a progress bar, and orbax checkpoints for resuming, kept in a
`jaxeif.runs.RunDir` (locked, every file checksummed) and matched by `jaxeif.fingerprint`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeif import fingerprint, io, runs
from jaxeif.errors import Error

PyTree = Any
Objective = Callable[[PyTree], jax.Array]


class MetaResult(NamedTuple):
    """Learned controls, objective before each update f32[steps], objective of the final controls,
    and the step a run resumed from (None: started fresh)."""

    controls: PyTree
    history: np.ndarray
    final: float
    resumed_from: int | None


def init_state(controls: PyTree, optimizer: optax.GradientTransformation, steps: int) -> dict:
    """The whole outer-loop state as one pytree (what a checkpoint holds)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "controls": controls,
        "opt_state": optimizer.init(controls),
        "history": jnp.full((steps,), jnp.nan, jnp.float32),
    }


def make_step(objective: Objective, optimizer: optax.GradientTransformation) -> Callable[..., tuple[dict, jax.Array]]:
    """A jitted meta-step(state, *data): value and gradient of objective(controls, *data), one optax update.

    Pass arrays (params, samples) as `data`, not closed over: XLA would constant-fold them at compile time.
    """
    checked = _checked_step(objective, optimizer)
    return lambda state, *data: checked(state, *data)[:2]


def _checked_step(objective: Objective, optimizer: optax.GradientTransformation):
    """make_step's step, also returning the names of control leaves whose gradient is not finite."""

    @jax.jit
    def step(state: dict, *data) -> tuple[dict, jax.Array, dict]:
        value, grads = jax.value_and_grad(objective)(state["controls"], *data)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["controls"])
        finite = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
        return (
            {
                "step": state["step"] + 1,
                "controls": optax.apply_updates(state["controls"], updates),
                "opt_state": opt_state,
                "history": state["history"].at[state["step"]].set(value.astype(jnp.float32)),
            },
            value,
            finite,
        )

    return step


def _nonfinite_leaves(finite: PyTree) -> list[str]:
    return [
        jax.tree_util.keystr(path) or "controls"
        for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
        if not bool(ok)
    ]


FINGERPRINT_FILE = "jaxeif_fit.json"


class StaleCheckpointError(Error, ValueError):
    """A checkpoint_dir holds a run of other data, controls, optimizer or objective."""


def run_fingerprint(
    objective: Objective, controls: PyTree, optimizer: optax.GradientTransformation, data: tuple
) -> dict:
    """Digests of what determines a fit's result (the step count aside: a run may be extended)."""
    return {
        "data": fingerprint.digest(data),
        "initial controls": fingerprint.digest(controls),
        "optimizer": fingerprint.digest(optimizer),
        "objective": fingerprint.digest(objective),
    }


def _check_fingerprint(run: runs.RunDir, has_checkpoints: bool, expected: dict) -> None:
    """Refuse a checkpoint_dir written by another run; record `expected` in a new one (checksummed)."""
    if not run.has(FINGERPRINT_FILE):
        if has_checkpoints:
            raise StaleCheckpointError(
                f"{run.path} holds checkpoints without {FINGERPRINT_FILE}, so they cannot be checked against this "
                "run; use a new checkpoint_dir or delete that folder to start over"
            )
        run.save_json(FINGERPRINT_FILE, {"fingerprint": expected})
        return
    try:
        saved = run.load_json(FINGERPRINT_FILE)["fingerprint"]
    except (KeyError, TypeError) as e:
        raise StaleCheckpointError(
            f"{run.file(FINGERPRINT_FILE)} is damaged ({e}); delete {run.path} to start over"
        ) from None
    changed = [k for k in expected if saved.get(k) != expected[k]]
    if changed:
        raise StaleCheckpointError(
            f"{run.path} holds a meta.fit run with other {', '.join(changed)}; resuming it would return that run's "
            "controls. Use a new checkpoint_dir, or delete that folder to start over"
        )


def _open_run(checkpoint_dir) -> runs.RunDir:
    """The checkpoint_dir as a results folder (jaxeif.runs: locked, every file checksummed)."""
    try:
        return runs.RunDir.open(checkpoint_dir, {"kind": "jaxeif.meta.fit"})
    except runs.RunDirError as e:
        raise StaleCheckpointError(f"checkpoint_dir: {e}") from None


def _saved_steps(run: runs.RunDir, manager) -> list[int]:
    """Steps saved in `manager` and recorded in `run` (a step saved by a process killed before recording it
    is deleted, never trusted); records of steps orbax dropped (max_to_keep) are forgotten."""
    steps = []
    for step in manager.all_steps():
        if run.recorded(_step_folder(manager, step)):
            steps.append(step)
        else:
            manager.delete(step)
    return sorted(steps)


def _step_folder(manager, step: int) -> Path:
    return Path(manager.directory) / str(step)


def _save(run: runs.RunDir, manager, step: int, state: dict, *, force: bool = False) -> None:
    """Save `state` as `step` (when due, or `force`), record its files' checksums, forget dropped steps."""
    io.save_step(manager, step, state, force=force)
    manager.wait_until_finished()
    folder = _step_folder(manager, step)
    if folder.exists():
        run.record_files(folder)
    kept = {str(s) for s in manager.all_steps()}
    for name in {n.split("/")[1] for n in run.recorded_files(_CHECKPOINTS + "/")} - kept:
        run.discard(f"{_CHECKPOINTS}/{name}")


_CHECKPOINTS = "checkpoints"


def _saved_history_length(directory: Path, step: int) -> int | None:
    """Length of the objective history in the checkpoint of `step` (the `steps` of the run that wrote it)."""
    try:
        meta = io.checkpoint_metadata(directory / str(step) / "default")
        return int(meta.item_metadata["history"].shape[0])
    except Exception:  # older layouts: fall back to this run's step count
        return None


def _restore(run: runs.RunDir, manager, step: int, template: dict, directory: Path) -> dict:
    run.verify_files(_step_folder(manager, step))  # ChecksumError names a damaged file
    steps = template["history"].shape[0]
    saved_length = _saved_history_length(directory, step) or steps
    like = {**template, "history": jnp.zeros((saved_length,), jnp.float32)}
    try:
        restored = io.restore_step(manager, step, like)
    except Exception as e:  # orbax raises several types for a structure mismatch
        raise ValueError(
            f"the checkpoint at {directory} (step {step}) does not match this run's controls or optimizer "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); use a new checkpoint_dir or "
            "delete it"
        ) from None
    restored = jax.tree.map(jnp.asarray, restored)
    history = jnp.full((steps,), jnp.nan, jnp.float32).at[: min(steps, saved_length)].set(restored["history"][:steps])
    return {**restored, "history": history}


def fit(
    objective: Objective,
    controls: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    checkpoint_dir: str | Path | None = None,
    every: int = 10,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    data: tuple = (),
) -> MetaResult:
    """Minimise `objective(controls, *data)` (jittable, scalar) for `steps` optax updates.

    `data`: a tuple of pytrees of arrays (params, samples) handed to the jitted step as arguments
    (closing over big arrays makes XLA constant-fold them: minutes of compile time).

    With `checkpoint_dir`, the state is saved with orbax every `every` steps and at the end,
    and a run finding a checkpoint there resumes from it, ending with the same controls as an
    uninterrupted run; a larger `steps` extends a finished run. The folder's fingerprint (data,
    initial controls, optimizer, objective) must match, else StaleCheckpointError.
    `callback(step, value)` runs after each step (host side).
    """
    for name, v in (("steps", steps), ("every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if not isinstance(data, tuple):
        raise TypeError(f"`data` must be a tuple of extra objective arguments, got {type(data).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    state = init_state(controls, optimizer, steps)
    manager, resumed_from, run = None, None, None
    if checkpoint_dir is not None:
        expected = run_fingerprint(objective, controls, optimizer, data)
        run = _open_run(checkpoint_dir)
        directory = run.file(_CHECKPOINTS)
        manager = io.checkpoint_manager(directory, save_interval_steps=every, max_to_keep=2)
        try:
            saved = _saved_steps(run, manager)
            latest = saved[-1] if saved else None
            _check_fingerprint(run, latest is not None, expected)
            if latest is not None and latest > steps:
                raise StaleCheckpointError(
                    f"{directory} holds this run at step {latest}, past steps={steps}; pass steps >= {latest} to "
                    "continue it, or use a new checkpoint_dir"
                )
            if latest is not None:
                state = _restore(run, manager, latest, state, directory)
                resumed_from = int(latest)
        except BaseException:
            manager.close()  # an open manager left behind buries the error under orbax tracebacks at exit
            raise
    step = _checked_step(objective, optimizer)
    start = int(state["step"])
    bar = _progress(start, steps, progress)
    try:
        for k in range(start, steps):
            new_state, value, finite = step(state, *data)
            value = float(value)
            last_good = "" if manager is None else f" (last good checkpoint: {manager.latest_step()})"
            if not np.isfinite(value):
                raise FloatingPointError(
                    f"the meta-objective is {value} at step {k}; lower the outer learning rate or bound "
                    f"the controls{last_good}"
                )
            bad = _nonfinite_leaves(finite)
            if bad:
                raise FloatingPointError(
                    f"the meta-gradient is not finite at step {k} (controls {', '.join(bad[:5])}), no update taken"
                    f"{last_good}; make the objective differentiable at these controls (e.g. no sqrt or log "
                    "of exact zeros) or bound the controls"
                )
            state = new_state
            if manager is not None and (k + 1) % every == 0:
                _save(run, manager, k + 1, state)
            bar.update(1)
            bar.set_postfix(objective=f"{value:.4g}")
            if callback is not None:
                callback(k + 1, value)
        if manager is not None and manager.latest_step() != steps:
            _save(run, manager, steps, state, force=True)
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    final = float(jax.jit(objective)(state["controls"], *data))
    return MetaResult(state["controls"], np.asarray(state["history"]), final, resumed_from)


def _progress(start: int, total: int, enabled: bool):
    return tqdm(total=total, initial=start, desc="meta", disable=not enabled, leave=False)
