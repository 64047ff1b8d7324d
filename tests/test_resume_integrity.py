"""A resumed results folder returns this computation's numbers or a named error, never another's:
fingerprints cover what determines the numbers (issue #23 item 1), and files are what they claim
(checksums on read, verified writes, no deletion of others' files, named disk errors, the umask; item 2)."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import resource
import shutil
import stat
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxeif
from jaxeif import io, meta, runs
from jaxeif.runs import RunDir, RunDirError

K = jax.random.split(jax.random.key(0), 3)
P = {"w": jax.random.normal(K[0], (3, 2))}
TR = (jax.random.normal(K[1], (8, 3)), jnp.zeros((8, 2)))


def loss(p, e):
    return jnp.mean((jnp.tanh(e[0] @ p["w"]) - e[1]) ** 2)


def sweep(run, loss_fn=loss, **kw):
    kw = {"lr": 0.1, "block_size": 4, **kw}
    return np.asarray(runs.sweep_eif(loss_fn, P, TR, run=run, **kw))


# ----------------------------------------------------------------------------- item 1: fingerprints


def test_another_eif_fn_is_refused(tmp_path):
    run = RunDir.open(tmp_path / "r", {})
    sweep(run, eif_fn=jaxeif.eif_linearized)
    with pytest.raises(RunDirError, match="eif_fn: saved"):
        sweep(run, eif_fn=jaxeif.eif)
    np.testing.assert_allclose(sweep(run, eif_fn=jaxeif.eif, fresh=True), sweep(None, eif_fn=jaxeif.eif))


class MSE:
    def __init__(self, shift):
        self.shift = shift

    def __call__(self, p, e):
        return jnp.mean((jnp.tanh(e[0] @ p["w"]) - e[1] - self.shift) ** 2)


def test_callable_instance_state_is_part_of_the_fingerprint(tmp_path):
    run = RunDir.open(tmp_path / "r", {})
    sweep(run, MSE(0.0))
    sweep(run, MSE(0.0))  # the same state resumes
    with pytest.raises(RunDirError, match="loss_fn: saved"):
        sweep(run, MSE(5.0))


ACT = jnp.tanh


def act_loss(p, e):
    return jnp.mean((ACT(e[0] @ p["w"]) - e[1]) ** 2)


def test_module_level_function_the_loss_calls_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    run = RunDir.open(tmp_path / "r", {})
    sweep(run, act_loss)
    monkeypatch.setitem(globals(), "ACT", jnp.sin)
    with pytest.raises(RunDirError, match="loss_fn: saved"):
        sweep(run, act_loss)


def test_optax_schedule_at_any_depth_is_part_of_the_fingerprint(tmp_path):
    run = RunDir.open(tmp_path / "r", {})
    deep = lambda rate: optax.chain(optax.sgd(optax.exponential_decay(1.0, 1, rate)))  # noqa: E731
    sweep(run, optimizer=deep(0.5), steps=2)
    sweep(run, optimizer=deep(0.5), steps=2)
    with pytest.raises(RunDirError, match="optimizer: saved"):
        sweep(run, optimizer=deep(0.9), steps=2)


class Opaque:
    __slots__ = ()

    def __call__(self, p, e):
        return loss(p, e)


def test_a_loss_that_cannot_be_fingerprinted_is_refused_unless_fresh(tmp_path):
    run = RunDir.open(tmp_path / "r", {})
    holder = [Opaque()]
    opaque_loss = lambda p, e: holder[0](p, e)  # noqa: E731
    with pytest.raises(jaxeif.fingerprint.FingerprintError, match="fresh=True"):
        sweep(run, opaque_loss)
    np.testing.assert_array_equal(sweep(run, opaque_loss, fresh=True), sweep(None))
    with pytest.raises(jaxeif.fingerprint.FingerprintError):  # never resumed without fresh
        sweep(run, opaque_loss)


class LabelObjective:
    def __init__(self, labels):
        self.labels = jnp.asarray(labels)

    def __call__(self, controls):
        return jnp.sum((controls - self.labels) ** 2)


def test_meta_fit_objective_instance_state_is_part_of_the_fingerprint(tmp_path):
    fit = lambda labels: meta.fit(
        LabelObjective(labels),
        jnp.zeros(3),
        optimizer=optax.sgd(0.1),
        steps=2,  # noqa
        checkpoint_dir=tmp_path / "fit",
        every=1,
        progress=False,
    )
    fit([0.0, 1.0, 2.0])
    with pytest.raises(meta.StaleCheckpointError, match="objective"):
        fit([5.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- item 2: files


def test_one_changed_byte_of_a_finished_matrix_is_an_error_naming_it(tmp_path):
    run = RunDir.open(tmp_path / "r", {})
    sweep(run)
    f = run.path / "eif.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(runs.ChecksumError, match=r"eif.npy is damaged.*delete"):
        sweep(RunDir.open(tmp_path / "r", {}))


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_short_write_under_a_file_size_limit_keeps_the_blocks_and_names_the_fix(tmp_path):
    evals = (jax.random.normal(K[2], (400, 3)), jnp.zeros((400, 2)))
    full = np.asarray(runs.sweep_eif(loss, P, TR, evals, lr=0.1, block_size=4))
    run = RunDir.open(tmp_path / "r", {})
    limit = contextlib.ExitStack()

    def limit_after_last_block(b, rows):
        if b == 1:  # eif.npy (8 x 400 float32 = 12.9 kB) will not fit; the small JSON files will
            limit.enter_context(file_size_limit(run.path.joinpath("manifest.json").stat().st_size + 4000))

    with limit, pytest.raises(io.WriteError, match=r"eif.npy .*12928 bytes needed; raise the file-size limit"):
        runs.sweep_eif(loss, P, TR, evals, lr=0.1, block_size=4, run=run, on_block=limit_after_last_block)
    assert not (run.path / "eif.npy").exists() and (run.path / "eif_blocks").exists()
    assert not [p for p in run.path.rglob("*.draft.tmp")]
    calls = []
    resumed = runs.sweep_eif(
        loss,
        P,
        TR,
        evals,
        lr=0.1,
        block_size=4,
        run=RunDir.open(run.path, {}),
        on_block=lambda b, rows: calls.append(b),
    )
    assert calls == []  # both blocks came from their checkpoints
    np.testing.assert_array_equal(np.asarray(resumed), full)
    assert not (run.path / "eif_blocks").exists()


def test_disk_full_names_the_file_the_bytes_and_the_fix_and_keeps_the_old_file(tmp_path, monkeypatch):
    run = RunDir.open(tmp_path / "r", {})
    run.save_npy("m", np.arange(3.0))

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(io.WriteError, match=r"m.npy \(No space left on device\): 928 bytes needed; free space"):
        run.save_npy("m", np.zeros(100))
    monkeypatch.undo()
    np.testing.assert_array_equal(run.load_npy("m"), np.arange(3.0))
    assert not [p for p in run.path.rglob("*.draft.tmp")]


def test_open_never_deletes_a_users_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".notes.draft.tmp").write_text("my draft")
    (folder / ".a.0123456789abcdef.draft.tmp").write_text("looks like ours but this is no run folder")
    with pytest.raises(RunDirError, match="not a jaxeif run"):
        RunDir.open(folder, {})
    assert sorted(p.name for p in folder.iterdir()) == [".a.0123456789abcdef.draft.tmp", ".lock", ".notes.draft.tmp"]


def test_files_get_the_users_umask(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = os.umask(0o022)
    try:
        run = RunDir.open(tmp_path / "r", {})
        paths = [
            run.save_npy("m", np.eye(2)),
            run.save_json("j", {}),
            run.save_figure("f", plt.figure()),
            run.path / "config.json",
            run.path / "manifest.json",
        ]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
        assert set(modes.values()) == {0o644}, modes
        os.umask(0o002)
        assert stat.S_IMODE(run.save_json("g", {}).stat().st_mode) == 0o664
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- property: damage -> same or named error


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "run"
    matrix = sweep(RunDir.open(folder, {"study": "toy"}))
    return folder, matrix


DAMAGE = st.sampled_from(["flip", "truncate", "delete", "extra"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=DAMAGE,
    which=st.integers(0, 1000),
    where=st.floats(0, 1, exclude_max=True),
    bit=st.integers(0, 7),
    extra_name=st.sampled_from(["notes.txt", "eif_blocks/0/x", ".hidden", "eif.npy.bak", "sub/eif.npy"]),
)
def test_any_damage_to_a_finished_folder_gives_the_matrix_or_a_named_error(
    finished, kind, which, where, bit, extra_name
):
    source, matrix = finished
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "run"
        shutil.copytree(source, folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
        target = files[which % len(files)]
        data = target.read_bytes()
        if kind == "flip" and data:
            pos = int(where * len(data))
            target.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :])
        elif kind == "truncate":
            target.write_bytes(data[: int(where * len(data))])
        elif kind == "delete":
            target.unlink()
        elif kind == "extra":
            extra = folder / extra_name
            extra.parent.mkdir(parents=True, exist_ok=True)
            extra.write_bytes(bytes([bit]) * (which % 50))
        try:
            got = sweep(RunDir.open(folder, {"study": "toy"}))
        except jaxeif.Error as e:  # named: says which file or folder
            assert str(folder) in str(e), e
            return
        np.testing.assert_array_equal(got, matrix)
        if kind == "extra":
            assert (folder / extra_name).exists()  # a file jaxeif did not write is never deleted


def test_meta_fit_checkpoints_are_checksummed(tmp_path):
    objective = LabelObjective([0.0, 1.0, 2.0])
    fit = lambda steps: meta.fit(
        objective,
        jnp.zeros(3),
        optimizer=optax.sgd(0.1),
        steps=steps,  # noqa: E731
        checkpoint_dir=tmp_path / "fit",
        every=1,
        progress=False,
    )
    first = fit(2)
    data = sorted((tmp_path / "fit" / "checkpoints" / "2").rglob("*"), key=lambda p: -p.stat().st_size)
    target = next(p for p in data if p.is_file())
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(runs.ChecksumError, match=r"checkpoints/2/.* is damaged.*delete .*checkpoints/2"):
        fit(3)
    shutil.rmtree(tmp_path / "fit" / "checkpoints" / "2")  # what the message says: resumes from step 1
    again = fit(2)
    assert again.resumed_from == 1
    np.testing.assert_array_equal(np.asarray(again.controls), np.asarray(first.controls))


def test_rundir_cached_computes_once_and_checks_what_it_reads(tmp_path):
    run = RunDir.open(tmp_path / "r", {"study": "x"})
    calls = []
    compute = lambda: calls.append(1) or np.arange(6.0).reshape(2, 3)  # noqa: E731
    first = run.cached("m", compute)
    np.testing.assert_array_equal(run.cached("m", compute), first)
    assert calls == [1]
    (run.path / "m.npy").write_bytes((run.path / "m.npy").read_bytes()[:-8])
    with pytest.raises(runs.ChecksumError, match="m.npy is damaged"):
        run.cached("m", compute)


@pytest.mark.slow  # trains the CNN and scores it on the 10,000 test images
def test_cnn_cache_weights_are_checksummed(tmp_path):
    from jaxeif.models import cnn

    ckpt = tmp_path / "cnn"
    cnn.load_or_train(ckpt, epochs=1, batch_size=32, train_size=64, progress=False)
    files = sorted((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0x10
    files[0].write_bytes(bytes(raw))
    with pytest.raises(runs.ChecksumError, match=r"params/.* is damaged.*delete .*cnn/params"):
        cnn.load_or_train(ckpt, epochs=1, batch_size=32, train_size=64, progress=False)


class Stop(Exception):
    pass


def stop_after_first_block(b, rows):
    raise Stop


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A sweep folder killed after its first block of two, and the uninterrupted matrix."""
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Stop):
        sweep(RunDir.open(folder, {"study": "toy"}), on_block=stop_after_first_block)
    return folder, sweep(None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=DAMAGE, which=st.integers(0, 1000), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_damage_to_an_interrupted_folder_gives_the_matrix_or_a_named_error(interrupted, kind, which, where, bit):
    source, matrix = interrupted
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "run"
        shutil.copytree(source, folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
        target = files[which % len(files)]
        data = target.read_bytes()
        if kind == "flip" and data:
            pos = int(where * len(data))
            target.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :])
        elif kind == "truncate":
            target.write_bytes(data[: int(where * len(data))])
        elif kind == "delete":
            target.unlink()
        elif kind == "extra":
            (target.parent / f"extra{bit}").write_bytes(bytes([bit]) * (which % 50))
        try:
            got = sweep(RunDir.open(folder, {"study": "toy"}))
        except jaxeif.Error as e:
            assert str(folder) in str(e), e
            return
        np.testing.assert_array_equal(got, matrix)


def test_a_folder_whose_first_write_was_killed_can_be_opened(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    draft = folder / ".config.json.0123456789abcdef.draft.tmp"
    draft.write_text("{")
    run = RunDir.open(folder, {"a": 1})
    assert not run.resumed and run.load_json("config") == {"a": 1}
