"""The Phi-3 port's name: the decoder (Phi-3, Llama, Mistral, Qwen2, Qwen3, Gemma 2) lives in
`jaxeif.models.decoder`; this module re-exports it so `from jaxeif.models import phi3` keeps working.

    from jaxeif.models import phi3
    apply_fn = phi3.make_apply_fn(phi3.Phi3Config(...))   # Phi3Config is decoder.DecoderConfig
"""

from jaxeif.models.decoder import (  # noqa: F401
    ARCHITECTURES,
    DecoderApply,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    Params,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3Model,
    apply_rope,
    attached_config,
    attention_mask_4d,
    greedy_generate,
    init_params,
    inv_freq,
    lowrank_embed,
    lowrank_linear,
    lowrank_unembed,
    make_apply_fn,
    param_shapes,
    read_input,
    rope_tables,
    tapped,
)
