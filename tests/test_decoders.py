"""The decoder architectures (Llama, Mistral, Phi-3, Qwen2, Qwen3, Gemma 2): logits against transformers'
PyTorch models from save_pretrained and from GGUF files, every EIF path on each, float64 throughout a
float64 forward, the config passed explicitly (upcast keeps it), and config.json errors naming the field."""

import json

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import chunking, lm
from jaxeif.lm import finetuned
from jaxeif.lm import loss as lm_loss
from jaxeif.models import decoder, loading, lora, phi3, upcast

TOL = 1e-4
ARCH_NAMES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma2")
TEXTS = ["Ab is big.", "Cd is big.", "Ab is big.\nCd is big.", "Cd is small.", "Ef is Gh."]


def _ids(b, t, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_logits_match_transformers(tmp_path, arch):
    """Sequences longer than Mistral's (5) and Gemma 2's (4) sliding windows, with and without padding."""
    torch = pytest.importorskip("torch")
    from tiny_lm import arch_checkpoint

    model = arch_checkpoint(tmp_path, arch)
    apply_fn, params, config = loading.from_pretrained(tmp_path)
    assert config.model_type == arch  # a Mistral checkpoint loads as Mistral
    ids = _ids(2, 12, seed=1)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    for m in (None, mask):
        with torch.no_grad():
            kw = {} if m is None else {"attention_mask": torch.tensor(m)}
            ref = model(torch.tensor(ids, dtype=torch.long), **kw).logits.numpy()
        ours = np.asarray(apply_fn(params, ids, None if m is None else jnp.asarray(m)))
        keep = np.ones(ids.shape, bool) if m is None else m.astype(bool)  # padded queries are unspecified
        assert np.abs(ours - ref)[keep].max() <= TOL, (arch, np.abs(ours - ref)[keep].max())
    if arch == "gemma2":  # the features the parity rests on are switched on
        assert config.final_logit_softcapping == 3.0 and config.attn_logit_softcapping == 2.0
        assert config.sliding_layers == (True, False) and config.embed_scale and config.norm_offset == 1.0
        assert np.abs(ours).max() <= 3.0  # logits are capped
    if arch == "mistral":
        assert config.sliding_window == 5 and all(config.sliding_layers)
    if arch in ("mistral", "gemma2"):  # the window matters at this length: without it the logits differ
        import dataclasses

        unwindowed = decoder.make_apply_fn(dataclasses.replace(config, sliding_window=None, layer_types=None))
        assert np.abs(np.asarray(unwindowed(params, ids))[0] - ref[0]).max() > 1e-3  # row 0: no padding


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`: q/k rows into its rotary order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def _write_gguf(path, model, arch: str):
    """A GGUF of `model`'s float32 weights as llama.cpp's converter lays them out for `arch`."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for name, t in model.state_dict().items():
        arr = t.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            if arch == "llama" and rest[-2] in ("q_proj", "k_proj"):
                arr = _llama_cpp_permute(arr, c.num_attention_heads if rest[-2] == "q_proj" else c.num_key_value_heads)
            gname = f"blk.{i}.{_GGUF_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, gguf_arch, overrides",
    [
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen3", {}),
        ("mistral", "llama", {"sliding_window": None}),
        ("llama", "llama", {"tie": False}),
    ],
)
def test_gguf_logits_match_transformers(tmp_path, arch, gguf_arch, overrides):
    """GGUF files written from the same tiny weights in llama.cpp's layout (q/k rows permuted for llama)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from tiny_lm import arch_checkpoint

    model = arch_checkpoint(tmp_path / "hf", arch, **overrides)
    path = _write_gguf(tmp_path / "m.gguf", model, gguf_arch)
    apply_fn, params, config = loading.from_pretrained(path)
    assert config.model_type == gguf_arch
    assert config.qkv_bias == (arch == "qwen2") and config.qk_norm == (arch == "qwen3")
    ids = _ids(2, 10, seed=2)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(np.asarray(apply_fn(params, ids)) - ref).max() <= TOL


def test_gguf_of_an_unported_layout_is_refused(tmp_path):
    """Gemma 2 loads from its transformers directory; its GGUF layout (norms stored as 1 + w) is refused."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general.architecture='gemma2' \(a supported transformers architecture"):
        loading.load(tmp_path / "g.gguf")


# ----------------------------------------------------------------------------- config.json errors
def _config_dir(tmp_path, **cfg):
    base = {
        "model_type": "llama",
        "vocab_size": 11,
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    base.update(cfg)
    base = {k: v for k, v in base.items() if v is not ...}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(base))
    return d


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text", "mamba"])
def test_unsupported_architectures_are_refused(tmp_path, model_type):
    with pytest.raises(loading.ConfigError, match=f"model_type='{model_type}'.*supported") as e:
        loading.load(_config_dir(tmp_path, model_type=model_type))
    assert "config.json" in str(e.value) and isinstance(e.value, (jaxeif.Error, ValueError))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("intermediate_size", ..., "field 'intermediate_size' is missing; add it to"),
        ("num_hidden_layers", None, "field 'num_hidden_layers' is missing"),
        ("hidden_size", "32", "field 'hidden_size' must be a positive int, got '32'"),
        ("num_key_value_heads", 0, "field 'num_key_value_heads' must be a positive number"),
        ("layer_types", ["full_attention", "full_attention"], "field 'layer_types' must list"),
    ],
)
def test_missing_or_invalid_config_field_names_field_and_file(tmp_path, field, value, match):
    d = _config_dir(tmp_path, **{field: value})
    with pytest.raises(loading.ConfigError, match=match) as e:
        loading.load(d)
    assert str(d / "config.json") in str(e.value)


def test_cli_reports_a_missing_config_field_in_one_line(tmp_path, capsys):
    from jaxeif import cli

    d = _config_dir(tmp_path, intermediate_size=...)
    code = cli.main(["llm", "--model", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "intermediate_size" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- every EIF path on each architecture
def _random_model(arch, seed=0, hidden=32):
    """(config, params) of a tiny random `arch` decoder (config from transformers' own config class);
    norm weights and biases perturbed away from their initial values."""
    pytest.importorskip("torch")
    from tiny_lm import arch_config

    config = loading.config_from_hf(arch_config(arch, hidden_size=hidden).to_dict(), f"tiny {arch}")
    params = decoder.init_params(jax.random.key(seed), config)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.2 * jax.random.normal(jax.random.key(len(p)), x.shape)
            if p[-1].key == "bias" or "norm" in str(p)
            else 6 * x
        ),
        params,
    )  # weights 6 * 0.02: a model whose EIF entries are far from zero
    return config, params


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("torch")
    from tiny_lm import byte_tokenizer

    return byte_tokenizer()


@pytest.mark.slow  # every EIF path on every architecture (about 40 s of compiles each on a cold cache)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_eif_path_runs_on_each_architecture(arch, tokenizer):
    """dense == low-rank (the per-linear taps stay exact with biases, q/k norms, soft-capping, sandwich norms);
    LoRA == a hand-written adapter step; prompted == separate sequences. About 40 s of CPU per
    architecture: Gemma 2 (the most switches) runs in the fast tier, the others in the slow one."""
    config, params = _random_model(arch)
    apply_fn = decoder.make_apply_fn(config)
    toks = lm.tokenize(tokenizer, TEXTS, config=config)
    dense = np.asarray(lm.finetuned_eif(apply_fn, params, toks, lr=0.05, path="dense", config=config))
    low = np.asarray(lm.finetuned_eif(apply_fn, params, toks, lr=0.05, path="lowrank", config=config))
    scale = np.abs(dense).max()
    assert scale > 1e-3
    np.testing.assert_allclose(low, dense, atol=2e-5 * scale, rtol=0)

    adapters = lora.init(jax.random.key(1), params, rank=2, alpha=4.0)
    adapters = lora.Adapters(jax.tree.map(lambda x: x + 0.05, adapters.deltas), adapters.scale)  # B != 0
    two = lm.tokenize(tokenizer, TEXTS[:2], config=config)
    M = np.asarray(lm.lora_eif(apply_fn, params, two, adapters=adapters, lr=0.1))
    rows = [lm.Tokens(*(jnp.asarray(x[k]) for x in two)) for k in range(2)]
    loss = jax.jit(lambda d, ex: lm.NLL(apply_fn)(lora.merge(params, lora.Adapters(d, adapters.scale)), ex))
    base = [float(loss(adapters.deltas, r)) for r in rows]
    for i, r in enumerate(rows):
        new = jax.tree.map(lambda a, g: a - 0.1 * g, adapters.deltas, jax.grad(loss)(adapters.deltas, r))
        np.testing.assert_allclose(M[i], [float(loss(new, q)) - b for q, b in zip(rows, base)], atol=1e-5)
    assert np.abs(M).max() > 1e-4

    texts = TEXTS[:3]
    got = np.asarray(lm.prompted_eif(apply_fn, params, tokenizer, config, texts))
    alone = lm.nll(apply_fn, params, lm.tokenize(tokenizer, texts, config=config))
    for j, pj in enumerate(texts):
        after = lm.nll(apply_fn, params, lm.tokenize(tokenizer, [pj] * len(texts), contexts=texts, config=config))
        np.testing.assert_allclose(got[:, j], after - alone[j], atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_difference_mode_matches_float64_on_each_architecture(arch, tokenizer):
    """precision "difference" (propagated through the architecture's ops) against "float64", both paths."""
    config, params = _random_model(arch)
    apply_fn = decoder.make_apply_fn(config)
    toks = lm.tokenize(tokenizer, TEXTS, config=config)
    off = ~np.eye(len(TEXTS), dtype=bool)
    for path in ("lowrank", "dense"):
        run = lambda precision: np.asarray(
            lm.finetuned_eif(
                apply_fn,
                params,
                toks,
                lr=1e-3,
                path=path,  # noqa: E731
                config=config,
                precision=precision,
            )
        )
        ref, got = run(jaxeif.Precision(dtype="float64")), run(jaxeif.Precision(difference=True))
        assert np.all(np.abs(ref[off]) > 0)
        assert np.median(np.abs(got[off] - ref[off]) / np.abs(ref[off])) <= 1e-4, path


# ----------------------------------------------------------------------------- float64 means float64
def _float_dtypes(jaxpr) -> set:
    """Dtypes of every floating value any equation produces, sub-jaxprs (scan, jit, custom_vjp) included."""
    found = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if jnp.issubdtype(v.aval.dtype, jnp.floating):
                found.add(jnp.dtype(v.aval.dtype))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _float_dtypes(sub)
    return found


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_float64_forward_has_no_float32_op(arch):
    """Both float64 routes: a float64 model (from_pretrained(dtype=float64)) and float64 params in the
    float32 model (precision "float64"); RoPE tables, norms, softmax, soft-caps and logits all float64."""
    config, params = _random_model(arch)
    ids = jnp.asarray(_ids(1, 9))
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        for dtype in (jnp.float64, jnp.float32):
            fn = decoder.make_apply_fn(config, dtype)
            loss = lambda p: lm_loss.sequence_nll(fn(p, ids)[0], ids[0], jnp.ones(9, jnp.float64).at[0].set(0))  # noqa: E731
            jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(p64).jaxpr
            assert _float_dtypes(jaxpr) == {jnp.dtype(jnp.float64)}, (arch, dtype, _float_dtypes(jaxpr))
        cos, _ = decoder.rope_tables(config, jnp.arange(9)[None], jnp.float64)
        assert cos.dtype == jnp.float64
        rd = config.rotary_dim
        exact = np.cos(np.arange(9)[:, None] * config.rope_theta ** (-np.arange(0, rd, 2) / rd))
        np.testing.assert_allclose(np.asarray(cos)[0, :, : config.rotary_dim // 2], exact, rtol=0, atol=1e-14)
        # the float64 model agrees with the float32 one to float32 rounding, and is not the same numbers
        l64 = np.asarray(decoder.make_apply_fn(config, jnp.float64)(p64, ids))
    l32 = np.asarray(decoder.make_apply_fn(config)(params, ids))
    assert 0 < np.abs(l64 - l32).max() <= 1e-4


@pytest.mark.slow
def test_float64_llama_matches_a_float64_transformers_reference(tmp_path):
    """transformers' double Llama rounds to float32 in RMSNorm, eager softmax and RoPE; patched to stay
    float64 there, it agrees with from_pretrained(dtype=float64) to float64 rounding."""
    torch = pytest.importorskip("torch")
    from tiny_lm import arch_checkpoint
    from transformers.models.llama import modeling_llama as ml

    model = arch_checkpoint(tmp_path, "llama").double()

    def norm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope64(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        inv = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[:, :, None].double() * inv[None, None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, dtype=None, **kw):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ml.LlamaRMSNorm, "forward", norm64)
    mp.setattr(ml.LlamaRotaryEmbedding, "forward", rope64)
    mp.setattr(torch.nn.functional, "softmax", softmax64)
    ids = _ids(2, 12, seed=3)
    try:
        with torch.no_grad():
            ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    finally:
        mp.undo()
    assert ref.dtype == np.float64
    apply64, params64, _ = loading.from_pretrained(tmp_path, dtype=jnp.float64)
    ours = np.asarray(apply64(params64, ids))
    assert ours.dtype == np.float64
    assert np.abs(ours - ref).max() <= 1e-12, np.abs(ours - ref).max()


# ----------------------------------------------------------------------------- the config, explicit
def _tokens(n=4, t=12, vocab=100, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, t + 1, size=n)
    attention = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    score = attention.astype(np.float32)
    score[:, 0] = 0
    return lm.Tokens(rng.integers(0, vocab, size=(n, t)).astype(np.int32) * attention, attention, score)


def test_upcast_model_keeps_its_config_lowrank_path_and_memory_check(monkeypatch):
    config = phi3.Phi3Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        model_type="llama",
    )
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), decoder.init_params(jax.random.key(0), config))
    apply16 = upcast.upcast_apply_fn(decoder.make_apply_fn(config))
    toks = _tokens()
    calls = []
    monkeypatch.setattr(finetuned, "lowrank_sgd_eif", lambda *a, **k: calls.append("lowrank") or jnp.zeros((4, 4)))
    real_check = finetuned.check_memory
    monkeypatch.setattr(finetuned, "check_memory", lambda *a, **k: calls.append("memory") or real_check(*a, **k))
    lm.finetuned_eif(apply16, params16, toks, lr=0.01, config=config)
    assert calls == ["memory", "lowrank"]
    with pytest.warns(DeprecationWarning, match="pass `config=`"):  # deprecated: the config rides on the apply_fn
        lm.finetuned_eif(apply16, params16, toks, lr=0.01)
    assert calls[2:] == ["memory", "lowrank"]
    with pytest.raises(chunking.MemoryBudgetError):
        lm.finetuned_eif(apply16, params16, toks, lr=0.01, config=config, memory_budget=1)
    with pytest.warns(DeprecationWarning, match="apply_fn.config"):
        assert apply16.config == config
    plain = upcast.upcast_apply_fn(lambda p, ids, **kw: ids)  # any other function stays a plain function
    assert decoder.attached_config(plain) is None
    with pytest.raises(TypeError, match="DecoderConfig"):
        lm.finetuned_eif(apply16, params16, toks, lr=0.01, config={"hidden_size": 64})


def test_upcast_lowrank_equals_dense_on_the_widened_params():
    """Low-rank on bfloat16 params computed in float32 (the weights stay bfloat16, the step is a float32
    delta) equals the dense path on the same weights widened to float32."""
    config = phi3.Phi3Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        model_type="qwen2",
        qkv_bias=True,
    )
    params16 = jax.tree.map(lambda x: (6 * x).astype(jnp.bfloat16), decoder.init_params(jax.random.key(0), config))
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
    toks = _tokens()
    low = np.asarray(
        lm.finetuned_eif(
            upcast.upcast_apply_fn(decoder.make_apply_fn(config)),
            params16,
            toks,
            lr=0.01,
            config=config,
            path="lowrank",
        )
    )
    dense = np.asarray(
        lm.finetuned_eif(decoder.make_apply_fn(config), params32, toks, lr=0.01, config=config, path="dense")
    )
    assert np.abs(dense).max() > 1e-4
    np.testing.assert_allclose(low, dense, atol=2e-5 * np.abs(dense).max())


def test_from_pretrained_returns_a_decoder_tuple(tmp_path):
    pytest.importorskip("torch")
    from tiny_lm import arch_checkpoint

    arch_checkpoint(tmp_path, "qwen3")
    model = loading.from_pretrained(tmp_path)
    assert isinstance(model, loading.Decoder) and model.config.qk_norm and model.config.head_dim == 16
    apply_fn, params, config = model
    assert config is model.config and decoder.attached_config(apply_fn) == config
