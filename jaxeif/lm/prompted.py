"""Prompted EIF: EIF_prompt[i, j] = L(p_j | context p_i) - L(p_j).

Context format (PROMPT_FORMAT): BOS + tokens(p_i) + tokens("\\n") + tokens(p_j), scoring only p_j's
tokens; the reference is BOS + tokens(p_j). p_j's tokens are identical in both, so the entry
measures only the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import packing
from jaxeif.finetune import PyTree
from jaxeif.lm.loss import ROW_LENGTH, nll, packed_nll
from jaxeif.lm.per_token import TokenInfluence, check_per_token, prompted_tokens
from jaxeif.lm.tokens import SEPARATOR, ApplyFn, bos_token_id, check_texts, check_vocab, encode, text_ids, tokenize


def prompted_eif(
    apply_fn: ApplyFn,
    params: PyTree,
    tokenizer,
    config,
    texts: Sequence[str],
    eval_texts: Sequence[str] | None = None,
    *,
    row_length: int = ROW_LENGTH,
    base: np.ndarray | None = None,
    progress: bool = False,
    per_token: bool = False,
) -> jax.Array | TokenInfluence:
    """EIF_prompt[i, j] = L(p_j | context p_i) - L(p_j), f32[n, m]; context format: PROMPT_FORMAT.

    Each context is computed once and followed, in packed rows (`jaxeif.packing.prefixed`), by every
    p_j, each seeing only the context and itself: exactly the n * m separate sequences, at about half
    their cost. `base` (f32[m], L(p_j) alone) is computed when not given. `progress`: a bar of the contexts'
    continuations scored. `per_token`: a `lm.TokenInfluence` instead, over p_j's own tokens (T: the longest
    eval's), each token's NLL after the context minus alone (`prompted_tokens`; `base` must be None).
    """
    texts = check_texts("texts", texts)
    evals = texts if eval_texts is None else check_texts("eval_texts", eval_texts)
    check_vocab(tokenizer, config)
    per_token = check_per_token(per_token)
    if base is None and not per_token:
        base = nll(apply_fn, params, tokenize(tokenizer, evals, config=config), row_length=row_length)
    bos = bos_token_id(tokenizer, config)
    head, sep = ([] if bos is None else [bos]), encode(tokenizer, SEPARATOR)
    prefixes = [head + text_ids(tokenizer, t, k) + sep for k, t in enumerate(texts)]
    bodies = [text_ids(tokenizer, t, k) for k, t in enumerate(evals)]
    longest = max(map(len, prefixes)) + max(map(len, bodies))
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"a context plus a sample is {longest} tokens long, longer than the model's context of "
            f"{config.max_position_embeddings} tokens; shorten the samples"
        )
    packed = packing.prefixed(prefixes, bodies, row_length=row_length)
    if per_token:
        return prompted_tokens(apply_fn, params, packed, bodies, head, base, row_length=row_length)
    after = packed_nll(apply_fn, params, packed, progress=progress)
    return jnp.asarray(after.reshape(len(texts), len(evals)) - np.asarray(base, np.float32)[None])
