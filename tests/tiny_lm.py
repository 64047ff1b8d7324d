"""A random tiny transformers checkpoint with a byte-level tokenizer, for the language-model tests
(needs torch: import it after `pytest.importorskip("torch")`)."""

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from jaxeif.models import tokenizer

BOS, PAD = "<s>", "<pad>"


def byte_tokenizer():
    """A byte-level tokenizer (one token per byte, ids 0..255) with BOS 256 and PAD 257."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet, key=lambda c: tokenizer._bytes_to_unicode().index(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(PAD, special=True)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD)


def tiny_checkpoint(path, arch="llama", vocab=260, tie=True, seed=0, context=128):
    """A random tiny transformers checkpoint + byte tokenizer in `path`; returns the torch model."""
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=tie,
        bos_token_id=256,
        pad_token_id=257,
        eos_token_id=257,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Phi3ForCausalLM(
            transformers.Phi3Config(**common, original_max_position_embeddings=context)
        )
    model = model.float().eval()
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


# one tiny transformers config per architecture the decoder ports (hidden 32, 2 layers, GQA)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 5}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"original_max_position_embeddings": 64}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": 4,
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
}


def arch_config(arch, vocab=260, tie=True, **overrides):
    """The transformers config of a tiny `arch` decoder (one of ARCHS)."""
    _, config_cls, extra = ARCHS[arch]
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=256,
        pad_token_id=257,
        eos_token_id=257,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
    )
    kw.update(extra)
    kw.update(overrides)
    return getattr(transformers, config_cls)(**kw)


def arch_checkpoint(path, arch, seed=0, **overrides):
    """A random tiny `arch` checkpoint (norm weights and biases perturbed, so a mis-mapped one cannot pass)
    saved with save_pretrained in `path`, plus the byte tokenizer; returns the float32 eager torch model."""
    torch.manual_seed(seed)
    config = arch_config(arch, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, ARCHS[arch][0])(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
