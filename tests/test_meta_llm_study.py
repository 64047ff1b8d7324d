"""Meta study 2 (per-layer lr multipliers for language-model logic) on a tiny random decoder:
the stacked per-layer multipliers are exact, and the study runs end to end, learns, writes its files."""

import argparse
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif import lm
from jaxeif.meta import layers_lm
from jaxeif.models import phi3

CONFIG = phi3.Phi3Config(
    vocab_size=260,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    tie_word_embeddings=True,
    bos_token_id=256,
    max_position_embeddings=512,
)


def byte_tokenizer():
    """One token per byte (ids 0..255), torch-free; BOS comes from the model config (256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxeif.models import tokenizer

    alphabet = tokenizer._bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


@pytest.fixture(scope="module")
def tiny():
    params = phi3.init_params(jax.random.key(0), CONFIG)
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)  # larger weights: non-trivial gains
    return jax.jit(phi3.make_apply_fn(CONFIG)), params, CONFIG, byte_tokenizer()


def _tokens(tiny, texts):
    _, _, config, tok = tiny
    return jax.tree.map(jnp.asarray, lm.tokenize(tok, texts, config=config))


def test_stacked_groups_and_bad_scales(tiny):
    _, params, _, _ = tiny
    s = layers_lm.init_stacked_log_scales(params)
    assert set(s) == {"model/layers", "model/embed_tokens", "model/norm"} and s["model/layers"].shape == (3,)
    apply_fn = tiny[0]
    toks = _tokens(tiny, ["Ab is big.", "Cd is big."])
    with pytest.raises(ValueError, match="must name exactly the groups"):
        jaxeif.eif(
            lm.NLL(apply_fn),
            params,
            toks,
            lr=0.1,
            optimizer=layers_lm.stacked_layer_optimizer({"model/layers": jnp.zeros(3)}),
        )
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        jaxeif.eif(
            lm.NLL(apply_fn),
            params,
            toks,
            lr=0.1,
            optimizer=layers_lm.stacked_layer_optimizer({**s, "model/layers": jnp.zeros(2)}),
        )
    with pytest.raises(ValueError, match="no 'blocks' at model"):
        layers_lm.init_stacked_log_scales(params, stacked=("model", "blocks"))


def test_unit_scales_are_plain_sgd_and_each_scale_moves_only_its_own_layer(tiny):
    """Unit multipliers give exactly the plain SGD step of jaxeif.eif's fine-tunes; with a different multiplier
    per group, each group's update is its factor times the plain one."""
    apply_fn, params, _, _ = tiny
    example = jax.tree.map(lambda a: a[0], _tokens(tiny, ["Ab is big."]))
    factors = {"model/layers": np.array([1.0, 3.0, 0.25]), "model/embed_tokens": 0.5, "model/norm": 2.0}
    s = {k: jnp.log(jnp.asarray(v, jnp.float32)) for k, v in factors.items()}

    @jax.jit
    def deltas(s):
        opt = None if s is None else layers_lm.stacked_layer_optimizer(s)
        tuned = jaxeif.finetune(lm.NLL(apply_fn), params, example, lr=0.1, steps=1, optimizer=opt)
        return jax.tree.map(jnp.subtract, tuned, params)

    unit = deltas(jax.tree.map(jnp.zeros_like, s))
    chex.assert_trees_all_equal(deltas(None), unit)
    plain, tuned = (
        jax.tree_util.tree_flatten_with_path(unit)[0],
        dict(jax.tree_util.tree_flatten_with_path(deltas(s))[0]),
    )
    for path, d_plain in plain:
        name = "/".join(str(k.key) for k in path)
        group = next(g for g in factors if name.startswith(g))
        factor = np.reshape(factors[group], np.shape(factors[group]) + (1,) * (d_plain.ndim - np.ndim(factors[group])))
        assert np.all(
            np.abs(np.asarray(d_plain)).reshape(len(d_plain) if group == "model/layers" else 1, -1).max(1) > 1e-4
        ), name
        np.testing.assert_allclose(
            np.asarray(tuned[path]), factor * np.asarray(d_plain), rtol=1e-5, atol=1e-6, err_msg=name
        )


