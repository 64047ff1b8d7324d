"""The outer loop lowers the objective, and checkpoint -> interrupt -> resume gives exactly the
controls of an uninterrupted run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif
from jaxeif import meta


def loss_fn(p, example):
    x, y = example
    return (jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2


K = jax.random.split(jax.random.key(0), 4)
PARAMS = {"w1": jax.random.normal(K[0], (3, 4)), "w2": jax.random.normal(K[1], (4,))}
TRAIN = (jax.random.normal(K[2], (6, 3)), jax.random.normal(K[3], (6,)))
LABELS = np.array([0, 0, 0, 1, 1, 1])


def objective(log_lr, params, train):
    M = jaxeif.eif(loss_fn, params, train, lr=meta.per_sample_lr(log_lr), steps=2)
    return meta.class_blocks(M, LABELS)


def run(tmp_path=None, steps=6, callback=None):
    return meta.fit(
        objective,
        meta.init_log_lr(6, 0.1),
        optimizer=optax.adam(0.1),
        steps=steps,
        checkpoint_dir=tmp_path,
        every=2,
        progress=False,
        callback=callback,
        data=(PARAMS, TRAIN),
    )


class Interrupt(Exception):
    pass


def test_fit_lowers_objective_and_resume_matches_uninterrupted(tmp_path):
    full = run()
    assert full.resumed_from is None and full.final < full.history[0]
    assert np.all(np.isfinite(full.history))

    def kill_at_3(step, value):
        if step == 3:
            raise Interrupt  # dies after step 3: the last checkpoint is step 2

    with pytest.raises(Interrupt):
        run(tmp_path, callback=kill_at_3)
    resumed = run(tmp_path)
    assert resumed.resumed_from == 2
    np.testing.assert_array_equal(np.asarray(resumed.controls), np.asarray(full.controls))
    np.testing.assert_array_equal(resumed.history, full.history)
    again = run(tmp_path)  # a finished run restores its end state and takes no step
    assert again.resumed_from == 6
    np.testing.assert_array_equal(np.asarray(again.controls), np.asarray(full.controls))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="other initial controls"):
        meta.fit(
            objective,
            {"other": jnp.zeros(3)},
            optimizer=optax.adam(0.1),
            steps=4,
            checkpoint_dir=tmp_path,
            every=2,
            progress=False,
            data=(PARAMS, TRAIN),
        )


def test_nonfinite_objective_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="step 0"):
        meta.fit(lambda c: jnp.log(c - 1.0).sum(), jnp.zeros(2), optimizer=optax.sgd(0.1), steps=3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        meta.fit(objective, jnp.zeros(6), optimizer=optax.sgd(0.1), steps=0)
    with pytest.raises(TypeError, match="tuple"):
        meta.fit(objective, jnp.zeros(6), optimizer=optax.sgd(0.1), steps=1, data=PARAMS)


def other_objective(log_lr, params, train):
    M = jaxeif.eif(loss_fn, params, train, lr=meta.per_sample_lr(log_lr), steps=1)
    return meta.class_blocks(M, LABELS)


@pytest.mark.parametrize(
    "change, what",
    [
        ({"data": (PARAMS, (TRAIN[0] * 3, TRAIN[1]))}, "data"),
        ({"controls": meta.init_log_lr(6, 1e-1 * 1.5)}, "initial controls"),
        ({"optimizer": optax.adam(0.2)}, "optimizer"),
        ({"objective": other_objective}, "objective"),
    ],
)
def test_resuming_with_other_data_controls_optimizer_or_objective_is_refused(tmp_path, change, what):
    kw = dict(objective=objective, controls=meta.init_log_lr(6, 0.1), optimizer=optax.adam(0.1), data=(PARAMS, TRAIN))
    meta.fit(steps=2, checkpoint_dir=tmp_path, every=2, progress=False, **kw)
    with pytest.raises(meta.StaleCheckpointError, match=f"other {what};.*new checkpoint_dir"):
        meta.fit(steps=2, checkpoint_dir=tmp_path, every=2, progress=False, **{**kw, **change})


def test_a_finished_run_extends_to_more_steps(tmp_path):
    full = run(steps=6)
    run(tmp_path, steps=4)
    extended = run(tmp_path, steps=6)
    assert extended.resumed_from == 4
    np.testing.assert_array_equal(np.asarray(extended.controls), np.asarray(full.controls))
    np.testing.assert_array_equal(extended.history, full.history)
    with pytest.raises(meta.StaleCheckpointError, match="past steps=3; pass steps >= 6"):
        run(tmp_path, steps=3)


@pytest.mark.slow
def test_refusal_is_one_clear_error_without_orbax_noise_at_exit(tmp_path):
    """The manager is closed before raising: no orbax tracebacks after the error when Python exits."""
    import subprocess
    import sys

    script = (
        "import sys, jax.numpy as jnp, optax, meta\n"
        "f = lambda c: jnp.sum((c - 1.0) ** 2)\n"
        "for steps in (2, 1):\n"
        "    meta.fit(f, jnp.zeros(3), optimizer=optax.sgd(0.1), steps=steps, checkpoint_dir=sys.argv[1],\n"
        "             progress=False)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
    assert out.returncode == 1
    assert "past steps=1; pass steps >= 2" in out.stderr
    assert "Exception ignored" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-2000:]
