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
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=tie, bos_token_id=256,
                  pad_token_id=257, eos_token_id=257, initializer_range=0.15, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, original_max_position_embeddings=context))
    model = model.float().eval()
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
