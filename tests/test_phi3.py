"""Parity of the Flax Phi-3 / Llama port with transformers' PyTorch models on random tiny checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tests need torch==2.13.0 (make test installs it)")
transformers = pytest.importorskip("transformers")

from jaxeif.models import loading  # noqa: E402

pytestmark = pytest.mark.slow  # every test writes a torch-built transformers checkpoint and compares with it

TOL = 1e-4


def _tiny_phi3(tmp_path, name, **overrides):
    cfg = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    cfg.update(overrides)
    torch.manual_seed(len(name))
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg)).eval()
    _randomise_norms(model)
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model


def _randomise_norms(model):
    """Norm weights start at one; perturb them so a mis-mapped norm cannot pass."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def _ours(path, ids, mask=None):
    apply_fn, params, config = loading.from_pretrained(path)
    out = apply_fn(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    return np.asarray(out), config


def _ids(b, t, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)


def test_longrope_gqa_partial_rotary_below_and_beyond_original_context(tmp_path):
    """Phi-3 with LongRoPE + GQA + partial rotary: short factors for t <= 16, long ones past it."""
    hd = 8
    rng = np.random.default_rng(1)
    n = int(hd * 0.75) // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 5000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": (1 + rng.random(n)).tolist(),
        "long_factor": (2 + 3 * rng.random(n)).tolist(),
    }
    path, model = _tiny_phi3(
        tmp_path,
        "phi3_longrope",
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters=rope,
    )
    for t in (16, 21):  # up to the original context (short factors) and past it (long factors)
        ids = _ids(2, t, 97, seed=t)
        ours, config = _ours(path, ids)
        ref = _torch_logits(model, ids)
        assert np.abs(ours - ref).max() <= TOL, (t, np.abs(ours - ref).max())
    assert config.rope_type == "longrope" and config.num_key_value_heads == 2 and config.rotary_dim == 6
    assert config.attention_factor > 1.0  # factor 64/16 > 1 turns the cos/sin scaling on


def test_longrope_written_as_transformers4_su_config(tmp_path):
    """A 4.x-style config.json (`rope_scaling` type "su", top-level rope_theta) loads to the same model."""
    rng = np.random.default_rng(2)
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": (1 + rng.random(4)).tolist(),
        "long_factor": (2 + rng.random(4)).tolist(),
    }
    path, model = _tiny_phi3(
        tmp_path, "phi3_su", max_position_embeddings=32, original_max_position_embeddings=8, rope_parameters=rope
    )
    cfg = json.loads((path / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp.pop("rope_type")
    rp["type"] = "su"
    cfg["rope_scaling"] = rp
    (path / "config.json").write_text(json.dumps(cfg))
    ids = _ids(1, 12, 97)
    ours, config = _ours(path, ids)
    assert config.rope_type == "longrope"
    assert np.abs(ours - _torch_logits(model, ids)).max() <= TOL


def test_plain_phi3_4k_with_padding_mask_and_sharded_files(tmp_path):
    """Plain rope, untied head, left padding; checkpoint sharded into several safetensors files."""
    torch.manual_seed(3)
    cfg = transformers.Phi3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.Phi3ForCausalLM(cfg).eval()
    _randomise_norms(model)
    path = tmp_path / "phi3_4k"
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = _ids(3, 10, 97)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    ours, config = _ours(path, ids, mask)
    ref = _torch_logits(model, ids, mask)
    valid = mask.astype(bool)
    assert not config.tie_word_embeddings and config.rope_type == "default"
    assert np.abs(ours - ref)[valid].max() <= TOL


def test_sliding_window(tmp_path):
    path, model = _tiny_phi3(tmp_path, "phi3_window", sliding_window=4)
    ids = _ids(1, 11, 97)
    ours, config = _ours(path, ids)
    assert config.sliding_window == 4
    assert np.abs(ours - _torch_logits(model, ids)).max() <= TOL


def test_tied_embedding_llama(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(
        vocab_size=89,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomise_norms(model)
    path = tmp_path / "llama"
    model.save_pretrained(path)
    ids = _ids(2, 9, 89)
    ours, config = _ours(path, ids)
    assert config.tie_word_embeddings and config.model_type == "llama"
    assert np.abs(ours - _torch_logits(model, ids)).max() <= TOL


def test_bf16_runs_close_to_float32(tmp_path):
    path, _ = _tiny_phi3(tmp_path, "phi3_bf16")
    ids = _ids(1, 8, 97)
    f32, _ = _ours(path, ids)
    apply_fn, params, _ = loading.from_pretrained(path, dtype=jnp.bfloat16)
    assert params["model"]["embed_tokens"]["weight"].dtype == jnp.bfloat16
    out = np.asarray(apply_fn(params, ids))
    assert out.dtype == np.float32
    assert np.abs(out - f32).max() < 0.05 * np.abs(f32).max()


def test_apply_fn_is_differentiable(tmp_path):
    path, _ = _tiny_phi3(tmp_path, "phi3_grad", num_hidden_layers=1)
    apply_fn, params, _ = loading.from_pretrained(path)
    ids = _ids(1, 5, 97)
    g = jax.jit(jax.grad(lambda p: apply_fn(p, ids).sum()))(params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["model"]["layers"]["self_attn"]["qkv_proj"]["weight"]).max()) > 0
