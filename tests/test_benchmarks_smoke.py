"""Each benchmark runs end to end on tiny sizes and prints its table (nothing is timed or asserted on speed)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxeif.benchmarks import cnn
from jaxeif.benchmarks import lm as bench_lm


@pytest.mark.slow
def test_cnn_benchmark_tiny(capsys):
    parser = argparse.ArgumentParser()
    cnn.add_arguments(parser)
    out = cnn.run(parser.parse_args(["--n", "8", "--rows", "2", "--matmul-size", "256", "--profile"]))
    assert "pairs/s" in capsys.readouterr().out  # the table is printed; its numbers are read from `out`
    for name in ("jaxeif.eif", "jax.vmap, straightforward", "PyTorch loop", "torch.func.vmap", "jaxeif.eif_linearized"):
        assert any(k.startswith(name) and v > 0 for k, v in out["pairs_per_s"].items()), name
    assert out["matmul_gflops"] > 0 and out["peak_rss_mb"] > 0
    assert (
        "conv2 3x3, 16 -> 32 channels" in out["profile_us"]
    )  # the stage profile composed to cnn.loss_fn (checked inside)
    point = cnn._scale_point("4:2", 1, 0.01)  # one point of --scale, in-process (the CLI runs each in a subprocess)
    assert point["n"] == 4 and point["rows"] == 2 and point["pairs_per_s"] > 0 and point["peak_rss_mb"] > 0
    # the exactness column: PyTorch and the plain vmap reproduce jaxeif's rows to float32 tolerance
    diffs = {k: v for k, v in out["max_abs_diff_vs_eif"].items() if k.startswith(("PyTorch loop", "jax.vmap"))}
    assert len(diffs) == 2 and all(v < 1e-4 for v in diffs.values()), diffs


def test_cnn_benchmark_checks_flags_before_any_work(capsys):
    from jaxeif import cli

    for argv, match in (
        (["--scale", "a,b"], "--scale"),
        (["--n", "-5"], "--n: must be >= 1"),
        (["--n", "20000"], "--n must be in"),
        (["--rows", "600"], "--rows must be in"),
        (["--chunk-size", "x"], "--chunk-size"),
        (["--scale", "8:9"], "--scale"),
        (["--device-report"], "--data"),
    ):
        assert cli.main(["bench-cnn", *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and err.startswith("error:"), (argv, err)


@pytest.mark.slow
def test_device_report_runs_on_cpu_at_tiny_sizes(tmp_path, capsys):
    from jaxeif.benchmarks import export_data

    data = tmp_path / "fm.npz"
    export_data.run(argparse.Namespace(out=str(data), test=40, train=200))
    loaded = export_data.load(str(data))
    assert loaded["test_images"].shape == (40, 28, 28, 1) and loaded["train_labels"].shape == (200,)
    parser = argparse.ArgumentParser()
    cnn.add_arguments(parser)
    json_out = tmp_path / "report.json"
    out = cnn.run(
        parser.parse_args(["--device-report", "--data", str(data), "--sizes", "tiny", "--json", str(json_out)])
    )
    report = out["report"]
    assert report["speed"]["torch_loop_max_diff"] < 1e-4  # PyTorch reproduces jaxeif's rows
    assert report["sweep_vs_calls"]["max_diff"] < 1e-6  # eif_sweep = separate eif calls
    modes = {(p["lr"], p["mode"]) for p in report["precision"]}
    assert len(modes) == 15 and all(
        p["sign_agreement_above_floor"] >= 0.99 for p in report["precision"] if "share_above_floor" in p
    )
    assert report["meta"]["finite"] and report["full"]["finite"]
    assert "default eif" in capsys.readouterr().out and json_out.exists()


@pytest.mark.slow
def test_meta_memory_benchmark_tiny(capsys):
    from jaxeif.benchmarks import meta_memory

    out = meta_memory.run(argparse.Namespace(sizes="12,48", run=False, point=0))
    small, large = out["rows"]
    # n 4x: before grows about 10-16x (n x m), after about 4x (one row over the m evals, m = n)
    assert large["before_gib"] > 8 * small["before_gib"] and large["after_gib"] < 5 * small["after_gib"]


@pytest.mark.slow
def test_lm_benchmark_random_tiny_decoder(tmp_path, capsys):
    """bench-lm --random: both exact paths side by side on a random decoder, no checkpoint, a JSON of every number."""
    parser = argparse.ArgumentParser()
    bench_lm.add_arguments(parser)
    out = bench_lm.run(
        parser.parse_args(["--random", "tiny", "--n", "4", "--matmul-size", "128", "--json", str(tmp_path / "lm.json")])
    )
    printed = capsys.readouterr().out
    assert bench_lm.LOWRANK in printed and bench_lm.DENSE in printed and "low-rank / dense = " in printed
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert saved["lowrank_over_dense"] == out["lowrank_over_dense"] > 0 and saved["auto_picks"] in ("lowrank", "dense")
    assert saved["max_abs_diff_vs_lowrank"][bench_lm.DENSE] < 1e-5  # the two paths compute the same matrix
    # the --random path imports neither TensorFlow nor torch (a GPU machine may have neither)
    code = (
        "import sys, argparse; from jaxeif.benchmarks import lm; p = argparse.ArgumentParser(); lm.add_arguments(p); "
        "lm._model(p.parse_args(['--random', 'tiny', '--n', '2'])); "
        "assert not {'tensorflow', 'torch'} & set(sys.modules), sorted({'tensorflow', 'torch'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
