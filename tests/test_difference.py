"""jaxeif.difference: f(p + d) - f(p) propagated through the jaxpr, checked against float64 on CPU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxeif
from jaxeif import difference
from jaxeif.benchmarks import difference as bench
from jaxeif.finetune import finetune, finetune_delta
from jaxeif.models import cnn

LRS = (1e-6, 1e-4, 1e-2)


def _f64(tree):
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree
    )


def _truth(f, x, dx):
    """f(x + dx) - f(x) in float64 from the float32 inputs, and that difference's own rounding error."""
    with jax.enable_x64(True):
        x64, d64 = _f64(x), _f64(dx)
        new, old = np.asarray(f(jax.tree.map(jnp.add, x64, d64))), np.asarray(f(x64))
        return new - old, 4 * np.finfo(np.float64).eps * np.maximum(np.abs(new), np.abs(old))


# ----------------------------------------------------------------------------- one rule at a time
def _window_max(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (3, 3), (2, 2), "SAME")  # overlapping windows, padding


ELEMENTARY = {
    "exp": (jnp.exp, 0),
    "log": (jnp.log, 1),
    "log1p": (jnp.log1p, 1),
    "expm1": (jnp.expm1, 0),
    "tanh": (lambda x: jnp.tanh(3 * x), 0),
    "logistic": (jax.nn.sigmoid, 0),
    "sqrt": (jnp.sqrt, 1),
    "rsqrt": (lax.rsqrt, 1),
    "cube": (lambda x: x**3, 0),
    "inverse_square": (lambda x: x**-2, 1),
    "div": (lambda x: x / (x[::-1] + 3.0), 0),
    "relu": (jax.nn.relu, 0),
    "silu": (jax.nn.silu, 0),
    "gelu": (jax.nn.gelu, 0),
    "abs": (jnp.abs, 0),
    "sin": (jnp.sin, 0),
    "cos": (jnp.cos, 0),
    "max_pair": (lambda x: jnp.maximum(x, x[::-1]), 0),
    "min_pair": (lambda x: jnp.minimum(x, 0.3 * x[::-1]), 0),
    "clip": (lambda x: jnp.clip(x, -0.5, 0.5), 0),
    "pow": (lambda x: x**1.7, 1),
    "square": (jnp.square, 0),
    "where": (lambda x: jnp.where(x > 0, 2 * x, -x), 0),
    "reduce_max": (lambda x: jnp.max(x.reshape(8, 8), axis=1), 0),
    "reduce_min": (lambda x: jnp.min(x.reshape(8, 8), axis=0), 0),
    "window_max": (lambda x: _window_max(x.reshape(8, 8)), 0),
    "logsumexp": (lambda x: jax.nn.logsumexp(4 * x.reshape(8, 8), axis=1), 0),
    "softmax": (lambda x: jax.nn.softmax(x.reshape(8, 8)), 0),
    "layer_norm": (lambda x: (x - x.mean()) * lax.rsqrt(jnp.var(x) + 1e-5), 0),
}


@pytest.mark.parametrize("name", sorted(ELEMENTARY))
@pytest.mark.parametrize("scale", [1e-6, 1e-1])
def test_rule_matches_float64(name, scale):
    """Each rule in float32 has float32 relative accuracy per element, for tiny and for sign-changing deltas."""
    f, shift = ELEMENTARY[name]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(64) + shift * 2.5).astype(np.float32)
    x = np.abs(x) + 0.1 if shift else x
    dx = (scale * rng.standard_normal(64)).astype(np.float32)
    got = np.asarray(difference.propagate(f, (x,), (dx,)))
    want, floor = _truth(f, x, dx)
    assert got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 2e-5 * np.abs(want) + floor), np.max(
        np.abs(got - want) / (np.abs(want) + floor)
    )


def test_pytrees_none_and_integer_deltas():
    """Pytree in and out; a None delta is an unchanged argument; integer leaves move exactly."""

    def f(p, data):
        x, i = data
        return {"y": jnp.tanh(p["w"] @ x) * p["s"], "picked": x[i], "i": i * 2}

    p = {"w": jnp.eye(3), "s": jnp.float32(2.0)}
    data = (jnp.arange(3.0), jnp.int32(1))
    d = {"w": 1e-3 * jnp.ones((3, 3)), "s": None}
    out = difference.propagate(f, (p, data), (d, None))
    assert float(out["picked"]) == 0.0 and int(out["i"]) == 0
    want = f({"w": p["w"] + d["w"], "s": p["s"]}, data)["y"] - f(p, data)["y"]
    np.testing.assert_allclose(out["y"], want, rtol=1e-3)
    moved = difference.propagate(lambda i: (i * 2, i > 1), (jnp.int32(1),), (jnp.int32(1),))
    assert int(moved[0]) == 2 and int(moved[1]) == 1  # integer and boolean outputs: new - old


