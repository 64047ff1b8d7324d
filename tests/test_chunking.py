"""chunk_size="auto": the layout search, memory errors, and equality with the unchunked program."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import chunking, influence
from jaxeif.chunking import Chunks
from tests.test_influence import make_problem, mlp_loss


def fake_compiler(per_pair=10, fixed=100, m=50):
    """A stand-in for compiling: bytes = fixed + per_pair * rows * evals."""
    calls = []

    def compile_at(chunks: Chunks):
        calls.append(chunks)
        rows, evals = chunks.rows, chunks.evals or m
        return f"program{chunks}", chunking.Footprint(fixed + per_pair * rows * evals, fixed)

    return compile_at, calls


def test_choose_on_an_accelerator_compiles_once_when_the_most_rows_fit():
    compile_at, calls = fake_compiler()
    chunks, program, used = chunking.choose(compile_at, n=300, m=50, budget=10**9, accelerator=True)
    assert chunks == Chunks(300, None) and program == "programChunks(rows=300, evals=None)"
    assert calls == [chunks]  # one compile: the program that runs
    chunking.choose(compile_at, n=5000, m=50, budget=10**9, accelerator=True)
    assert calls[-1].rows == 1000 and len(calls) == 2  # MAX_ROWS, spread evenly over the 5,000 rows


def test_choose_on_an_accelerator_takes_the_rows_that_fit_from_the_analysis():
    compile_at, calls = fake_compiler()
    chunks, program, used = chunking.choose(compile_at, n=1000, m=50, budget=100_000, accelerator=True)
    assert used <= 100_000 and chunks.evals is None and program == f"program{chunks}"
    assert 100 <= chunks.rows <= 199  # 199 fit; spread evenly over 1,000 rows: 167 (6 steps)
    assert calls == [Chunks(1000, None), chunks]  # the most rows, then the rows that fit


def test_choose_corrects_an_estimate_that_does_not_fit():
    """Bytes that the analysis calls row-dependent but are not (fixed reported as 0): the first estimate is
    over budget, the line through the two layouts tried is exact."""
    calls = []

    def compile_at(chunks):
        calls.append(chunks)
        return "p", chunking.Footprint(5000 + 10 * chunks.rows, 0)

    chunks, _, used = chunking.choose(compile_at, n=1000, m=10, budget=6000, accelerator=True)
    assert chunks.rows == 100 and used == 6000 and len(calls) == 3


def test_choose_halves_when_compiling_runs_out_of_memory():
    def compile_at(chunks):
        if chunks.rows > 300:
            raise RuntimeError("RESOURCE_EXHAUSTED: autotuning ran out of memory")
        return "p", chunking.Footprint(chunks.rows, 0)

    assert chunking.choose(compile_at, n=1000, m=10, budget=10**9, accelerator=True)[0] == Chunks(250, None)

    def broken(chunks):
        raise RuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):  # other compile errors are not swallowed
        chunking.choose(broken, n=1000, m=10, budget=10**9, accelerator=True)


def test_choose_on_cpu_takes_one_row_and_tiles_evals_only_when_needed():
    compile_at, calls = fake_compiler()
    assert chunking.choose(compile_at, n=1000, m=50, budget=10**9, accelerator=False)[0] == Chunks(1, None)
    assert len(calls) == 1
    chunks, _, used = chunking.choose(compile_at, n=1000, m=50, budget=300, accelerator=False)
    assert chunks.rows == 1 and chunks.evals is not None and chunks.evals < 50 and used <= 300


def test_choose_refuses_when_nothing_fits():
    compile_at, _ = fake_compiler(fixed=10_000)
    with pytest.raises(chunking.MemoryBudgetError, match="memory budget"):
        chunking.choose(compile_at, n=10, m=50, budget=5_000, accelerator=True)


def test_choose_plans_from_a_probe_when_the_most_rows_surely_do_not_fit():
    """With a floor over budget at the most rows, a small probe is compiled instead of them; the rows read
    off its analysis are compiled once: the same layout as the search without the floor, one compile fewer
    at full size."""
    compile_at, calls = fake_compiler()  # bytes = 100 + 500 * rows (m = 50)
    floor_at = lambda c: 100 + 250 * c.rows  # noqa: E731  (half of the bytes: a floor)
    chunks, program, used = chunking.choose(
        compile_at, n=1000, m=50, budget=100_000, accelerator=True, floor_at=floor_at
    )
    assert calls == [Chunks(chunking.PROBE_ROWS, None), chunks]  # the probe, then the program that runs
    assert program == f"program{chunks}" and used <= 100_000
    without, _ = fake_compiler()
    assert chunking.choose(without, n=1000, m=50, budget=100_000, accelerator=True)[0] == chunks
    # a floor within budget changes nothing: the most rows, one compile
    compile_at, calls = fake_compiler()
    chunking.choose(compile_at, n=300, m=50, budget=10**9, accelerator=True, floor_at=floor_at)
    assert calls == [Chunks(300, None)]


def test_choose_runs_the_probe_when_nothing_larger_fits():
    compile_at, calls = fake_compiler()  # the probe's 8 rows take 4,100 bytes; 9 rows would take 4,600
    floor_at = lambda c: 100 + 250 * c.rows  # noqa: E731
    chunks, program, used = chunking.choose(compile_at, n=1000, m=50, budget=4_500, accelerator=True, floor_at=floor_at)
    assert chunks == Chunks(8, None) and calls == [chunks] and used == 4_100
    # a probe over budget: the search goes on from it, down
    compile_at, calls = fake_compiler()
    chunks, _, used = chunking.choose(compile_at, n=1000, m=50, budget=3_000, accelerator=True, floor_at=floor_at)
    assert calls[0] == Chunks(8, None) and chunks.rows == 5 and used <= 3_000


def test_choose_after_a_probe_corrects_an_estimate_that_does_not_fit():
    """Memory that grows faster than linearly with rows: the probe's line overshoots; the line through the
    probe and the overshoot is compiled next, and the probe itself runs if that is no larger."""
    calls = []

    def compile_at(chunks):
        calls.append(chunks)
        return f"p{chunks.rows}", chunking.Footprint(100 + 10 * chunks.rows**2, 100)

    floor_at = lambda c: 100 + 5 * c.rows**2  # noqa: E731  (half the bytes)
    chunks, program, used = chunking.choose(
        compile_at, n=1000, m=10, budget=20_000, accelerator=True, floor_at=floor_at
    )
    assert calls[0] == Chunks(8, None) and Chunks(1000, None) not in calls
    # 8 -> 200 (the probe's line; 400,100 bytes: over) -> 17 (the line through both): fits, and runs
    assert calls == [Chunks(8, None), Chunks(200, None), Chunks(17, None)] == [*calls[:2], chunks]
    assert used == 100 + 10 * 17**2 <= 20_000 and program == "p17"
    calls.clear()
    chunks, program, used = chunking.choose(compile_at, n=1000, m=10, budget=850, accelerator=True, floor_at=floor_at)
    assert calls == [Chunks(8, None), Chunks(9, None)]  # 9 rows take 910 bytes: over
    assert chunks == Chunks(8, None) and program == "p8" and used == 740  # the probe, compiled once, runs


@pytest.fixture
def accelerator(monkeypatch):
    """Make jaxeif plan as on a GPU (the programs still compile and run on this CPU)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    influence._CACHE.clear()
    yield
    influence._CACHE.clear()


