"""Generated bad input at eif, sweep_eif, the run folder API and the CLI: one clear message each."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_experiment  # a toy experiment module for the CLI (tests/toy_experiment.py)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxeif import cli, eif, runs

N = 4
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 15).reshape(3, 5), "v": jnp.linspace(0.5, -0.5, 5)}
TRAIN = (np.linspace(-1, 1, N * 3, dtype=np.float32).reshape(N, 3), np.linspace(0, 1, N, dtype=np.float32))
# Huge generated floats overflow to inf when cast to float32: that is part of the bad input.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loss(params, example):
    x, y = example
    return jnp.square(jnp.tanh(x @ params["w"]) @ params["v"] - y)


def message(e: BaseException) -> str:
    return " ".join([str(e), *getattr(e, "__notes__", [])])


def raises_naming(arg: str, fn, *a, **kw) -> None:
    """fn(*a, **kw) raises ValueError/TypeError whose message names `arg`."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*a, **kw)
    assert arg in message(info.value), message(info.value)


# ----------------------------------------------------------------------------- strategies

non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.floats(max_value=-1e-30, allow_nan=False, allow_infinity=False)
wrong_shape = st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda s: tuple(s) != (N,))


@st.composite
def bad_lr(draw):
    kind = draw(st.sampled_from(["scalar", "entry", "shape", "type"]))
    if kind == "scalar":
        return draw(st.one_of(non_finite, negative))
    if kind == "entry":  # one bad rate in an otherwise fine vector, as numpy or jax
        lr = np.full(N, 0.1, np.float32)
        lr[draw(st.integers(0, N - 1))] = draw(st.one_of(non_finite, negative))
        return draw(st.sampled_from([np.asarray, jnp.asarray, list]))(lr)
    if kind == "shape":
        return np.full(tuple(draw(wrong_shape)), 0.1, np.float32)
    return draw(
        st.one_of(
            st.text(max_size=5),
            st.booleans(),
            st.just(object()),
            st.dictionaries(st.text(max_size=2), st.floats(), max_size=2),
            st.complex_numbers(min_magnitude=1e-3, allow_nan=False, allow_infinity=False),
        )
    )


not_positive_int = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.just(np.float32(2.0))
)


@st.composite
def ragged_or_empty(draw):
    """A (features, targets) batch whose leaves disagree on, or have 0, examples; or a scalar leaf."""
    kind = draw(st.sampled_from(["ragged", "empty", "scalar"]))
    if kind == "ragged":
        a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        if a == b:
            b += 1
        return (np.zeros((a, 3), np.float32), np.zeros((b,), np.float32))
    if kind == "empty":
        return (np.zeros((0, 3), np.float32), np.zeros((0,), np.float32))
    return (np.zeros((N, 3), np.float32), np.float32(1.0))


# ----------------------------------------------------------------------------- eif


@FAST
@given(lr=bad_lr())
def test_eif_bad_lr_is_named(lr):
    raises_naming("`lr`", eif, loss, PARAMS, TRAIN, lr=lr)


@FAST
@given(steps=not_positive_int)
def test_eif_bad_steps_is_named(steps):
    raises_naming("`steps`", eif, loss, PARAMS, TRAIN, lr=0.1, steps=steps)


@FAST
@given(chunk=not_positive_int)
def test_eif_bad_chunk_size_is_named(chunk):
    raises_naming("`chunk_size`", eif, loss, PARAMS, TRAIN, lr=0.1, chunk_size=chunk)


@FAST
@given(batch=ragged_or_empty(), where=st.sampled_from(["train", "evals"]))
def test_eif_bad_batches_are_named(batch, where):
    if where == "train":
        raises_naming("`train`", eif, loss, PARAMS, batch, lr=0.1)
    else:
        raises_naming("`evals`", eif, loss, PARAMS, TRAIN, batch, lr=0.1)


@FAST
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    dtype=st.sampled_from([None, jnp.int32, jnp.bool_, jnp.complex64]),
)
def test_eif_non_scalar_or_non_float_loss_is_named(shape, dtype):
    def bad_loss(params, example):
        out = jnp.broadcast_to(loss(params, example), tuple(shape))
        return out if dtype is None else out[(0,) * len(shape)].astype(dtype)

    raises_naming("loss_fn", eif, bad_loss, PARAMS, TRAIN, lr=0.1)


