"""Shared test set-up. Being here puts tests/ on sys.path (pytest's default import mode), so the test
modules import their helper modules (toy_experiment) by name, with no sys.path edits of their own."""

import pytest


@pytest.fixture(scope="module")
def tiny_lm_ckpt(tmp_path_factory):
    """A tiny random transformers checkpoint (tests/tiny_lm.py, context 512) for a module's study runs, with the
    persistent XLA cache off for the module (it would change jax config for later tests). Needs torch."""
    pytest.importorskip("torch", reason="the tiny checkpoint is written with transformers' PyTorch models")
    from tiny_lm import tiny_checkpoint  # imports torch: only where the fixture is used

    mp = pytest.MonkeyPatch()
    mp.setenv("JAXEIF_COMPILE_CACHE", "")
    ckpt = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(ckpt, context=512)
    yield ckpt
    mp.undo()
