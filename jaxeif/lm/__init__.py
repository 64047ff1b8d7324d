"""Language-model influence: tokenised samples, the length-normalised NLL, fine-tuned EIF (dense via
`jaxeif.eif`, LoRA, and the exact low-rank single-step SGD path) and prompted EIF.

Models enter as `apply_fn(params, ids int32[b, t], attention_mask=None, delta=None, positions=None)
-> f32[b, t, v]` (`jaxeif.models.phi3`; `delta=` takes per-linear low-rank deltas and taps), where
attention_mask may be a bool[b, t, t] visibility mask: losses are computed on samples packed into
shared rows (`jaxeif.packing`). Every fine-tuned EIF takes `(apply_fn, params, train, evals=None, *,
lr, ..., chunk_size="auto", precision="highest", progress=False)` and returns a jax.Array f32[n, m].

    tokens.py     Tokens, check_tokens, tokenize (text -> Tokens)
    loss.py       NLL (a loss_fn for jaxeif.eif), nll / packed_nll (many samples per forward pass)
    finetuned.py  finetuned_eif (path "auto" | "dense" | "lowrank") and lora_eif
    dispatch.py   choose_path: the measured rule behind finetuned_eif(path="auto")
    lowrank.py    lowrank_sgd_eif: single-step SGD EIF, exactly, in low-rank form (named steps);
                  linearized_sgd_eif: its first-order term -lr <g_i, g_j>, the same way
    prompted.py   prompted_eif: L(p_j | context p_i) - L(p_j)
    per_token.py  TokenInfluence: every scored eval token's change (per_token=True on the paths above)
    memory.py     memory_estimate / check_memory: peak device bytes of each path, before it runs
The learning-rate sweep lives in `jaxeif.lr_choice`: nothing in it is language-specific.
"""
from jaxeif.lm.dispatch import choose_path
from jaxeif.lm.finetuned import finetuned_eif, lora_eif
from jaxeif.lm.loss import NLL, ROW_LENGTH, nll, pack_tokens, packed_nll, sequence_nll, slot_nll
from jaxeif.chunking import MemoryBudgetError
from jaxeif.lm.memory import check_memory, memory_estimate
from jaxeif.lm.lowrank import linearized_sgd_eif, lowrank_sgd_eif, sgd_step_lowrank
from jaxeif.lm.per_token import TokenInfluence
from jaxeif.lm.prompted import prompted_eif
from jaxeif.lm.tokens import (PROMPT_FORMAT, SEPARATOR, ApplyFn, Tokens, bos_token_id, check_example, check_tokens,
                              check_vocab, encode, model_vocab_size, tokenize, vocab_size)

__all__ = ["Tokens", "tokenize", "check_tokens", "check_example", "check_vocab", "encode", "vocab_size", "bos_token_id",
           "model_vocab_size", "SEPARATOR", "PROMPT_FORMAT", "ApplyFn", "NLL", "nll", "packed_nll", "pack_tokens",
           "sequence_nll", "slot_nll", "ROW_LENGTH", "finetuned_eif", "lora_eif", "choose_path", "lowrank_sgd_eif", "linearized_sgd_eif", "sgd_step_lowrank",
           "prompted_eif", "TokenInfluence", "memory_estimate", "check_memory", "MemoryBudgetError"]