@FAST
@given(dtype=st.sampled_from([np.int32, np.int8, np.uint8, np.bool_]), leaf=st.sampled_from(["w", "v"]))
def test_eif_non_float_params_are_named(dtype, leaf):
    params = dict(PARAMS, **{leaf: np.asarray(PARAMS[leaf]).astype(dtype)})
    raises_naming("`params`", eif, loss, params, TRAIN, lr=0.1)


@FAST
@given(feat=st.integers(1, 6).filter(lambda f: f != 3), where=st.sampled_from(["train", "evals"]))
def test_eif_wrong_feature_shape_names_the_batch(feat, where):
    batch = (np.zeros((N, feat), np.float32), np.zeros((N,), np.float32))
    args = (batch,) if where == "train" else (TRAIN, batch)
    raises_naming(f"{where}[0]", eif, loss, PARAMS, *args, lr=0.1)


def test_eif_bad_loss_fn_and_optimizer_are_named():
    raises_naming("`loss_fn`", eif, None, PARAMS, TRAIN, lr=0.1)
    raises_naming("`optimizer`", eif, loss, PARAMS, TRAIN, lr=0.1, optimizer=lambda: None)


def test_eif_lr_none_is_named():
    raises_naming("`lr`", eif, loss, PARAMS, TRAIN, lr=None)


@pytest.mark.parametrize("where", ["params", "train", "evals"])
def test_eif_non_finite_inputs_are_named(where):
    params, train, evals = PARAMS, TRAIN, TRAIN
    if where == "params":
        params = dict(PARAMS, w=PARAMS["w"].at[1, 2].set(jnp.nan))
    else:
        x = TRAIN[0].copy()
        x[2, 1] = np.inf
        train, evals = ((x, TRAIN[1]), TRAIN) if where == "train" else (TRAIN, (x, TRAIN[1]))
    with pytest.raises(ValueError) as info:
        eif(loss, params, train, evals, lr=0.1)
    assert f"`{where}`" in message(info.value)


# ----------------------------------------------------------------------------- sweep_eif and run folders


@FAST
@given(
    lr=bad_lr(), block=not_positive_int, steps=not_positive_int, which=st.sampled_from(["lr", "block_size", "steps"])
)
def test_sweep_bad_arguments_are_named(lr, block, steps, which):
    kw = {"lr": 0.1, "block_size": 2, "steps": 1, "progress": False}
    kw[which] = {"lr": lr, "block_size": block, "steps": steps}[which]
    raises_naming(f"`{which}`", runs.sweep_eif, loss, PARAMS, TRAIN, **kw)


def test_sweep_bad_run_and_name():
    raises_naming("`run`", runs.sweep_eif, loss, PARAMS, TRAIN, lr=0.1, run="results/")
    raises_naming("`name`", runs.sweep_eif, loss, PARAMS, TRAIN, lr=0.1, name="../eif")


unjsonable = st.sampled_from([object(), print, {1: 2}, {"a": {3}}, b"bytes", jax.random.key(0)])


@FAST
@given(value=unjsonable, key=st.text(min_size=1, max_size=8))
def test_run_config_must_be_json_data(value, key):
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(TypeError) as info:
            runs.RunDir.open(pathlib.Path(d) / "r", {key: value})
        assert "config" in str(info.value) and "JSON" in str(info.value)
        assert not (pathlib.Path(d) / "r" / "config.json").exists()


@FAST
@given(resume=st.one_of(st.none(), st.integers(), st.text(max_size=3)), path=st.sampled_from([None, "", 3, 2.5]))
def test_run_open_bad_types(resume, path):
    with tempfile.TemporaryDirectory() as d:
        raises_naming("`resume`", runs.RunDir.open, pathlib.Path(d) / "r", {}, resume=resume)
        raises_naming("results folder", runs.RunDir.open, path, {})


