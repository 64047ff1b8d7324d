"""The core: jaxeif.eif against a plain per-sample loop, finite differences, and bad input."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif


def mlp_loss(params, example):
    """A tiny nonlinear regressor: loss of ONE example (x: f[3], y: f[])."""
    x, y = example
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (h @ params["w2"] - y) ** 2


def make_problem(n=6, m=None, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "w1": jax.random.normal(k[0], (3, 4), dtype),
        "b1": jax.random.normal(k[1], (4,), dtype) * 0.1,
        "w2": jax.random.normal(k[2], (4,), dtype),
    }
    x = jax.random.normal(k[3], (n, 3), dtype)
    y = jax.random.normal(k[4], (n,), dtype)
    train = (x, y)
    evals = None if m is None else (jax.random.normal(k[3], (m, 3), dtype) * 2, jnp.arange(m, dtype=dtype))
    return params, train, evals


def loop_eif(loss_fn, params, train, evals, lr, steps, optimizer):
    """The straightforward computation: copy params, run optax steps on one sample, score all."""
    evals = train if evals is None else evals
    n = jax.tree.leaves(train)[0].shape[0]
    m = jax.tree.leaves(evals)[0].shape[0]
    lrs = np.broadcast_to(np.asarray(lr), (n,))
    out = np.zeros((n, m))
    for i in range(n):
        p = copy.deepcopy(params)
        example = jax.tree.map(lambda a: a[i], train)
        state = optimizer.init(p)
        for _ in range(steps):
            g = jax.grad(loss_fn)(p, example)
            updates, state = optimizer.update(g, state, p)
            p = jax.tree.map(lambda w, u: w + lrs[i] * u, p, updates)
        for j in range(m):
            e = jax.tree.map(lambda a: a[j], evals)
            out[i, j] = float(loss_fn(p, e)) - float(loss_fn(params, e))
    return out


@pytest.mark.parametrize(
    "optimizer,steps,lr",
    [
        (None, 1, 0.05),
        (None, 3, np.linspace(0.01, 0.2, 6)),
        (optax.adam(1.0), 2, 0.01),
        (optax.sgd(1.0, momentum=0.9), 3, np.linspace(0.2, 0.01, 6)),
    ],
)
def test_eif_equals_per_sample_loop(optimizer, steps, lr):
    params, train, _ = make_problem()
    got = jaxeif.eif(mlp_loss, params, train, lr=lr, steps=steps, optimizer=optimizer)
    want = loop_eif(mlp_loss, params, train, None, lr, steps, optimizer or optax.sgd(1.0))
    assert got.shape == (6, 6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 1e-2  # the comparison is not trivially between zeros


def test_separate_evals_and_sign():
    params, train, evals = make_problem(n=5, m=7)
    got = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05)
    want = loop_eif(mlp_loss, params, train, evals, 0.05, 1, optax.sgd(1.0))
    assert got.shape == (5, 7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # loss after minus before: a small SGD step on a sample lowers its own loss.
    self_influence = jnp.diag(jaxeif.eif(mlp_loss, params, train, lr=1e-3))
    assert jnp.all(self_influence < 0)


def test_chunk_size_does_not_change_result():
    params, train, _ = make_problem(n=7)
    lr = np.linspace(0.01, 0.1, 7)
    full = jaxeif.eif(mlp_loss, params, train, lr=lr, steps=2)
    for chunk in (1, 3, 7, 50):
        chunked = jaxeif.eif(mlp_loss, params, train, lr=lr, steps=2, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-6, atol=1e-7)


def test_per_sample_lr_rows_match_scalar_runs():
    params, train, _ = make_problem(n=4)
    lr = jnp.array([0.0, 0.01, 0.05, 0.2])
    per_sample = jaxeif.eif(mlp_loss, params, train, lr=lr)
    # lr 0 learns nothing (up to float32 rounding of the batched vs unbatched loss).
    np.testing.assert_allclose(np.asarray(per_sample[0]), 0.0, atol=1e-6)
    for i in range(1, 4):
        row = jaxeif.eif(mlp_loss, params, train, lr=float(lr[i]))[i]
        np.testing.assert_allclose(np.asarray(per_sample[i]), np.asarray(row), rtol=1e-5, atol=1e-7)


def test_jit_and_tree_examples():
    params, (x, y), _ = make_problem(n=5)

    def dict_loss(p, ex):
        return mlp_loss(p, (ex["x"], ex["y"]))

    train = {"x": x, "y": y}
    eager = jaxeif.eif(dict_loss, params, train, lr=0.03, steps=2)
    jitted = jax.jit(lambda p, lr: jaxeif.eif(dict_loss, p, train, lr=lr, steps=2, chunk_size=2))(params, 0.03)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-7)


def _central_difference(f, x, eps):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        grad[idx] = (f(x + d) - f(x - d)) / (2 * eps)
    return grad


@pytest.mark.parametrize("optimizer", [None, "adam"])
def test_lr_gradient_matches_finite_differences(optimizer):
    with jax.enable_x64(True):
        params, train, evals = make_problem(n=4, m=5, dtype=jnp.float64)
        opt = optax.adam(1.0) if optimizer == "adam" else None
        weights = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)))

        def objective(lr):
            return jnp.sum(
                weights * jaxeif.eif(mlp_loss, params, train, evals, lr=lr, steps=3, optimizer=opt, chunk_size=3)
            )

        lr0 = jnp.array([0.05, 0.02, 0.1, 0.07])
        got = jax.grad(objective)(lr0)
        want = _central_difference(lambda v: float(objective(jnp.asarray(v))), lr0, 1e-6)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)
        assert np.abs(want).min() > 1e-4


def test_params_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        params, train, _ = make_problem(n=3, dtype=jnp.float64)

        def objective(w2):
            return jnp.sum(jaxeif.eif(mlp_loss, {**params, "w2": w2}, train, lr=0.1, steps=2) ** 2)

        got = jax.grad(objective)(params["w2"])
        want = _central_difference(lambda v: float(objective(jnp.asarray(v))), params["w2"], 1e-6)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)


def test_divergence_is_reported_with_rows():
    params, train, _ = make_problem(n=4)
    lr = jnp.array([0.01, 1e30, 0.01, 1e30])
    with pytest.raises(jaxeif.NonFiniteInfluenceError, match=r"rows \[1, 3\]") as info:
        jaxeif.eif(mlp_loss, params, train, lr=lr, steps=3)
    assert info.value.rows.tolist() == [1, 3]
    assert np.all(np.isfinite(info.value.matrix[[0, 2]]))
    with pytest.warns(RuntimeWarning, match=r"rows \[1, 3\]"):
        jax.block_until_ready(jax.jit(lambda l: jaxeif.eif(mlp_loss, params, train, lr=l, steps=3))(lr))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(train=(jnp.zeros((3, 3)), jnp.zeros(4))), ValueError, "`train`.*disagree"),
        (dict(evals=(jnp.zeros((3, 3)), jnp.zeros(2))), ValueError, "`evals`.*disagree"),
        (dict(train=(jnp.zeros((0, 3)), jnp.zeros(0))), ValueError, "`train` is empty"),
        (dict(lr=jnp.ones(5)), ValueError, r"`lr` has shape \(5,\)"),
        (dict(lr=jnp.array([0.1, np.nan, 0.1, 0.1])), ValueError, "`lr` has non-finite"),
        (dict(lr=-0.1), ValueError, "`lr` must be >= 0"),
        (dict(lr="fast"), TypeError, "`lr`"),
        (dict(steps=0), ValueError, "`steps` must be >= 1"),
        (dict(steps=1.5), TypeError, "`steps` must be an int"),
        (dict(chunk_size=0), ValueError, "`chunk_size` must be >= 1"),
        (dict(optimizer="adam"), TypeError, "`optimizer`"),
        (dict(loss_fn=lambda p, e: mlp_loss(p, e) * jnp.ones(2)), TypeError, "float scalar"),
        (dict(params={"w": jnp.zeros(3, jnp.int32)}), TypeError, "floating point"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    params, train, _ = make_problem(n=4)
    args = dict(
        loss_fn=mlp_loss, params=params, train=train, evals=None, lr=0.1, steps=1, chunk_size=None, optimizer=None
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        jaxeif.eif(
            args["loss_fn"],
            args["params"],
            args["train"],
            args["evals"],
            lr=args["lr"],
            steps=args["steps"],
            optimizer=args["optimizer"],
            chunk_size=args["chunk_size"],
        )


def test_loss_fn_given_a_batch_by_mistake_is_explained():
    params, train, _ = make_problem(n=4)

    def batch_loss(p, example):
        x, y = example
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2, axis=0) + x[0, 0]  # needs x 2-d

    with pytest.raises(Exception) as info:
        jaxeif.eif(batch_loss, params, train, lr=0.1)
    assert "ONE example" in "".join(getattr(info.value, "__notes__", []))


def test_progress_bar_counts_rows_and_changes_nothing(capsys):
    params, train, evals = make_problem(n=5, m=3)
    plain = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, chunk_size=2)
    shown = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, chunk_size=2, progress=True)
    assert "eif rows: 100%" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(plain))
    sweep = jaxeif.eif_sweep(mlp_loss, params, train, evals, lrs=[0.05, 0.1], progress=True)
    assert "5/5" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(sweep[0]), np.asarray(jaxeif.eif(mlp_loss, params, train, evals, lr=0.05)))
    with pytest.raises(ValueError, match="progress=True` needs a concrete call"):
        jax.jit(lambda lr: jaxeif.eif(mlp_loss, params, train, evals, lr=lr, progress=True))(0.05)
    with pytest.raises(TypeError, match="`progress` must be True or False"):
        jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, progress=1)


def test_noise_floor_shows_a_bar_per_eif_and_changes_nothing(capsys):
    params, train, evals = make_problem(n=5, m=3)
    plain = jaxeif.noise_floor(mlp_loss, params, train, evals, lr=0.05, samples=3)
    capsys.readouterr()
    shown = jaxeif.noise_floor(mlp_loss, params, train, evals, lr=0.05, samples=3, progress=True)
    assert capsys.readouterr().err.count("eif rows: 100%") == 2  # the float64 reference, then the measured
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(plain))
    with pytest.raises(ValueError, match="progress=True` needs a concrete call"):
        jax.jit(lambda lr: jaxeif.noise_floor(mlp_loss, params, train, evals, lr=lr, progress=True))(0.05)


def _head_loss(frozen, scale, head, example):
    """mlp_loss with w1 frozen (bound through a Partial, with a python float) and only b1, w2 fine-tuned."""
    return scale * mlp_loss({"w1": frozen, **head}, example)


def test_partial_loss_passes_its_bound_arrays_into_the_program():
    """A jax.tree_util.Partial loss_fn: the same matrix as a closure over the same arrays, and its bound
    arrays are program inputs, so the EIF is differentiable in them (a closure would leak a tracer)."""
    params, train, _ = make_problem()
    head = {"b1": params["b1"], "w2": params["w2"]}
    bound = lambda w1: jax.tree_util.Partial(_head_loss, w1, 0.5)  # noqa: E731
    closure = lambda head_, example: _head_loss(params["w1"], 0.5, head_, example)  # noqa: E731
    partial_m = jaxeif.eif(bound(params["w1"]), head, train, lr=0.05)
    np.testing.assert_allclose(partial_m, jaxeif.eif(closure, head, train, lr=0.05), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        partial_m, loop_eif(bound(params["w1"]), head, train, None, 0.05, 1, optax.sgd(1.0)), rtol=1e-4, atol=1e-6
    )
    objective = lambda w1, h, t: jnp.sum(jaxeif.eif(bound(w1), h, t, lr=0.05) ** 2)  # noqa: E731
    direction = jax.random.normal(jax.random.PRNGKey(7), params["w1"].shape)
    grad = jnp.vdot(jax.grad(objective)(params["w1"], head, train), direction)
    with jax.enable_x64(True):
        w64, h64, t64, d64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params["w1"], head, train, direction))
        fd = (objective(w64 + 1e-6 * d64, h64, t64) - objective(w64 - 1e-6 * d64, h64, t64)) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-3)