def test_unsupported_primitive_is_named():
    with pytest.raises(difference.UnsupportedPrimitiveError, match="'erf'"):
        difference.propagate(lambda x: lax.erf(x), (jnp.ones(3),), (jnp.ones(3),))
    with pytest.raises(difference.UnsupportedPrimitiveError, match="an index"):  # an index that moves with the delta
        difference.propagate(lambda x: x[jnp.argmax(x)], (jnp.arange(3.0),), (jnp.array([5.0, 0, 0]),))
    # unchanged inputs never reach a rule: erf of the data alone is fine
    out = difference.propagate(lambda w, x: w * lax.erf(x), (jnp.ones(3), jnp.ones(3)), (jnp.ones(3), None))
    np.testing.assert_allclose(out, lax.erf(jnp.ones(3)))


# ----------------------------------------------------------------------------- finetune_delta
def test_finetune_delta_is_the_finetune_step():
    def loss_fn(p, example):
        x, y = example
        return jnp.sum((jnp.tanh(x @ p["w"]) - y) ** 2) + p["b"] ** 2

    params = {"w": jax.random.normal(jax.random.key(0), (3, 2)), "b": jnp.float32(0.5)}
    example = (jnp.arange(3.0), jnp.ones(2))
    d1 = finetune_delta(loss_fn, params, example, lr=1e-3)
    g = jax.grad(loss_fn)(params, example)
    chex.assert_trees_all_close(d1, jax.tree.map(lambda b: -1e-3 * b, g), rtol=1e-6, atol=0)  # lr * update, unrounded
    adam = optax.adam(1.0)
    d3 = finetune_delta(loss_fn, params, example, lr=1e-2, steps=3, optimizer=adam)
    theta = finetune(loss_fn, params, example, lr=1e-2, steps=3, optimizer=adam)
    chex.assert_trees_all_close(d3, jax.tree.map(jnp.subtract, theta, params), atol=1e-6, rtol=1e-7)


# ----------------------------------------------------------------------------- whole models against float64
def _check_model(problem):
    f, p, data = problem.loss_fn, problem.params, problem.data
    for lr in LRS:
        ds = bench.deltas(f, p, data, jnp.float32(lr))
        truth = bench.truth64(f, p, ds, data)
        got = bench.propagated_matrix(f, p, ds, data)
        acc = bench.agreement(got, truth)
        assert acc["sign_agreement"] >= 0.999 and acc["median_rel_error"] <= 1e-4, (problem.name, lr, acc)
        if lr == LRS[-1]:  # far above rounding: equal to the direct method
            direct = np.asarray(bench.direct_matrix(f, p, ds, data))
            loss = np.abs(np.asarray(jax.vmap(f, (None, 0))(p, data))).max()
            big = np.abs(truth) > 1e-3 * loss  # direct float32's rounding (~1e-7 x loss) is below 1e-4 of these
            assert big.sum() >= 4
            np.testing.assert_allclose(np.asarray(got)[big], direct[big], rtol=1e-3)


def test_cnn_eif_matches_float64():
    rng = np.random.default_rng(0)
    m = 8
    data = (jnp.asarray(rng.random((m, 28, 28, 1)), jnp.float32), jnp.asarray(rng.integers(0, 10, m), jnp.int32))
    _check_model(bench.Problem("cnn", cnn.loss_fn, cnn.init_params(jax.random.key(0)), data, "random init"))


def test_mlp_eif_matches_float64():
    _check_model(bench.mlp_problem(12, train_steps=30))


@pytest.mark.slow  # a scanned decoder in float64 and difference mode (test_decoders covers each architecture)
def test_decoder_eif_matches_float64():
    _check_model(bench.decoder_problem(6, length=8))


# ----------------------------------------------------------------------------- gradients (float64)
def _fd(fn, x, v, h):
    return (fn(jax.tree.map(lambda a, b: a + h * b, x, v)) - fn(jax.tree.map(lambda a, b: a - h * b, x, v))) / (2 * h)


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradients_match_finite_differences():
    """MLP, float64: d/d delta and d/d params of loss_difference, and d/d lr of an EIF built on finetune_delta."""
    problem = bench.mlp_problem(4, train_steps=0)
    with jax.enable_x64(True):
        f, p = problem.loss_fn, bench.to_float64(problem.params)
        data = bench.to_float64(problem.data)
        train, ev = jax.tree.map(lambda a: a[0], data), jax.tree.map(lambda a: a[1], data)
        delta = jax.jit(lambda p: finetune_delta(f, p, train, lr=1e-2))(p)
        diff = jax.jit(lambda p, d: difference.loss_difference(f, p, d, ev))
        g_delta, g_params = jax.jit(jax.grad(diff, argnums=(1, 0)))(p, delta)
        for arg, grad, fn in ((delta, g_delta, lambda d: diff(p, d)), (p, g_params, lambda q: diff(q, delta))):
            v = _random_like(arg, 1)
            np.testing.assert_allclose(_dot(grad, v), _fd(fn, arg, v, 1e-6), rtol=1e-6)
        direct = jax.jit(jax.grad(lambda q: f(jax.tree.map(jnp.add, q, delta), ev) - f(q, ev)))(p)
        chex.assert_trees_all_close(g_params, direct, rtol=1e-8, atol=1e-12)

        @jax.jit
        def eif_sum(lr):
            d = finetune_delta(f, p, train, lr=lr, steps=2)
            return jnp.sum(jax.vmap(lambda e: difference.loss_difference(f, p, d, e))(data))

        lr = jnp.float64(1e-2)
        np.testing.assert_allclose(
            jax.jit(jax.grad(eif_sum))(lr), (eif_sum(lr + 1e-6) - eif_sum(lr - 1e-6)) / 2e-6, rtol=1e-6
        )