@FAST
@given(
    name=st.one_of(
        st.builds(lambda a: f"../{a}", st.text("abc", min_size=1, max_size=3)),
        st.builds(lambda a: f"/{a}", st.text("abc", min_size=1, max_size=3)),
        st.builds(lambda a: f".{a}", st.text("abc", min_size=0, max_size=3)),
        st.sampled_from(["", None, 3]),
    )
)
def test_run_file_names_stay_inside(name):
    with tempfile.TemporaryDirectory() as d:
        run = runs.RunDir.open(pathlib.Path(d) / "r", {})
        with pytest.raises((ValueError, TypeError), match="file name"):
            run.save_json(name, {})
        assert sorted(p.name for p in run.path.iterdir()) == [".lock", "config.json", "manifest.json"]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def toy_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "toy", ("toy_experiment", "a toy sweep"))
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("jaxeif.experiments.not_written_yet", "missing"))
    monkeypatch.delenv("JAXEIF_DEBUG", raising=False)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("cnn", "llm", "meta-cnn", "meta-llm", "bench-cnn", "bench-lm"):
        assert f"\n  {name} " in out


@FAST
@given(
    word=st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10).filter(
        lambda w: w not in cli.COMMANDS and not w.startswith("-")
    )
)
def test_unknown_subcommand_exits_2_with_one_line(word):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([word]) == 2
    assert "invalid choice" in one_error_line(err.getvalue())


def test_cli_user_errors_exit_2_one_line(tmp_path, capsys, toy_command):
    (tmp_path / "file").write_text("keep me")
    cases = {
        ("toy", "--out", str(tmp_path / "file" / "sub")): "cannot create results folder",
        ("toy", "--out", str(tmp_path / "file")): "is an existing file",
        ("toy", "--out", str(tmp_path / "o"), "--seed", "x"): "invalid int value",
        ("toy", "--out", str(tmp_path / "o"), "--nope"): "unrecognized arguments",
        ("toy",): "arguments are required: --out",
        ("toy", "--out", str(tmp_path / "o"), "--lr", "-1"): "`lr` must be >= 0",
        ("toy", "--out", str(tmp_path / "o2"), "--steps", "0"): "`steps` must be >= 1",
        ("ghost",): "not in this installation",
    }
    for argv, expected in cases.items():
        assert cli.main(list(argv)) == 2, argv
        assert expected in one_error_line(capsys.readouterr().err), argv
    assert (tmp_path / "file").read_text() == "keep me"
    # A finished run, then the same folder with another config: refused, nothing damaged.
    assert cli.main(["toy", "--out", str(tmp_path / "r"), "--n", "3", "--block-size", "3"]) == 0
    before = (tmp_path / "r" / "eif.npy").read_bytes()
    capsys.readouterr()
    assert cli.main(["toy", "--out", str(tmp_path / "r"), "--n", "4"]) == 2
    assert "pass another --out" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "r" / "eif.npy").read_bytes() == before


def test_cli_subcommand_help_interrupt_and_debug(tmp_path, capsys, monkeypatch, toy_command):
    assert cli.main(["toy", "--help"]) == 0
    assert "--block-size" in capsys.readouterr().out

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_experiment, "run", interrupted)
    assert cli.main(["toy", "--out", str(tmp_path / "o")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err

    def bad(args):
        raise ValueError("bad domain name 'x'")

    monkeypatch.setattr(toy_experiment, "run", bad)
    assert cli.main(["toy", "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: bad domain name 'x'"
    monkeypatch.setenv("JAXEIF_DEBUG", "1")
    with pytest.raises(ValueError, match="bad domain"):
        cli.main(["toy", "--out", str(tmp_path / "o")])

    def bug(args):
        raise KeyError("k")  # a bug, not a user error: keeps its traceback

    monkeypatch.delenv("JAXEIF_DEBUG")
    monkeypatch.setattr(toy_experiment, "run", bug)
    with pytest.raises(KeyError):
        cli.main(["toy", "--out", str(tmp_path / "o")])


def test_cli_missing_dependency_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import not_a_real_package_jaxeif\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "dep", ("needs_dep", "needs a package"))
    assert cli.main(["dep"]) == 2
    assert "not_a_real_package_jaxeif" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_real_processes_exit_2_without_traceback(tmp_path):
    env = toy_experiment.env()
    (tmp_path / "file").write_text("keep me")
    for cmd, expected in (
        ([sys.executable, "-m", "jaxeif.cli", "frobnicate"], "invalid choice"),
        (
            [sys.executable, str(toy_experiment.HERE), "--out", str(tmp_path / "file" / "x")],
            "cannot create results folder",
        ),
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr
        assert expected in one_error_line(proc.stderr)
    assert (tmp_path / "file").read_text() == "keep me"
