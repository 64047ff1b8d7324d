"""Meta study 2: learn per-layer lr multipliers so that fine-tuning on a causal chain teaches its
conclusion more than its reversal.

Domain chain_induces (jaxeif.data.domains): after one SGD step on the 4-line chain
A->B->C->D->Z, "A causes Z" should gain more likelihood (its loss fall more) than "Z causes A".
Only the EIF entries the probes need are computed: per name draw, train = the chain sample,
evals = the probe pair. Steps:
 1. best uniform lr: the lr of --lr-grid with the lowest logic objective (meta.logic) on the
    meta-training draws (seeds --seed ..); "before" = that lr with every multiplier at 1;
 2. learn log-multipliers (meta.layers_lm: one per decoder layer, one for the embedding, the final
    norm and lm_head if untied) with meta.fit (Adam, orbax checkpoints: a rerun resumes), minimising
    meta.logic + keep_weight * meta.keep_learning(implied gain, its gain at the uniform lr);
    the log-multipliers are centred (mean 0) so they move the *location* of learning, not its speed;
 3. on held-out draws (seeds --heldout-seed ..: fresh names) compute the chain probe before and
    after, the logic objective and the scorecard of experiments.llm_logic (jaxeif.desiderata.probe_scores),
    and the paired difference after - before with confidence intervals (paired_summary).
Evaluation without meta-gradients (grid, before/after) takes each draw's gradient once for every setting
(probe_blocks, tested equal to the jaxeif.eif blocks). Writes into --out: config.json, grid.json,
meta_ckpt/, history.npy, log_scales.json, heldout_{before,after}.npy (NaN where not needed), objective.png
(outer objective, learned multipliers, held-out probe gains before/after), heldout.png (paired per-draw
gains and differences), results.json (every number, model, lr, seeds, timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

import jaxeif
from jaxeif import desiderata, lm, meta, runs
from jaxeif.data import domains
from jaxeif.experiments import options
from jaxeif.finetune import apply_delta, first_update, scale_updates
from jaxeif.meta import layers_lm
from jaxeif.models import loading, tokenizer

DOMAIN = "chain_induces"
TRAIN_ROW = 3  # the 4-line chain A->B->C->D->Z; its probe: implied 0 ("A causes Z"), not implied 4 ("Z causes A")
EVAL_ROWS = (TRAIN_ROW,)  # held-out rows (the 2-line chain, row 2, would double the cost on this CPU)
PROBE_COLS = (0, 4)
PAD_MULTIPLE = 8


# --quick runs with at most these values (jaxeif.cli refuses a larger one given with it: it would be ignored)
QUICK_CAPS = {"draws": 2, "heldout_draws": 2, "meta_steps": 4, "every": 2}


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options, listed once: they generate its flags (`add_arguments`) and its config.json (`_config`)."""

    model: str | None = options.field(
        None, "Phi-3 or Llama checkpoint directory or .gguf; default: the embedded SmolLM2-135M-Instruct"
    )
    out: str = options.out("results/meta_llm_logic")
    draws: int = options.field(4, "meta-training name draws (seeds --seed ...)", type=options.positive_int)
    heldout_draws: int = options.field(64, "held-out name draws (seeds --heldout-seed ...)", type=options.positive_int)
    seed: int = options.seed("first seed of the meta-training draws")
    heldout_seed: int = options.field(1000, "first seed of the held-out draws", type=options.nonnegative_int)
    lr_grid: list = options.field(
        [1e-4, 3e-4, 1e-3],
        "uniform SGD rates tried on the meta-training draws; the best is the baseline and the base rate",
        type=options.positive_float,
        nargs="+",
    )
    meta_steps: int = options.field(8, "outer (Adam) steps", type=options.positive_int)
    meta_lr: float = options.field(0.2, "outer Adam learning rate (on log-multipliers)", type=options.positive_float)
    keep_weight: float = options.field(
        1.0, "weight of keeping the implied statement's gain at the uniform-lr level", type=options.nonnegative_float
    )
    no_center: bool = options.switch("do not centre the log-multipliers (lets the overall rate move)")
    every: int = options.field(3, "checkpoint the outer loop every N steps", type=options.positive_int)
    quick: bool = options.switch("smoke run: 2 draws, 2 held-out draws, 4 meta steps, 2 grid rates")
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _resolved(config: Config) -> Config:
    """The options a run uses (--quick's smaller sizes applied); held-out seeds must not overlap training seeds."""
    if config.quick:
        config = dataclasses.replace(
            config,
            draws=min(config.draws, QUICK_CAPS["draws"]),
            heldout_draws=min(config.heldout_draws, QUICK_CAPS["heldout_draws"]),
            meta_steps=min(config.meta_steps, QUICK_CAPS["meta_steps"]),
            every=min(config.every, QUICK_CAPS["every"]),
            lr_grid=list(config.lr_grid)[:2],
        )
    train_seeds = set(range(config.seed, config.seed + config.draws))
    if train_seeds & set(range(config.heldout_seed, config.heldout_seed + config.heldout_draws)):
        raise ValueError(
            f"held-out seeds from {config.heldout_seed} overlap the meta-training seeds from {config.seed}; "
            "choose a --heldout-seed past them"
        )
    return config