@pytest.mark.slow  # finite differences through a scanned decoder
def test_decoder_gradient_through_scan():
    """The decoder (attention, RMSNorm, SiLU gating, a scan over layers): d/d delta against finite differences."""
    problem = bench.decoder_problem(2, length=6)
    with jax.enable_x64(True):
        f, p, ids = problem.loss_fn, bench.to_float64(problem.params), problem.data
        delta = jax.tree.map(lambda a: 1e-2 * a, _random_like(p, 2))
        diff = jax.jit(lambda d: difference.loss_difference(f, p, d, ids[1]))
        v = _random_like(p, 3)
        np.testing.assert_allclose(_dot(jax.jit(jax.grad(diff))(delta), v), _fd(diff, delta, v, 1e-6), rtol=1e-6)


def test_base_pass_does_not_depend_on_the_delta():
    """Under vmap over deltas the base forward pass stays unbatched (computed once for all rows)."""
    problem = bench.mlp_problem(4, train_steps=0)
    f, p, (x, y) = problem.loss_fn, problem.params, problem.data
    rows = jax.tree.map(lambda a: jnp.stack([a] * 5) * 1e-3, p)
    closed = jax.make_jaxpr(jax.vmap(lambda d: difference.loss_difference(f, p, d, (x[0], y[0]))))(rows)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    unbatched = [e for e in dots(closed.jaxpr) if all(5 not in v.aval.shape for v in e.outvars)]
    assert len(unbatched) == 3  # the three layers of the base pass, once


@pytest.mark.parametrize(
    "fn, a, da",
    [(jnp.exp, -200.0, 150.0), (jnp.tanh, 30.0, -60.0), (jax.nn.sigmoid, -50.0, 200.0), (jnp.log, 1e-30, 5.0)],
)
def test_large_changes_stay_finite_and_exact(fn, a, da):
    """A closed form such as exp(x) * expm1(dx) is 0 * inf when exp(x) underflows and dx is large;
    large changes take the direct difference, which has no cancellation there."""
    from jaxeif import difference

    got = difference.propagate(lambda p: fn(p["a"]), ({"a": jnp.float32(a)},), ({"a": jnp.float32(da)},))
    with jax.enable_x64(True):
        want = float(fn(jnp.float64(a + da)) - fn(jnp.float64(a)))
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-30)


def test_overflowed_entries_are_recomputed_directly_with_a_warning():
    """A huge step moves saturated logits by ~1e10: the propagated form overflows (-inf) where two losses
    subtracted stay finite; eif recomputes exactly those entries directly and says so."""

    def loss_fn(w, example):
        x, y = example
        return optax.softmax_cross_entropy_with_integer_labels(w @ x, y)

    w = 20 * jax.random.normal(jax.random.key(0), (5, 4))
    data = (jax.random.normal(jax.random.key(100), (8, 4)), jnp.arange(8) % 5)
    propagated = jax.jit(
        jax.vmap(jax.vmap(lambda d, e: difference.loss_difference(loss_fn, w, d, e), (None, 0)), (0, None))
    )
    deltas = jax.vmap(lambda ex: finetune_delta(loss_fn, w, ex, lr=1e9, steps=1))(data)
    raw = np.asarray(propagated(deltas, data))
    assert not np.isfinite(raw).all()  # the case this guards against really happens
    with pytest.warns(RuntimeWarning, match=r"overflowed in precision='difference'.*recomputed in 'highest'"):
        M = np.asarray(jaxeif.eif(loss_fn, w, data, lr=1e9, precision=jaxeif.Precision(difference=True)))
    direct = np.asarray(jaxeif.eif(loss_fn, w, data, lr=1e9, precision=jaxeif.Precision()))
    assert np.isfinite(M).all()
    np.testing.assert_array_equal(M[~np.isfinite(raw)], direct[~np.isfinite(raw)])
    np.testing.assert_array_equal(M[np.isfinite(raw)], raw[np.isfinite(raw)])  # the rest stays propagated
    with pytest.warns(RuntimeWarning, match="overflowed"):
        S = np.asarray(
            jaxeif.eif_sweep(loss_fn, w, data, lrs=jnp.array([1.0, 1e9]), precision=jaxeif.Precision(difference=True))
        )
    np.testing.assert_array_equal(S[1], M)
