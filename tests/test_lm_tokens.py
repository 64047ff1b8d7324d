"""Every language-model entry point checks its Tokens (ids in the vocabulary, attention 1s then 0s,
score >= 0 only on real tokens and not all zero) and raises jaxeif's own one-line error."""

import jax
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxeif import lm
from jaxeif.lm import lowrank
from jaxeif.models import lora, phi3

CFG = phi3.Phi3Config(
    vocab_size=53,
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)
PARAMS = phi3.init_params(jax.random.key(0), CFG)
APPLY = phi3.make_apply_fn(CFG)
ADAPTERS = lora.init(jax.random.key(1), PARAMS, rank=2, alpha=4)


def valid_tokens(n=3, t=6):
    ids = np.arange(n * t, dtype=np.int32).reshape(n, t) % CFG.vocab_size
    att = np.zeros((n, t), np.int32)
    score = np.zeros((n, t), np.float32)
    for k in range(n):  # every sample padded
        att[k, : t - 1 - k] = 1
        score[k, 1 : t - 1 - k] = 1
    return lm.Tokens(ids, att, score)


ENTRY_POINTS = {
    "nll": lambda tr, ev: lm.nll(APPLY, PARAMS, tr),
    "finetuned_eif train": lambda tr, ev: lm.finetuned_eif(APPLY, PARAMS, tr, ev, lr=1e-2, config=CFG),
    "finetuned_eif evals": lambda tr, ev: lm.finetuned_eif(
        APPLY, PARAMS, ev, tr, lr=1e-2, optimizer=optax.adam(1.0), config=CFG
    ),
    "lora_eif": lambda tr, ev: lm.lora_eif(APPLY, PARAMS, tr, ev, adapters=ADAPTERS, lr=1e-2),
    "lowrank_sgd_eif train": lambda tr, ev: lm.lowrank_sgd_eif(APPLY, PARAMS, tr, ev, lr=1e-2, config=CFG),
    "lowrank_sgd_eif evals": lambda tr, ev: lm.lowrank_sgd_eif(APPLY, PARAMS, ev, tr, lr=1e-2, config=CFG),
    "sgd_step_lowrank": lambda tr, ev: step_every_row(tr),
}


def step_every_row(tokens):
    """sgd_step_lowrank on each sample of a batch (so a fault in any row is seen); one unbatched sample
    becomes a batch of one, which is the malformed input for this per-sample function; anything else as is."""
    if (
        isinstance(tokens, tuple)
        and len(tokens) == 3
        and len({np.shape(x)[:1] for x in tokens}) == 1
        and all(np.ndim(x) == 2 for x in tokens)
    ):
        for k in range(np.shape(tokens[0])[0]):
            lowrank.sgd_step_lowrank(APPLY, PARAMS, lm.Tokens(*(x[k] for x in tokens)), 1e-2, config=CFG)
    elif isinstance(tokens, tuple) and len(tokens) == 3 and all(np.ndim(x) == 1 for x in tokens):
        lowrank.sgd_step_lowrank(APPLY, PARAMS, lm.Tokens(*(np.asarray(x)[None] for x in tokens)), 1e-2, config=CFG)
    else:
        lowrank.sgd_step_lowrank(APPLY, PARAMS, tokens, 1e-2, config=CFG)


def corrupt(kind, tok):
    ids, att, score = (np.array(x) for x in tok)
    if kind == "id >= vocab":
        ids[0, 2] = CFG.vocab_size
    elif kind == "negative id":
        ids[0, 1] = -3
    elif kind == "float ids":
        ids = ids.astype(np.float32)
    elif kind == "score on padding":
        score[0, -1] = 1.0
    elif kind == "attention shape":
        att = att[:, :-1]
    elif kind == "score shape":
        score = score[:-1]
    elif kind == "all-zero score":
        score[0] = 0.0
    elif kind == "non-binary attention":
        att[0, 0] = 2
    elif kind == "attention gap":
        att[0, 2] = 0
    elif kind == "score at position 0":
        score[0, 0] = 1.0
    elif kind == "negative score":
        score[0, 1] = -1.0
    elif kind == "nan score":
        score[0, 1] = np.nan
    elif kind == "one unbatched sample":
        ids, att, score = ids[0], att[0], score[0]
    elif kind == "not Tokens":
        return {"ids": ids}
    return lm.Tokens(ids, att, score)


KINDS = [
    "id >= vocab",
    "negative id",
    "float ids",
    "score on padding",
    "attention shape",
    "score shape",
    "all-zero score",
    "non-binary attention",
    "attention gap",
    "score at position 0",
    "negative score",
    "nan score",
    "one unbatched sample",
    "not Tokens",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ["nll", "finetuned_eif train", "lowrank_sgd_eif train", "sgd_step_lowrank"])
def test_each_malformed_case_is_one_clear_error(entry, kind):
    with pytest.raises((ValueError, TypeError), match=r"`(tokens|train|evals|example)"):
        ENTRY_POINTS[entry](corrupt(kind, valid_tokens()), valid_tokens())


def test_out_of_vocabulary_ids_name_the_vocabulary():
    with pytest.raises(ValueError, match=r"id 53 .*outside the model's vocabulary \[0, 53\)"):
        lm.lowrank_sgd_eif(APPLY, PARAMS, corrupt("id >= vocab", valid_tokens()), lr=1e-2, config=CFG)
    with pytest.raises(ValueError, match=r"id 53 .*vocabulary"):
        lm.finetuned_eif(APPLY, PARAMS, corrupt("id >= vocab", valid_tokens()), lr=1e-2, config=CFG)


def test_valid_tokens_pass_and_both_paths_agree():
    tok = valid_tokens()
    dense = np.asarray(lm.finetuned_eif(APPLY, PARAMS, tok, lr=1e-1, config=CFG))
    low = np.asarray(lm.lowrank_sgd_eif(APPLY, PARAMS, tok, lr=1e-1, config=CFG))
    np.testing.assert_allclose(low, dense, atol=2e-5, rtol=1e-3)
    assert np.abs(dense).max() > 1e-4


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entry=st.sampled_from(sorted(ENTRY_POINTS)),
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
    n=st.integers(1, 3),
    t=st.integers(5, 7),
    data=st.data(),
)
def test_random_malformed_tokens_get_only_jaxeif_errors(entry, kinds, n, t, data):
    tok = valid_tokens(n, t)
    for kind in kinds:
        try:
            tok = corrupt(kind, tok)
        except (IndexError, TypeError, AttributeError, ValueError):
            break  # an earlier corruption already changed the structure
    noise = data.draw(st.integers(-2, 2))
    if noise and isinstance(tok, tuple) and len(tok) == 3:  # and maybe a random id somewhere
        ids = np.array(tok[0])
        if ids.size and ids.dtype.kind == "i":
            ids.flat[data.draw(st.integers(0, ids.size - 1))] = noise * 1000
        tok = lm.Tokens(ids, tok[1], tok[2])
    with pytest.raises((ValueError, TypeError), match=r"`(tokens|train|evals|example)"):
        ENTRY_POINTS[entry](tok, valid_tokens(n, t))
