"""Language-model EIF against a per-sample PyTorch loop (transformers models), the exact low-rank
SGD path against the dense computation, prompted EIF, masks, and bad input."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="reference tests need torch==2.13.0 (make test installs it)")
transformers = pytest.importorskip("transformers")

from tiny_lm import tiny_checkpoint  # noqa: E402

from jaxeif import lm, lr_choice  # noqa: E402
from jaxeif.lm import loss as lm_loss  # noqa: E402
from jaxeif.lm import lowrank
from jaxeif.models import loading, lora, tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # every test compares with a torch-built tiny checkpoint (tests/tiny_lm.py)

TEXTS = ["Ab is big.", "Cd is big.", "Ab is big.\nCd is big.", "Cd is small.", "Ab is small."]


def torch_loss(model, ids, att, score):
    """The same length-normalised NLL, written directly in torch for one row."""
    logits = model(torch.tensor(ids[None], dtype=torch.long), attention_mask=torch.tensor(att[None])).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(ids[1:, None], dtype=torch.long))[:, 0]
    w = torch.tensor(score[1:])
    return -(w * logp).sum() / w.sum()


def torch_eif(model, toks, make_opt, steps=1):
    """Per-sample loop: copy, `steps` optimizer steps on sample i, score every sample."""
    rows = [tuple(np.asarray(x)[k] for x in toks) for k in range(toks.ids.shape[0])]
    with torch.no_grad():
        base = np.array([torch_loss(model, *r).item() for r in rows])
    out = []
    for r in rows:
        m = copy.deepcopy(model)
        opt = make_opt(m.parameters())
        for _ in range(steps):
            opt.zero_grad()
            torch_loss(m, *r).backward()
            opt.step()
        with torch.no_grad():
            out.append([torch_loss(m, *q).item() for q in rows])
    return np.array(out) - base[None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_checkpoint(path)
    apply_fn, params, config = loading.from_pretrained(path)
    tok = tokenizer.load_tokenizer(path)
    return model, apply_fn, params, config, tok


def _close(ours, ref):
    scale = np.abs(ref).max()
    assert scale > 1e-3, "the reference EIF is ~0: the test would not see a difference"
    np.testing.assert_allclose(ours, ref, atol=2e-4 * scale + 1e-6, rtol=0)


@pytest.fixture(scope="module")
def sgd_eif(tiny):
    """(torch per-sample loop, jaxeif dense, jaxeif low-rank) single-step SGD EIF on TEXTS."""
    model, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS, config=config)
    lr = 0.05
    ref = torch_eif(model, toks, lambda p: torch.optim.SGD(p, lr=lr))
    dense = np.asarray(lm.finetuned_eif(apply_fn, params, toks, lr=lr, chunk_size=None, config=config))
    low = np.asarray(lm.lowrank_sgd_eif(apply_fn, params, toks, lr=lr, config=config))
    return ref, dense, low


def test_dense_sgd_and_lowrank_match_torch_loop(sgd_eif):
    ref, dense, low = sgd_eif
    _close(dense, ref)
    _close(low, ref)


def test_two_line_row_differs_from_its_last_line_row(sgd_eif):
    """Row 2 trains "Ab is big.\nCd is big."; row 1 trains its last line alone: they must differ."""
    _, _, M = sgd_eif
    assert TEXTS[2].split("\n")[-1] == TEXTS[1]
    gap = np.abs(M[2] - M[1]).max()
    assert gap > 0.1 * np.abs(M[1]).max(), (M[1], M[2])


def test_phi3_untied_adam_and_lowrank_sgd_with_context_match_torch_loop(tmp_path):
    """Phi-3 layout, untied output layer: Adam (2 steps) and low-rank SGD on samples whose context is not scored."""
    model = tiny_checkpoint(tmp_path, arch="phi3", tie=False, seed=1)
    apply_fn, params, config = loading.from_pretrained(tmp_path)
    tok = tokenizer.load_tokenizer(tmp_path)
    toks = lm.tokenize(tok, TEXTS[:4], config=config)
    lr = 3e-3
    ref = torch_eif(model, toks, lambda p: torch.optim.Adam(p, lr=lr), steps=2)
    ours = lm.finetuned_eif(
        apply_fn, params, toks, lr=lr, steps=2, optimizer=optax.adam(1.0), chunk_size=None, config=config
    )
    _close(np.asarray(ours), ref)
    with_context = lm.tokenize(tok, TEXTS[:3], contexts=TEXTS[2:5], config=config)
    assert 0 < with_context.score.sum() < with_context.attention.sum() - 3
    ref = torch_eif(model, with_context, lambda p: torch.optim.SGD(p, lr=0.05))
    _close(np.asarray(lm.lowrank_sgd_eif(apply_fn, params, with_context, lr=0.05, config=config)), ref)


def test_prompted_matches_torch(tiny):
    model, apply_fn, params, config, tok = tiny
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ref = np.zeros((len(TEXTS), len(TEXTS)))
    with torch.no_grad():
        for j, pj in enumerate(TEXTS):
            alone = np.array([256] + enc(pj))
            s_alone = np.r_[0.0, np.ones(len(alone) - 1)].astype(np.float32)
            base = torch_loss(model, alone, np.ones_like(alone), s_alone).item()
            for i, pi in enumerate(TEXTS):
                ctx = [256] + enc(pi) + enc("\n")
                ids = np.array(ctx + enc(pj))
                score = np.r_[np.zeros(len(ctx)), np.ones(len(ids) - len(ctx))].astype(np.float32)
                ref[i, j] = torch_loss(model, ids, np.ones_like(ids), score).item() - base
    _close(lm.prompted_eif(apply_fn, params, tok, config, TEXTS), ref)


def test_prompted_and_nll_progress_is_a_bool_bar(tiny, capsys):
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS, config=config)
    quiet = lm.prompted_eif(apply_fn, params, tok, config, TEXTS)
    shown = lm.prompted_eif(apply_fn, params, tok, config, TEXTS, progress=True)
    assert isinstance(shown, jax.Array)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(quiet))
    np.testing.assert_array_equal(lm.nll(apply_fn, params, toks, progress=True), lm.nll(apply_fn, params, toks))
    err = capsys.readouterr().err
    assert f"{len(TEXTS) ** 2}/{len(TEXTS) ** 2}" in err and f"{len(TEXTS)}/{len(TEXTS)}" in err
    for bad in (None, 1, object()):
        with pytest.raises(TypeError, match="`progress` must be True or False"):
            lm.nll(apply_fn, params, toks, progress=bad)


def test_nll_bos_padding_and_mask(tiny):
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, ["Ab is big.", "Cd"], config=config)
    assert toks.ids[0, 0] == 256 and toks.score[0, 0] == 0 and toks.score[1, 3:].sum() == 0
    assert toks.ids[1, 3] == 257 and toks.attention[1, 3] == 0
    longer = lm.tokenize(tok, ["Ab is big.", "Cd"], config=config, length=40)
    a, b = lm.nll(apply_fn, params, toks), lm.nll(apply_fn, params, longer)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    logits = np.asarray(apply_fn(params, jnp.asarray(toks.ids[:1])), np.float64)[0]
    n = int(toks.lengths[0])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    manual = -np.mean([logp[t - 1, toks.ids[0, t]] for t in range(1, n)])
    np.testing.assert_allclose(a[0], manual, rtol=1e-5)


def test_lora_eif_equals_loop_over_merged_models(tiny):
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS[:2], config=config)
    adapters = lora.init(jax.random.key(1), params, rank=2, alpha=4.0)
    adapters = lora.Adapters(jax.tree.map(lambda x: x + 0.05, adapters.deltas), adapters.scale)  # B != 0
    lr = 0.1
    M = np.asarray(lm.lora_eif(apply_fn, params, toks, adapters=adapters, lr=lr))
    rows = [lm.Tokens(*(jnp.asarray(x[k]) for x in toks)) for k in range(2)]
    loss = jax.jit(lambda d, ex: lm.NLL(apply_fn)(lora.merge(params, lora.Adapters(d, adapters.scale)), ex))
    grad = jax.jit(jax.grad(loss))
    base = np.array([loss(adapters.deltas, r) for r in rows])
    for i, r in enumerate(rows):
        g = grad(adapters.deltas, r)
        new = jax.tree.map(lambda a, b: a - lr * b, adapters.deltas, g)
        np.testing.assert_allclose(M[i], [float(loss(new, q)) - b for q, b in zip(rows, base)], atol=1e-5)
    assert np.abs(M).max() > 1e-3


def test_lr_sweep_on_tiny_model(tiny):
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS, config=config)
    sweep = lr_choice.lr_sweep(
        lambda r: np.asarray(lm.lowrank_sgd_eif(apply_fn, params, toks, lr=r, config=config)),
        [1e-4, 1e-3, 1e-2, 1e-1, 3.0],
    )
    assert sweep.agreement[1] > 0.95 and sweep.agreement[-1] < sweep.agreement[1]  # linear regime, then not
    assert np.all(np.diff(sweep.magnitude[:4]) > 0)
    assert sweep.chosen in sweep.lrs[:4]
    assert lr_choice.plot_lr_sweep(sweep) is not None


def test_bad_input(tiny):
    _, apply_fn, params, config, tok = tiny
    with pytest.raises(ValueError, match="sample 1 is empty"):
        lm.tokenize(tok, ["Ab is big.", "  "], config=config)
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        lm.tokenize(tok, ["x" * 200], config=config)
    with pytest.raises(ValueError, match="longer than the model's context"):
        lm.prompted_eif(apply_fn, params, tok, config, ["y" * 70, "z" * 70])
    small_config = dataclasses.replace(config, vocab_size=200)  # a model whose vocabulary is smaller
    with pytest.raises(ValueError, match="tokenizer has 258 tokens but the model's vocabulary has 200"):
        lm.tokenize(tok, TEXTS, config=small_config)


def test_logits_at_equals_slicing_the_full_logits(tiny):
    """phi3's `logits_at` (with and without a low-rank delta on the tied embedding) = full logits sliced."""
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS[:3], config=config)
    ids, att = jnp.asarray(toks.ids), jnp.asarray(toks.attention)
    pos = np.random.default_rng(0).integers(0, toks.ids.shape[1], size=(3, 5)).astype(np.int32)
    d = config.hidden_size
    delta = {"model": {"embed_tokens": {"a": jnp.full((config.vocab_size, 2), 0.01), "b": jnp.full((2, d), 0.02)}}}
    for delta_ in (None, delta):
        full = np.asarray(apply_fn(params, ids, att, delta=delta_))
        at = np.asarray(apply_fn(params, ids, att, delta=delta_, logits_at=jnp.asarray(pos)))
        np.testing.assert_allclose(at, full[np.arange(3)[:, None], pos], rtol=1e-5, atol=1e-6)
    assert at.shape == (3, 5, config.vocab_size)


