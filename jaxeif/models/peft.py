"""A LoRA adapter written by the `peft` package (`save_pretrained`), loaded onto jaxeif's decoder.

    apply_fn, params, config = loading.from_pretrained(base_dir)
    adapter = peft.load_adapter(adapter_dir, config)        # adapter_config.json + adapter_model.safetensors
    logits = apply_fn(params, ids, delta=adapter.delta())   # what peft's model computes (dropout off)
    M = lm.lora_eif(apply_fn, params, train, adapters=adapter, lr=1e-3)   # further LoRA fine-tuning from it

peft keeps one (A, B) pair per transformers module (q_proj, k_proj, v_proj, ...), while jaxeif's decoder
fuses q/k/v into qkv_proj and gate/up into gate_up_proj (`jaxeif.models.loading`). `PeftLora.weights`
holds peft's own pairs, stacked over layers, so a fine-tune updates exactly what peft's optimizer
updates; `PeftLora.delta` assembles the decoder's `delta=` entries from them: A's side by side, B's
block-diagonal (each B in its module's output columns, zeros elsewhere, the scaling folded in). The
zero blocks are constants of that assembly, not trained parameters.

Only safetensors and JSON are read (nothing unpickled, no code run). What the assembly cannot express
exactly is refused with the config field to change: DoRA, modules_to_save, trainable tokens, biases,
fan_in_fan_out layouts, rank/alpha patterns, adapters on a subset of layers, embedding or lm_head
adapters, and every other LoRA variant.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import flax.struct
import jax.numpy as jnp
import numpy as np

from jaxeif.errors import Error
from jaxeif.models import loading
from jaxeif.models.phi3 import Phi3Config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# config fields that change what the adapter computes, with the value that leaves plain LoRA
_REFUSED = {
    "use_dora": (False, "DoRA rescales the weight's column norms"),
    "modules_to_save": (None, "modules_to_save trains full copies of whole modules"),
    "trainable_token_indices": (None, "trainable tokens train rows of the embedding"),
    "bias": ("none", "trained biases are not LoRA factors"),
    "lora_bias": (False, "a trained bias on lora_B"),
    "fan_in_fan_out": (False, "fan_in_fan_out stores weights as [in, out] (GPT-2's Conv1D)"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
    "layers_to_transform": (None, "adapters on only some layers"),
    "layers_pattern": (None, "adapters on only some layers"),
    "layer_replication": (None, "replicated layers"),
    "target_parameters": (None, "adapters on raw parameters (MoE experts)"),
    "exclude_modules": (None, "excluded modules"),
    "use_qalora": (False, "QA-LoRA pools the input"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA depends on invocation tokens"),
    "megatron_config": (None, "Megatron-parallel layers"),
    "monteclora_config": (None, "MonteCLoRA samples its factors"),
    "arrow_config": (None, "Arrow routes between adapters"),
    "kasa_config": (None, "a LoRA variant"),
    "velora_config": (None, "a LoRA variant"),
}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


class PeftAdapterError(Error, ValueError):
    """A peft adapter folder that cannot be loaded exactly: the cause and the config field or file to change."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One peft module inside a fused decoder linear: its name ("self_attn.q_proj"), its output columns
    [start, start + size) of the fused module, and its LoRA scaling (alpha / r, or alpha / sqrt(r))."""

    name: str
    start: int
    size: int
    scaling: float


@dataclasses.dataclass(frozen=True)
class Layout:
    """How peft's modules fill the decoder's fused linears: ((path, fused output size, blocks), ...),
    path as in params ("model", "layers", "self_attn", "qkv_proj"). Hashable: a static part of a loss."""

    modules: tuple

    def delta(self, weights: dict) -> dict:
        """The decoder's `delta=` dict (scale 1): A's concatenated, scaled B's block-diagonal in the fused outputs.

        Args:
            weights: peft's per-module weights {name: {"a": [L, in, r], "b": [L, r, out]}}.

        Returns:
            The fused linears' low-rank entries, nested as the decoder's params.
        """
        out: dict = {}
        for path, total, blocks in self.modules:
            a = jnp.concatenate([weights[blk.name]["a"] for blk in blocks], axis=-1)
            b = jnp.concatenate([_place(blk.scaling * weights[blk.name]["b"], blk, total) for blk in blocks], axis=-2)
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = {"a": a, "b": b}
        return out


def _place(b: jnp.ndarray, block: Block, total: int) -> jnp.ndarray:
    """One module's B^T [L, r, out] padded with zeros to the fused module's outputs [L, r, total]."""
    return jnp.pad(b, ((0, 0), (0, 0), (block.start, total - block.start - block.size)))


@flax.struct.dataclass
class PeftLora:
    """A loaded peft LoRA adapter: `weights` (trainable) {peft module name: {"a": A^T [L, in, r],
    "b": B^T [L, r, out]}} and its static `layout` onto the decoder's fused linears."""

    weights: dict
    layout: Layout = flax.struct.field(pytree_node=False)

    def delta(self, weights: dict | None = None) -> dict:
        """The decoder's `delta=` dict (scale 1) for this adapter.

        Args:
            weights: peft's per-module weights, shaped as `self.weights` (default: the loaded ones).

        Returns:
            {"model": {"layers": {...: {"a": [L, in, R], "b": [L, R, out]}}}} for the fused linears.
        """
        return self.layout.delta(self.weights if weights is None else weights)


