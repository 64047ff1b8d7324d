"""Each meta objective is minimised by a matrix with its target structure (and a wrong one is not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif import desiderata
from jaxeif.meta import objectives as O

RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(3), 4)  # 12 samples, 3 classes


def descend(objective, M0, steps=300, lr=0.05, decay=0.98):
    """Normalised gradient descent on the matrix itself, shrinking steps: where does the objective pull M?"""

    def step(M, t):
        g = jax.grad(objective)(M)
        return M - lr * decay**t * g / (jnp.linalg.norm(g) + 1e-12) * jnp.linalg.norm(M), None

    return jax.jit(lambda M: jax.lax.scan(step, M, jnp.arange(steps, dtype=jnp.float32))[0])(jnp.asarray(M0))


def random_matrices(shape, k=10):
    return [RNG.normal(size=shape) for _ in range(k)]


def assert_local_min(objective, M, scale=1e-3, k=20):
    """No small random step from M lowers the objective (float64, so rounding cannot hide a slope)."""
    with jax.enable_x64(True):
        base = float(objective(jnp.asarray(M, jnp.float64)))
        moved = jax.vmap(objective)(jnp.asarray(M + scale * RNG.normal(size=(k, *M.shape)), jnp.float64))
        assert np.all(np.asarray(moved) >= base - 1e-12)


def test_noise_invariance_minimised_by_silent_noisy_rows():
    clean, noisy = np.arange(4), np.arange(4, 8)
    target = RNG.normal(size=(8, 5))
    target[noisy] = 0.0
    obj = jax.jit(lambda M: O.noise_invariance(M, clean, noisy))
    assert float(obj(target)) == 0.0
    assert all(float(obj(M)) > 0.05 for M in random_matrices((8, 5)))
    swapped = np.zeros_like(target)
    swapped[noisy] = target[clean]
    assert float(obj(swapped)) > 1e6  # silent clean rows, loud noisy rows: the wrong structure
    M = descend(obj, RNG.normal(size=(8, 5)))
    assert float(jnp.linalg.norm(M[noisy])) < 1e-2 * float(jnp.linalg.norm(M[clean]))


def test_class_blocks_minimised_by_learning_within_class_only():
    same = LABELS[:, None] == LABELS[None, :]
    target = np.where(same, -2.5, 0.0)
    obj = jax.jit(lambda M: O.class_blocks(M, LABELS))
    assert float(obj(target)) == pytest.approx(0.0, abs=1e-6)
    assert float(obj(-target)) == pytest.approx(2.0, abs=1e-6)  # within classes forgotten
    assert float(obj(np.where(same, -1.0, -1.0))) > 0.1  # learning everything, not selective
    assert all(float(obj(M)) > 0.3 for M in random_matrices((12, 12)))
    assert_local_min(obj, target)
    M = np.asarray(descend(obj, RNG.normal(size=(12, 12))))
    assert np.all(M[same] < 0) and np.abs(M[~same]).max() < 0.05 * np.abs(M[same]).min()


def test_class_blocks_rectangular_with_column_labels():
    rows, cols = np.array([0, 1, 1]), np.array([1, 0])
    target = np.array([[0.0, -1.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert float(O.class_blocks(target, rows, cols)) == pytest.approx(0.0, abs=1e-6)
    assert float(O.class_blocks(target[:, ::-1], rows, cols)) == pytest.approx(1.0, abs=1e-6)


def test_sparsity_minimised_by_one_entry():
    one = np.zeros((6, 6))
    one[2, 4] = -3.0
    obj = jax.jit(lambda M: O.sparsity(M))
    assert float(obj(one)) == pytest.approx(0.0, abs=1e-6)
    assert float(obj(np.ones((6, 6)))) == pytest.approx(1.0, abs=1e-6)
    assert all(float(obj(M)) > float(obj(one)) + 0.3 for M in random_matrices((6, 6)))
    M = np.asarray(descend(obj, RNG.normal(size=(6, 6)), steps=500, decay=0.995))
    off = np.abs(M[~np.eye(6, dtype=bool)])
    assert np.sort(off)[-2] < 0.05 * off.max()  # one dominant entry left


def test_symmetry_minimised_by_symmetric_matrices():
    A = RNG.normal(size=(7, 7))
    obj = jax.jit(lambda M: O.symmetry(M))
    assert float(obj(A + A.T)) == pytest.approx(0.0, abs=1e-6)
    assert float(obj(A - A.T)) == pytest.approx(2.0, abs=1e-6)
    assert all(float(obj(M)) > 0.2 for M in random_matrices((7, 7)))
    M = np.asarray(descend(obj, A))
    off = ~np.eye(7, dtype=bool)
    assert np.abs(M - M.T)[off].max() < 0.05 * np.abs(M)[off].max()


def test_logic_minimised_when_implied_gains_and_reversed_does_not():
    rows, imp, rev = np.array([0, 1]), np.array([2, 3]), np.array([3, 2])
    good = np.zeros((2, 4))
    good[0, 2], good[1, 3] = -1.0, -0.5  # implied learned (loss down), reversed untouched
    obj = jax.jit(lambda M: O.logic(M, rows, imp, rev))
    assert float(obj(good)) == pytest.approx(-1.0, abs=1e-6)
    assert float(obj(good[:, [0, 1, 3, 2]])) == pytest.approx(1.0, abs=1e-6)  # reversed learned instead
    symmetric = good.copy()
    symmetric[0, 3], symmetric[1, 2] = -1.0, -0.5  # both learned equally: no logic
    assert float(obj(symmetric)) == pytest.approx(0.0, abs=1e-6)
    for M in random_matrices((2, 4), k=20):  # the minimum -1 is reached exactly when the structure holds
        structured = np.all(M[rows, imp] < 0) and np.all(M[rows, rev] >= 0)
        assert (float(obj(M)) < -1.0 + 1e-6) == structured


def test_class_learning_matches_desiderata_and_skips_pairs():
    M = RNG.normal(size=(12, 12))
    within, between = O.class_learning(M, LABELS, exclude=np.eye(12, dtype=bool))
    d_within, d_between = desiderata.within_between(M, LABELS)
    np.testing.assert_allclose([within, between], [-d_within, -d_between], rtol=1e-6)
    rows = np.array([0, 5])
    w, b = O.class_learning(M, LABELS, rows=rows)
    same = LABELS[rows][:, None] == LABELS[None, :]
    np.testing.assert_allclose([w, b], [-M[rows][same].mean(), -M[rows][~same].mean()], rtol=1e-6)


def test_keep_and_stay_below_penalise_only_the_wrong_side():
    assert float(O.keep_learning(2.0, 1.0)) == 0.0 and float(O.keep_learning(0.5, 1.0)) == pytest.approx(0.25)
    assert float(O.stay_below(0.5, 1.0)) == 0.0 and float(O.stay_below(1.5, 1.0)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: O.noise_invariance(np.zeros(5), [0], [1]), "2-d"),
        (lambda: O.noise_invariance(np.zeros((4, 4)), [0, 1], [2]), "pair up"),
        (lambda: O.noise_invariance(np.zeros((4, 4)), [0], [9]), "outside"),
        (lambda: O.noise_invariance(np.zeros((4, 4)), [0.5], [1]), "integer"),
        (lambda: O.class_blocks(np.zeros((4, 4)), [0, 1]), "shape"),
        (lambda: O.logic(np.zeros((2, 4)), [0], [1, 2], [3]), "equal lengths"),
        (lambda: O.class_learning(np.zeros((4, 4)), [0, 0, 1, 1], exclude=np.eye(3, dtype=bool)), "mask"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_toward_is_minimised_by_the_target_and_scale_free():
    from jaxeif import meta

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    noisy = np.tile([1.0, 1.0, 0.5, 0.5], 3)  # "learn only from the same class, half as much from noisy rows"
    target = -1.0 * (labels[:, None] == labels[None, :]) * noisy[:, None]
    mask = ~np.eye(12, dtype=bool)
    assert float(meta.toward(target, target, mask)) == pytest.approx(0.0, abs=1e-6)
    M = rng.normal(size=(12, 12))
    for scale in (1e-4, 1.0, 1e3):
        assert float(meta.toward(scale * M, target, mask)) == pytest.approx(
            float(meta.toward(M, target, mask)), rel=1e-5
        )
    assert float(meta.toward(target + 0.3, target, mask)) > 0.05  # an offset is not the drawn structure
    assert float(meta.toward(-target, target, mask)) == pytest.approx(2.0, abs=1e-6)
    g = jax.grad(lambda m: meta.toward(m, target, mask))(jnp.asarray(target * 2.0))
    assert np.allclose(g, 0.0, atol=1e-6)  # a minimum: no pull at the target's structure
    with pytest.raises(ValueError, match="`target` must have the shape"):
        meta.toward(M, target[:3])