@pytest.mark.slow
def test_quick_study_learns_and_writes_files(tiny, tmp_path, monkeypatch):
    from jaxeif.experiments import meta_llm_logic as study

    monkeypatch.setattr(study, "load_model", lambda args: tiny)
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    out = tmp_path / "meta_llm"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--quick",
            "--no-progress",
            "--lr-grid",
            "0.3",
            "1.0",
            "--meta-steps",
            "4",
            "--meta-lr",
            "0.2",
            "--draws",
            "2",
        ]
    )
    res = study.run(args)["results"]
    for name in (
        "config.json",
        "grid.json",
        "history.npy",
        "log_scales.json",
        "heldout_before.npy",
        "heldout_after.npy",
        "objective.png",
        "heldout.png",
        "results.json",
    ):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    hist = np.load(out / "history.npy")
    assert saved["meta_train"]["objective_history"] == pytest.approx(hist.tolist())
    # the learned multipliers improve the training objective (ignored multipliers would leave it unchanged)
    assert saved["meta_train"]["objective_final"] < hist[0] - 0.005, (hist, saved["meta_train"])
    assert saved["best_uniform_lr"] == min(res["uniform_lr_grid"], key=lambda g: g["logic"])["lr"]
    ls = saved["log_scales"]
    assert abs(np.mean(np.concatenate([np.ravel(v) for v in ls.values()]))) < 1e-5  # centred: location, not speed
    assert np.ptp(ls["model/layers"]) > 0
    # the held-out scorecard is the probe gain of the saved matrices, before and after
    for name in ("before", "after"):
        M = np.load(out / f"heldout_{name}.npy")
        diffs = M[:, 3, 4] - M[:, 3, 0]
        assert saved["heldout"][name]["scorecard"][0]["mean"] == pytest.approx(float(diffs.mean()), rel=1e-5)
    assert not np.allclose(
        np.load(out / "heldout_before.npy")[:, 3, [0, 4]], np.load(out / "heldout_after.npy")[:, 3, [0, 4]]
    )
    paired = saved["heldout"]["paired"]
    gains = {
        k: np.load(out / f"heldout_{k}.npy")[:, 3, 4] - np.load(out / f"heldout_{k}.npy")[:, 3, 0]
        for k in ("before", "after")
    }
    assert paired["per_draw"]["gain_after"] == pytest.approx(gains["after"].tolist(), rel=1e-6)
    assert paired["gain_difference"]["mean"] == pytest.approx(
        float((gains["after"] - gains["before"]).mean()), rel=1e-5
    )
    assert saved["seeds"]["heldout"] and not set(saved["seeds"]["train"]) & set(saved["seeds"]["heldout"])


@pytest.mark.slow  # a study stage on the tiny checkpoint
def test_probe_blocks_equal_the_eif_blocks(tiny):
    """The evaluation path (one gradient per draw, rescaled per setting; batched base losses) equals
    jaxeif.eif with the stacked-layer optimizer, setting by setting."""
    from jaxeif.experiments import meta_llm_logic as study

    apply_fn, params, config, tok = tiny
    train, evals = (jax.tree.map(jnp.asarray, t) for t in study.draw_tokens(tok, config, [5, 6], (2, 3), (0, 1, 4)))
    s0 = layers_lm.init_stacked_log_scales(params)
    s1 = {k: jax.random.normal(jax.random.key(i), v.shape) * 0.5 for i, (k, v) in enumerate(s0.items())}
    settings = [(s0, 0.3), (s1, 1.0)]
    fast = study.evaluate(apply_fn, params, train, evals, settings, center=True)
    assert fast.shape == (2, 2, 2, 3)
    for k, (scales, lr) in enumerate(settings):
        ref = np.asarray(study.blocks(apply_fn, params, train, evals, scales, lr, center=True))
        assert np.abs(ref).max() > 1e-2
        np.testing.assert_allclose(fast[k], ref, rtol=0, atol=2e-6 * np.abs(ref).max() + 1e-6)
    assert not np.allclose(fast[0], fast[1])


def test_paired_summary_against_direct_formulas():
    from scipy import stats

    from jaxeif.experiments import meta_llm_logic as study

    rng = np.random.default_rng(3)
    before = rng.normal(size=(40, 2)) * 0.1
    after = before + np.stack([rng.normal(-0.02, 0.05, 40), rng.normal(0.01, 0.05, 40)], 1)
    out = study.paired_summary(before, after, resamples=2000)
    g_before, g_after = before[:, 1] - before[:, 0], after[:, 1] - after[:, 0]
    d = g_after - g_before
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    diff = out["gain_difference"]
    assert diff["mean"] == pytest.approx(d.mean()) and diff["t_interval"] == pytest.approx(
        [d.mean() - half, d.mean() + half]
    )
    lo, hi = diff["bootstrap_interval"]
    assert lo < d.mean() < hi and hi - lo == pytest.approx(2 * half, rel=0.25)
    logic_before = (before[:, 0] - before[:, 1]) / (np.abs(before).sum(1))
    assert out["logic_term_difference"]["mean"] == pytest.approx(
        float(np.mean(study.per_draw_logic(after) - logic_before))
    )
    assert np.mean(study.per_draw_logic(before)) == pytest.approx(
        float(study.objective_terms(jnp.asarray(before[:, None]), None, 0)[1]), rel=1e-5
    )
    for name, g in (("before", g_before), ("after", g_after)):
        k = int((g > 0).sum())
        share = out["right_direction"][name]
        assert (share["right"], share["of"]) == (k, 40)
        p = k / 40
        z = stats.norm.ppf(0.975)
        centre, width = (p + z**2 / 80) / (1 + z**2 / 40), z / (1 + z**2 / 40) * np.sqrt(p * (1 - p) / 40 + z**2 / 6400)
        assert share["wilson_interval"] == pytest.approx([centre - width, centre + width])
    assert out["flips"]["right_to_wrong"] == int(((g_before > 0) & (g_after <= 0)).sum())
    assert out["flips"]["wrong_to_right"] == int(((g_before <= 0) & (g_after > 0)).sum())
