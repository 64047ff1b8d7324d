"""`jaxeif bench-lm-device --sizes tiny`: the device command's smoke run on CPU, without TensorFlow or gguf."""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif import lm
from jaxeif.benchmarks import lm_device
from jaxeif.lm import tokens
from jaxeif.models import phi3, tokenizer, upcast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The device's image has neither: importing either must fail there, so it fails here too.
BLOCKED = "import sys; sys.modules['tensorflow'] = None; sys.modules['gguf'] = None; "


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.load_tokenizer(None).save_pretrained(str(out))
    return out


def test_folded_tokenizer_maps_ids_modulo_the_vocabulary(tokenizer_dir):
    full = tokenizer.load_tokenizer(None)
    folded = lm_device.load_folded(str(tokenizer_dir), 32064)
    text = "Klarbu causes Pimjon.\nZoo"
    ids = tokens.encode(full, text)
    assert max(ids) >= 0 and tokens.encode(folded, text) == [i % 32064 for i in ids]
    assert folded.bos_token_id == full.bos_token_id % 32064 and tokens.vocab_size(folded) == 32064
    toks = lm.tokenize(folded, [text], config=lm_device.PHI3_MINI)
    assert int(np.asarray(toks.ids).max()) < 32064


def test_upcast_apply_fn_computes_in_float32_on_bfloat16_params():
    config = lm_device.SIZES["tiny"]
    p16 = phi3.init_params(jax.random.key(0), config, jnp.bfloat16)
    ids = jnp.arange(6, dtype=jnp.int32)[None]
    got = upcast.upcast_apply_fn(phi3.make_apply_fn(config))(p16, ids)
    want = phi3.make_apply_fn(config)(jax.tree.map(lambda x: x.astype(jnp.float32), p16), ids)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    grads = jax.grad(lambda p: upcast.upcast_apply_fn(phi3.make_apply_fn(config))(p, ids).sum())(p16)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


def _run(tokenizer_dir, tmp_path, *flags):
    out = tmp_path / "report.json"
    code = (
        BLOCKED + "from jaxeif import cli; import jaxeif.benchmarks.lm_device as m; "
        f"raise SystemExit(cli.experiment_main(m, {['--tokenizer', str(tokenizer_dir), '--json', str(out), *flags]!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_tiny_run_of_every_path_without_tensorflow(tokenizer_dir, tmp_path):
    report, stdout = _run(tokenizer_dir, tmp_path, "--sizes", "tiny", "--domains", "squares")
    assert report["size"] == "tiny" and report["dtype"] == "bfloat16" and report["compute_dtype"] == "float32"
    steps = {s["path"]: s for s in report["steps"] if s["path"] != "base"}
    assert set(steps) == set(lm_device.PATHS)
    for path, s in steps.items():
        assert s["finite"] and s["seconds"] > 0 and s["estimate_bytes"] > 0 and s["pairs"] == 49, (path, s)
        assert report["summary"]["paths"][path]["pairs_per_s"] > 0
    assert steps["dense"]["max_abs_diff_vs_lowrank"] < steps["lowrank"]["max_abs"]  # the same EIF, bf16 rounding apart
    assert report["summary"]["not_run"] == [] and "squares" in report["summary"]["seconds_per_domain"]
    assert "pairs/s" in stdout and "prompted squares" in stdout  # progress printed as it goes


@pytest.mark.slow
def test_budget_stops_new_steps_and_says_so(tokenizer_dir, tmp_path):
    report, _ = _run(
        tokenizer_dir, tmp_path, "--sizes", "tiny", "--domains", "squares", "--stages", "prompted", "--budget-s", "1e-6"
    )
    (step,) = [s for s in report["steps"] if s["path"] == "prompted"]
    assert "budget" in step["skipped"] and report["summary"]["not_run"] == ["prompted/squares"]


def test_unknown_stage_is_refused(tokenizer_dir):
    args = argparse.Namespace(
        tokenizer=str(tokenizer_dir), sizes="tiny", stages="dense,fast", domains=["squares"], budget_s=1.0
    )
    with pytest.raises(ValueError, match="--stages"):
        lm_device.run(args)
