"""precision= modes and the noise floor, against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import desiderata
from jaxeif import precision as precision_lib
from jaxeif.models import cnn
from tests.test_influence import make_problem, mlp_loss


def test_float64_mode_equals_a_float64_computation():
    params, train, evals = make_problem(n=5, m=6)
    M = jaxeif.eif(mlp_loss, params, train, evals, lr=1e-5, precision=jaxeif.Precision(dtype="float64"))
    assert M.dtype == jnp.float32
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        want = np.asarray(jaxeif.eif(mlp_loss, to64(params), to64(train), to64(evals), lr=1e-5))
    assert want.dtype == np.float64
    np.testing.assert_allclose(np.asarray(M), want, rtol=2e-7, atol=0)  # float64 rounded to float32, per entry
    direct = np.asarray(jaxeif.eif(mlp_loss, params, train, evals, lr=1e-5))
    assert np.max(np.abs(direct - want) / np.abs(want)) > 1e-4  # float32 itself is far off at this lr


def test_precision_modes_are_checked_and_run():
    params, train, _ = make_problem(n=3)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1, precision="fp8")
    ref = jaxeif.eif(mlp_loss, params, train, lr=0.1)
    for mode in (jaxeif.Precision(matmul="tf32"), jaxeif.Precision(dtype="bfloat16")):  # on CPU both compute in float32
        M = jaxeif.eif(mlp_loss, params, train, lr=0.1, precision=mode)
        np.testing.assert_allclose(np.asarray(M), np.asarray(ref), rtol=1e-2, atol=1e-4)


def test_highest_sets_the_matmul_precision_of_the_traced_program():
    params, train, _ = make_problem(n=2)
    jaxpr = jax.make_jaxpr(lambda p: jaxeif.eif(mlp_loss, p, train, lr=0.1, precision=jaxeif.Precision()))(params)
    text = str(jaxpr)
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in text and "Precision.DEFAULT" not in text


@pytest.fixture(scope="module")
def cnn_problem():
    key = jax.random.split(jax.random.key(3), 3)
    params = cnn.init_params(key[0])
    x = jax.random.uniform(key[1], (20, 28, 28, 1))
    y = jax.random.randint(key[2], (20,), 0, 10)
    return params, (x, y)


@pytest.mark.parametrize(
    "lr",
    [pytest.param(1e-8, marks=pytest.mark.slow), pytest.param(1e-6, marks=pytest.mark.slow), 1e-3],  # fast tier: one
)
def test_noise_floor_separates_trustworthy_signs(cnn_problem, lr):
    params, train = cnn_problem
    M = np.asarray(jaxeif.eif(cnn.loss_fn, params, train, lr=lr))
    ref = np.asarray(jaxeif.eif(cnn.loss_fn, params, train, lr=lr, precision=jaxeif.Precision(dtype="float64")))
    floor = np.asarray(jaxeif.noise_floor(cnn.loss_fn, params, train, lr=lr, samples=8))
    off = ~np.eye(len(M), dtype=bool)
    above = (np.abs(M) > floor) & off
    agree = np.sign(M) == np.sign(ref)
    assert floor.shape == M.shape and np.all(floor > 0)
    assert above.sum() >= 20 and agree[above].mean() >= 0.99
    if lr == 1e-8:
        assert agree[off & ~above].mean() < 0.9  # the floor really excludes the noisy entries
    if lr == 1e-3:
        assert above.sum() / off.sum() > 0.95  # and is not needlessly high where signal is strong
    shares = desiderata.sign_shares(M, np.asarray(train[1]), floor=floor)
    assert float(shares["excluded"]) == pytest.approx(1 - above.sum() / off.sum(), abs=1e-6)


def test_noise_floor_bad_input(cnn_problem):
    params, train = cnn_problem
    with pytest.raises(ValueError, match="`samples`"):
        jaxeif.noise_floor(cnn.loss_fn, params, train, lr=1e-3, samples=0)
    with pytest.raises(ValueError, match="`precision`"):
        jaxeif.noise_floor(cnn.loss_fn, params, train, lr=1e-3, precision="half")


def test_sign_shares_counts_only_above_the_floor():
    labels = np.array([0, 0, 1, 1])
    M = np.array([[0, -1, 2, -0.001], [-1, 0, 0.001, 3], [1, 1, 0, -2], [1, 1, -2, 0]], float)
    all_ = desiderata.sign_shares(M, labels)
    assert float(all_["within_learned"]) == 1.0 and float(all_["between_unlearned"]) == pytest.approx(7 / 8)
    above = desiderata.sign_shares(M, labels, floor=0.01)
    assert float(above["between_unlearned"]) == 1.0 and float(above["excluded"]) == pytest.approx(2 / 12)


@pytest.mark.parametrize("lr", [1e-7, 1e-3])
def test_difference_mode_has_float64_accuracy_at_float32_cost(cnn_problem, lr):
    params, train = cnn_problem
    ref = np.asarray(
        jaxeif.eif(cnn.loss_fn, params, train, lr=lr, precision=jaxeif.Precision(dtype="float64")), np.float64
    )
    M = np.asarray(jaxeif.eif(cnn.loss_fn, params, train, lr=lr, precision=jaxeif.Precision(difference=True)))
    assert M.dtype == np.float32
    off = ~np.eye(len(M), dtype=bool)
    rel = np.abs(M - ref)[off] / np.abs(ref[off])
    assert np.median(rel) < 1e-4 and np.mean(np.sign(M[off]) == np.sign(ref[off])) >= 0.999
    S = jaxeif.eif_sweep(cnn.loss_fn, params, train, lrs=[lr, 2 * lr], precision=jaxeif.Precision(difference=True))
    np.testing.assert_allclose(np.asarray(S[0]), M, rtol=1e-6, atol=0)


def test_difference_mode_gradients_match_finite_differences():
    with jax.enable_x64(True):
        params, train, evals = make_problem(n=3, m=4, dtype=jnp.float64)
        w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
        f = lambda lr: jnp.sum(
            w * jaxeif.eif(mlp_loss, params, train, evals, lr=lr, steps=2, precision=jaxeif.Precision(difference=True))
        )  # noqa: E731
        lr0 = np.array([0.05, 0.02, 0.1])
        got = np.asarray(jax.grad(f)(jnp.asarray(lr0)))
        eps = 1e-6
        want = np.array(
            [
                (float(f(jnp.asarray(lr0 + eps * e))) - float(f(jnp.asarray(lr0 - eps * e)))) / (2 * eps)
                for e in np.eye(3)
            ]
        )
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        direct = np.asarray(
            jax.grad(lambda lr: jnp.sum(w * jaxeif.eif(mlp_loss, params, train, evals, lr=lr, steps=2)))(
                jnp.asarray(lr0)
            )
        )
        np.testing.assert_allclose(got, direct, rtol=1e-7)


@pytest.mark.parametrize("name", ["highest", "tf32", "bfloat16", "float64", "difference", "difference-tf32"])
def test_short_names_warn_with_their_precision_and_compute_the_same(name):
    params, train, evals = make_problem(n=3, m=4)
    want = jaxeif.eif(mlp_loss, params, train, evals, lr=1e-3, precision=precision_lib.NAMES[name])
    with pytest.warns(
        DeprecationWarning, match=r"precision='.*' is deprecated; pass precision=jaxeif\.Precision\("
    ) as w:
        got = jaxeif.eif(mlp_loss, params, train, evals, lr=1e-3, precision=name)
    assert w[0].filename == __file__  # attributed to the caller's line, not to jaxeif
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    spelled = str(w[0].message).split("pass precision=jaxeif.")[1]
    assert eval(spelled, {"Precision": jaxeif.Precision}) == precision_lib.NAMES[name]


def test_unsupported_precision_combinations_are_refused_with_the_supported_ones():
    params, train, _ = make_problem(n=2)
    with pytest.raises(ValueError, match=r"not a supported combination; use one of Precision\(\), "):
        jaxeif.eif(mlp_loss, params, train, lr=0.1, precision=jaxeif.Precision(matmul="tf32", dtype="float64"))
    with pytest.raises(ValueError, match="`precision` must be one of"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1, precision=("highest", "float32", False))
    assert {precision_lib.name(p) for p in precision_lib.NAMES.values()} == set(precision_lib.MODES)
