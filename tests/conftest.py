"""Shared test set-up. Being here puts tests/ on sys.path (pytest's default import mode), so the test
modules import their helper modules (toy_experiment) by name, with no sys.path edits of their own.

Every test process (both xdist workers, and the study subprocesses through JAXEIF_COMPILE_CACHE) shares
one persistent XLA cache: a program compiled by one is loaded by the others. Entries are keyed by the
program, the compile options and the jax version, so a hit is the same executable."""

import os
from pathlib import Path

import jax
import pytest

XLA_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla"
os.environ["JAXEIF_COMPILE_CACHE"] = str(XLA_CACHE)
os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files: no display needed
jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def tiny_lm_ckpt(tmp_path_factory):
    """A tiny random transformers checkpoint (tests/tiny_lm.py, context 512) for a module's study runs. Needs torch."""
    pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")
    from tiny_lm import tiny_checkpoint  # imports torch: only where the fixture is used

    ckpt = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(ckpt, context=512)
    return ckpt


@pytest.fixture
def lowered_layouts(monkeypatch):
    """The layouts (Chunks) jaxeif.eif lowers its program at from here on: one entry per compile."""
    from jaxeif import influence

    lowered = []
    real = influence._jitted_program

    class Counting:
        def lower(self, *args, **kwargs):
            lowered.append(kwargs["chunks"])
            return real.lower(*args, **kwargs)

        def trace(self, *args, **kwargs):  # tracing (chunking.jaxpr_floor) compiles nothing: not counted
            return real.trace(*args, **kwargs)

    monkeypatch.setattr(influence, "_jitted_program", Counting())
    return lowered