@pytest.mark.slow  # compiles a CNN and an MLP at 4 layouts each
def test_jaxpr_floor_is_never_above_xla_estimate(accelerator, monkeypatch):
    """The floor (arguments, results, the largest convolution/matmul result, inside vmapped and lax.map'ed
    rows) of the real EIF program is never more than XLA's analysis of the compiled program, and grows with
    the rows of a step."""
    from jaxeif.models import cnn

    seen = []
    real_choose = chunking.choose
    monkeypatch.setattr(chunking, "choose", lambda *a, **k: seen.append((a[0], k["floor_at"])) or real_choose(*a, **k))
    key = jax.random.split(jax.random.key(0), 3)
    cnn_train = (jax.random.uniform(key[1], (12, 28, 28, 1)), jax.random.randint(key[2], (12,), 0, 10))
    mlp_params, mlp_train, _ = make_problem(n=12)
    for loss, params, train in ((cnn.loss_fn, cnn.init_params(key[0]), cnn_train), (mlp_loss, mlp_params, mlp_train)):
        jaxeif.chunk_plan(loss, params, train, lr=0.05)
        compile_at, floor_at = seen[-1]
        floors = []
        for chunks in (Chunks(1), Chunks(4), Chunks(12), Chunks(4, 6)):
            floors.append(floor_at(chunks))
            assert 0 < floors[-1] <= compile_at(chunks)[1].total, (loss, chunks)
        assert floors[2] > floors[1] > floors[0]


