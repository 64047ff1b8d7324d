"""jaxeif.streaming: every study metric from a 512 x 512 store in 64 x 64 tiles equals the in-memory
jaxeif.desiderata metric to float32 rounding, holding at most two tiles (counted, and measured)."""

import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif import desiderata, store, streaming

N, TILE = 512, 64


def loss(params, example):
    x, y = example
    return jnp.sum((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    k = jax.random.split(jax.random.key(11), 4)
    labels = np.asarray(jax.random.randint(k[0], (N,), 0, 4))
    x = jax.random.normal(k[1], (N, 6)) + labels[:, None]  # classes that differ: structured influence
    y = jax.nn.one_hot(labels, 4)
    params = {"w": 0.3 * jax.random.normal(k[2], (6, 8)), "v": 0.3 * jax.random.normal(k[3], (8, 4))}
    path = tmp_path_factory.mktemp("s") / "store"
    s = store.fill(loss, params, (x, y), lr=0.05, path=path, tile=(TILE, TILE)).store
    return s, labels, s.to_numpy()


def test_metrics_equal_in_memory(filled):
    s, labels, M = filled
    floor = np.float32(np.quantile(np.abs(M), 0.3))  # a scalar floor that excludes about 30% of pairs
    got = streaming.summarize(s, labels, floor=floor, k=5)
    close = lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=2e-5, atol=1e-7)  # noqa: E731
    close(got.symmetry_corr, desiderata.symmetry_corr(M))
    close(got.block_symmetry_corr, desiderata.block_symmetry_corr(M, labels))
    within, between = desiderata.within_between(M, labels)
    close(got.within, within)
    close(got.between, between)
    close(got.sparsity, desiderata.sparsity(M))
    shares = desiderata.sign_shares(M, labels, floor=floor)
    for key in shares:
        close(got.sign_shares[key], shares[key])
    assert 0.2 < got.sign_shares["excluded"] < 0.4
    close(got.row_sums, M.astype(np.float64).sum(1))
    close(got.col_sums, M.astype(np.float64).sum(0))
    off = ~np.eye(N, dtype=bool)
    for a in range(4):
        for b in range(4):
            block = (labels[:, None] == a) & (labels[None, :] == b) & off
            close(got.class_means[a, b], M[block].mean())
    rows, values = streaming.top_k(M, 5)
    assert np.array_equal(got.top_rows, rows) and np.array_equal(got.top_values, values)
    rows, values = streaming.top_k(M, 5, largest=False)
    assert np.array_equal(got.bottom_rows, rows) and np.array_equal(got.bottom_values, values)
    assert got.tiles_read == (N // TILE) ** 2 and got.max_tiles_held == 2


def test_per_eval_floor_and_diagonal(filled):
    s, labels, M = filled
    floor = np.quantile(np.abs(M), 0.5, axis=0).astype(np.float32)  # f[m]: one floor per eval, as noise_floor
    got = streaming.summarize(s, labels, floor=floor, k=3, include_diagonal=True)
    shares = desiderata.sign_shares(M, labels, floor=np.broadcast_to(floor, M.shape), include_diagonal=True)
    for key in shares:
        np.testing.assert_allclose(got.sign_shares[key], shares[key], rtol=2e-5)
    np.testing.assert_allclose(got.symmetry_corr, desiderata.symmetry_corr(M, include_diagonal=True), rtol=2e-5)
    np.testing.assert_allclose(got.sparsity, desiderata.sparsity(M, include_diagonal=True), rtol=2e-5)


@pytest.mark.slow
def test_peak_memory_a_few_tiles(filled):
    s, labels, M = filled
    tile_bytes = TILE * TILE * 4
    streaming.summarize(s, labels, k=5)  # warm: imports and tensorstore's first-read set-up
    tracemalloc.start()
    streaming.summarize(s, labels, k=5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    state = 2 * 5 * N * (8 + 8) + 2 * N * 8  # top/bottom k (f64 values, i64 rows) and the row/column sums
    print(
        f"peak {peak} bytes = {peak / tile_bytes:.1f} tiles of {tile_bytes}; running state {state}; matrix {M.nbytes}"
    )
    assert peak - state < 16 * tile_bytes  # two tiles with their float64 copies, masks and top-k merges
    assert peak < M.nbytes / 3


def test_bad_arguments(filled):
    s, labels, _ = filled
    with pytest.raises(ValueError, match="`labels`"):
        streaming.summarize(s, labels[:-1])
    with pytest.raises(ValueError, match="`floor`"):
        streaming.summarize(s, labels, floor=np.zeros(3))
    with pytest.raises(ValueError, match="`k`"):
        streaming.summarize(s, k=0)
    with pytest.raises(TypeError, match="jaxeif.store.Store"):
        streaming.summarize(np.zeros((4, 4)))


def test_non_square_store_and_non_square_tiles(tmp_path):
    """Train-vs-eval stores (n != m) stream sums, top-k and sparsity; symmetry needs square tiles."""
    k = jax.random.split(jax.random.key(5), 4)
    params = {"w": jax.random.normal(k[0], (6, 8)), "v": jax.random.normal(k[1], (8, 4))}
    data = lambda key, n: (jax.random.normal(key, (n, 6)), jax.nn.one_hot(jnp.arange(n) % 4, 4))  # noqa: E731
    s = store.fill(loss, params, data(k[2], 30), data(k[3], 22), lr=0.05, path=tmp_path / "a", tile=(8, 6)).store
    M = s.to_numpy()
    got = streaming.summarize(s, k=4, include_diagonal=True)
    assert got.symmetry_corr is None and got.within is None
    np.testing.assert_allclose(got.sparsity, desiderata.sparsity(M, include_diagonal=True), rtol=2e-5)
    np.testing.assert_allclose(got.col_sums, M.astype(np.float64).sum(0), rtol=1e-6)
    assert np.array_equal(got.top_rows, streaming.top_k(M, 4)[0])
    sq = store.fill(loss, params, data(k[2], 30), lr=0.05, path=tmp_path / "b", tile=(8, 6)).store  # 30 x 30
    got = streaming.summarize(sq, k=2)
    np.testing.assert_allclose(got.sparsity, desiderata.sparsity(sq.to_numpy()), rtol=2e-5)  # diagonal left out
    assert got.symmetry_corr is None  # 8 x 6 tiles do not mirror onto tiles
    with pytest.raises(store.StoreError, match="square tiles"):
        streaming.summarize(sq, np.arange(30) % 3)