def _config(config: Config) -> dict:
    """config.json: the resolved options that change results, and what the study fixes; a resumed run must match it."""
    varying = {
        k: v
        for k, v in options.as_json(config).items()
        if k not in ("out", "quick", "no_progress", "no_center", "model")
    }
    return {
        **varying,
        "study": "meta_llm_logic",
        "model": config.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domain": DOMAIN,
        "train_row": TRAIN_ROW,
        "eval_rows": list(EVAL_ROWS),
        "probe_cols": list(PROBE_COLS),
        "lr_grid": [float(x) for x in config.lr_grid],
        "optimizer": "sgd",
        "steps": 1,
        "meta_optimizer": "adam",
        "center": not config.no_center,
    }


def load_model(args: argparse.Namespace):
    """(apply_fn, params, config, tokenizer) of --model (tests replace this with a tiny random decoder)."""
    apply_fn, params, config = loading.from_pretrained(args.model)
    tok = tokenizer.load_tokenizer(args.model)
    lm.check_vocab(tok, config)
    return apply_fn, params, config, tok


# ----------------------------------------------------------------------------- tokens per draw


def draw_tokens(tok, config, seeds, rows, cols):
    """(train Tokens [D, R, t1], evals Tokens [D, C, t2]) of chain_induces draws: train rows and eval
    columns padded separately (short probes stay short), each to one length over the draws."""
    draws = [domains.draw(DOMAIN, s) for s in seeds]

    def part(idx):
        flat = lm.tokenize(tok, [d[k].text for d in draws for k in idx], config=config, pad_multiple=PAD_MULTIPLE)
        return lm.Tokens(*(np.asarray(x).reshape(len(seeds), len(idx), -1) for x in flat))

    return part(rows), part(cols)


# ----------------------------------------------------------------------------- the EIF blocks


def effective_log_scales(log_scales: dict, center: bool) -> dict:
    """Log-multipliers with their mean over all multipliers removed (center) or as they are."""
    if not center:
        return log_scales
    flat = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(log_scales)])
    return jax.tree.map(lambda v: v - flat.mean(), log_scales)


def blocks(apply_fn, params, train, evals, log_scales, lr, *, center: bool):
    """f32[D, R, C]: per draw, the EIF of its R train rows on its C eval columns (SGD, one step,
    per-layer multipliers exp(log_scales)); draws run one after another (lax.map)."""
    opt = layers_lm.stacked_layer_optimizer(effective_log_scales(log_scales, center))
    loss_fn = lm.NLL(apply_fn)

    def one(args):
        tr, ev = args
        return jaxeif.eif(loss_fn, params, tr, ev, lr=lr, optimizer=opt, chunk_size=1)

    return jax.lax.map(one, (train, evals))


