"""Figures 2 to 6 of the paper: fine-tuned vs prompted influence of a language model on synthetic facts.

For each domain of jaxeif.data.domains and each repeat (fresh made-up names), compute the
fine-tuned EIF (one optimizer step on each sample alone, loss after minus before on every
sample; lm.finetuned_eif picks its exact path, low-rank for single-step SGD on CPU) and the prompted EIF
(L(p_j | context p_i) - L(p_j), context format jaxeif.lm.PROMPT_FORMAT). Matrices are averaged
over repeats. Writes into --out: config.json, per-repeat matrices (<mode>_<domain>_r<k>.npy,
resumable), heatmaps_<domain>.png (fine-tuned beside prompted, sign -EIF: positive = more
likely), histogram.png (fig 5A), symmetry.png (fig 5B: 1/||M - M^T||_F), scorecard.json and
results.json (all numbers, model, lr, optimizer, seed). With --lr-sweep: the fine-tuned matrices
at every swept lr (lr_sweep/lr<lr>/, resumable), the plateau choice (lr_sweep.json/.png) and every
finding at every lr (lr_findings.json/.png); with --float64-check also float64_check.json. Unless
--no-per-token: which eval tokens a fine-tune moved (repeat 0, `per_token_stage`): every eval token's
NLL change (per_token/finetuned_<domain>_r0.npy), its mean |change| on the answer tokens (the last
entity a sample names) against the other tokens per domain in results.json ("per_token") and per_token.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import string
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxeif
from jaxeif import compile_cache, desiderata, lm, lr_choice, runs
from jaxeif.data import domains
from jaxeif.experiments import options
from jaxeif.models import loading, lora, tokenizer

MODES = ("finetuned", "prompted")
# Figure 5B of the paper (Phi-3-mini), 1/||M - M^T||: fine-tuned, prompted. "ontology" is belongs_to.
PAPER_SYMMETRY = {"transitivity": (0.52, 0.28), "belongs_to": (0.56, 0.20), "chain_induces": (1.11, 0.45)}
# Read off the paper's figures (PAPER.md): (domain, probe index) -> gain of implied over not implied, fine-tuned
PAPER_PROBES = {("chain_induces", 0): 0.6, ("belongs_to", 0): 0.0}
SWEEP = "lr_sweep.json"  # the --lr-sweep results
SWEEP_DIR = "lr_sweep"  # the fine-tuned matrices of every swept lr: lr_sweep/lr<lr>/finetuned_<domain>_r<k>.npy
FINDINGS = "lr_findings.json"  # every finding at every swept lr
FLOAT64 = "float64_check.json"  # --float64-check: the study's float32 matrices against float64
TIMINGS = "timings.json"  # wall and process CPU seconds of every computed matrix (compiles included)
PAD_MULTIPLE = 16  # pad token lengths to multiples of this: fewer distinct shapes, fewer compiles
DEFAULT_LR = 1e-4  # single-step SGD plateau for SmolLM2-135M-Instruct (see README, lr sweep)
RULE = "middle_of_longest_plateau"  # jaxeif.lr_choice.RULES: the lr sweep's choice


def _lr_arg(text: str):
    if text == "plateau":
        return text
    try:
        return options.positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--lr takes a number > 0 or 'plateau', got {text!r}") from None


def _lr_list(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr-sweep takes comma-separated numbers, e.g. 1e-6,1e-5,1e-4; got {text!r}"
        ) from None
    if len(lrs) < 3 or not all(0 < x < float("inf") for x in lrs):
        raise argparse.ArgumentTypeError(f"--lr-sweep needs at least 3 positive learning rates, got {text!r}")
    return lrs


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options (defaults: all domains, 10 repeats, fine-tuned and prompted, SmolLM2), listed once:
    they generate its flags (`add_arguments`); `_config` checks what argparse cannot and writes config.json."""

    model: str | None = options.field(
        None,
        "Phi-3 or Llama checkpoint directory (config.json + safetensors) or .gguf file; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    out: str = options.out("results/llm_logic")
    domains: list = options.field(list(domains.DOMAINS), f"any of {', '.join(domains.DOMAINS)}", nargs="+")
    repeats: int = options.field(10, "repeats with fresh entity names", type=options.positive_int)
    modes: list = options.field(list(MODES), "which influences to compute", nargs="+", choices=MODES)
    lr: float | str = options.field(
        DEFAULT_LR, "fine-tuning learning rate, or 'plateau': the one --lr-sweep chooses", type=_lr_arg
    )
    lr_sweep: tuple = options.field(
        (),
        "comma-separated lrs (>= 3): sweep them on repeat 0 of every domain first (paper 3.4: EIF "
        "magnitude and agreement vs lr, lr_sweep.png/.json) and pick the plateau; every finding "
        "at every lr goes to lr_findings.json/.png",
        type=_lr_list,
    )
    sweep_repeats: int = options.field(
        1,
        "repeats (the first ones, <= --repeats) whose fine-tuned EIF --lr-sweep computes at every lr "
        "for lr_findings (each costs about one study's fine-tuned part per lr)",
        type=options.positive_int,
    )
    float64_check: bool = options.switch(
        "with --lr-sweep: also the dense EIF of repeat 0 of every domain in float64 at each swept lr "
        "and in precision 'difference' at the smallest; float32's sign agreement and relative "
        "error against float64 go to float64_check.json (slow: dense path, float64)"
    )
    optimizer: str = options.field("sgd", "fine-tuning optimizer (unit rate, times --lr)", choices=("sgd", "adam"))
    lora_rank: int = options.field(
        0,
        "fine-tune LoRA adapters of this rank (alpha = 2 * rank) instead of all weights; 0: dense",
        type=options.nonnegative_int,
    )
    steps: int = options.field(1, "optimizer steps per one-sample fine-tune", type=options.positive_int)
    chunk_size: int = options.field(
        1, "fine-tunes computed together (1 suits a CPU; raise it on an accelerator)", type=options.positive_int
    )
    seed: int = options.seed("repeat k draws names with seed + k")
    dtype: str = options.field("float32", "model parameter dtype", choices=("float32", "bfloat16"))
    summarise_only: bool = options.switch(
        "compute nothing: summarise the repeats already complete in --out (e.g. of a stopped run)"
    )
    no_progress: bool = options.switch("no progress bars")
    no_per_token: bool = options.switch(
        "skip the per-token stage (every eval token's NLL change on repeat 0: answer tokens vs the "
        "rest, per_token.png); it costs one more fine-tuned EIF per domain"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _config(args: argparse.Namespace) -> dict:
    for name in args.domains:
        domains.domain(name)  # unknown names: clear error listing the valid ones
    if args.lr == "plateau" and not args.lr_sweep:
        raise ValueError("--lr plateau needs --lr-sweep LR,LR,LR to choose it from")
    if not 1 <= args.sweep_repeats <= args.repeats:
        raise ValueError(f"--sweep-repeats must be between 1 and --repeats ({args.repeats}), got {args.sweep_repeats}")
    if (args.sweep_repeats > 1 or args.float64_check) and not args.lr_sweep:
        raise ValueError("--sweep-repeats and --float64-check need --lr-sweep LR,LR,LR (the lrs to compute them at)")
    if args.float64_check and (args.lora_rank or args.optimizer != "sgd" or args.steps != 1 or args.dtype != "float32"):
        raise ValueError(
            "--float64-check compares the float32 single-step SGD study with float64; drop --lora-rank, "
            "--optimizer adam, --steps and --dtype"
        )
    return {
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": list(args.domains),
        "repeats": args.repeats,
        "modes": list(args.modes),
        "lr": args.lr,
        "lr_sweep": list(args.lr_sweep),
        "sweep_repeats": args.sweep_repeats,
        "float64_check": args.float64_check,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "seed": args.seed,
        "dtype": args.dtype,
        "lora_rank": args.lora_rank,
        "per_token": not args.no_per_token and "finetuned" in args.modes,
    }


def _finetuned(apply_fn, params, config, toks, args, lr=None, per_token=False):
    """The fine-tuned EIF f32[n, n] of one draw (per_token: its lm.TokenInfluence, per_token f32[n, n, T])."""
    lr = args.lr if lr is None else lr
    opt = None if args.optimizer == "sgd" else optax.adam(1.0)  # None: plain SGD (lets lm pick the low-rank path)
    if args.lora_rank:
        adapters = lora.init(jax.random.key(args.seed), params, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        out = lm.lora_eif(
            apply_fn,
            params,
            toks,
            adapters=adapters,
            lr=lr,
            steps=args.steps,
            optimizer=opt,
            chunk_size=args.chunk_size,
            per_token=per_token,
        )
    else:
        out = lm.finetuned_eif(
            apply_fn,
            params,
            toks,
            lr=lr,
            steps=args.steps,
            optimizer=opt,
            chunk_size=args.chunk_size,
            config=config,
            per_token=per_token,
        )
    return out if per_token else np.asarray(out)


def _figures(run, name, samples, means):
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    modes = list(means)
    labels = [f"{k}: {s.template.replace(chr(10), ' / ')}"[:48] for k, s in enumerate(samples)]
    fig, axes = plt.subplots(1, len(modes), figsize=(9.5 * len(modes), 8.5), layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, mode in zip(axes, modes):
        row_label = "fine-tuned on sample i" if mode == "finetuned" else "sample i as the prompt's context"
        plot.heatmap(
            means[mode],
            ax=ax,
            labels=labels,
            sign="logprob",
            title=f"{name}: {mode} (mean of repeats)",
            row_label=row_label,
        )
        ax.tick_params(axis="x", labelrotation=90)
    run.save_figure(f"heatmaps_{name}.png", fig)


def run(args: argparse.Namespace) -> dict:
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    config_dict = _config(args)
    run_dir = runs.RunDir.open(args.out, config_dict)
    compile_cache.enable()  # a rerun or resume loads its programs from disk
    t0, cpu0 = time.time(), time.process_time()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    draws = {(d, r): domains.draw(d, args.seed + r) for r in range(args.repeats) for d in args.domains}
    if not args.summarise_only:
        apply_fn, params, config = loading.from_pretrained(args.model, dtype=dtype)
        tok = tokenizer.load_tokenizer(args.model)
        lm.check_vocab(tok, config)
        if args.lr_sweep:
            args.lr = _lr_sweep(run_dir, draws, apply_fn, params, config, tok, args)
        _compute(run_dir, draws, apply_fn, params, config, tok, args)
        if config_dict["per_token"]:
            per_token_stage(run_dir, draws, apply_fn, params, config, tok, args)
        if args.float64_check:
            _float64_check(run_dir, draws, apply_fn, params, config, tok, args)
    elif args.lr == "plateau":
        args.lr = run_dir.load_json(SWEEP)["chosen"] if run_dir.has(SWEEP) else float("nan")
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    repeats = [
        r
        for r in range(args.repeats)
        if all(run_dir.has(f"{m}_{d}_r{r}.npy") for m in args.modes for d in args.domains)
    ]
    if not repeats:
        raise ValueError(f"{run_dir.path} holds no complete repeat yet; run without --summarise-only first")

    results = {
        "config": config_dict,
        "metadata": runs.run_metadata(seed=args.seed, elapsed_s=elapsed, cpu_s=cpu),
        "repeats_used": len(repeats),
        "lr_used": args.lr,
        "prompt_format": lm.PROMPT_FORMAT,
        "sign": "M[i, j] = loss after - loss before (negative = learned)",
        "domains": {},
    }
    histogram_values = {m: [] for m in args.modes}
    for name in args.domains:
        samples = draws[(name, 0)]
        per_repeat = {m: np.stack([run_dir.load_npy(f"{m}_{name}_r{r}.npy") for r in repeats]) for m in args.modes}
        means = {m: v.mean(axis=0) for m, v in per_repeat.items()}
        entry = {
            "templates": [s.template for s in samples],
            "labels": [s.label for s in samples],
            **domain_summary(per_repeat, domains.domain(name).probe_rows),
        }
        for m in args.modes:
            histogram_values[m].append(per_repeat[m].ravel())
        if name in PAPER_SYMMETRY:
            entry["paper_inverse_asymmetry"] = dict(zip(MODES, PAPER_SYMMETRY[name]))
        results["domains"][name] = entry
        _figures(run_dir, name, samples, means)
    fig = plot.histogram(
        {m: np.concatenate(v) for m, v in histogram_values.items()}, sign="logprob", title="all EIF values (fig 5A)"
    )
    run_dir.save_figure("histogram.png", fig)
    run_dir.save_figure("symmetry.png", _symmetry_figure(results, args.modes))
    if config_dict["per_token"] and all(run_dir.has(_token_key(d)) for d in args.domains):
        results["per_token"] = per_token_summary(run_dir, args.domains)
        run_dir.save_figure("per_token.png", per_token_figure(results["per_token"]))
    scorecard = {name: {m: results["domains"][name][m]["probes"] for m in args.modes} for name in args.domains}
    run_dir.save_json("scorecard.json", scorecard)
    run_dir.save_json("results.json", results)
    if args.lr_sweep and all(
        run_dir.has(_sweep_key(lr, d, r))
        for lr in args.lr_sweep
        for d in args.domains
        for r in range(args.sweep_repeats)
    ):
        findings = lr_findings(run_dir, args)
        run_dir.save_json(FINDINGS, findings)
        run_dir.save_figure("lr_findings.png", findings_figure(findings))
    print(format_tables(results, args.modes))
    return {"out": str(run_dir.path), "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)}


def _sweep_key(lr: float, name: str, r: int) -> str:
    return f"{SWEEP_DIR}/lr{lr:g}/finetuned_{name}_r{r}.npy"


def _domain_tokens(tok, config, samples) -> lm.Tokens:
    return lm.tokenize(tok, [s.text for s in samples], config=config, pad_multiple=PAD_MULTIPLE)


def _lr_sweep(run_dir, draws, apply_fn, params, config, tok, args) -> float:
    """Fine-tuned EIF of the first --sweep-repeats repeats of every domain at each swept lr (each matrix saved as
    it finishes: resumable); the plateau from repeat 0 (lr_sweep.json/.png); returns the lr to use."""
    lrs = sorted(args.lr_sweep)
    cells = [(d, r) for r in range(args.sweep_repeats) for d in args.domains]
    bar = tqdm(
        total=len(lrs) * sum(len(draws[c]) for c in cells), desc="lr sweep (fine-tunes)", disable=args.no_progress
    )
    for name, r in cells:
        toks, base = _domain_tokens(tok, config, draws[(name, r)]), None
        for lr in lrs:
            if not run_dir.has(_sweep_key(lr, name, r)):
                base = lm.nll(apply_fn, params, toks) if base is None else base
                run_dir.save_npy(_sweep_key(lr, name, r), _finetuned(apply_fn, params, config, toks, args, lr=lr))
            bar.update(len(draws[(name, r)]))
    bar.close()
    if not run_dir.has(SWEEP):
        matrices = [[run_dir.load_npy(_sweep_key(lr, d, 0)).astype(np.float64) for d in args.domains] for lr in lrs]
        sweep = lr_choice.summarise(lrs, matrices, threshold=0.95, rule=RULE)
        run_dir.save_json(
            SWEEP,
            {
                "lrs": sweep.lrs.tolist(),
                "median_abs_eif": sweep.magnitude.tolist(),
                "agreement_with_previous": sweep.agreement.tolist(),
                "chosen": sweep.chosen,
                "threshold": sweep.threshold,
                "domains": list(args.domains),
            },
        )
        run_dir.save_figure(
            "lr_sweep.png", lr_choice.plot_lr_sweep(sweep, title="fine-tuned EIF vs lr (repeat 0, all domains)")
        )
    chosen = run_dir.load_json(SWEEP)["chosen"]
    print(f"lr sweep: plateau lr {chosen:g} (lr_sweep.png)")
    return chosen if args.lr == "plateau" else args.lr


def _compute(run_dir, draws, apply_fn, params, config, tok, args) -> None:
    """Every missing per-repeat matrix, saved as it finishes (a stopped run resumes here); a fine-tuned one the
    lr sweep already computed at this lr is copied."""
    sizes = [len(s) for s in draws.values()]
    total = sum(sizes) * ("finetuned" in args.modes) + sum(n * n for n in sizes) * ("prompted" in args.modes)
    bar = tqdm(total=total, desc="llm_logic (fine-tunes + prompted pairs)", disable=args.no_progress)
    timings = run_dir.load_json(TIMINGS) if run_dir.has(TIMINGS) else {}
    swept = args.lr in args.lr_sweep
    for (name, r), samples in draws.items():
        texts = [s.text for s in samples]
        toks = _domain_tokens(tok, config, samples)
        base = None  # L(p_j) before fine-tuning = L(p_j) without context: computed once, shared by both modes
        for mode in args.modes:
            key = f"{mode}_{name}_r{r}.npy"
            if not run_dir.has(key):
                wall, cpu = time.time(), time.process_time()
                if mode == "finetuned" and swept and run_dir.has(_sweep_key(args.lr, name, r)):
                    run_dir.save_npy(key, run_dir.load_npy(_sweep_key(args.lr, name, r)))
                    bar.update(len(texts))
                    continue
                if base is None:
                    base = lm.nll(apply_fn, params, toks)
                if mode == "finetuned":
                    M = _finetuned(apply_fn, params, config, toks, args)
                else:
                    base = lm.nll(apply_fn, params, toks) if base is None else base
                    M = lm.prompted_eif(apply_fn, params, tok, config, texts, base=base)
                run_dir.save_npy(key, np.asarray(M, np.float32))
                timings[key] = {"wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}
                run_dir.save_json(TIMINGS, timings)
            bar.update(len(texts) if mode == "finetuned" else len(texts) ** 2)
    bar.close()


# ----------------------------------------------------------------------------- the findings at every lr
def mode_summary(per_repeat: np.ndarray, probes) -> dict:
    """Symmetry, magnitude and logic probes of one mode's matrices f[repeats, n, n] (symmetry of their mean)."""
    mean = per_repeat.mean(axis=0)
    return {
        "mean_matrix": mean.tolist(),
        "inverse_asymmetry": float(desiderata.inverse_asymmetry(mean)),
        "symmetry_corr": float(desiderata.symmetry_corr(mean)),
        "median_abs": lr_choice.magnitude(mean),
        "probes": desiderata.probe_scores(per_repeat, probes),
    }


def domain_summary(per_repeat: dict, probes) -> dict:
    """mode_summary of each mode's matrices ({mode: f[repeats, n, n]}), and with both modes their comparison:
    corr of the mean matrices off the diagonal, the ratio of median |EIF|, the share of probes whose mean
    gains have the same sign."""
    out = {m: mode_summary(v, probes) for m, v in per_repeat.items()}
    if set(MODES) <= set(out):
        ft, pr = out["finetuned"], out["prompted"]
        out["comparison"] = {
            "corr_finetuned_prompted": lr_choice.agreement(
                per_repeat["prompted"].mean(0), per_repeat["finetuned"].mean(0)
            ),
            "median_abs_ratio": ft["median_abs"] / pr["median_abs"],
            "probes_same_sign": float(
                np.mean([np.sign(a["mean"]) == np.sign(b["mean"]) for a, b in zip(ft["probes"], pr["probes"])])
            ),
        }
    return out


def lr_findings(run_dir, args) -> dict:
    """domain_summary of the first --sweep-repeats repeats at every swept lr (the prompted matrices do not
    depend on lr: computed once), and the curves of lr_findings.png."""
    lrs, repeats = sorted(args.lr_sweep), range(args.sweep_repeats)

    def matrices(name: str, lr: float) -> dict:  # {mode: f[repeats, n, n]}; the prompted ones have no lr
        out = {"finetuned": np.stack([run_dir.load_npy(_sweep_key(lr, name, r)) for r in repeats])}
        if "prompted" in args.modes:
            out["prompted"] = np.stack([run_dir.load_npy(f"prompted_{name}_r{r}.npy") for r in repeats])
        return out

    per_lr = [{d: domain_summary(matrices(d, lr), domains.domain(d).probe_rows) for d in args.domains} for lr in lrs]
    return {
        "lrs": lrs,
        "chosen_lr": args.lr,
        "repeats": args.sweep_repeats,
        "domains": list(args.domains),
        "sign": "M[i, j] = loss after - loss before; probe gain = implied minus not implied log-prob (> 0: right)",
        **_curves(per_lr, args.domains),
        "per_lr": per_lr,
    }


def _probe_label(name: str, k: int) -> str:
    p = domains.domain(name).probes[k]
    return f"{name} {k}: {p.why.split(' implies ')[0][:24]}"


def _curves(per_lr: list, names) -> dict:
    """Each finding as curves over lr ({panel: {line: [value per lr]}}), the paper's values and the prompted
    (lr-free) values of the same quantities."""
    curves, paper, prompted = {}, {}, {}

    def panel(title, value, lines, mode="finetuned", ref=None):
        curves[title] = {line: [value(e[d], mode, k) for e in per_lr] for line, (d, k) in lines.items()}
        if mode == "finetuned" and "prompted" in per_lr[0][names[0]]:
            prompted[title] = {line: value(per_lr[0][d], "prompted", k) for line, (d, k) in lines.items()}
        if ref:
            paper[title] = ref

    by_domain = {d: (d, None) for d in names}
    panel(
        "1/‖M−Mᵀ‖_F, fine-tuned (scales as 1/lr)",
        lambda e, m, _: e[m]["inverse_asymmetry"],
        by_domain,
        ref={d: PAPER_SYMMETRY[d][0] for d in names if d in PAPER_SYMMETRY},
    )
    panel("corr(M, Mᵀ), fine-tuned", lambda e, m, _: e[m]["symmetry_corr"], by_domain)
    for (name, k), ref in PAPER_PROBES.items():
        if name in names:
            lines = {_probe_label(name, j): (name, j) for j in range(len(domains.domain(name).probes))}
            panel(
                f"{name}: probe gains (mean)",
                lambda e, m, j: e[m]["probes"][j]["mean"],
                lines,
                ref={_probe_label(name, k): ref},
            )
    panel(
        "share of probe repeats right",
        lambda e, m, _: float(np.mean([p["right_direction"] for p in e[m]["probes"]])),
        by_domain,
    )
    if "comparison" in per_lr[0][names[0]]:
        panel(
            "corr(fine-tuned M, prompted M)",
            lambda e, m, _: e["comparison"]["corr_finetuned_prompted"],
            by_domain,
            mode="comparison",
        )
        panel(
            "median |EIF|: fine-tuned / prompted",
            lambda e, m, _: e["comparison"]["median_abs_ratio"],
            by_domain,
            mode="comparison",
        )
    return {"curves": curves, "paper": paper, "prompted": prompted}


LOG_Y = ("1/‖M−Mᵀ‖_F, fine-tuned (scales as 1/lr)", "median |EIF|: fine-tuned / prompted")


def findings_figure(findings: dict):
    """lr_findings.png: every finding against lr (dashed: the paper, dotted: prompted, which has no lr)."""
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    return plot.curves(
        findings["lrs"],
        findings["curves"],
        reference=findings["paper"],
        constant=findings["prompted"],
        constant_label="prompted",
        log_y=LOG_Y,
        chosen=findings["chosen_lr"],
        columns=4,
        title=f"Language-model findings across the fine-tuning lr (SGD, 1 step; {findings['repeats']} "
        "repeat(s); dashed: paper, dotted: prompted, vertical: the study's lr)",
    )


# ----------------------------------------------------------------------------- float64 check
def _float64_check(run_dir, draws, apply_fn, params, config, tok, args) -> None:
    """Repeat 0 of every domain: the dense EIF in float64 at each swept lr and in 'difference' at the smallest
    (matrices saved as they finish); the study's float32 matrices against float64 -> float64_check.json."""
    lrs = sorted(args.lr_sweep)
    jobs = [(lr, "float64") for lr in lrs] + [(lrs[0], "difference")]
    key = lambda lr, precision, name: f"{precision}/lr{lr:g}/finetuned_{name}_r0.npy"  # noqa: E731
    bar = tqdm(total=len(jobs) * len(args.domains), desc="float64 check (dense EIF)", disable=args.no_progress)
    timings = run_dir.load_json(TIMINGS) if run_dir.has(TIMINGS) else {}
    for name in args.domains:
        toks = lm.Tokens(*(jnp.asarray(x) for x in _domain_tokens(tok, config, draws[(name, 0)])))
        for lr, precision in jobs:
            if not run_dir.has(key(lr, precision, name)):
                wall = time.time()
                loss = lm.NLL(apply_fn)  # keeps float64 logits and loss in float64
                run_dir.save_npy(
                    key(lr, precision, name),
                    np.asarray(
                        jaxeif.eif(loss, params, toks, lr=lr, chunk_size=1, precision=options.precision_of(precision))
                    ),
                )
                timings[key(lr, precision, name)] = {"wall_s": time.time() - wall}
                run_dir.save_json(TIMINGS, timings)
            bar.update()
    bar.close()
    pooled = lambda k: np.concatenate([lr_choice.offdiag(run_dir.load_npy(k(d))) for d in args.domains])  # noqa: E731
    out = {
        "domains": list(args.domains),
        "repeat": 0,
        "float32": "the study's matrices (lowrank_sgd_eif, float32)",
        "truth": "jaxeif.eif(precision='float64'), dense, lm.NLL",
        "per_lr": {},
    }
    for lr in lrs:
        truth = pooled(lambda d: key(lr, "float64", d))
        entry = {
            "float32": desiderata.agreement(pooled(lambda d: _sweep_key(lr, d, 0))[None], truth[None]),
            "median_abs_entry": float(np.median(np.abs(truth))),
        }
        if lr == lrs[0]:
            entry["difference"] = desiderata.agreement(pooled(lambda d: key(lr, "difference", d))[None], truth[None])
        out["per_lr"][f"{lr:g}"] = entry
    run_dir.save_json(FLOAT64, out)


# ----------------------------------------------------------------------------- which eval tokens a fine-tune moved
def _token_key(name: str, what: str = "finetuned") -> str:
    return f"per_token/{what}_{name}_r0.npy"


def per_token_stage(run_dir, draws, apply_fn, params, config, tok, args) -> None:
    """Which eval tokens a fine-tune moved, on repeat 0 of every domain (saved as each finishes: resumable).

    Writes per_token/finetuned_<domain>_r0.npy (f32[n, n, T], the study's own fine-tuned path with
    per_token=True) and its masks bool[n, T] of scored (scored_...) and answer tokens (answer_...).

    Args:
        run_dir: the study's RunDir.
        draws: {(domain, repeat): samples}.
        apply_fn: the decoder.
        params: its params.
        config: its Phi3Config.
        tok: its tokenizer.
        args: the study's options.
    """
    for name in args.domains:
        if not run_dir.has(_token_key(name)):
            samples = draws[(name, 0)]
            toks = _domain_tokens(tok, config, samples)
            inf = _finetuned(apply_fn, params, config, toks, args, per_token=True)
            run_dir.save_npy(_token_key(name, "scored"), np.asarray(inf.mask))
            run_dir.save_npy(_token_key(name, "answer"), answer_tokens(tok, toks, samples))
            run_dir.save_npy(_token_key(name), np.asarray(inf.per_token, np.float32))


def answer_span(sample: domains.Sample) -> tuple[int, int] | None:
    """Where a sample's answer is: the last entity it names (its template's last slot).

    Args:
        sample: a domain sample.

    Returns:
        (start, end) of that name in sample.text; None for a template without slots.

    Raises:
        ValueError: the text does not follow its template.
    """
    pattern, slots = "", 0
    for literal, field, _, _ in string.Formatter().parse(sample.template):
        pattern += re.escape(literal)
        if field:
            pattern, slots = pattern + r"(\w+)", slots + 1
    if not slots:
        return None
    match = re.fullmatch(pattern, sample.text, flags=re.IGNORECASE | re.DOTALL)
    if match is None:
        raise ValueError(f"sample {sample.text!r} does not follow its template {sample.template!r}")
    return match.span(slots)


def _decode(tok, ids) -> str:
    if hasattr(tok, "get_vocab_size"):  # tokenizers.Tokenizer
        return tok.decode(list(ids), skip_special_tokens=False)
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def answer_tokens(tok, toks: lm.Tokens, samples) -> np.ndarray:
    """The scored tokens of each sample that overlap its answer (`answer_span`).

    A token's characters are found by decoding the sample's scored tokens one more at a time.

    Args:
        tok: the tokenizer `toks` were made with.
        toks: the samples' Tokens, [n, T].
        samples: the domain samples.

    Returns:
        bool[n, T].

    Raises:
        ValueError: the tokenizer does not decode a sample's tokens back to its text.
    """
    score = np.asarray(toks.score) > 0
    out = np.zeros(score.shape, bool)
    for k, sample in enumerate(samples):
        span = answer_span(sample)
        positions = np.flatnonzero(score[k])
        ids = np.asarray(toks.ids)[k, positions]
        if _decode(tok, ids) != sample.text:
            raise ValueError(
                f"decoding sample {k}'s tokens gives {_decode(tok, ids)!r}, not {sample.text!r}: this "
                "tokenizer does not round-trip, so its tokens cannot be matched to the answer's "
                "characters"
            )
        if span is None:
            continue
        ends = np.array([len(_decode(tok, ids[: t + 1])) for t in range(len(ids))])
        starts = np.concatenate([[0], ends[:-1]])
        out[k, positions] = (starts < span[1]) & (ends > span[0])
    return out


def token_split(per_token: np.ndarray, scored: np.ndarray, answer: np.ndarray) -> dict:
    """Mean |per-token change| over the answer tokens and over the other scored ones.

    Args:
        per_token: f[n, m, T], every fine-tune's change of every eval token's NLL.
        scored: bool[m, T], the scored tokens.
        answer: bool[m, T], the answer tokens (a subset of scored).

    Returns:
        {"answer_mean_abs", "other_mean_abs", "answer_over_other", "answer_tokens", "other_tokens"}, pooled
        over every fine-tune and eval.
    """
    size = np.abs(np.asarray(per_token, np.float64))
    other = scored & ~answer
    a = float(size[:, answer].mean()) if answer.any() else float("nan")
    b = float(size[:, other].mean()) if other.any() else float("nan")
    return {
        "answer_mean_abs": a,
        "other_mean_abs": b,
        "answer_over_other": a / b if b > 0 else float("nan"),
        "answer_tokens": int(answer.sum()),
        "other_tokens": int(other.sum()),
    }


def per_token_summary(run_dir, names) -> dict:
    """`token_split` of repeat 0 of every domain, from `per_token_stage`'s files.

    Args:
        run_dir: the study's RunDir.
        names: the domains.

    Returns:
        {domain: token_split}.
    """
    return {
        name: token_split(
            run_dir.load_npy(_token_key(name)),
            run_dir.load_npy(_token_key(name, "scored")),
            run_dir.load_npy(_token_key(name, "answer")),
        )
        for name in names
    }


def per_token_figure(summary: dict):
    """per_token.png: mean |NLL change| of answer tokens vs the other scored tokens, per domain (repeat 0).

    Args:
        summary: `per_token_summary`'s result.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4), layout="constrained")
    x = np.arange(len(names))
    for k, (key, label) in enumerate(
        (("answer_mean_abs", "answer tokens (the last entity named)"), ("other_mean_abs", "other scored tokens"))
    ):
        ax.bar(x + (k - 0.5) * 0.4, [summary[n][key] for n in names], 0.4, label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("mean |per-token NLL change|")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("which eval tokens a fine-tune moved (repeat 0, all fine-tunes x evals)")
    return fig


def _symmetry_figure(results: dict, modes):
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    names = list(results["domains"])
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    width = 0.8 / len(modes)
    for k, m in enumerate(modes):
        vals = [results["domains"][n][m]["inverse_asymmetry"] for n in names]
        ax.bar(np.arange(len(names)) + k * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("1 / ||M - M^T||_F (higher = more symmetric)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("symmetry per domain (fig 5B)")
    return fig


def format_tables(results: dict, modes) -> str:
    """Markdown tables: symmetry per domain and the logic scorecard, beside the paper's numbers."""
    lines = [
        "| domain | " + " | ".join(f"1/||M-M^T|| {m}" for m in modes) + " | paper (Phi-3-mini) ft / prompted |",
        "|---|" + "---|" * (len(modes) + 1),
    ]
    for name, e in results["domains"].items():
        paper = e.get("paper_inverse_asymmetry")
        ptxt = f"{paper['finetuned']} / {paper['prompted']}" if paper else "-"
        lines.append(f"| {name} | " + " | ".join(f"{e[m]['inverse_asymmetry']:.3g}" for m in modes) + f" | {ptxt} |")
    lines += [
        "",
        "| domain | probe (train: implied vs not) | " + " | ".join(f"{m}: mean ± sd, right" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for name, e in results["domains"].items():
        for k, p in enumerate(e[modes[0]]["probes"]):
            cells = [
                f"{e[m]['probes'][k]['mean']:+.3g} ± {e[m]['probes'][k]['std']:.2g}, "
                f"{e[m]['probes'][k]['right_direction']:.0%}"
                for m in modes
            ]
            lines.append(
                f"| {name} | {p['train']}: {p['implied']} vs {p['not_implied']} ({p['why']}) | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
