"""jaxeif.store: tiles bit-identical to one jaxeif.eif call, resumable, refusing other calls, and
detecting torn or altered tiles; readable as plain zarr v2 without jaxeif."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import store


def loss(params, example):
    x, y = example
    return (jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2


def problem(n=7, m=5):
    k = jax.random.split(jax.random.key(3), 5)
    params = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4,))}
    train = (jax.random.normal(k[2], (n, 3)), jax.random.normal(k[3], (n,)))
    evals = (jax.random.normal(k[4], (m, 3)), jnp.arange(float(m)))
    return params, train, evals, jnp.linspace(0.01, 0.1, n)


@pytest.fixture(scope="module")
def reference():
    params, train, evals, lr = problem()
    return np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))


def fill(path, **kw):
    params, train, evals, lr = problem()
    kw.setdefault("tile", (3, 2))
    return store.fill(loss, params, train, evals, lr=kw.pop("lr", lr), path=path, **kw)


def test_tiles_bit_identical_to_one_call(tmp_path, reference):
    result = fill(tmp_path / "s")
    assert len(result.computed) == 3 * 3 and not result.reused and not result.repaired
    M = result.store.to_numpy()
    assert M.dtype == np.float32 and np.array_equal(M, reference)  # bit for bit, edge tiles included
    again = store.open(tmp_path / "s")
    assert np.array_equal(again.read_tile((2, 2)), reference[6:7, 4:5])
    assert again.verify() == {} and again.missing() == []


def test_row_tiles_exact_column_tiles_exact_per_block(tmp_path):
    """Row blocks are independent fine-tunes: tiles spanning every eval equal the whole call bit for bit.
    XLA:CPU rounds an eval's loss differently with the number of evals batched beside it (vectorised
    loops and their scalar tails), so a column block equals jaxeif.eif on that block bit for bit and
    the whole call to float32 rounding: within jaxeif.noise_floor."""
    params, train, evals, lr = problem(24, 20)
    whole = np.asarray(jaxeif.eif(loss, params, train, evals, lr=lr))
    rows = store.fill(loss, params, train, evals, lr=lr, path=tmp_path / "rows", tile=(5, 20)).store.to_numpy()
    assert np.array_equal(rows, whole)
    tiles = store.fill(loss, params, train, evals, lr=lr, path=tmp_path / "tiles", tile=(5, 6)).store
    block = np.asarray(
        jaxeif.eif(
            loss, params, jax.tree.map(lambda x: x[5:10], train), jax.tree.map(lambda x: x[6:12], evals), lr=lr[5:10]
        )
    )
    assert np.array_equal(tiles.read_tile((1, 1)), block)
    floor = np.asarray(jaxeif.noise_floor(loss, params, train, evals, lr=lr, samples=24))  # 4 sigma of float32 vs 64
    assert np.all(np.abs(tiles.to_numpy() - whole) <= 2 * floor)  # two float32 results, each within the floor


def test_evals_none_and_scalar_lr(tmp_path):
    params, train, _, _ = problem()
    ref = np.asarray(jaxeif.eif(loss, params, train, lr=0.05))
    got = store.fill(loss, params, train, lr=0.05, path=tmp_path / "s", tile=(4, 4)).store.to_numpy()
    assert np.array_equal(got, ref)


def test_rerun_computes_only_missing_tiles(tmp_path, reference):
    fill(tmp_path / "s")
    (tmp_path / "s" / "tiles" / "1.0.json").unlink()  # as if the worker died before marking it
    again = fill(tmp_path / "s")
    assert again.computed == [(1, 0)] and len(again.reused) == 8
    assert np.array_equal(again.store.to_numpy(), reference)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_tile_detected_never_read_and_recomputed(tmp_path, reference, damage):
    s = fill(tmp_path / "s").store
    chunk = tmp_path / "s" / "eif" / "1.1"
    raw = bytearray(chunk.read_bytes())
    if damage == "flip":
        raw[5] ^= 0x01  # one bit of one value: still decodes, only the checksum can tell
        chunk.write_bytes(bytes(raw))
    elif damage == "truncate":
        chunk.write_bytes(bytes(raw[:7]))  # half-written
    else:
        chunk.unlink()
    with pytest.raises(store.TileError, match=r"tile \(1, 1\)"):
        s.read_tile((1, 1))
    with pytest.raises(store.TileError):
        s.to_numpy()
    assert list(s.verify()) == [(1, 1)]
    with pytest.warns(RuntimeWarning, match=r"tile \(1, 1\).*recomputing"):
        again = fill(tmp_path / "s")
    assert again.repaired == [(1, 1)] and again.computed == []
    assert np.array_equal(again.store.to_numpy(), reference)


def test_other_call_refused_naming_the_difference(tmp_path, reference):
    fill(tmp_path / "s")
    with pytest.raises(store.StoreMismatchError, match=r"fingerprint\.lr.*fresh=True"):
        fill(tmp_path / "s", lr=0.5)
    with pytest.raises(store.StoreMismatchError, match=r"grid\.tile"):
        fill(tmp_path / "s", tile=(2, 2))
    with pytest.raises(store.StoreMismatchError, match=r"fingerprint\.steps"):
        fill(tmp_path / "s", steps=2)
    assert isinstance(store.StoreMismatchError("x"), (jaxeif.Error, ValueError))
    fresh = fill(tmp_path / "s", lr=0.5, fresh=True)
    assert len(fresh.computed) == 9
    params, train, evals, _ = problem()
    assert np.array_equal(fresh.store.to_numpy(), np.asarray(jaxeif.eif(loss, params, train, evals, lr=0.5)))


def test_readable_as_plain_zarr_v2(tmp_path, reference):
    """What a user without jaxeif sees: a zarr v2 array (tensorstore here; zarr, xarray and dask read the
    same files) and, for the bare-numpy case, raw little-endian chunks; NaN where no tile was written."""
    import tensorstore as ts

    fill(tmp_path / "s", worker=0, workers=2)  # half the tiles
    meta = json.loads((tmp_path / "s" / "eif" / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["chunks"] == [3, 2] and meta["shape"] == [7, 5]
    assert json.loads((tmp_path / "s" / ".zgroup").read_text()) == {"zarr_format": 2}
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "s" / "eif")}}).result()
    M = np.asarray(arr.read().result())
    done = store.Grid(7, 5, 3, 2).share(0, 2)
    for t in store.Grid(7, 5, 3, 2).tiles():
        r, c = store.Grid(7, 5, 3, 2).bounds(t)
        if t in done:
            assert np.array_equal(M[r, c], reference[r, c])
        else:
            assert np.isnan(M[r, c]).all()
    chunk = np.fromfile(tmp_path / "s" / "eif" / "0.0", dtype=meta["dtype"]).reshape(meta["chunks"])
    assert np.array_equal(chunk, reference[0:3, 0:2])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["shape"] == [7, 5]
    assert set(manifest["fingerprint"]) >= {"loss_fn", "params", "train", "lr", "versions"}


def test_worker_shares_partition_the_grid(monkeypatch):
    grid = store.Grid(10, 7, 3, 2)
    shares = [grid.share(w, 3) for w in range(3)]
    assert sorted(sum(shares, [])) == grid.tiles() and sum(map(len, shares)) == grid.count == 16
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert store.worker_share() == (1, 3)
    assert store.worker_share(2, 4) == (2, 4)  # arguments win


def test_bad_arguments(tmp_path):
    with pytest.raises(store.StoreError, match="`tile`"):
        fill(tmp_path / "a", tile=(0, 2))
    with pytest.raises(store.StoreError, match="both `worker` and `workers`"):
        fill(tmp_path / "a", worker=1)
    with pytest.raises(store.StoreError, match=r"\[0, workers\)"):
        fill(tmp_path / "a", worker=2, workers=2)
    with pytest.raises(store.StoreError, match="fresh=True deletes"):
        fill(tmp_path / "a", fresh=True, worker=0, workers=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(store.StoreError, match="existing file"):
        fill(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(store.StoreError, match="not a jaxeif store"):
        fill(tmp_path / "other")
    with pytest.raises(store.StoreError, match="holds no jaxeif store"):
        store.open(tmp_path / "nothing")
    s = fill(tmp_path / "b", worker=0, workers=2).store
    with pytest.raises(store.TileError, match="not complete"):
        s.read_tile((0, 1))
    with pytest.raises(store.StoreError, match="max_bytes"):
        s.to_numpy(max_bytes=8)


def test_plan_arithmetic():
    p = store.plan(100_000, pairs_per_second=7.2e6, devices=8, tile=(4096, 4096), program_bytes=10**9)
    assert p.tiles == 25 * 25 and p.pairs == 10**10
    assert p.device_hours == pytest.approx(1e10 / 7.2e6 / 3600)
    assert p.hours == pytest.approx(p.device_hours / 8 * 79 / (625 / 8))  # 79 rounds of 8 tiles, the last short
    assert p.bytes_on_disk == 625 * (4096 * 4096 * 4 + store.MARKER_BYTES)
    assert p.peak_bytes_per_worker == 10**9 + 2 * 4096 * 4096 * 4
    assert "device-hours" in str(p) and "TB" in str(store.plan(10**6, pairs_per_second=7.2e6))
    with pytest.raises(store.StoreError, match="pairs_per_second"):
        store.plan(10, pairs_per_second=0)


def test_compile_cache_default_and_off(monkeypatch):
    from jaxeif import compile_cache

    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.folder().endswith("/.cache/jaxeif/xla")
    monkeypatch.setenv(compile_cache.ENV, "")
    assert compile_cache.folder() is None
    assert compile_cache.enable() == jax.config.jax_compilation_cache_dir  # the test suite's own cache is kept


def test_first_auto_call_compiles_the_program_once(lowered_layouts):
    """On CPU, chunk_size="auto" plans with the one-row program it then runs: one compile of the EIF program
    (store workers rely on it: a worker's first tile costs one compile, or none from the persistent cache)."""
    from jaxeif import influence

    params, train, evals, lr = problem(13, 11)  # shapes no other test uses: nothing planned yet
    jaxeif.eif(loss, params, train, evals, lr=lr)
    assert lowered_layouts == [influence.Chunks(1, None)]  # one row against all 11 evals: the program that runs
    jaxeif.eif(loss, params, train, evals, lr=lr)
    assert len(lowered_layouts) == 1  # warm: the planned, compiled program is reused


def test_verify_false_trusts_markers(tmp_path, reference):
    fill(tmp_path / "s")
    chunk = tmp_path / "s" / "eif" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    trusting = fill(tmp_path / "s", verify=False)
    assert trusting.computed == [] and trusting.repaired == []  # markers trusted: no tile read
    with pytest.raises(store.TileError):  # ... but a read still checks
        trusting.store.to_numpy()
    with pytest.warns(RuntimeWarning, match="recomputing"):
        assert fill(tmp_path / "s").repaired == [(0, 0)]


def test_store_status_and_plan_commands(tmp_path, capsys):
    """`jaxeif store status` counts complete, missing (per worker) and damaged tiles; `plan` prints store.plan."""
    from jaxeif import cli

    fill(tmp_path / "s", worker=0, workers=2)  # 5 of the 9 tiles
    chunk = tmp_path / "s" / "eif" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:7])  # tile (0, 0): torn
    assert cli.main(["store", "status", str(tmp_path / "s"), "--workers", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    for line in (
        "complete: 5",
        "missing: 4",
        "tiles by worker 0: 5",
        "missing of worker 0/2: 0",
        "missing of worker 1/2: 4",
        "damaged: 1",
        "damaged 0.0: tile (0, 0)",
        "next: run the same fill again",
    ):
        assert line in out, (line, out)
    assert cli.main(["store", "status", str(tmp_path / "nothing")]) == 2  # a clear error, not a traceback
    assert "error:" in capsys.readouterr().err
    assert cli.main(["store", "plan", "--n", "100000", "--pairs-per-second", "7.2e6", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert str(store.plan(10**5, pairs_per_second=7.2e6, devices=8)) in out and "tiles: 625" in out
