"""Tokenised samples: the `Tokens` rows every language-model entry point takes, their checks, and
`tokenize` (text -> Tokens).

A sample is a `Tokens` row: ids, attention (1 = real token) and score (1 = this token's
log-probability counts in the loss). Tokenisation: BOS (when the tokenizer or model has one) + the
text's tokens (no other special tokens); padding is on the right with attention 0 and score 0; a
multi-line sample is ONE sample (lines joined by "\\n"), every line scored and trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif.finetune import PyTree
from jaxeif.models.decoder import attached_config
from jaxeif.packing import round_up

SEPARATOR = "\n"
"""What joins a context and its continuation in prompted EIF (`tokenize(..., contexts=...)`)."""
PROMPT_FORMAT = "BOS + tokens(p_i) + tokens('\\n') + tokens(p_j); only p_j's tokens scored; minus L(BOS + tokens(p_j))"
"""How prompted EIF (`jaxeif.lm.prompted_eif`) scores p_j in the context of p_i, in words."""
ApplyFn = Callable[..., jax.Array]
"""A language model: `apply_fn(params, ids int32[b, t], attention int32[b, t], ...) -> f32[b, t, vocab]`."""


class Tokens(NamedTuple):
    """A batch of tokenised samples, right-padded; `tokenize` makes them.

    Every language-model entry point checks these rules (`check_tokens`) and names what breaks one.

    Attributes:
        ids: int32[n, t] token ids in [0, vocabulary size), padding included.
        attention: int32[n, t] 1 for the sample's real tokens, then 0 for the padding on the right.
        score: f32[n, t] the weight of -log p(ids[t] | ids[<t]) in the sample's loss, >= 0: 0 at position 0
            (nothing predicts it) and on padding, > 0 somewhere; `tokenize` makes 0/1 scores.
    """

    ids: Any
    attention: Any
    score: Any

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.attention).sum(axis=1)


def check_tokens(name: str, tokens: Any, vocab_size: int) -> Tokens:
    """`tokens` as numpy Tokens (int32, int32, float32) after checking every rule of `Tokens`.

    Args:
        name: the argument's name, used in the error messages.
        tokens: the samples to check.
        vocab_size: the model's vocabulary size (ids must be below it).

    Returns:
        The checked `Tokens`, as host numpy arrays.

    Raises:
        TypeError: not a `Tokens`, or a field has a wrong dtype.
        ValueError: shapes disagree or a rule is broken; the message names the field, sample and position.
    """
    if not isinstance(tokens, tuple) or len(tokens) != 3:
        raise TypeError(
            f"`{name}` must be a jaxeif.lm.Tokens(ids, attention, score) (lm.tokenize makes one), "
            f"got {type(tokens).__name__}"
        )
    ids, att, score = (_host_array(f"{name}.{field}", x) for field, x in zip(Tokens._fields, tokens))
    if not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != bool):
        raise TypeError(f"`{name}.ids` has dtype {ids.dtype}; token ids must be integers (int32)")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(
            f"`{name}.ids` has shape {ids.shape}; pass int[n, t], one row per sample "
            "(add a leading axis for a single sample: ids[None])"
        )
    for field, x in (("attention", att), ("score", score)):
        if x.shape != ids.shape:
            raise ValueError(
                f"`{name}.{field}` has shape {x.shape} but `{name}.ids` has {ids.shape}; give all three "
                "fields the same [n, t] shape"
            )
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
            raise TypeError(f"`{name}.{field}` has dtype {x.dtype}; it must hold real numbers")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        (r, t), value = bad[0], ids[tuple(bad[0])]
        raise ValueError(
            f"`{name}.ids` holds id {value} (sample {r}, position {t}), outside the model's vocabulary "
            f"[0, {vocab_size}); tokenize with the model's own tokenizer (lm.tokenize)"
        )
    if not np.all((att == 0) | (att == 1)):
        raise ValueError(f"`{name}.attention` must hold only 0 and 1, got {np.unique(att)[:5].tolist()}")
    att = att.astype(np.int32)
    lengths = att.sum(axis=1)
    not_prefix = np.flatnonzero(np.any(att != (np.arange(att.shape[1])[None] < lengths[:, None]), axis=1))
    if not_prefix.size:
        raise ValueError(
            f"`{name}.attention` of sample {not_prefix[0]} is not 1s followed by 0s: pad on the right "
            "(real tokens first, attention 1)"
        )
    score = score.astype(np.float32)
    if not np.all(np.isfinite(score)) or np.any(score < 0):
        raise ValueError(f"`{name}.score` must be finite and >= 0 (a weight per token)")
    if np.any(score[:, 0] != 0):
        raise ValueError(
            f"`{name}.score` is nonzero at position 0 of sample {np.flatnonzero(score[:, 0])[0]}: "
            "nothing predicts the first token, so set its score to 0"
        )
    padded = np.argwhere((score != 0) & (att == 0))
    if padded.size:
        raise ValueError(
            f"`{name}.score` is nonzero where attention is 0 (sample {padded[0][0]}, position "
            f"{padded[0][1]}); score only real tokens"
        )
    empty = np.flatnonzero(score.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"`{name}.score` of sample {empty[0]} is all zero: nothing to score; mark the tokens whose "
            "log-probability counts with score > 0"
        )
    return Tokens(ids.astype(np.int32), att, score)


def _host_array(name: str, x: Any) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"`{name}` is traced; the language-model entry points take concrete Tokens (call them outside jit)"
        )
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}") from e


def check_example(name: str, example: Any, vocab_size: int) -> Tokens:
    """One sample (a `Tokens` of 1-d rows), checked as `check_tokens` checks a batch.

    Args:
        name: the argument's name, used in the error messages.
        example: the sample.
        vocab_size: the model's vocabulary size.

    Returns:
        The checked sample, with 1-d rows.

    Raises:
        TypeError: not a `Tokens`, or a field has a wrong dtype.
        ValueError: a field is not 1-d, or a rule of `Tokens` is broken.
    """
    if not isinstance(example, tuple) or len(example) != 3:
        raise TypeError(f"`{name}` must be ONE sample, a jaxeif.lm.Tokens of 1-d rows, got {type(example).__name__}")
    shapes = [np.shape(x) for x in example]
    if any(len(shape) != 1 for shape in shapes):
        raise ValueError(
            f"`{name}` must be ONE sample, Tokens of 1-d rows (e.g. Tokens(*(x[k] for x in toks))), got shapes {shapes}"
        )
    one = check_tokens(name, Tokens(*(np.asarray(x)[None] for x in example)), vocab_size)
    return Tokens(*(x[0] for x in one))


def model_vocab_size(apply_fn: ApplyFn, params: PyTree) -> int:
    """The vocabulary size of a model: the last axis of its logits, found abstractly (nothing is computed).

    Args:
        apply_fn: the model.
        params: its params.

    Returns:
        The number of logits per position.
    """
    out = jax.eval_shape(lambda p: apply_fn(p, jnp.zeros((1, 2), jnp.int32)), params)
    return int(out.shape[-1])


def checked(
    apply_fn, params, train, evals, vocab_size: int | None = None, context: int | None = None
) -> tuple[Tokens, Tokens | None]:
    """`train` and `evals` checked against the model's vocabulary and context length.

    Args:
        apply_fn: the model.
        params: its params.
        train: the train samples.
        evals: the eval samples, or None.
        vocab_size: the vocabulary size; None: read from the model (`model_vocab_size`).
        context: the model's context length (max_position_embeddings); None: from the config of a jaxeif
            decoder's apply_fn (`decoder.attached_config`), else not checked.

    Returns:
        (train, evals) as checked `Tokens`; evals stays None when None.

    Raises:
        ValueError: a sample longer than the context (positions past it have no trained embedding).
    """
    vocab_size = model_vocab_size(apply_fn, params) if vocab_size is None else int(vocab_size)
    if context is None:
        context = getattr(attached_config(apply_fn), "max_position_embeddings", None)
    train = check_context("train", check_tokens("train", train, vocab_size), context)
    return train, None if evals is None else check_context("evals", check_tokens("evals", evals, vocab_size), context)


def check_context(name: str, tokens: Tokens, context: int | None) -> Tokens:
    """ValueError when a sample of `tokens` has more real tokens than the model's `context` (None: unknown,
    not checked); positions past the context have no trained position embedding, so the numbers mean nothing."""
    if context is None:
        return tokens
    lengths = tokens.lengths
    over = np.flatnonzero(lengths > int(context))
    if over.size:
        raise ValueError(
            f"`{name}` sample {over[0]} is {int(lengths[over[0]])} tokens long, longer than the model's "
            f"context of {int(context)} tokens ({over.size} such samples); shorten them (lm.tokenize "
            "refuses them too)"
        )
    return tokens


def check_texts(name: str, texts: Any) -> list[str]:
    """`texts` as a non-empty list of str: a single str (which would be split into one-letter samples) and an
    empty list are refused, naming `name`."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a list of str, one per sample, got a single {type(texts).__name__} "
            f"({texts[:30]!r}); pass [{texts[:30]!r}] for one sample"
        )
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of str, one per sample, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError(f"`{name}` is empty; pass at least one text")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"`{name}[{k}]` is a {type(t).__name__}; every sample must be a str")
    return texts


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added.

    Args:
        tokenizer: a Hugging Face tokenizer or a `tokenizers.Tokenizer`.
        text: the text.

    Returns:
        The token ids.

    Raises:
        TypeError: `text` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"a sample must be a str, got {type(text).__name__}")
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_ids(tokenizer, text: str, k: int) -> list[int]:
    """Token ids of sample `k`, which must have some text.

    Args:
        tokenizer: a Hugging Face tokenizer or a `tokenizers.Tokenizer`.
        text: the sample's text.
        k: the sample's index, for the error message.

    Returns:
        The token ids.

    Raises:
        ValueError: the sample is empty or only whitespace.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"sample {k} is empty ({text!r}); every sample needs some text to score")
    return encode(tokenizer, text)


def vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can produce (added tokens included).

    Args:
        tokenizer: a Hugging Face tokenizer or a `tokenizers.Tokenizer`.

    Returns:
        The vocabulary size.
    """
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return int(len(tokenizer))


