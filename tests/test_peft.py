"""A user's own peft LoRA adapter: loaded onto the decoder it was trained for (logits equal peft's), and the
EIF of further LoRA fine-tuning from it equal to a PyTorch + peft loop (one SGD step on the LoRA
parameters only, per train sample); every unsupported config refused by name."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the adapter is written by peft, the reference loop runs in PyTorch")
peft_torch = pytest.importorskip("peft")

from tiny_lm import tiny_checkpoint  # noqa: E402

from jaxeif import lm  # noqa: E402
from jaxeif.models import loading, peft, tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # torch-built checkpoints and a PyTorch reference loop

TRAIN = ["Ab is big.", "Cd is small.", "Ef is Gh."]
EVALS = ["Ab is big.", "Cd is big.", "Ab is small.", "Gh is Ef."]
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # k_proj and gate_proj left out: fused blocks partly


def _adapter(model, path, **config):
    """`model` wrapped in a peft LoRA with random A and B (init_lora_weights=False), saved to `path`."""
    torch.manual_seed(1)
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    wrapped = peft_torch.get_peft_model(model, peft_torch.LoraConfig(**{**kwargs, **config}))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)  # a sizeable but not dominating change of the model
    wrapped.save_pretrained(path)
    return wrapped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_dir, adapter_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("adapter")
    model = tiny_checkpoint(base_dir)
    wrapped = _adapter(model, adapter_dir, use_rslora=True)
    apply_fn, params, config = loading.from_pretrained(base_dir)
    tok = tokenizer.load_tokenizer(base_dir)
    return wrapped.eval(), apply_fn, params, config, tok, adapter_dir


def _nll(model, ids, score):
    """Length-normalised NLL of one sample in PyTorch (lm.sequence_nll's definition)."""
    logits = model(input_ids=ids[None]).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
    return -(score[1:] * logp).sum() / score[1:].sum()


def _torch_eif(wrapped, toks_train, toks_evals, lr):
    """M[i, j] by the straightforward loop: copy the adapter, one SGD step on train i (LoRA params only)."""
    rows = (
        lambda t: [
            (
                torch.tensor(np.asarray(t.ids[k, :n]), dtype=torch.long),  # noqa: E731
                torch.tensor(np.asarray(t.score[k, :n]), dtype=torch.float64),
            )
            for k, n in enumerate(t.lengths)
        ]
    )
    train, evals = rows(toks_train), rows(toks_evals)
    lora = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    start = {n: p.detach().clone() for n, p in lora.items()}
    with torch.no_grad():
        base = np.array([float(_nll(wrapped, *e)) for e in evals])
    out = np.zeros((len(train), len(evals)))
    for i, example in enumerate(train):
        opt = torch.optim.SGD(list(lora.values()), lr=lr)
        opt.zero_grad()
        _nll(wrapped, *example).backward()
        opt.step()
        with torch.no_grad():
            out[i] = [float(_nll(wrapped, *e)) for e in evals] - base
            for n, p in lora.items():
                p.copy_(start[n])
    return out


def test_loaded_adapter_gives_peft_logits(setup):
    wrapped, apply_fn, params, config, tok, adapter_dir = setup
    adapter = peft.load_adapter(adapter_dir, config)
    assert set(adapter.weights) == {
        "self_attn.q_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    toks = lm.tokenize(tok, EVALS, config=config)
    ids = np.asarray(toks.ids)
    with torch.no_grad():
        ref = wrapped(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
        bare = wrapped.get_base_model()
        with wrapped.disable_adapter():
            plain = bare(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(apply_fn(params, ids, delta=adapter.delta()))
    assert np.abs(ref - plain).max() > 0.1  # the adapter changes the model
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_lora_eif_from_a_peft_adapter_matches_a_pytorch_peft_loop(setup):
    wrapped, apply_fn, params, config, tok, adapter_dir = setup
    adapter = peft.load_adapter(adapter_dir, config)
    train, evals = lm.tokenize(tok, TRAIN, config=config), lm.tokenize(tok, EVALS, config=config)
    lr = 0.05
    ref = _torch_eif(wrapped, train, evals, lr)
    got = np.asarray(lm.lora_eif(apply_fn, params, train, evals, adapters=adapter, lr=lr))
    scale = np.abs(ref).max()
    assert scale > 1e-3
    err = np.abs(got - ref).max() / scale
    assert err < 1e-4, err
    # the fine-tune starts from the loaded adapter: from another start (q_proj's B zero) the matrix differs
    start = jax.tree.map(lambda x: x, adapter.weights)
    start["self_attn.q_proj"]["b"] = jnp.zeros_like(start["self_attn.q_proj"]["b"])
    other = np.asarray(lm.lora_eif(apply_fn, params, train, evals, adapters=adapter.replace(weights=start), lr=lr))
    assert np.abs(other - got).max() > 100 * err * scale


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(setup, tmp_path):
    *_, config, _, adapter_dir = setup
    rs = peft.load_adapter(adapter_dir, config).delta()  # saved with use_rslora=True: alpha / sqrt(r)
    plain = peft.load_adapter(_saved(adapter_dir, tmp_path, use_rslora=False), config).delta()  # alpha / r
    modules = rs["model"]["layers"]
    assert sorted(modules) == ["mlp", "self_attn"] and sorted(modules["self_attn"]) == ["o_proj", "qkv_proj"]
    for group, entries in modules.items():
        for name, d in entries.items():
            p = plain["model"]["layers"][group][name]
            np.testing.assert_array_equal(p["a"], d["a"])
            np.testing.assert_allclose(p["b"], d["b"] * (8 / 4) / (8 / 4**0.5), rtol=1e-6)


def _saved(src, tmp_path, **changes):
    dest = tmp_path / "adapter"
    shutil.copytree(src, dest)
    cfg = json.loads((dest / peft.CONFIG_NAME).read_text())
    cfg.update(changes)
    (dest / peft.CONFIG_NAME).write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("fan_in_fan_out", True),
        ("rank_pattern", {"q_proj": 2}),
        ("layers_to_transform", [0]),
        ("peft_type", "IA3"),
    ],
)
def test_unsupported_configs_are_refused_by_field(setup, tmp_path, field, value):
    *_, config, _, adapter_dir = setup
    with pytest.raises(peft.PeftAdapterError, match=field):
        peft.load_adapter(_saved(adapter_dir, tmp_path, **{field: value}), config)


def test_bad_folders_and_tensors_are_refused(setup, tmp_path):
    from safetensors.numpy import load_file, save_file

    *_, config, _, adapter_dir = setup
    with pytest.raises(peft.PeftAdapterError, match="no adapter_config.json"):
        peft.load_adapter(tmp_path, config)
    bin_only = _saved(adapter_dir, tmp_path)
    (bin_only / peft.WEIGHTS_NAME).rename(bin_only / "adapter_model.bin")
    with pytest.raises(peft.PeftAdapterError, match="a pickle"):
        peft.load_adapter(bin_only, config)
    with pytest.raises(peft.PeftAdapterError, match="does not target it"):
        peft.load_adapter(_saved(adapter_dir, tmp_path / "t", target_modules=["q_proj"]), config)
    tensors = load_file(str(adapter_dir / peft.WEIGHTS_NAME))
    embed = _saved(adapter_dir, tmp_path / "e")
    save_file(
        {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 260), np.float32)},
        str(embed / peft.WEIGHTS_NAME),
    )
    with pytest.raises(peft.PeftAdapterError, match="embed_tokens.lora_embedding_A"):
        peft.load_adapter(embed, config)
    with pytest.warns(RuntimeWarning, match="lora_dropout=0.1 is ignored"):
        peft.load_adapter(_saved(adapter_dir, tmp_path / "d", lora_dropout=0.1), config)


def test_phi3_adapter_on_its_fused_linears(tmp_path):
    """Phi-3 has qkv_proj and gate_up_proj as single modules: a peft adapter on them loads as one block each."""
    model = tiny_checkpoint(tmp_path / "base", arch="phi3")
    wrapped = _adapter(model, tmp_path / "adapter", target_modules=["qkv_proj", "gate_up_proj", "down_proj"]).eval()
    apply_fn, params, config = loading.from_pretrained(tmp_path / "base")
    adapter = peft.load_adapter(tmp_path / "adapter", config)
    assert set(adapter.weights) == {"self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    ids = np.asarray(lm.tokenize(tokenizer.load_tokenizer(tmp_path / "base"), EVALS, config=config).ids)
    with torch.no_grad():
        ref = wrapped(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(apply_fn(params, ids, delta=adapter.delta())), ref, atol=1e-4)