def _check_config(cfg: dict, where: Path) -> None:
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise PeftAdapterError(
            f"{where}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be loaded"
        )
    empty = lambda v: v is None or v is False or v == {} or v == []  # noqa: E731
    for field, (plain, what) in _REFUSED.items():
        value = cfg.get(field, plain)
        if value == plain or (empty(value) and empty(plain)):
            continue
        raise PeftAdapterError(
            f"{where}: {field}={value!r} is not supported ({what}: not expressible as plain LoRA "
            f"factors on the decoder); save the adapter with {field}={plain!r}"
        )


def _scaling(cfg: dict) -> float:
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / r**0.5 if cfg.get("use_rslora", False) else alpha / r


def _targeted(name: str, targets) -> bool:
    """peft's rule: a list matches a module whose name is a target or ends with "." + target; a string is a
    regex that must match the whole module name; "all-linear" matches every linear."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file  # safetensors: tensors only, no pickle

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise PeftAdapterError(f"`path` {path} has no {CONFIG_NAME}: pass the folder peft's save_pretrained wrote")
    if not weights_file.is_file():
        pickled = (
            " (it has adapter_model.bin, a pickle, which jaxeif does not read: re-save it with "
            "save_pretrained(..., safe_serialization=True))"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise PeftAdapterError(f"`path` {path} has no {WEIGHTS_NAME}{pickled}")
    return json.loads(cfg_file.read_text()), load_file(str(weights_file))


def load_adapter(path, config: Phi3Config, dtype=jnp.float32) -> PeftLora:
    """The peft LoRA adapter in a folder, for the decoder it was trained on.

    Honours r, lora_alpha (scaling alpha / r; alpha / sqrt(r) with use_rslora) and target_modules (the
    file's modules must be exactly those targeted). lora_dropout > 0 warns: jaxeif's fine-tunes and losses
    run without dropout, as peft's model in eval mode.

    Args:
        path: the folder peft's `save_pretrained` wrote (adapter_config.json + adapter_model.safetensors).
        config: the base decoder's Phi3Config (`loading.from_pretrained`'s third result).
        dtype: the dtype of the loaded A and B.

    Returns:
        A `PeftLora`: `lm.lora_eif(..., adapters=...)` fine-tunes its weights; `.delta()` is the decoder's
        `delta=` for it.

    Raises:
        PeftAdapterError: a missing file, a non-LoRA adapter, a config field outside plain LoRA (named, with
            the value that would load), tensors for modules the decoder does not have, or shapes that do
            not fit `config`.
    """
    path = Path(path)
    cfg, tensors = _read(path)
    _check_config(cfg, path / CONFIG_NAME)
    if float(cfg.get("lora_dropout", 0.0) or 0.0) > 0:
        warnings.warn(
            f"{path}: lora_dropout={cfg['lora_dropout']} is ignored: jaxeif fine-tunes without dropout "
            "(as peft's model in eval mode)",
            RuntimeWarning,
            stacklevel=2,
        )
    r, scaling, targets = int(cfg["r"]), _scaling(cfg), cfg.get("target_modules")
    found: dict = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise PeftAdapterError(
                f"{path / WEIGHTS_NAME}: tensor {key!r} is not a LoRA factor of a decoder layer's "
                "linear (embedding, lm_head and other adapters are not supported); save an adapter "
                "whose target_modules are among q/k/v/o_proj, gate/up/down_proj (qkv_proj, "
                "gate_up_proj for Phi-3)"
            )
        layer, name, which = int(match[1]), match[2], match[3]
        found.setdefault(name, {}).setdefault(which, {})[layer] = value
    if not found:
        raise PeftAdapterError(f"{path / WEIGHTS_NAME} holds no LoRA tensors")
    if config.model_type not in loading.SUPPORTED_ARCHITECTURES:
        raise PeftAdapterError(
            f"the decoder's model_type {config.model_type!r} has no known module layout; "
            f"pass the config from_pretrained returned"
        )
    # our stacked module -> the transformers per-layer modules fused into it (weights only: LoRA has no bias)
    fused = {
        key[:-1]: [name.removesuffix(".weight") for name in names]
        for key, names in loading.layer_modules(config).items()
        if key[-1] == "weight"
    }
    shapes = loading.per_tensor_shapes(config)
    L = config.num_hidden_layers
    weights, modules = {}, []
    for dest, names in fused.items():
        blocks, start = [], 0
        if len(shapes[f"model.layers.0.{names[0]}.weight"]) != 2:  # a norm: no LoRA there
            continue
        for name in names:
            out, inp = shapes[f"model.layers.0.{name}.weight"]
            if name in found:
                weights[name] = _stack(found.pop(name), name, L, r, out, inp, path, dtype)
                if targets is not None and not _targeted(f"model.layers.0.{name}", targets):
                    raise PeftAdapterError(
                        f"{path}: the file holds LoRA factors for {name} but target_modules="
                        f"{targets!r} does not target it; the config and weights disagree"
                    )
                blocks.append(Block(name, start, out, scaling))
            start += out
        if blocks:
            modules.append((("model", "layers") + dest, start, tuple(blocks)))
    if found:
        linears = sorted(n for ns in fused.values() for n in ns if len(shapes[f"model.layers.0.{n}.weight"]) == 2)
        raise PeftAdapterError(
            f"{path / WEIGHTS_NAME}: LoRA factors for {sorted(found)}, which the "
            f"{config.model_type} decoder does not have (its linears: {linears})"
        )
    return PeftLora(weights=weights, layout=Layout(tuple(modules)))


def _stack(pairs: dict, name: str, L: int, r: int, out: int, inp: int, path: Path, dtype) -> dict:
    """{"a": A^T [L, in, r], "b": B^T [L, r, out]} of one module's per-layer lora_A [r, in], lora_B [out, r]."""
    for which, shape in (("A", (r, inp)), ("B", (out, r))):
        layers = pairs.get(which, {})
        if sorted(layers) != list(range(L)):
            raise PeftAdapterError(
                f"{path / WEIGHTS_NAME}: {name}.lora_{which} is present for layers "
                f"{sorted(layers)}, the decoder has {L}; adapters on a subset of layers are not "
                "supported"
            )
        for layer, x in layers.items():
            if tuple(x.shape) != shape:
                raise PeftAdapterError(
                    f"{path / WEIGHTS_NAME}: layer {layer} {name}.lora_{which} has shape "
                    f"{tuple(x.shape)}, r={r} and the decoder need {shape}"
                )
    stack = lambda which: np.stack([np.asarray(pairs[which][k], np.float32) for k in range(L)])  # noqa: E731
    transposed = lambda which: jnp.asarray(np.swapaxes(stack(which), 1, 2), dtype)  # noqa: E731
    return {"a": transposed("A"), "b": transposed("B")}