def check_vocab(tokenizer, config) -> None:
    """Check that the tokenizer produces no ids past the model's embedding table.

    Args:
        tokenizer: the tokenizer.
        config: the model's config (its `vocab_size`).

    Raises:
        ValueError: the tokenizer has more tokens than the model: they do not belong together.
    """
    n = vocab_size(tokenizer)
    if n > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocabulary has {config.vocab_size}: they do not belong "
            "together; load the tokenizer from the same checkpoint as the model "
            "(jaxeif.models.tokenizer.load_tokenizer)"
        )


def bos_token_id(tokenizer, config) -> int | None:
    """The BOS token id: the tokenizer's, else the model config's.

    Args:
        tokenizer: the tokenizer.
        config: the model's config, or None.

    Returns:
        The id, or None when neither has one.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None and config is not None and getattr(config, "bos_token_id", None) is not None:
        bos = config.bos_token_id if config.bos_token_id >= 0 else None
    return None if bos is None else int(bos)


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def tokenize(
    tokenizer,
    texts: Sequence[str],
    *,
    config,
    contexts: Sequence[str] | None = None,
    length: int | None = None,
    pad_multiple: int = 8,
) -> Tokens:
    """`Tokens` of `texts`, each optionally after a context (`PROMPT_FORMAT`), right-padded.

    Only the text's own tokens are scored; BOS (when the model has one) and the context are not.

    Args:
        tokenizer: the model's tokenizer (`jaxeif.models.tokenizer.load_tokenizer`).
        texts: the samples; a multi-line sample is one sample.
        config: the model's config (vocabulary size, BOS id, context length).
        contexts: one context per text, placed before it with `SEPARATOR`; None: no context.
        length: the padded length; None: the longest sample rounded up to `pad_multiple`.
        pad_multiple: rounding of the padded length (fewer distinct shapes, fewer compilations).

    Returns:
        `Tokens` with fields of shape [n, t].

    Raises:
        ValueError: no texts, an empty sample, a sample with no token to score, a sample longer than the model's
            context, `length` shorter than the longest sample, contexts and texts of different counts, or a
            tokenizer that does not fit the model's vocabulary.
    """
    check_vocab(tokenizer, config)
    texts = check_texts("texts", texts)
    if contexts is not None:
        contexts = check_texts("contexts", contexts)
    if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"`pad_multiple` must be an int >= 1 (pad lengths to a multiple of it), got {pad_multiple!r}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"`length` must be None or an int >= 1 (the padded length), got {length!r}")
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts; pass one context per text")
    bos = bos_token_id(tokenizer, config)
    head = [] if bos is None else [bos]
    sep = encode(tokenizer, SEPARATOR)
    rows = []
    for k, text in enumerate(texts):
        body = text_ids(tokenizer, text, k)
        ctx = [] if contexts is None else encode(tokenizer, contexts[k]) + sep
        ids = head + ctx + body
        score = [0.0] * (len(head) + len(ctx)) + [1.0] * len(body)
        score[0] = 0.0  # nothing predicts the first token
        if sum(score) == 0:
            raise ValueError(
                f"sample {k} ({text!r}) has no token to score: with no BOS token a sample needs two tokens"
            )
        limit = config.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(
                f"sample {k} is {len(ids)} tokens long (context included), longer than the model's context of "
                f"{limit} tokens; shorten it"
            )
        rows.append((ids, score))
    longest = max(len(ids) for ids, _ in rows)
    t = round_up(longest, pad_multiple) if length is None else int(length)
    if t < longest:
        raise ValueError(f"length={t} is shorter than the longest sample ({longest} tokens)")
    pad = _pad_id(tokenizer)
    ids = np.full((len(rows), t), pad, np.int32)
    att = np.zeros((len(rows), t), np.int32)
    score = np.zeros((len(rows), t), np.float32)
    for r, (row_ids, row_score) in enumerate(rows):
        ids[r, : len(row_ids)] = row_ids
        att[r, : len(row_ids)] = 1
        score[r, : len(row_ids)] = row_score
    return Tokens(ids, att, score)