def probe_blocks(apply_fn, params, train, evals, log_scales, lrs, *, center: bool):
    """f32[K, D, R, C]: `blocks` at K settings at once (log_scales stacked on a leading K axis, lrs f32[K]),
    for evaluation only. One SGD step's update is the gradient scaled per layer and by lr, so each draw's
    gradient is taken once and rescaled per setting; the evals' base losses are one forward over all draws."""
    loss_fn = lm.NLL(apply_fn)
    D, C = evals.ids.shape[:2]
    base = jaxeif.losses(loss_fn, params, jax.tree.map(lambda x: x.reshape(D * C, *x.shape[2:]), evals)).reshape(D, C)

    def settings(sgd_update, ev, b):  # -> [K, C]
        def one(args):
            scales, lr = args
            tx = layers_lm.scale_by_stacked_layer(effective_log_scales(scales, center))
            scaled, _ = tx.update(sgd_update, tx.init(params))
            return jaxeif.losses(loss_fn, apply_delta(params, scale_updates(scaled, lr)), ev) - b

        return jax.lax.map(one, (log_scales, lrs))

    def draw(args):  # one draw: [R, K, C]
        tr, ev, b = args
        return jax.lax.map(lambda example: settings(first_update(loss_fn, params, example), ev, b), tr)

    return jnp.moveaxis(jax.lax.map(draw, (train, evals, base)), 2, 0)


@functools.cache
def _jitted_probe_blocks(apply_fn, center):
    return jax.jit(
        lambda params, train, evals, log_scales, lrs: probe_blocks(
            apply_fn, params, train, evals, log_scales, lrs, center=center
        )
    )


def evaluate(apply_fn, params, train, evals, settings: list, *, center: bool) -> np.ndarray:
    """f32[K, D, R, C] of `probe_blocks` for settings [(log_scales, lr), ...] (host array)."""
    scales = jax.tree.map(lambda *x: jnp.stack(x), *[s for s, _ in settings])
    lrs = jnp.asarray([lr for _, lr in settings], jnp.float32)
    return np.asarray(_jitted_probe_blocks(apply_fn, center)(params, train, evals, scales, lrs))


def objective_terms(block, keep_ref, keep_weight):
    """(total, logic) of blocks f32[D, 1, 2] (implied, reversed): meta.logic + keep * keep_learning."""
    M = block[:, 0, :]
    D = M.shape[0]
    logic = meta.logic(M, jnp.arange(D), jnp.zeros(D, jnp.int32), jnp.ones(D, jnp.int32))
    total = logic
    if keep_ref is not None:
        total = total + keep_weight * meta.keep_learning(-M[:, 0].mean(), keep_ref)
    return total, logic


def per_draw_logic(chain: np.ndarray) -> np.ndarray:
    """f[D]: each draw's term of meta.logic, (a - b) / (|a| + |b|), of chain blocks f[D, 2] (implied, reversed)."""
    a, b = chain[:, 0], chain[:, 1]
    return (a - b) / (np.abs(a) + np.abs(b) + 1e-12)


