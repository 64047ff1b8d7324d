"""Issue #23 items 3-5: numbers that would mean nothing are warned of or refused, every argument is
checked where it enters (naming it and the index), and eif's hidden jit neither reuses stale constants
nor compiles a loss that closes over a tracer. Each test is one reproducer of the issue."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxeif
from jaxeif import cli, lm, lr_choice, meta
from jaxeif.models import phi3

K = jax.random.split(jax.random.key(0), 4)
P = {"w": jax.random.normal(K[0], (3, 2))}
TR = (jax.random.normal(K[1], (8, 3)), jnp.zeros((8, 2)))


def loss(p, e):
    return jnp.mean((jnp.tanh(e[0] @ p["w"]) - e[1]) ** 2)


# ----------------------------------------------------------------------------- item 3: numbers without a word


def test_bfloat16_updates_that_round_away_are_warned():
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), P)
    with pytest.warns(RuntimeWarning, match=r"bfloat16 params, lr=0.0001 .* rounds away.*float32 params"):
        M = jaxeif.eif(loss, p16, TR, lr=1e-4)
    assert not np.any(np.asarray(M))  # what the warning is about: exactly 0 everywhere
    for chunk_size in (1, 4):  # in every layout: XLA may not keep the fine-tuned bfloat16 params in float32
        with pytest.warns(RuntimeWarning, match="rounds away"):
            assert not np.any(np.asarray(jaxeif.eif(loss, p16, TR, lr=1e-4, chunk_size=chunk_size)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxeif.eif(loss, p16, TR, lr=0.5)  # large enough to move bfloat16 params: no warning
        jaxeif.eif(loss, P, TR, lr=1e-4)  # float32 params: no check, no warning


def random_loss(p, e):
    noise = jax.random.normal(jax.random.key(1), (2,), dtype=p["w"].dtype)  # x64 draws other numbers
    return jnp.mean((jnp.tanh(e[0] @ p["w"]) + noise - e[1]) ** 2)


def float32_loss(p, e):
    p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    return loss(p, jax.tree.map(lambda x: x.astype(jnp.float32), e))


@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
def test_bfloat16_fine_tunes_are_bfloat16_params(chunk_size):
    """The fine-tuned params are params + lr * update rounded to bfloat16, as an op-by-op fine-tune makes
    them, not float32 values that XLA kept between fused ops (which differ by up to bfloat16's rounding)."""
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), P)
    lr = 0.05
    got = np.asarray(jaxeif.eif(float32_loss, p16, TR, lr=lr, chunk_size=chunk_size))
    for i in range(TR[0].shape[0]):
        example = jax.tree.map(lambda x: x[i], TR)
        grads = jax.grad(float32_loss)(p16, example)  # op by op: every value is a bfloat16
        tuned = jax.tree.map(lambda p, g: (p + (-lr * g).astype(p.dtype)).astype(p.dtype), p16, grads)
        want = jaxeif.losses(float32_loss, tuned, TR) - jaxeif.losses(float32_loss, p16, TR)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_float64_mode_that_changes_the_loss_is_warned():
    with pytest.warns(RuntimeWarning, match="random draws from a fixed key"):
        jaxeif.noise_floor(random_loss, P, TR, lr=0.1, samples=2)
    with pytest.warns(RuntimeWarning, match="casts to float32 inside.*noise_floor would be 0"):
        jaxeif.eif(float32_loss, P, TR, lr=0.1, precision=jaxeif.Precision(dtype="float64"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxeif.eif(loss, P, TR, lr=0.1, precision=jaxeif.Precision(dtype="float64"))


def test_toward_with_nothing_to_match_is_refused_also_inside_meta_fit():
    M = jnp.ones((3, 3))
    with pytest.raises(ValueError, match="mask.*False everywhere"):
        meta.toward(M, -jnp.eye(3), mask=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="target.*0 on every entry"):
        meta.toward(M, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="target.*0 on every entry"):  # kept entries all zero in target
        meta.toward(M, -np.eye(3), mask=~np.eye(3, dtype=bool))
    target = np.zeros((8, 8))
    objective = lambda log_lr, p, tr: meta.toward(jaxeif.eif(loss, p, tr, lr=jnp.exp(log_lr)), target)  # noqa
    with pytest.raises(ValueError, match="target.*0 on every entry"):
        meta.fit(objective, jnp.full(8, -2.0), optimizer=optax.sgd(0.1), steps=1, progress=False, data=(P, TR))


CFG = phi3.Phi3Config(
    vocab_size=260,
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=16,
    bos_token_id=256,
)
PARAMS = phi3.init_params(jax.random.key(0), CFG)
APPLY = phi3.make_apply_fn(CFG)


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer (tokenizers library: one token per byte, ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_a_single_string_or_no_text_is_refused():
    tok = byte_tokenizer()
    with pytest.raises(TypeError, match=r"`texts` must be a list of str.*single str.*\['hello'\]"):
        lm.tokenize(tok, "hello", config=CFG)
    assert lm.tokenize(tok, ["hello"], config=CFG).ids.shape[0] == 1
    with pytest.raises(TypeError, match=r"`texts` must be a list of str.*single str"):
        lm.prompted_eif(APPLY, PARAMS, tok, CFG, texts="abc")
    with pytest.raises(ValueError, match="`texts` is empty"):
        lm.prompted_eif(APPLY, PARAMS, tok, CFG, texts=[])
    with pytest.raises(TypeError, match=r"`texts\[1\]` is a int"):
        lm.tokenize(tok, ["a b", 3], config=CFG)


def test_hand_built_tokens_longer_than_the_context_are_refused():
    t = CFG.max_position_embeddings + 4
    ids = np.arange(2 * t, dtype=np.int32).reshape(2, t) % 200
    att = np.ones((2, t), np.int32)
    score = np.ones((2, t), np.float32)
    score[:, 0] = 0
    with pytest.raises(ValueError, match=r"`train` sample 0 is 20 tokens long, longer than the model's context of 16"):
        lm.finetuned_eif(APPLY, PARAMS, lm.Tokens(ids, att, score), lr=1e-2, config=CFG)
    with pytest.raises(ValueError, match=r"`train` sample 0 is 20 tokens long"):
        lm.lowrank_sgd_eif(APPLY, PARAMS, lm.Tokens(ids, att, score), lr=1e-2, config=CFG)


def test_memory_estimate_refuses_impossible_configs_and_dtypes():
    bad = phi3.Phi3Config(**{**vars(CFG), "hidden_size": -16}) if hasattr(CFG, "__dict__") else None
    with pytest.raises(ValueError, match=r"`config.hidden_size` must be an int >= 1, got -16"):
        lm.memory_estimate(bad, 4, 4, path="dense")
    with pytest.raises(ValueError, match=r"`config.hidden_size`"):
        lm.check_memory(bad, 4, 4, path="dense", budget=1)
    with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype.*got None"):
        lm.memory_estimate(CFG, 4, 4, path="dense", dtype=None)
    with pytest.raises(TypeError, match=r"`compute_dtype` must be a floating dtype"):
        lm.memory_estimate(CFG, 4, 4, path="dense", compute_dtype=jnp.int32)


def test_cli_quick_with_options_above_its_caps_is_a_usage_error(capsys):
    code = cli.main(["cnn", "--quick", "--epochs", "3", "--per-digit", "5", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert code == 2 and "--quick runs with --epochs <= 1, --per-digit <= 2, so --epochs 3, --per-digit 5" in err, err


def test_cli_quick_keeps_values_within_its_caps():
    """A value --quick would not change is allowed with it, and the resolved config uses it as given."""
    import argparse

    from jaxeif.experiments import meta_cnn_toward as study
    from jaxeif.experiments import options

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    argv = ["--quick", "--meta-steps", "3", "--every", "2"]
    args = parser.parse_args(argv)
    cli.check_quick_caps(parser, args, argv, study.QUICK_CAPS)  # no error
    config = study._resolved(options.config_of(study.Config, args))
    assert (config.meta_steps, config.every, config.epochs) == (3, 2, study.QUICK_CAPS["epochs"])
    over = ["--quick", "--meta-steps", "5"]
    with pytest.raises(cli.UsageError, match="--meta-steps <= 4, so --meta-steps 5 would be ignored"):
        cli.check_quick_caps(parser, parser.parse_args(over), over, study.QUICK_CAPS)


def test_cli_explicit_options_are_told_from_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    assert cli.explicit_options(parser, ["--quick", "--epochs", "4"]) == {"quick", "epochs"}
    assert cli.explicit_options(parser, []) == set()
    assert parser.parse_args([]).epochs == 4  # defaults restored


def test_lr_choice_summarise_gives_the_sorted_grids_choice_for_any_order():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 6))
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    mats = [base * lr + (rng.normal(size=(6, 6)) * 10 if lr >= 1.0 else 0) for lr in lrs]
    ref = lr_choice.summarise(lrs, mats, threshold=0.95)
    order = [3, 0, 4, 1, 2]
    shuffled = lr_choice.summarise([lrs[i] for i in order], [mats[i] for i in order], threshold=0.95)
    assert shuffled.chosen == ref.chosen
    np.testing.assert_array_equal(shuffled.lrs, ref.lrs)
    np.testing.assert_array_equal(shuffled.agreement, ref.agreement)
    with pytest.raises(ValueError, match="holds 0.01 twice"):
        lr_choice.summarise([1e-2, 1e-2, 1.0], mats[:3], threshold=0.95)


SCALE = 1.0


def scaled_loss(p, e):
    return loss(p, e) * SCALE


class Scaled:
    def __init__(self, s):
        self.s = s

    def __call__(self, p, e):
        return loss(p, e) * self.s


def test_eif_recompiles_when_a_value_the_loss_reads_changes(monkeypatch):
    first = np.asarray(jaxeif.eif(scaled_loss, P, TR, lr=0.1))
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    np.testing.assert_allclose(
        np.asarray(jaxeif.eif(scaled_loss, P, TR, lr=0.1)),
        np.asarray(jaxeif.eif(lambda p, e: loss(p, e) * 3.0, P, TR, lr=0.1)),
        rtol=1e-5,
    )
    assert not np.allclose(first, np.asarray(jaxeif.eif(scaled_loss, P, TR, lr=0.1)))
    obj = Scaled(1.0)
    a = np.asarray(jaxeif.eif(obj, P, TR, lr=0.1))
    obj.s = 2.0  # an attribute the loss reads
    b = np.asarray(jaxeif.eif(obj, P, TR, lr=0.1))
    np.testing.assert_allclose(b, np.asarray(jaxeif.eif(Scaled(2.0), P, TR, lr=0.1)), rtol=1e-6)
    assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- items 4-5: arguments, tracers


def test_a_loss_closing_over_a_tracer_points_to_partial():
    def outer(s):
        return jaxeif.eif(lambda p, e: loss(p, e) * s, P, TR, lr=0.1).sum()

    with pytest.raises(TypeError, match=r"closure variable 's'.*traced.*jax.tree_util.Partial"):
        jax.grad(outer)(2.0)

    def with_partial(s):
        return jaxeif.eif(jax.tree_util.Partial(lambda s, p, e: loss(p, e) * s, s), P, TR, lr=0.1).sum()

    assert np.isfinite(jax.grad(with_partial)(2.0))


def test_a_string_leaf_in_params_is_named():
    with pytest.raises(TypeError, match=r"`params`\['mlp'\] is builtins.str \('mlp'\), not an array"):
        jaxeif.eif(loss, {**P, "mlp": "mlp"}, TR, lr=0.1)


def test_eif_sweep_names_the_index_of_a_bad_rate():
    with pytest.raises(ValueError, match=r"`lrs\[2\]` is nan; every learning rate must be finite"):
        jaxeif.eif_sweep(loss, P, TR, lrs=[1e-2, 1e-3, float("nan")])
    with pytest.raises(ValueError, match=r"`lrs\[1\]` is -0.1; every learning rate must be >= 0"):
        jaxeif.eif_sweep(loss, P, TR, lrs=[1e-2, -0.1])


def test_noise_floor_sigmas_and_eif_sharded_devices_are_named():
    with pytest.raises(TypeError, match=r"`sigmas` must be a number > 0, got '4'"):
        jaxeif.noise_floor(loss, P, TR, lr=0.1, sigmas="4")
    with pytest.raises(ValueError, match=r"`sigmas` must be a finite number > 0"):
        jaxeif.noise_floor(loss, P, TR, lr=0.1, sigmas=float("inf"))
    with pytest.raises(TypeError, match=r"`devices` must be a list of jax.Device.*got 'cpu'"):
        jaxeif.eif_sharded(loss, P, TR, lr=0.1, devices="cpu")
    with pytest.raises(TypeError, match=r"`devices\[1\]` is a str"):
        jaxeif.eif_sharded(loss, P, TR, lr=0.1, devices=[jax.devices()[0], "cpu"])


def test_tokenize_pad_multiple_and_length_are_checked():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match=r"`pad_multiple` must be an int >= 1.*got 0"):
        lm.tokenize(tok, ["hi there"], config=CFG, pad_multiple=0)
    with pytest.raises(ValueError, match=r"`length` must be None or an int >= 1"):
        lm.tokenize(tok, ["hi there"], config=CFG, length=0)
