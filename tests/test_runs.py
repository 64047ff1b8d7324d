"""Results folders: resume-or-refuse, atomic writes, checkpointed sweeps, damaged checkpoints."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_experiment import toy_loss, toy_problem

from jaxeif import NonFiniteInfluenceError, eif, eif_sharded, runs
from jaxeif.runs import CorruptCheckpointError, RunDir, RunDirError


def toy(seed: int = 0, n: int = 7):
    return toy_problem(seed, n, d_in=3, hidden=5)


loss = toy_loss


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


class Crash(Exception):
    pass


def crash_after(k: int):
    """An on_block hook that raises once k blocks are saved (a crash mid-sweep); returns (call log, hook)."""
    calls = []

    def on_block(b, rows):
        calls.append(b)
        if len(calls) >= k:
            raise Crash

    return calls, on_block


# ----------------------------------------------------------------------------- RunDir


def test_new_folder_saves_config_and_same_config_resumes(tmp_path):
    cfg = {"lr": 0.1, "sizes": (1, 2), "path": pathlib.Path("a/b"), "k": np.int64(3)}
    run = RunDir.open(tmp_path / "r", cfg)
    assert not run.resumed and run.path == (tmp_path / "r").absolute()
    assert json.loads((run.path / "config.json").read_text()) == {"lr": 0.1, "sizes": [1, 2], "path": "a/b", "k": 3}
    again = RunDir.open(tmp_path / "r", {"lr": 0.1, "sizes": [1, 2], "path": "a/b", "k": 3})
    assert again.resumed


def test_other_config_is_refused_and_nothing_is_touched(tmp_path):
    run = RunDir.open(tmp_path / "r", {"lr": 0.1})
    run.save_npy("m", np.arange(3.0))
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match=r"(?s)another config.*lr: saved 0.1 != now 0.2.*another --out.*delete"):
        RunDir.open(tmp_path / "r", {"lr": 0.2})
    with pytest.raises(RunDirError, match="resume=False"):
        RunDir.open(tmp_path / "r", {"lr": 0.1}, resume=False)
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before


def test_foreign_or_unusable_folders_are_refused(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a jaxeif run"):
        RunDir.open(tmp_path / "foreign", {})
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is an existing file"):
        RunDir.open(tmp_path / "file", {})
    with pytest.raises(RunDirError, match="cannot create results folder"):
        RunDir.open(tmp_path / "file" / "sub", {})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"lr": 0.')  # damaged by hand
    with pytest.raises(RunDirError, match="config.json is damaged"):
        RunDir.open(tmp_path / "bad", {"lr": 0.1})


def test_config_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match=r"config\['fn'\] is a builtin_function"):
        RunDir.open(tmp_path / "r", {"fn": print})
    with pytest.raises(TypeError, match="must be a dict"):
        RunDir.open(tmp_path / "r", [("lr", 1)])
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.slow
def test_folder_in_use_by_another_process_is_refused(tmp_path):
    RunDir.open(tmp_path / "r", {"a": 1})  # this process now holds the folder's lock
    code = f"from jaxeif.runs import RunDir; RunDir.open({str(tmp_path / 'r')!r}, {{'a': 1}})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0 and "in use by another running process" in proc.stderr


def test_writes_are_atomic(tmp_path, monkeypatch):
    run = RunDir.open(tmp_path / "r", {})
    run.save_npy("m", np.arange(4.0))
    run.save_json("j", {"a": 1})

    def half_then_crash(fh, arr, **kw):
        fh.write(b"\x93NUMPY half")
        raise Crash

    monkeypatch.setattr(np, "save", half_then_crash)
    with pytest.raises(Crash):
        run.save_npy("m", np.zeros(100))
    monkeypatch.undo()
    np.testing.assert_array_equal(run.load_npy("m"), np.arange(4.0))
    assert not list(run.path.glob(".*.tmp"))
    with pytest.raises(TypeError, match=r"j\['x'\] is a object"):
        run.save_json("j", {"x": object()})
    assert run.load_json("j") == {"a": 1}
    # A draft left by a SIGKILLed writer never looks complete and is removed on reopen; other files stay.
    (run.path / ".m.npy.0123456789abcdef.draft.tmp").write_bytes(b"partial")
    (run.path / ".users.tmp").write_bytes(b"not ours")
    RunDir.open(tmp_path / "r", {})
    assert [p.name for p in run.path.glob(".*.tmp")] == [".users.tmp"]


def test_save_load_has_and_names(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir.open(tmp_path / "r", {})
    assert run.save_npy("m", np.eye(2)).name == "m.npy" and run.has("m") and run.has("m.npy")
    assert not run.has("missing")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert run.save_figure("figs/line.pdf", fig).read_bytes().startswith(b"%PDF")
    assert run.save_figure("line", fig).read_bytes().startswith(b"\x89PNG")
    plt.close(fig)
    for bad in ("../x", "/abs", ".hidden"):
        with pytest.raises(ValueError, match="relative to the run folder"):
            run.save_json(bad, {})
    with pytest.raises(FileNotFoundError, match="was not saved"):
        run.load_npy("missing")
    (run.path / "t.npy").write_bytes(run.file("m.npy").read_bytes())  # not written through the RunDir
    with pytest.raises(runs.ChecksumError, match="t.npy is not recorded in .*manifest.json"):
        run.load_npy("t")
    (run.path / "m.npy").write_bytes(run.file("m.npy").read_bytes()[:-5])  # truncated by hand
    with pytest.raises(runs.ChecksumError, match="m.npy is damaged"):
        run.load_npy("m")


def test_run_metadata_records_versions_device_seed():
    meta = runs.run_metadata(seed=3, model="toy", lr=np.float32(0.5), optimizer="sgd", block_size=4)
    assert meta["seed"] == 3 and meta["model"] == "toy" and meta["lr"] == 0.5 and meta["block_size"] == 4
    for pkg in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert meta["versions"][pkg]
    assert meta["versions"]["jax"] == jax.__version__
    assert meta["device"]["platform"] == jax.devices()[0].platform and meta["device"]["kind"]
    assert meta["time_utc"].endswith("+00:00")
    json.dumps(meta, allow_nan=False)


# ----------------------------------------------------------------------------- sweep_eif


def test_sweep_equals_eif_with_and_without_run(tmp_path):
    params, train = toy()
    lr = np.linspace(0.05, 0.3, 7).astype(np.float32)
    ref = np.asarray(eif(loss, params, train, lr=lr, steps=2))
    free = runs.sweep_eif(loss, params, train, lr=lr, steps=2, block_size=3)
    run = RunDir.open(tmp_path / "r", {})
    saved = runs.sweep_eif(loss, params, train, lr=lr, steps=2, block_size=3, run=run)
    np.testing.assert_allclose(free, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bits(free), bits(saved))
    np.testing.assert_array_equal(bits(np.load(run.path / "eif.npy")), bits(saved))
    assert json.loads((run.path / "eif_nonfinite.json").read_text())["rows"] == []
    evals = jax.tree.map(lambda x: x[:4], train)
    rect = runs.sweep_eif(loss, params, train, evals, lr=lr, steps=2, block_size=5)
    np.testing.assert_allclose(rect, ref[:, :4], rtol=1e-5, atol=1e-6)


def test_sweep_resumes_after_crash_bit_identical(tmp_path):
    params, train = toy()
    full = runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=RunDir.open(tmp_path / "a", {}))
    run = RunDir.open(tmp_path / "b", {})
    with pytest.raises(Crash):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=crash_after(2)[1])
    assert sorted(int(p.name) for p in (run.path / "eif_blocks").iterdir() if p.name.isdigit()) == [0, 1]
    # An orbax temp dir from a kill mid-save is not taken as a finished block.
    (run.path / "eif_blocks" / "2.orbax-checkpoint-tmp-1").mkdir()
    calls, count = crash_after(100)
    resumed = runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=count)
    assert calls == [2, 3]  # blocks 2 and 3 of 4
    np.testing.assert_array_equal(bits(resumed), bits(full))
    calls.clear()
    again = runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=count)
    assert not calls and np.array_equal(bits(again), bits(full))


def test_sweep_refuses_resuming_other_inputs(tmp_path):
    params, train = toy()
    run = RunDir.open(tmp_path / "r", {})
    with pytest.raises(Crash):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=crash_after(1)[1])
    for kw in ({"lr": 0.3, "block_size": 2}, {"lr": 0.2, "block_size": 3}):
        with pytest.raises(RunDirError, match="other inputs"):
            runs.sweep_eif(loss, params, train, run=run, progress=False, **kw)
    (run.path / "eif_sweep.json").unlink()  # blocks of unknown inputs are never reused
    with pytest.raises(RunDirError, match="without its eif_sweep.json"):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run)


def abs_loss(params, example):
    x, y = example
    return jnp.abs(jnp.tanh(x @ params["w"]) @ params["v"] - y)


def test_sweep_refuses_resuming_with_another_optimizer_or_loss(tmp_path):
    params, train = toy()
    run = RunDir.open(tmp_path / "r", {})
    with pytest.raises(Crash):
        runs.sweep_eif(
            loss, params, train, lr=0.2, block_size=2, optimizer=optax.sgd(1.0), run=run, on_block=crash_after(1)[1]
        )
    for other in ({"optimizer": optax.adam(1.0)}, {"optimizer": optax.sgd(1.0, momentum=0.9)}, {"optimizer": None}):
        with pytest.raises(RunDirError, match="optimizer: saved"):
            runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, progress=False, **other)
    with pytest.raises(RunDirError, match="loss_fn: saved"):
        runs.sweep_eif(abs_loss, params, train, lr=0.2, block_size=2, optimizer=optax.sgd(1.0), run=run)
    calls, count = crash_after(100)  # the same optimizer, built again, resumes
    runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, optimizer=optax.sgd(1.0), run=run, on_block=count)
    assert calls == [1, 2, 3]


def test_damaged_block_checkpoint_gives_clear_error_then_recovers(tmp_path):
    params, train = toy()
    full = runs.sweep_eif(loss, params, train, lr=0.2, block_size=2)
    run = RunDir.open(tmp_path / "r", {})
    with pytest.raises(Crash):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=crash_after(2)[1])
    block = run.path / "eif_blocks" / "1"
    data = [f for f in block.rglob("*") if f.is_file() and f.parent.name == "d" and f.parent.parent.name == "default"]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.raises(CorruptCheckpointError, match=r"eif_blocks/1/.* is damaged.*delete .*eif_blocks/1 "):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run)
    shutil.rmtree(block)  # what the message says to do
    fixed = runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run)
    np.testing.assert_array_equal(bits(fixed), bits(full))


def test_diverged_rows_raise_like_eif_after_being_recorded(tmp_path):
    params, train = toy()
    lr = np.full(7, 0.1, np.float32)
    lr[[1, 5]] = 1e30
    with pytest.raises(NonFiniteInfluenceError) as direct:  # what eif does with the same rows
        eif(loss, params, train, lr=lr)
    run = RunDir.open(tmp_path / "r", {})
    with pytest.raises(
        NonFiniteInfluenceError, match=r"2 of 7 fine-tunes diverged \(non-finite influence\) in rows \[1, 5\]"
    ) as e:
        runs.sweep_eif(loss, params, train, lr=lr, block_size=3, run=run)
    assert e.value.rows.tolist() == direct.value.rows.tolist() == [1, 5]
    m = e.value.matrix
    assert np.isnan(m[[1, 5]]).all() and np.isfinite(np.delete(m, [1, 5], axis=0)).all()
    np.testing.assert_array_equal(np.load(run.path / "eif.npy"), m)  # saved before raising
    report = json.loads((run.path / "eif_nonfinite.json").read_text())
    assert report["rows"] == [1, 5] and report["lr"] == [float(np.float32(1e30))] * 2
    ok = np.asarray(eif(loss, params, train, lr=0.1))
    np.testing.assert_allclose(np.delete(m, [1, 5], axis=0), np.delete(ok, [1, 5], axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(NonFiniteInfluenceError, match=r"rows \[1, 5\]"):  # a resumed sweep raises the same
        runs.sweep_eif(loss, params, train, lr=lr, block_size=3, run=run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs.sweep_eif(loss, params, train, lr=0.1, block_size=3)


def test_sweep_passes_chunk_size_to_its_eif_fn():
    params, train = toy()
    seen = []

    def sharded(*a, **kw):  # any function with eif's signature and values
        seen.append(kw["chunk_size"])
        return eif_sharded(*a, **kw)

    m = runs.sweep_eif(loss, params, train, lr=0.2, block_size=3, chunk_size=2, eif_fn=sharded)
    assert seen == [2, 2, 2] and isinstance(m, jax.Array) and m.dtype == jnp.float32
    np.testing.assert_allclose(m, eif(loss, params, train, lr=0.2), rtol=1e-6, atol=1e-7)


def test_sweep_record_edited_by_hand_is_refused(tmp_path):
    params, train = toy()
    run = RunDir.open(tmp_path / "r", {})
    with pytest.raises(Crash):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run, on_block=crash_after(1)[1])
    info = json.loads((run.path / "eif_sweep.json").read_text())
    info["block_size"] = 3  # what determines the blocks, changed outside jaxeif
    (run.path / "eif_sweep.json").write_text(json.dumps(info))
    with pytest.raises(runs.ChecksumError, match="eif_sweep.json is damaged"):
        runs.sweep_eif(loss, params, train, lr=0.2, block_size=2, run=run)
