"""Each benchmark runs end to end on tiny sizes and prints its table (nothing is timed or asserted on speed)."""
import argparse

from benchmarks import cnn


def test_cnn_benchmark_tiny(capsys):
    parser = argparse.ArgumentParser()
    cnn.add_arguments(parser)
    out = cnn.run(parser.parse_args(["--n", "8", "--rows", "2", "--matmul-size", "256", "--profile"]))
    printed = capsys.readouterr().out
    for name in ("jaxeif.eif", "jax.vmap, straightforward", "PyTorch loop", "torch.func.vmap", "eif_linearized"):
        assert name in printed
    assert set(out["pairs_per_s"]) >= {"jax.vmap, straightforward", "PyTorch loop (deepcopy, SGD step, eval)"}
    assert out["matmul_gflops"] > 0 and out["peak_rss_mb"] > 0
    assert "conv2 3x3, 16 -> 32 channels" in out["profile_us"]  # the stage profile composed to cnn.loss_fn (checked inside)
    point = cnn._scale_point("4:2", 1, 0.01)  # one point of --scale, in-process (the CLI runs each in a subprocess)
    assert point["n"] == 4 and point["rows"] == 2 and point["pairs_per_s"] > 0 and point["peak_rss_mb"] > 0
    # the exactness column: PyTorch and the plain vmap reproduce jaxeif's rows to float32 tolerance
    rows = [l for l in printed.splitlines() if l.startswith("| PyTorch loop") or l.startswith("| jax.vmap")]
    assert rows and all(float(l.rstrip(" |").split("|")[-1]) < 1e-4 for l in rows)