def test_auto_on_an_accelerator_fits_the_budget_and_equals_all_rows_at_once(accelerator):
    params, train, _ = make_problem(n=40)
    evals = train
    want = np.asarray(jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, chunk_size=None))
    one_row = jaxeif.chunk_plan(mlp_loss, params, train, evals, lr=0.05, chunk_size=1)[1]
    all_rows = jaxeif.chunk_plan(mlp_loss, params, train, evals, lr=0.05, chunk_size=40)[1]
    budget = (one_row + all_rows) // 2  # all 40 rows do not fit, one row does
    chunks, nbytes = jaxeif.chunk_plan(mlp_loss, params, train, evals, lr=0.05, memory_budget=budget)
    assert 1 < chunks.rows < 40 and nbytes <= budget
    got = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, memory_budget=budget)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_first_auto_call_on_an_accelerator_compiles_the_program_that_runs(accelerator, lowered_layouts):
    params, train, _ = make_problem(n=37)
    got = jaxeif.eif(mlp_loss, params, train, lr=0.05)
    assert lowered_layouts == [Chunks(37, None)]  # all rows fit: one compile, and it is the program that ran
    jaxeif.eif(mlp_loss, params, train, lr=0.05)
    assert len(lowered_layouts) == 1  # warm
    want = jaxeif.eif(mlp_loss, params, train, lr=0.05, chunk_size=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_first_auto_call_never_compiles_the_most_rows_when_they_surely_do_not_fit(
    accelerator, lowered_layouts, monkeypatch
):
    """A budget under the floor of all 40 rows: the probe (8 rows) is compiled, then the rows read off it; the
    40-row program never is, and the result equals one row at a time."""
    params, train, _ = make_problem(n=40)
    floors = []
    real_floor = chunking.jaxpr_floor
    monkeypatch.setattr(chunking, "jaxpr_floor", lambda j: floors.append(real_floor(j)) or floors[-1])
    jaxeif.chunk_plan(mlp_loss, params, train, lr=0.05)  # the floor of the 40-row program, then it compiles
    probe = jaxeif.chunk_plan(mlp_loss, params, train, lr=0.05, chunk_size=8)[1]
    budget = floors[0] - 1
    assert probe <= budget  # the setting: the probe fits, the most rows surely do not
    del lowered_layouts[:]
    got = jaxeif.eif(mlp_loss, params, train, lr=0.05, memory_budget=budget)
    assert lowered_layouts[0] == Chunks(8, None) and Chunks(40, None) not in lowered_layouts
    chunks, nbytes = jaxeif.chunk_plan(mlp_loss, params, train, lr=0.05, memory_budget=budget)
    assert chunks == lowered_layouts[-1] and chunks.rows > 8 and nbytes <= budget
    want = jaxeif.eif(mlp_loss, params, train, lr=0.05, chunk_size=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_auto_plans_again_in_half_the_estimate_when_the_device_runs_out(accelerator, monkeypatch):
    """XLA's estimate can be low on a real device: "auto" then plans once more within half of it, warns, and
    keeps that plan; a fixed chunk_size gets the MemoryBudgetError instead."""
    real = influence.plan
    runs = []

    def plan_on_a_small_device(args, static, chunk_size, memory_budget, mode, **kw):
        chunks, compiled, nbytes = real(args, static, chunk_size, memory_budget, mode, **kw)
        if kw.get("traced"):
            return chunks, compiled, nbytes

        def run(*a):
            runs.append(chunks)
            if chunks.rows > 10:  # the device holds 10 rows at once, whatever XLA estimated
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
            return compiled(*a)

        return chunks, run, nbytes

    monkeypatch.setattr(influence, "plan", plan_on_a_small_device)
    params, train, _ = make_problem(n=39)
    with pytest.warns(RuntimeWarning, match="out of device memory at .* planned again within") as record:
        got = jaxeif.eif(mlp_loss, params, train, lr=0.05)
    assert "at 39 rows" in str(record[0].message)  # then halved until the program fits the device
    assert runs[0] == Chunks(39, None) and 1 <= runs[-1].rows <= 10
    want = jaxeif.eif(mlp_loss, params, train, lr=0.05, chunk_size=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxeif.eif(mlp_loss, params, train, lr=0.05)  # the smaller plan is kept: no second failure
    with pytest.raises(jaxeif.MemoryBudgetError, match="chunk_size=20 rows"):
        jaxeif.eif(mlp_loss, params, train, lr=0.05, chunk_size=20)


def test_auto_tiles_the_evals_when_one_row_does_not_fit(accelerator):
    params, evals, _ = make_problem(n=4000)
    train = jax.tree.map(lambda x: x[:3], evals)
    one_row = jaxeif.chunk_plan(mlp_loss, params, train, evals, lr=0.05, chunk_size=1)[1]
    chunks, nbytes = jaxeif.chunk_plan(mlp_loss, params, train, evals, lr=0.05, memory_budget=int(0.6 * one_row))
    assert chunks.rows == 1 and chunks.evals is not None and chunks.evals < 4000
    got = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, memory_budget=int(0.6 * one_row))
    want = jaxeif.eif(mlp_loss, params, train, evals, lr=0.05, chunk_size=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_fixed_chunk_over_free_memory_is_refused_before_running(accelerator, monkeypatch):
    monkeypatch.setattr(chunking, "free_bytes", lambda device=None: 1000)
    params, train, _ = make_problem(n=8)
    with pytest.raises(chunking.MemoryBudgetError, match="chunk_size=4 needs an estimated"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1, chunk_size=4)


def test_out_of_memory_at_run_time_names_chunk_size(monkeypatch):
    def exhausted(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26.00GiB")

    monkeypatch.setattr(influence, "plan", lambda *a, **k: (Chunks(7), exhausted, 2**30))
    params, train, _ = make_problem(n=8)
    with pytest.raises(jaxeif.MemoryBudgetError, match=r"chunk_size=7 rows .* 1.00 GiB"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1)

    def other(*args):
        raise RuntimeError("INVALID_ARGUMENT: something else")

    monkeypatch.setattr(influence, "plan", lambda *a, **k: (Chunks(7), other, 2**30))
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1)


def test_bad_chunk_size_and_budget():
    params, train, _ = make_problem(n=4)
    for bad in ("big", 0, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="chunk_size"):
            jaxeif.eif(mlp_loss, params, train, lr=0.1, chunk_size=bad)
    with pytest.raises(ValueError, match="memory_budget"):
        jaxeif.eif(mlp_loss, params, train, lr=0.1, memory_budget=-1)
    with pytest.raises(ValueError, match="memory_budget"):  # also under jit, and with a fixed chunk
        jax.jit(lambda p: jaxeif.eif(mlp_loss, p, train, lr=0.1, chunk_size=2, memory_budget="lots"))(params)


def wide_loss(params, example):
    x, y = example
    return (jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2


def _grad_temp_bytes(n: int, m: int) -> int:
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k[0], (3, 512)) / 3, "w2": jax.random.normal(k[1], (512,)) / 30}
    train = (jax.random.normal(k[2], (n, 3)), jnp.zeros(n))
    evals = (jax.random.normal(k[2], (m, 3)), jnp.zeros(m))
    f = jax.jit(jax.grad(lambda lr: jaxeif.eif(wide_loss, params, train, evals, lr=lr, chunk_size=2).sum()))
    return f.lower(jnp.full((n,), 0.01)).compile().memory_analysis().temp_size_in_bytes


def test_the_backward_pass_keeps_about_one_chunk_of_rows():
    # Without rematerialisation reverse mode would keep every row's activations over all evals:
    # 64 rows x 256 evals x 512 hidden x 4 bytes = 32 MiB more at n = 64 than at n = 8.
    grow = _grad_temp_bytes(64, 256) - _grad_temp_bytes(8, 256)
    assert grow < 2 * 2**20
