"""Bad checkpoints give clear errors naming the file or tensor (GGUF and safetensors; no torch)."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxeif.models import loading, phi3

D, F, H, KV, V = 8, 12, 2, 1, 11


def _llama_tensors(rng):
    hd = D // H
    t = {"token_embd.weight": rng.normal(size=(V, D)), "output_norm.weight": rng.normal(size=(D,))}
    for name, shape in {
        "attn_q": (H * hd, D),
        "attn_k": (KV * hd, D),
        "attn_v": (KV * hd, D),
        "attn_output": (D, D),
        "ffn_gate": (F, D),
        "ffn_up": (F, D),
        "ffn_down": (D, F),
        "attn_norm": (D,),
        "ffn_norm": (D,),
    }.items():
        t[f"blk.0.{name}.weight"] = rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in t.items()}


def _write_gguf(path, arch="llama", tensors=None, drop=()):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for name, arr in (tensors or _llama_tensors(np.random.default_rng(0))).items():
        if name not in drop:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_valid_tiny_gguf_loads_and_runs(tmp_path):
    tensors = _llama_tensors(np.random.default_rng(0))
    tensors["blk.0.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"].astype(np.float16)  # F16 path
    params, config = loading.load(_write_gguf(tmp_path / "ok.gguf", tensors=tensors))
    assert config.tie_word_embeddings and config.num_key_value_heads == KV
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["weight"], tensors["token_embd.weight"])
    np.testing.assert_array_equal(
        params["model"]["layers"]["mlp"]["gate_up_proj"]["weight"][0, F:],
        tensors["blk.0.ffn_up.weight"].astype(np.float32),
    )
    logits = phi3.make_apply_fn(config)(params, np.zeros((1, 3), np.int32))
    assert logits.shape == (1, 3, V) and bool(np.isfinite(logits).all())


def test_unpermute_inverts_llama_cpp_rotary_row_order():
    """llama.cpp stores rows (h, i, pair) as (h, pair, i); the inverse restores HF's order."""
    hd, heads = 6, 2
    w = np.arange(heads * hd * 3, dtype=np.float32).reshape(heads * hd, 3)
    # Build llama.cpp's order explicitly, row by row: stored row h*hd + 2*i + p = HF row h*hd + p*hd/2 + i.
    stored = np.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            for p in range(2):
                stored[h * hd + 2 * i + p] = w[h * hd + p * hd // 2 + i]
    np.testing.assert_array_equal(loading.unpermute_rotary_rows(stored, heads), w)


@pytest.mark.parametrize(
    "case, match",
    [
        ("arch", "unknown architecture general.architecture='gpt2'"),
        ("type", "blk.0.attn_v.weight has GGUF type I8"),
        ("shape", r"blk.0.ffn_down.weight.*shape \(12, 8\).*needs \(8, 12\)"),
        ("missing", "tensor blk.0.attn_k.weight"),
        ("truncated", "cannot read GGUF file"),
        ("nofile", "does not exist"),
    ],
)
def test_gguf_errors_name_the_problem(tmp_path, case, match):
    path = tmp_path / f"{case}.gguf"
    tensors = _llama_tensors(np.random.default_rng(1))
    if case == "arch":
        _write_gguf(path, arch="gpt2")
    elif case == "type":
        tensors["blk.0.attn_v.weight"] = np.ones((KV * D // H, D), np.int8)
        _write_gguf(path, tensors=tensors)
    elif case == "shape":
        tensors["blk.0.ffn_down.weight"] = tensors["blk.0.ffn_down.weight"].T.copy()
        _write_gguf(path, tensors=tensors)
    elif case == "missing":
        _write_gguf(path, drop=("blk.0.attn_k.weight",))
    elif case == "truncated":
        data = _write_gguf(path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        loading.load(path)
    if case != "nofile":
        assert str(path) in str(err.value)


def _hf_dir(tmp_path, config_edit=None, tensor_edit=None):
    cfg = {
        "model_type": "phi3",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": 1,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "max_position_embeddings": 32,
    }
    if config_edit:
        config_edit(cfg)
    config = phi3.Phi3Config(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=D // H,
    )
    rng = np.random.default_rng(0)
    flat = {
        name: rng.normal(size=shape).astype(np.float32)
        for name, shape in loading.per_tensor_shapes(config).items()
        if name.split(".")[-2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    }
    if tensor_edit:
        tensor_edit(flat)
    d = tmp_path / "hf"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(flat, str(d / "model.safetensors"))
    return d


def test_hf_dir_roundtrip_and_errors(tmp_path):
    d = _hf_dir(tmp_path / "ok")
    params, config = loading.load(d)
    assert params["model"]["layers"]["self_attn"]["qkv_proj"]["weight"].shape == (1, (H + 2 * KV) * D // H, D)

    bad_type = _hf_dir(tmp_path / "arch", config_edit=lambda c: c.update(model_type="mamba"))
    with pytest.raises(ValueError, match="unknown architecture model_type='mamba'") as e:
        loading.load(bad_type)
    assert "config.json" in str(e.value)

    shape = _hf_dir(
        tmp_path / "shape",
        tensor_edit=lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((F, D), np.float32)}),
    )
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight has shape \(12, 8\)"):
        loading.load(shape)

    missing = _hf_dir(tmp_path / "missing", tensor_edit=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        loading.load(missing)

    trunc = _hf_dir(tmp_path / "trunc")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors") as e:
        loading.load(trunc)
    assert "truncated" in str(e.value)

    (trunc / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        loading.load(trunc)

    rope = _hf_dir(tmp_path / "rope", config_edit=lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        loading.load(rope)


def test_checkpoint_with_more_layers_than_its_config_is_refused(tmp_path):
    """config.json says 1 layer beside 2-layer weights: refused, not loaded with layer 1 dropped."""
    config = phi3.Phi3Config(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=D // H,
    )
    two = {
        k: v
        for k, v in loading.per_tensor_shapes(config).items()
        if k.startswith("model.layers.1.")
        and k.split(".")[-2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    }
    d = _hf_dir(tmp_path, tensor_edit=lambda t: t.update({k: np.ones(s, np.float32) for k, s in two.items()}))
    with pytest.raises(ValueError, match=r"6 tensors are not used .*num_hidden_layers=1.*model.layers.1"):
        loading.load(d)
    tied_copy = _hf_dir(
        tmp_path / "tied",
        config_edit=lambda c: c.update(tie_word_embeddings=True),
        tensor_edit=lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}),
    )
    loading.load(tied_copy)  # a saved copy of the tied embedding is fine
    tied_other = _hf_dir(tmp_path / "tied_other", config_edit=lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight"):
        loading.load(tied_other)


def test_gguf_with_more_blocks_than_its_block_count_is_refused(tmp_path):
    tensors = _llama_tensors(np.random.default_rng(0))
    tensors.update({k.replace("blk.0.", "blk.1."): v for k, v in tensors.items() if k.startswith("blk.0.")})
    with pytest.raises(ValueError, match=r"9 tensors are not used .*blk.1"):
        loading.load(_write_gguf(tmp_path / "m.gguf", tensors=tensors))
