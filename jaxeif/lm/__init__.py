"""Language-model influence: tokenised samples, the length-normalised NLL, fine-tuned EIF (dense via
`jaxeif.eif`, LoRA, and the exact low-rank single-step SGD path) and prompted EIF.

Models enter as `apply_fn(params, ids int32[b, t], attention_mask=None, delta=None, positions=None)
-> f32[b, t, v]` (`jaxeif.models.phi3`; `delta=` takes per-linear low-rank deltas and taps), where
attention_mask may be a bool[b, t, t] visibility mask: losses are computed on samples packed into
shared rows (`jaxeif.packing`). Every fine-tuned EIF takes `(apply_fn, params, train, evals=None, *,
lr, ..., chunk_size="auto", precision=jaxeif.Precision(), progress=False, memory_budget=None)` (the
shared contract, jaxeif.options) and returns a jax.Array f32[n, m].

    tokens.py     Tokens, tokenize (text -> Tokens), check_vocab
    loss.py       NLL (a loss_fn for jaxeif.eif), nll (many samples per forward pass)
    finetuned.py  finetuned_eif (path "auto" | "dense" | "lowrank") and lora_eif
    dispatch.py   choose_path: the measured rule behind finetuned_eif(path="auto")
    lowrank.py    lowrank_sgd_eif: single-step SGD EIF, exactly, in low-rank form (named steps);
                  linearized_sgd_eif: its first-order term -lr <g_i, g_j>, the same way
    prompted.py   prompted_eif: L(p_j | context p_i) - L(p_j)
    per_token.py  TokenInfluence: every scored eval token's change (per_token=True on the paths above)
    memory.py     memory_estimate / check_memory: peak device bytes of each path, before it runs
The learning-rate sweep lives in `jaxeif.lr_choice`: nothing in it is language-specific.
"""

from jaxeif import deprecation
from jaxeif.lm.finetuned import finetuned_eif, lora_eif
from jaxeif.lm.loss import NLL, nll
from jaxeif.lm.lowrank import linearized_sgd_eif, lowrank_sgd_eif
from jaxeif.lm.memory import check_memory, memory_estimate
from jaxeif.lm.per_token import TokenInfluence
from jaxeif.lm.prompted import prompted_eif
from jaxeif.lm.tokens import PROMPT_FORMAT, Tokens, check_vocab, tokenize

__all__ = [
    "Tokens",
    "tokenize",
    "check_vocab",
    "PROMPT_FORMAT",
    "NLL",
    "nll",
    "finetuned_eif",
    "lora_eif",
    "lowrank_sgd_eif",
    "linearized_sgd_eif",
    "prompted_eif",
    "TokenInfluence",
    "memory_estimate",
    "check_memory",
]

# helpers importable from jaxeif.lm before its public list was cut to what users call (one release)
__getattr__ = deprecation.moved(
    "jaxeif.lm",
    {
        "check_tokens": "jaxeif.lm.tokens",
        "check_example": "jaxeif.lm.tokens",
        "encode": "jaxeif.lm.tokens",
        "vocab_size": "jaxeif.lm.tokens",
        "bos_token_id": "jaxeif.lm.tokens",
        "model_vocab_size": "jaxeif.lm.tokens",
        "SEPARATOR": "jaxeif.lm.tokens",
        "ApplyFn": "jaxeif.lm.tokens",
        "packed_nll": "jaxeif.lm.loss",
        "pack_tokens": "jaxeif.lm.loss",
        "sequence_nll": "jaxeif.lm.loss",
        "slot_nll": "jaxeif.lm.loss",
        "ROW_LENGTH": "jaxeif.lm.loss",
        "choose_path": "jaxeif.lm.dispatch",
        "sgd_step_lowrank": "jaxeif.lm.lowrank",
        "MemoryBudgetError": "jaxeif.chunking",
    },
)
