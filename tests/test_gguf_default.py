"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers' GGUF loader."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxeif.models import loading, phi3, tokenizer

pytestmark = pytest.mark.slow  # SmolLM2-135M against transformers, logits and greedy tokens

torch = pytest.importorskip("torch", reason="reference tests need torch==2.13.0 (make test installs it)")
transformers = pytest.importorskip("transformers")

STRINGS = [
    "Hello world, it's me!",
    "  leading spaces\tand tabs\n\nnew lines",
    "naïve café 東京 🚀 x²",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "1234567 numbers and CamelCaseWords_with-dashes",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("jaxeif_cache")
    os.environ["JAXEIF_CACHE_DIR"] = str(d)
    yield d
    os.environ.pop("JAXEIF_CACHE_DIR", None)


@pytest.fixture(scope="module")
def gguf_path():
    return loading.default_gguf_path()


def test_tokenizer_builds_without_torch_and_matches_transformers(cache, gguf_path):
    # A fresh interpreter converts the GGUF tokenizer (filling the cache) and never imports torch.
    code = (
        "import sys; from jaxeif.models.tokenizer import load_tokenizer; t = load_tokenizer(); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(t('hi there')['input_ids'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAXEIF_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ours = tokenizer.load_tokenizer()  # from the cache just written
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for s in STRINGS:
        assert ours(s)["input_ids"] == ref(s)["input_ids"], s
        assert ours.decode(ours(s)["input_ids"]) == s
    assert ours.eos_token == ref.eos_token and ours.bos_token == ref.bos_token
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)


def test_default_model_matches_transformers_logits_and_greedy_tokens(cache, gguf_path):
    apply_fn, params, config = loading.default_model()
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.tie_word_embeddings,
    ) == (30, 576, 9, 3, True)
    tok = tokenizer.load_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        ref_tokens = ref_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
        ).numpy()
    ours = np.asarray(apply_fn(params, ids))
    diff = np.abs(ours - ref).max()
    print(f"max |logit diff| vs transformers on the SmolLM2 GGUF: {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert diff <= 1e-3
    gen = phi3.greedy_generate(apply_fn, params, ids, max_new_tokens=8, eos_token_id=config.eos_token_id, config=config)
    assert gen.tolist() == ref_tokens[:, : gen.shape[1]].tolist()
    assert len(tok.decode(gen[0, ids.shape[1] :]).strip()) > 0
