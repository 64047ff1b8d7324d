"""Figures 2 to 6 of the paper: fine-tuned vs prompted influence of a language model on synthetic facts.

For each domain of jaxeif.data.domains and each repeat (fresh made-up names), compute the
fine-tuned EIF (one optimizer step on each sample alone, loss after minus before on every
sample; lm.finetuned_eif picks its exact path, low-rank for single-step SGD on CPU) and the prompted EIF
(L(p_j | context p_i) - L(p_j), context format jaxeif.lm.PROMPT_FORMAT). Matrices are averaged
over repeats. Writes into --out: config.json, per-repeat matrices (<mode>_<domain>_r<k>.npy,
resumable), heatmaps_<domain>.png (fine-tuned beside prompted, sign -EIF: positive = more
likely), histogram.png (fig 5A), symmetry.png (fig 5B: 1/||M - M^T||_F), scorecard.json and
results.json (all numbers, model, lr, optimizer, seed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeif import cli, desiderata, lm, lr_choice, runs
from jaxeif.data import domains
from jaxeif.models import loading, lora, tokenizer

MODES = ("finetuned", "prompted")
# Figure 5B of the paper (Phi-3-mini), 1/||M - M^T||: fine-tuned, prompted. "ontology" is belongs_to.
PAPER_SYMMETRY = {"transitivity": (0.52, 0.28), "belongs_to": (0.56, 0.20), "chain_induces": (1.11, 0.45)}
SWEEP = "lr_sweep.json"  # the --lr-sweep results
TIMINGS = "timings.json"  # wall and process CPU seconds of every computed matrix (compiles included)
PAD_MULTIPLE = 16  # pad token lengths to multiples of this: fewer distinct shapes, fewer compiles
DEFAULT_LR = 1e-4  # single-step SGD plateau for SmolLM2-135M-Instruct (see README, lr sweep)
RULE = "middle_of_longest_plateau"  # jaxeif.lr_choice.RULES: the lr sweep's choice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study (defaults: all domains, 10 repeats, fine-tuned and prompted, SmolLM2)."""
    parser.add_argument("--model", default=None,
                        help="Phi-3 or Llama checkpoint directory (config.json + safetensors) or .gguf file; "
                             "default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--out", default="results/llm_logic", help="results folder (resumed if its config matches)")
    parser.add_argument("--domains", nargs="+", default=list(domains.DOMAINS), help=f"any of {', '.join(domains.DOMAINS)}")
    parser.add_argument("--repeats", type=cli.positive_int, default=10, help="repeats with fresh entity names")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="which influences to compute")
    parser.add_argument("--lr", type=_lr_arg, default=DEFAULT_LR,
                        help="fine-tuning learning rate, or 'plateau': the one --lr-sweep chooses")
    parser.add_argument("--lr-sweep", type=_lr_list, default=(),
                        help="comma-separated lrs (>= 3): sweep them on repeat 0 of every domain first (paper 3.4: EIF "
                             "magnitude and agreement vs lr, lr_sweep.png/.json) and pick the plateau")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="fine-tuning optimizer (unit rate, times --lr)")
    parser.add_argument("--lora-rank", type=cli.nonnegative_int, default=0,
                        help="fine-tune LoRA adapters of this rank (alpha = 2 * rank) instead of all weights; 0: dense")
    parser.add_argument("--steps", type=cli.positive_int, default=1, help="optimizer steps per one-sample fine-tune")
    parser.add_argument("--chunk-size", type=cli.positive_int, default=1,
                        help="fine-tunes computed together (1 suits a CPU; raise it on an accelerator)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0, help="repeat k draws names with seed + k")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model parameter dtype")
    parser.add_argument("--summarise-only", action="store_true",
                        help="compute nothing: summarise the repeats already complete in --out (e.g. of a stopped run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _lr_arg(text: str):
    if text == "plateau":
        return text
    try:
        return cli.positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--lr takes a number > 0 or 'plateau', got {text!r}") from None


def _lr_list(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr-sweep takes comma-separated numbers, e.g. 1e-6,1e-5,1e-4; got {text!r}") from None
    if len(lrs) < 3 or not all(0 < x < float("inf") for x in lrs):
        raise argparse.ArgumentTypeError(f"--lr-sweep needs at least 3 positive learning rates, got {text!r}")
    return lrs


def _config(args: argparse.Namespace) -> dict:
    for name in args.domains:
        domains.domain(name)  # unknown names: clear error listing the valid ones
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.lr == "plateau" and not args.lr_sweep:
        raise ValueError("--lr plateau needs --lr-sweep LR,LR,LR to choose it from")
    if args.lr != "plateau" and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.steps < 1 or args.chunk_size < 1 or args.lora_rank < 0:
        raise ValueError("--steps and --chunk-size must be >= 1, --lora-rank >= 0")
    return {
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": list(args.domains), "repeats": args.repeats, "modes": list(args.modes), "lr": args.lr,
        "lr_sweep": list(args.lr_sweep),
        "optimizer": args.optimizer, "steps": args.steps, "seed": args.seed, "dtype": args.dtype,
        "lora_rank": args.lora_rank,
    }


def _finetuned(apply_fn, params, config, toks, args, lr=None) -> np.ndarray:
    lr = args.lr if lr is None else lr
    opt = None if args.optimizer == "sgd" else optax.adam(1.0)  # None: plain SGD (lets lm pick the low-rank path)
    if args.lora_rank:
        adapters = lora.init(jax.random.key(args.seed), params, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        return np.asarray(lm.lora_eif(apply_fn, params, toks, adapters=adapters, lr=lr, steps=args.steps, optimizer=opt,
                                      chunk_size=args.chunk_size))
    return np.asarray(lm.finetuned_eif(apply_fn, params, toks, lr=lr, steps=args.steps, optimizer=opt,
                                       chunk_size=args.chunk_size, config=config))


def _figures(run, name, samples, means):
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    modes = list(means)
    labels = [f"{k}: {s.template.replace(chr(10), ' / ')}"[:48] for k, s in enumerate(samples)]
    fig, axes = plt.subplots(1, len(modes), figsize=(9.5 * len(modes), 8.5), layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, mode in zip(axes, modes):
        row_label = "fine-tuned on sample i" if mode == "finetuned" else "sample i as the prompt's context"
        plot.heatmap(means[mode], ax=ax, labels=labels, sign="logprob", title=f"{name}: {mode} (mean of repeats)",
                     row_label=row_label)
        ax.tick_params(axis="x", labelrotation=90)
    run.save_figure(f"heatmaps_{name}.png", fig)


def _enable_compile_cache() -> None:
    """Keep compiled XLA programs on disk (JAXEIF_COMPILE_CACHE, '' disables): a rerun or resume skips compiling."""
    path = os.environ.get("JAXEIF_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxeif", "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def run(args: argparse.Namespace) -> dict:
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    config_dict = _config(args)
    run_dir = runs.RunDir.open(args.out, config_dict)
    _enable_compile_cache()
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
    elif args.lr == "plateau":
        args.lr = run_dir.load_json(SWEEP)["chosen"] if run_dir.has(SWEEP) else float("nan")
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    repeats = [r for r in range(args.repeats)
               if all(run_dir.has(f"{m}_{d}_r{r}.npy") for m in args.modes for d in args.domains)]
    if not repeats:
        raise ValueError(f"{run_dir.path} holds no complete repeat yet; run without --summarise-only first")

    results = {"config": config_dict, "metadata": runs.run_metadata(seed=args.seed, elapsed_s=elapsed, cpu_s=cpu),
               "repeats_used": len(repeats), "lr_used": args.lr, "prompt_format": lm.PROMPT_FORMAT, "sign": "M[i, j] = loss after - loss before (negative = learned)",
               "domains": {}}
    histogram_values = {m: [] for m in args.modes}
    for name in args.domains:
        d = domains.domain(name)
        samples = draws[(name, 0)]
        per_repeat = {m: np.stack([run_dir.load_npy(f"{m}_{name}_r{r}.npy") for r in repeats]) for m in args.modes}
        means = {m: v.mean(axis=0) for m, v in per_repeat.items()}
        entry = {"templates": [s.template for s in samples], "labels": [s.label for s in samples]}
        for m in args.modes:
            histogram_values[m].append(per_repeat[m].ravel())
            entry[m] = {
                "mean_matrix": means[m].tolist(),
                "inverse_asymmetry": float(desiderata.inverse_asymmetry(means[m])),
                "symmetry_corr": float(desiderata.symmetry_corr(means[m])),
                "probes": desiderata.probe_scores(per_repeat[m], d.probe_rows),
            }
        if name in PAPER_SYMMETRY:
            entry["paper_inverse_asymmetry"] = dict(zip(MODES, PAPER_SYMMETRY[name]))
        results["domains"][name] = entry
        _figures(run_dir, name, samples, means)
    fig = plot.histogram({m: np.concatenate(v) for m, v in histogram_values.items()}, sign="logprob",
                         title="all EIF values (fig 5A)")
    run_dir.save_figure("histogram.png", fig)
    run_dir.save_figure("symmetry.png", _symmetry_figure(results, args.modes))
    scorecard = {name: {m: results["domains"][name][m]["probes"] for m in args.modes} for name in args.domains}
    run_dir.save_json("scorecard.json", scorecard)
    run_dir.save_json("results.json", results)
    print(format_tables(results, args.modes))
    return {"out": str(run_dir.path), "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)}


def _lr_sweep(run_dir, draws, apply_fn, params, config, tok, args) -> float:
    """Fine-tuned EIF of repeat 0 of every domain at each swept lr; saves lr_sweep.json/.png; returns the
    lr to use (the plateau's when --lr plateau). Resumed from lr_sweep.json."""
    if not run_dir.has(SWEEP):
        toks = {d: lm.tokenize(tok, [s.text for s in draws[(d, 0)]], config=config, pad_multiple=PAD_MULTIPLE)
                for d in args.domains}
        sweep = lr_choice.lr_sweep(lambda lr: [_finetuned(apply_fn, params, config, t, args, lr=lr) for t in toks.values()],
                                   args.lr_sweep, rule=RULE, progress=not args.no_progress)
        run_dir.save_json(SWEEP, {"lrs": sweep.lrs.tolist(), "median_abs_eif": sweep.magnitude.tolist(),
                                  "agreement_with_previous": sweep.agreement.tolist(), "chosen": sweep.chosen,
                                  "threshold": sweep.threshold, "domains": list(args.domains)})
        run_dir.save_figure("lr_sweep.png", lr_choice.plot_lr_sweep(sweep, title="fine-tuned EIF vs lr (repeat 0, all domains)"))
    chosen = run_dir.load_json(SWEEP)["chosen"]
    print(f"lr sweep: plateau lr {chosen:g} (lr_sweep.png)")
    return chosen if args.lr == "plateau" else args.lr


def _compute(run_dir, draws, apply_fn, params, config, tok, args) -> None:
    """Every missing per-repeat matrix, saved as it finishes (a stopped run resumes here)."""
    sizes = [len(s) for s in draws.values()]
    total = sum(sizes) * ("finetuned" in args.modes) + sum(n * n for n in sizes) * ("prompted" in args.modes)
    bar = tqdm(total=total, desc="llm_logic (fine-tunes + prompted pairs)", disable=args.no_progress)
    timings = run_dir.load_json(TIMINGS) if run_dir.has(TIMINGS) else {}
    for (name, r), samples in draws.items():
        texts = [s.text for s in samples]
        toks = lm.tokenize(tok, texts, config=config, pad_multiple=PAD_MULTIPLE)
        base = None  # L(p_j) without context: computed once per repeat for the prompted mode
        for mode in args.modes:
            key = f"{mode}_{name}_r{r}.npy"
            if not run_dir.has(key):
                wall, cpu = time.time(), time.process_time()
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
    lines = ["| domain | " + " | ".join(f"1/||M-M^T|| {m}" for m in modes) + " | paper (Phi-3-mini) ft / prompted |",
             "|---|" + "---|" * (len(modes) + 1)]
    for name, e in results["domains"].items():
        paper = e.get("paper_inverse_asymmetry")
        ptxt = f"{paper['finetuned']} / {paper['prompted']}" if paper else "-"
        lines.append(f"| {name} | " + " | ".join(f"{e[m]['inverse_asymmetry']:.3g}" for m in modes) + f" | {ptxt} |")
    lines += ["", "| domain | probe (train: implied vs not) | " + " | ".join(
        f"{m}: mean ± sd, right" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for name, e in results["domains"].items():
        for k, p in enumerate(e[modes[0]]["probes"]):
            cells = [f"{e[m]['probes'][k]['mean']:+.3g} ± {e[m]['probes'][k]['std']:.2g}, "
                     f"{e[m]['probes'][k]['right_direction']:.0%}" for m in modes]
            lines.append(f"| {name} | {p['train']}: {p['implied']} vs {p['not_implied']} ({p['why']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
