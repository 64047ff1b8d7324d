"""Each desideratum on constructed matrices whose answer is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif import desiderata as D


def _sym_antisym(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    b = rng.normal(size=(n, n))
    return (a + a.T) / 2, (b - b.T) / 2


def _offdiag(M):
    return M[~np.eye(len(M), dtype=bool)]


def test_symmetry_corr_closed_form():
    S, A = _sym_antisym(9, 0)
    assert float(D.symmetry_corr(S)) == pytest.approx(1.0, abs=1e-6)
    assert float(D.symmetry_corr(A)) == pytest.approx(-1.0, abs=1e-6)
    # M = S + cA: corr = (|S_c|^2 - c^2|A|^2) / (|S_c|^2 + c^2|A|^2) over off-diagonal entries.
    c = 0.7
    s = _offdiag(S) - _offdiag(S).mean()
    a = _offdiag(A)
    expected = (s @ s - c**2 * a @ a) / (s @ s + c**2 * a @ a)
    assert float(D.symmetry_corr(S + c * A)) == pytest.approx(expected, abs=1e-5)
    M = S + c * A
    assert float(D.symmetry_corr(M)) == pytest.approx(np.corrcoef(_offdiag(M), _offdiag(M.T))[0, 1], abs=1e-5)


def test_symmetry_corr_ignores_diagonal_unless_asked():
    S, A = _sym_antisym(6, 1)
    M = S + A
    big = M + np.diag(np.linspace(-50, 50, 6))
    assert float(D.symmetry_corr(big)) == pytest.approx(float(D.symmetry_corr(M)), abs=1e-6)
    with_diag = float(D.symmetry_corr(big, include_diagonal=True))
    assert with_diag == pytest.approx(np.corrcoef(big.ravel(), big.T.ravel())[0, 1], abs=1e-5)
    assert with_diag > float(D.symmetry_corr(M)) + 0.1


def test_block_symmetry_corr_only_sees_diagonal_blocks():
    S, A = _sym_antisym(8, 2)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    same = labels[:, None] == labels[None, :]
    M = np.where(same, S, A)  # symmetric inside blocks, antisymmetric across
    assert float(D.block_symmetry_corr(M, labels)) == pytest.approx(1.0, abs=1e-6)
    assert float(D.symmetry_corr(M)) < 0.5
    M2 = np.where(same, A, S)
    assert float(D.block_symmetry_corr(M2, labels)) == pytest.approx(-1.0, abs=1e-6)
    mask = same & ~np.eye(8, dtype=bool)
    M3 = S + 0.5 * A
    assert float(D.block_symmetry_corr(M3, labels)) == pytest.approx(np.corrcoef(M3[mask], M3.T[mask])[0, 1], abs=1e-5)


def test_inverse_asymmetry():
    M = np.array([[0.0, 3.0], [1.0, 5.0]])
    assert float(D.inverse_asymmetry(M)) == pytest.approx(1 / (np.sqrt(2) * 2.0), rel=1e-6)
    S, A = _sym_antisym(5, 3)
    assert float(D.inverse_asymmetry(S + A)) == pytest.approx(1 / (2 * np.linalg.norm(A)), rel=1e-5)
    assert np.isinf(float(D.inverse_asymmetry(S)))


def test_within_between_block_constants():
    labels = np.array([2, 2, 5, 5, 5, 7])
    same = labels[:, None] == labels[None, :]
    M = np.where(same, 2.0, -1.0)
    np.fill_diagonal(M, -100.0)
    within, between = D.within_between(M, labels)
    assert float(within) == pytest.approx(2.0) and float(between) == pytest.approx(-1.0)
    # with the diagonal: 8 off-diagonal same pairs of 2.0 and 6 diagonal entries of -100.
    within_d, _ = D.within_between(M, labels, include_diagonal=True)
    assert float(within_d) == pytest.approx((8 * 2.0 - 6 * 100.0) / 14)


def test_noise_influence_rows():
    M = np.arange(36.0).reshape(6, 6) ** 1.5
    out = np.asarray(D.noise_influence(M, [0, 1], [4, 3]))
    np.testing.assert_allclose(out, np.stack([M[4] - M[0], M[3] - M[1]]), rtol=1e-6)
    with pytest.raises(ValueError, match="pair up"):
        D.noise_influence(M, [0, 1], [2])
    with pytest.raises(ValueError, match="outside"):
        D.noise_influence(M, [0], [6])


def test_sparsity_hoyer_known_values():
    n = 7
    one = np.zeros((n, n))
    one[2, 5] = -3.0
    one[4, 4] = 99.0  # diagonal: ignored
    assert float(D.sparsity(one)) == pytest.approx(1.0, abs=1e-6)
    signs = np.where(np.random.default_rng(0).random((n, n)) < 0.5, -2.0, 2.0)
    assert float(D.sparsity(signs)) == pytest.approx(0.0, abs=1e-6)
    k_of = np.zeros((n, n))
    k_of[0, 1:5] = 1.5  # k = 4 equal nonzeros among n(n-1) = 42 off-diagonal entries
    m = n * (n - 1)
    assert float(D.sparsity(k_of)) == pytest.approx((np.sqrt(m) - 2.0) / (np.sqrt(m) - 1), abs=1e-6)
    assert float(D.sparsity(5 * k_of)) == pytest.approx(float(D.sparsity(k_of)), abs=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="square"):
        D.symmetry_corr(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="labels"):
        D.within_between(np.zeros((3, 3)), [0, 1])


def test_differentiable_and_jittable():
    labels = np.array([0, 0, 1, 1, 1])
    M = jnp.asarray(np.random.default_rng(4).normal(size=(5, 5)))
    g = jax.grad(lambda m: D.within_between(m, labels)[0])(M)
    same = (labels[:, None] == labels[None, :]) & ~np.eye(5, dtype=bool)
    np.testing.assert_allclose(np.asarray(g), same / same.sum(), rtol=1e-6)
    f = jax.jit(lambda m: D.symmetry_corr(m) + D.sparsity(m) + D.block_symmetry_corr(m, labels))
    assert float(f(M)) == pytest.approx(
        float(D.symmetry_corr(M) + D.sparsity(M) + D.block_symmetry_corr(M, labels)), rel=1e-5
    )
    # gradient of the symmetry score vs central finite differences in float64
    with jax.enable_x64(True):
        M64 = jnp.asarray(np.random.default_rng(5).normal(size=(4, 4)), jnp.float64)
        grad = np.asarray(jax.grad(D.symmetry_corr)(M64))
        E = np.zeros((4, 4))
        E[1, 3] = 1e-6
        fd = (float(D.symmetry_corr(M64 + E)) - float(D.symmetry_corr(M64 - E))) / 2e-6
        assert grad[1, 3] == pytest.approx(fd, rel=1e-5)