def paired_summary(
    before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict:
    """After vs before on the same held-out draws, chain blocks f[D, 2] (implied, reversed): per-draw gain
    (M[reversed] - M[implied]) and logic term, their paired differences with a t-interval and a percentile
    bootstrap interval, and the share of draws in the right direction (Wilson intervals, exact McNemar test)."""
    gain = {k: v[:, 1] - v[:, 0] for k, v in (("before", before), ("after", after))}
    logic = {k: per_draw_logic(v) for k, v in (("before", before), ("after", after))}
    rng = np.random.default_rng(seed)

    def difference(a, b):
        d = b - a
        t = stats.ttest_rel(b, a)
        boot = stats.bootstrap(
            (d,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile", random_state=rng
        )
        return {
            "mean": float(d.mean()),
            "t_interval": [float(x) for x in t.confidence_interval(confidence)],
            "t_pvalue": float(t.pvalue),
            "bootstrap_interval": [float(boot.confidence_interval.low), float(boot.confidence_interval.high)],
        }

    right = {k: gain[k] > 0 for k in gain}
    n = len(right["before"])
    share = {
        k: {
            "right": int(v.sum()),
            "of": n,
            "share": float(v.mean()),
            "wilson_interval": list(map(float, stats.binomtest(int(v.sum()), n).proportion_ci(confidence, "wilson"))),
        }
        for k, v in right.items()
    }
    flips = {
        "right_to_wrong": int((right["before"] & ~right["after"]).sum()),
        "wrong_to_right": int((~right["before"] & right["after"]).sum()),
    }
    discordant = sum(flips.values())
    flips["mcnemar_exact_pvalue"] = (
        float(stats.binomtest(flips["wrong_to_right"], discordant).pvalue) if discordant else 1.0
    )
    return {
        "draws": n,
        "confidence": confidence,
        "bootstrap_resamples": resamples,
        "gain_difference": difference(gain["before"], gain["after"]),
        "logic_term_difference": difference(logic["before"], logic["after"]),
        "right_direction": share,
        "flips": flips,
        "per_draw": {"gain_before": gain["before"].tolist(), "gain_after": gain["after"].tolist()},
    }


def scatter_into_nan_matrices(block: np.ndarray, n: int, rows, cols) -> np.ndarray:
    """[D, n, n] NaN matrices holding the computed [D, R, C] entries at (rows, cols)."""
    out = np.full((block.shape[0], n, n), np.nan, np.float32)
    out[:, np.asarray(rows)[:, None], np.asarray(cols)[None, :]] = block
    return out


# ----------------------------------------------------------------------------- the study, stage by stage


class Draws(NamedTuple):
    """Seeds and token blocks of the meta-training draws (train: the chain row [D, 1, t1], evals: the probe
    pair [D, 2, t2]) and of the held-out draws (train: the EVAL_ROWS rows, evals: the probe pair)."""

    train_seeds: list
    heldout_seeds: list
    train: lm.Tokens
    evals: lm.Tokens
    heldout_train: lm.Tokens
    heldout_evals: lm.Tokens


class Baseline(NamedTuple):
    """The uniform-lr grid, the best uniform lr and its implied gain (the keep_learning reference)."""

    grid: list
    lr: float
    keep_ref: float


def prepare_draws(args: argparse.Namespace, tok, mconfig) -> Draws:
    """Tokens of every draw; meta-training and held-out draws are padded separately (many held-out draws
    would otherwise lengthen the meta-training rows, the costly part)."""
    train_seeds = list(range(args.seed, args.seed + args.draws))
    held_seeds = list(range(args.heldout_seed, args.heldout_seed + args.heldout_draws))
    on_device = lambda tokens: jax.tree.map(jnp.asarray, tokens)  # noqa: E731
    train, evals = draw_tokens(tok, mconfig, train_seeds, (TRAIN_ROW,), PROBE_COLS)
    held_train, held_evals = draw_tokens(tok, mconfig, held_seeds, EVAL_ROWS, PROBE_COLS)
    return Draws(
        train_seeds, held_seeds, on_device(train), on_device(evals), on_device(held_train), on_device(held_evals)
    )


def uniform_grid(run_dir, evaluate_on, draws: Draws, lr_grid, scales0) -> list:
    """Per rate of the grid: logic objective and mean implied/reversed gains on the meta-training draws
    (grid.json, resumed)."""
    if not run_dir.has("grid.json"):
        grid = []
        for lr, b in zip(lr_grid, evaluate_on(draws.train, draws.evals, [(scales0, lr) for lr in lr_grid])):
            _, logic = objective_terms(jnp.asarray(b), None, 0.0)
            grid.append(
                {
                    "lr": lr,
                    "logic": float(logic),
                    "implied_gain": float(-b[:, 0, 0].mean()),
                    "reversed_gain": float(-b[:, 0, 1].mean()),
                }
            )
        run_dir.save_json("grid.json", grid)
    return run_dir.load_json("grid.json")


def best_uniform(grid: list, lr_grid) -> Baseline:
    """The finite grid point with the lowest logic objective; it must teach "A causes Z"."""
    finite = [g for g in grid if np.isfinite(g["logic"])]
    if not finite:
        raise ValueError(f"every rate of --lr-grid {lr_grid} diverged; try smaller rates")
    best = min(finite, key=lambda g: g["logic"])
    lr, keep_ref = float(best["lr"]), best["implied_gain"]
    if not keep_ref > 0:
        raise ValueError(
            f"at the best uniform lr {lr:g} the chain does not teach 'A causes Z' (gain {keep_ref:.3g} <= 0); "
            "try other --lr-grid rates"
        )
    return Baseline(grid, lr, keep_ref)


def learn_multipliers(run_dir, apply_fn, params, draws: Draws, base: Baseline, scales0, args, *, center: bool):
    """meta.fit of the log-multipliers on the meta-training draws (checkpointed in meta_ckpt/, resumed)."""

    def objective(log_scales, params, train, evals):
        b = blocks(apply_fn, params, train, evals, log_scales, base.lr, center=center)
        return objective_terms(b, base.keep_ref, args.keep_weight)[0]

    return meta.fit(
        objective,
        scales0,
        optimizer=optax.adam(args.meta_lr),
        steps=args.meta_steps,
        checkpoint_dir=run_dir.path / "meta_ckpt",
        every=args.every,
        progress=not args.no_progress,
        data=(params, draws.train, draws.evals),
    )


def meta_train_summary(evaluate_on, draws: Draws, scales0, result, lr: float) -> dict:
    """Objective history and the logic objective on the meta-training draws, before and after."""
    before, after = (
        float(objective_terms(jnp.asarray(b), None, 0.0)[1])
        for b in evaluate_on(draws.train, draws.evals, [(scales0, lr), (result.controls, lr)])
    )
    return {
        "objective_history": result.history.tolist(),
        "objective_final": result.final,
        "resumed_from": result.resumed_from,
        "logic_before": before,
        "logic_after": after,
    }


def heldout_scores(run_dir, evaluate_on, draws: Draws, settings: dict, lr: float, *, progress: bool = False) -> dict:
    """Per setting name ("before", "after": log-scales): the held-out probe blocks (heldout_{name}.npy, NaN
    where not needed; resumed), their chain-4 logic objective, gains and scorecard; "paired": after vs before."""
    n_samples = len(domains.DOMAINS[DOMAIN].templates)
    probes = [
        p
        for p in domains.DOMAINS[DOMAIN].probe_rows
        if p.train in EVAL_ROWS and {p.implied, p.not_implied} <= set(PROBE_COLS)
    ]
    if not all(run_dir.has(f"heldout_{name}.npy") for name in settings):
        if progress:  # one jitted call: no per-draw bar
            print(
                f"held-out: {len(draws.heldout_seeds)} draws x {len(settings)} settings in one call ...",
                file=sys.stderr,
                flush=True,
            )
        out = evaluate_on(draws.heldout_train, draws.heldout_evals, [(scales, lr) for scales in settings.values()])
        for name, b in zip(settings, out):
            run_dir.save_npy(f"heldout_{name}", scatter_into_nan_matrices(b, n_samples, EVAL_ROWS, PROBE_COLS))
    summary, chains = {}, {}
    for name in settings:
        mats = run_dir.load_npy(f"heldout_{name}")
        chains[name] = chain4 = mats[:, TRAIN_ROW][:, list(PROBE_COLS)]
        summary[name] = {
            "logic_objective_chain4": float(objective_terms(jnp.asarray(chain4[:, None]), None, 0.0)[1]),
            "scorecard": desiderata.probe_scores(mats, probes),
            "implied_gain_chain4": float(-chain4[:, 0].mean()),
            "reversed_gain_chain4": float(-chain4[:, 1].mean()),
        }
    summary["paired"] = paired_summary(*(chains[name] for name in ("before", "after")))
    return summary


def run(args: argparse.Namespace) -> dict:
    """Pick the best uniform lr, learn per-layer multipliers, evaluate on held-out draws."""
    start = time.perf_counter()
    args = _resolved(options.config_of(Config, args))
    config = _config(args)
    run_dir = runs.RunDir.open(args.out, config)
    apply_fn, params, mconfig, tok = load_model(args)
    center = config["center"]
    draws = prepare_draws(args, tok, mconfig)
    scales0 = layers_lm.init_stacked_log_scales(params)
    evaluate_on = functools.partial(evaluate, apply_fn, params, center=center)
    seconds = {}

    t = time.perf_counter()
    base = best_uniform(uniform_grid(run_dir, evaluate_on, draws, config["lr_grid"], scales0), config["lr_grid"])
    seconds["grid"] = time.perf_counter() - t
    t = time.perf_counter()
    result = learn_multipliers(run_dir, apply_fn, params, draws, base, scales0, args, center=center)
    seconds["meta"] = time.perf_counter() - t
    run_dir.save_npy("history", result.history)
    learned = effective_log_scales(result.controls, center)
    run_dir.save_json("log_scales.json", {k: np.asarray(v) for k, v in learned.items()})
    meta_train = meta_train_summary(evaluate_on, draws, scales0, result, base.lr)
    t = time.perf_counter()
    summary = heldout_scores(
        run_dir,
        evaluate_on,
        draws,
        {"before": scales0, "after": result.controls},
        base.lr,
        progress=not args.no_progress,
    )
    seconds["heldout"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    results = {
        "config": config,
        "sign": "EIF = loss after - loss before (negative = learned); probe gain = M[not] - M[implied]",
        "uniform_lr_grid": base.grid,
        "best_uniform_lr": base.lr,
        "keep_reference_implied_gain": base.keep_ref,
        "meta_train": meta_train,
        "log_scales": {k: np.asarray(v).tolist() for k, v in learned.items()},
        "heldout": summary,
        "seeds": {"train": draws.train_seeds, "heldout": draws.heldout_seeds},
        "seconds": seconds,
        "seconds_per_meta_step": seconds["meta"] / max(1, args.meta_steps - (result.resumed_from or 0)),
        "metadata": runs.run_metadata(seed=args.seed, study="meta_llm_logic"),
    }
    run_dir.save_json("results.json", results)
    _figures(run_dir, result.history, summary, learned)
    _heldout_figure(run_dir, summary["paired"], base.lr)
    text = format_summary(results)
    print(text)
    return {"out": str(run_dir.path), "summary": text, "results": results}


def _figures(run_dir, history, summary, learned) -> None:
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    axes[0].plot(np.arange(len(history)), history, marker="o")
    axes[0].set_xlabel("meta step")
    axes[0].set_ylabel("outer objective (meta-training draws)")
    axes[0].set_title("learning per-layer lr multipliers")
    layers = np.asarray(learned["model/layers"])
    axes[1].bar(np.arange(len(layers)), np.exp(layers))
    others = [k for k in learned if k != "model/layers"]
    axes[1].set_title(
        "learned multipliers per decoder layer; " + ", ".join(f"{k}: x{float(np.exp(learned[k])):.2f}" for k in others),
        fontsize=8,
    )
    axes[1].set_xlabel("layer")
    axes[1].set_yscale("log")
    probes = summary["before"]["scorecard"]
    x = np.arange(len(probes))
    for k, name in enumerate(("before", "after")):
        sc = summary[name]["scorecard"]
        axes[2].bar(
            x + 0.4 * k,
            [p["mean"] for p in sc],
            0.4,
            yerr=[p["std"] for p in sc],
            label={"before": "best uniform lr", "after": "learned multipliers"}[name],
        )
    axes[2].set_xticks(x + 0.2, [f"train {p['train']}: {p['implied']} vs {p['not_implied']}" for p in probes])
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set_ylabel("held-out log-prob gain, implied - reversed")
    axes[2].legend()
    axes[2].set_title("held-out logic probes")
    run_dir.save_figure("objective.png", fig)


def _heldout_figure(run_dir, paired: dict, lr: float) -> None:
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    before, after = (np.asarray(paired["per_draw"][k]) for k in ("gain_before", "gain_after"))
    diff = paired["gain_difference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    lim = float(np.abs(np.concatenate([before, after])).max()) * 1.08
    axes[0].scatter(before, after, s=14)
    axes[0].plot([-lim, lim], [-lim, lim], "k--", lw=0.7, label="after = before")
    axes[0].axhline(0, color="k", lw=0.4)
    axes[0].axvline(0, color="k", lw=0.4)
    axes[0].set(
        xlim=(-lim, lim),
        ylim=(-lim, lim),
        xlabel=f"gain at the best uniform lr {lr:g}",
        ylabel="gain with learned multipliers",
        title=f"{paired['draws']} held-out draws: log-prob gain 'A causes Z' - 'Z causes A'",
    )
    axes[0].legend(loc="upper left")
    d = np.sort(after - before)
    axes[1].bar(np.arange(len(d)), d, color=np.where(d > 0, "tab:green", "tab:red"))
    axes[1].axhline(diff["mean"], color="k", lw=1, label=f"mean {diff['mean']:+.4f}")
    lo, hi = diff["bootstrap_interval"]
    axes[1].axhspan(lo, hi, color="k", alpha=0.15, label=f"{paired['confidence']:.0%} bootstrap [{lo:+.4f}, {hi:+.4f}]")
    axes[1].set(xlabel="held-out draw (sorted)", ylabel="gain after - gain before", title="paired differences")
    axes[1].legend()
    run_dir.save_figure("heldout.png", fig)


def format_summary(results: dict) -> str:
    """A few lines: best uniform lr, meta-training objective, held-out scorecard before/after."""
    mt = results["meta_train"]
    lines = [
        f"best uniform lr {results['best_uniform_lr']:g}; "
        f"meta-train logic {mt['logic_before']:.4f} -> {mt['logic_after']:.4f} "
        f"(objective {mt['objective_history'][0]:.4f} -> {mt['objective_final']:.4f})"
    ]
    for name in ("before", "after"):
        h = results["heldout"][name]
        probes = "; ".join(
            f"probe {p['train']}->{p['implied']}/{p['not_implied']}: gain {p['mean']:.4g} +- {p['std']:.2g}, "
            f"right {p['right_direction']:.0%}"
            for p in h["scorecard"]
        )
        lines.append(f"held-out {name}: logic {h['logic_objective_chain4']:.4f}; {probes}")
    paired = results["heldout"]["paired"]
    d, share = paired["gain_difference"], paired["right_direction"]
    lines.append(
        f"held-out after - before ({paired['draws']} draws): gain {d['mean']:+.4g}, {paired['confidence']:.0%} "
        f"t [{d['t_interval'][0]:+.4g}, {d['t_interval'][1]:+.4g}], bootstrap [{d['bootstrap_interval'][0]:+.4g}, "
        f"{d['bootstrap_interval'][1]:+.4g}]; right "
        + ", ".join(
            f"{k} {v['right']}/{v['of']} [{v['wilson_interval'][0]:.2f}, {v['wilson_interval'][1]:.2f}]"
            for k, v in share.items()
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
