"""Tokenizers for the models `loading.from_pretrained` loads, offline and without torch.

`load_tokenizer(path=None)` returns a `transformers.PreTrainedTokenizerFast`:
  * a model directory: `transformers.AutoTokenizer.from_pretrained(dir)` (its tokenizer files);
  * a `.gguf` file (or None, the SmolLM2 default): built directly from the GGUF's tokenizer
    metadata with the `tokenizers` library (byte-level BPE: vocabulary, merges, control tokens
    as special tokens), which is what transformers' GGUF loader builds but without importing torch.
    Parsing the GGUF metadata is slow (seconds), so the result is cached once as a tokenizer
    directory under $JAXEIF_CACHE_DIR (default ~/.cache/jaxeif), keyed by the file's path, size
    and mtime; `cache=False` skips the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from jaxeif import io
from jaxeif.models import loading

# GGUF `tokenizer.ggml.pre` values whose split is GPT-2's byte-level regex.
_GPT2_STYLE_PRE = ("smollm", "gpt-2", "gpt2", "default")
_CONTROL = 3  # llama.cpp token type: control (special) token
_USER_DEFINED = 4
# transformers is imported inside the functions that need it: importing it takes about a second, which
# `jaxeif --help` and every study that never builds a tokenizer would otherwise pay.


def load_tokenizer(path=None, *, cache: bool = True):
    """A fast tokenizer for a model directory or .gguf file (None: the embedded SmolLM2 default)."""
    path = loading.default_gguf_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        from transformers import AutoTokenizer  # slow import (see the module's imports)

        check_tokenizer_dir(path)
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load the tokenizer in {path} ({str(e).splitlines()[0][:200]}); re-save it with "
                "tokenizer.save_pretrained(dir)"
            ) from None
    return cached_gguf_tokenizer(path) if cache else gguf_tokenizer(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer_dir(path: Path) -> None:
    """A model directory must hold a tokenizer file transformers can build a fast tokenizer from."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save them beside the weights "
            "with tokenizer.save_pretrained(dir), or pass the model's .gguf file"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("JAXEIF_CACHE_DIR") or Path.home() / ".cache" / "jaxeif")


def cached_gguf_tokenizer(path):
    """`gguf_tokenizer(path)`, converted once and then read back from the cache (atomic write)."""
    from transformers import PreTrainedTokenizerFast  # slow import (see the module's imports)

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:20]
    target = cache_dir() / "tokenizers" / key
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)
    tok = gguf_tokenizer(path)
    with io.atomic_dir(target) as tmp:  # a concurrent writer may have won, which is fine
        tok.save_pretrained(str(tmp))
    return tok


def _gguf_tokenizer_fields(path: Path) -> dict:
    try:
        reader = loading.gguf_package().GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    return out


def gguf_tokenizer(path):
    """Byte-level BPE tokenizer rebuilt from a GGUF's `tokenizer.ggml.*` metadata (no torch)."""
    from transformers import PreTrainedTokenizerFast  # slow import (see the module's imports)

    path = Path(path)
    f = _gguf_tokenizer_fields(path)
    kind, pre = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _GPT2_STYLE_PRE:
        raise ValueError(
            f"{path}: GGUF tokenizer model={kind!r} pre={pre!r} is not supported here (only GPT-2-style "
            f"byte-level BPE, pre in {_GPT2_STYLE_PRE}); pass a model directory with tokenizer.json instead"
        )
    tokens = list(f["tokenizer.ggml.tokens"])
    types = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_of = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    # Tokens stored outside the byte alphabet are respelled byte by byte, as transformers does.
    spelled = [t if set(t) <= alphabet else "".join(byte_of[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)

    def name(key):
        i = f.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"),
        pad_token=name("padding_token_id"),
        chat_template=f.get("tokenizer.chat_template"),
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable spelling of each byte 0..255 (the byte-level BPE alphabet, in byte order)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]