def test_packed_nll_and_lowrank_equal_one_sample_at_a_time(tiny, sgd_eif):
    """Packing several samples into a row (block attention, per-sample positions) changes nothing: nll =
    sequence_nll on each sample alone; the low-rank EIF with many samples per row and one backward pass
    per row = the same with one sample per row (row_length 1) and with other rank buckets."""
    _, apply_fn, params, config, tok = tiny
    pairs = lm.tokenize(tok, TEXTS[:4], contexts=TEXTS[1:5], config=config)
    slow = [float(lm.NLL(apply_fn)(params, lm.Tokens(*(jnp.asarray(x[k]) for x in pairs)))) for k in range(4)]
    for row_length in (1, 40, 512):  # one sample per row, several rows of several, all in one row
        np.testing.assert_allclose(lm.nll(apply_fn, params, pairs, row_length=row_length), slow, rtol=1e-5)
    assert lm_loss.pack_tokens(pairs, 512).ids.shape[0] == 1 and lm_loss.pack_tokens(pairs, 40).ids.shape[0] > 1
    toks = lm.tokenize(tok, TEXTS, config=config)
    packed = sgd_eif[2]  # lm.lowrank_sgd_eif(..., lr=0.05) with the defaults: all samples in one row
    alone = np.asarray(
        lm.lowrank_sgd_eif(apply_fn, params, toks, lr=0.05, config=config, row_length=1, rank_bucket=1, chunk_size=2)
    )
    assert np.abs(alone).max() > 1e-3
    np.testing.assert_allclose(packed, alone, atol=1e-5 * np.abs(alone).max(), rtol=0)


def test_sgd_step_lowrank_is_the_dense_sgd_step(tiny):
    """apply_fn(params, delta=delta) = apply_fn(params - lr * grad) on another sample's logits."""
    _, apply_fn, params, config, tok = tiny
    toks = lm.tokenize(tok, TEXTS[:2], config=config)
    row = lm.Tokens(*(jnp.asarray(x[0]) for x in toks))
    lr = 0.05
    delta = lowrank.sgd_step_lowrank(apply_fn, params, row, lr, config=config)
    new = jax.tree.map(lambda w, g: w - lr * g, params, jax.grad(lm.NLL(apply_fn))(params, row))
    ids = jnp.asarray(toks.ids[1:])
    np.testing.assert_allclose(apply_fn(params, ids, delta=delta), apply_fn(new, ids), atol=2e-5)
    assert np.abs(np.asarray(apply_fn(new, ids)) - np.asarray(apply_fn(params, ids))).max() > 1e-3
