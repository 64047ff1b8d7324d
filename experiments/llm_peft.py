"""The seed's PEFT question: does parameter-efficient fine-tuning change what the EIF shows?

On the logic study's domains and draws (experiments/llm_logic.py), one SGD step on each sample alone,
dense (every weight; the exact low-rank path `lm.lowrank_sgd_eif`) beside LoRA of each --ranks
(`lm.lora_eif`, adapters from `jaxeif.models.lora.init`, alpha = 2 * rank, all four linear targets,
one adapter draw per rank shared by every fine-tune). Each method's lr is chosen by the dense study's
plateau rule (`jaxeif.lr_choice`, llm_logic.RULE) over --lr-grid on repeat 0 of --sweep-domains.
Writes into --out: config.json, one matrix per method, domain, repeat and lr (<method>_<domain>_r<k>_lr<lr>.npy,
resumable), sweep_<method>.json, heatmaps.png (every domain x method, mean of repeats, sign -EIF),
timings.json and results.json (every number: corr with dense, symmetry, probes over repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxeif import compile_cache, desiderata, lm, lr_choice, runs
from jaxeif.data import domains
from jaxeif.experiments import llm_logic, options
from jaxeif.models import loading, lora, tokenizer

DENSE = "dense"
DEFAULT_RANKS = (4, 16, 64)
DEFAULT_GRID = tuple(float(10.0**k) for k in range(-6, 1))  # 1e-6 .. 1
SWEEP_DOMAINS = ("squares",)  # the cheapest domain (shortest samples): one sweep per method keeps the study < 20 min


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options (defaults: SmolLM2, all five domains, 3 repeats, ranks 4/16/64, lr grid 1e-6..1),
    listed once: they generate its flags (`add_arguments`); `_config` checks what argparse cannot."""

    model: str | None = options.field(None, "checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    out: str = options.out("results/llm_peft")
    domains: list = options.field(list(domains.DOMAINS), f"any of {', '.join(domains.DOMAINS)}", nargs="+")
    repeats: int = options.field(3, "repeats with fresh entity names (seed + k)", type=options.positive_int)
    ranks: list = options.field(list(DEFAULT_RANKS), "LoRA ranks", type=options.positive_int, nargs="+")
    lr_grid: list = options.field(
        list(DEFAULT_GRID),
        "ascending lrs (>= 3) swept for each method; the plateau rule picks each method's lr",
        type=options.positive_float,
        nargs="+",
    )
    sweep_domains: list = options.field(
        list(SWEEP_DOMAINS), "domains whose repeat 0 the lr sweep pools (a subset of --domains)", nargs="+"
    )
    seed: int = options.seed("repeat k draws names with seed + k; LoRA A draws")
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _config(args: argparse.Namespace) -> dict:
    for name in list(args.domains) + list(args.sweep_domains):
        domains.domain(name)  # unknown names: a clear error listing the valid ones
    if not set(args.sweep_domains) <= set(args.domains):
        raise ValueError(f"--sweep-domains {args.sweep_domains} must be among --domains {args.domains}")
    grid = [float(x) for x in args.lr_grid]
    if len(grid) < 3 or grid != sorted(grid):
        raise ValueError(f"--lr-grid needs at least 3 learning rates in ascending order, got {grid}")
    return {
        "study": "llm_peft",
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": list(args.domains),
        "repeats": args.repeats,
        "ranks": sorted(set(args.ranks)),
        "lr_grid": grid,
        "sweep_domains": list(args.sweep_domains),
        "seed": args.seed,
        "rule": llm_logic.RULE,
        "lora": {"alpha": "2 * rank", "targets": list(lora.TARGETS)},
        "optimizer": "sgd, 1 step",
    }


def method_names(ranks) -> list[str]:
    """'dense' then 'lora<r>' for each rank."""
    return [DENSE] + [f"lora{r}" for r in ranks]


def domain_tokens(tok, config, draws: dict, names) -> dict:
    """Tokens of every (domain, repeat) draw, each domain padded to ONE length over its repeats (fewer compiles)."""
    out = {}
    for name in names:
        keys = [k for k in draws if k[0] == name]
        longest = max(
            int(lm.tokenize(tok, [s.text for s in draws[k]], config=config, pad_multiple=1).ids.shape[1]) for k in keys
        )
        length = -(-longest // llm_logic.PAD_MULTIPLE) * llm_logic.PAD_MULTIPLE
        for k in keys:
            out[k] = lm.tokenize(tok, [s.text for s in draws[k]], config=config, length=length)
    return out


def cached(run_dir: runs.RunDir, key: str, compute, timings: dict | None = None) -> np.ndarray:
    """run_dir's f32 matrix `key` (`RunDir.cached`: checksummed), computed (and timed into `timings`, saved as
    timings.json) when missing."""

    def timed() -> np.ndarray:
        wall, cpu = time.time(), time.process_time()
        out = np.asarray(compute(), np.float32)
        if timings is not None:
            timings[key] = {"wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}
        return out

    matrix = run_dir.cached(key, timed)
    if timings is not None and key in timings:
        run_dir.save_json(llm_logic.TIMINGS, timings)
    return matrix


def eif_fn(method: str, apply_fn, params, config, seed: int):
    """(tokens, lr) -> f32[n, n]: one SGD step, dense (exact low-rank path) or LoRA of the method's rank."""
    if method == DENSE:
        return lambda toks, lr: np.asarray(lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=lr))
    rank = int(method.removeprefix("lora"))
    adapters = lora.init(jax.random.key(seed), params, rank=rank, alpha=2.0 * rank)
    return lambda toks, lr: np.asarray(lm.lora_eif(apply_fn, params, toks, adapters=adapters, lr=lr))


def matrix_key(method: str, name: str, repeat: int, lr: float) -> str:
    return f"{method}_{name}_r{repeat}_lr{lr:g}.npy"


def run(args: argparse.Namespace) -> dict:
    config_dict = _config(args)
    run_dir = runs.RunDir.open(args.out, config_dict)
    compile_cache.enable()  # a rerun or resume loads its programs from disk
    t0, cpu0 = time.time(), time.process_time()
    apply_fn, params, config = loading.from_pretrained(args.model)
    tok = tokenizer.load_tokenizer(args.model)
    lm.check_vocab(tok, config)
    draws = {(d, r): domains.draw(d, args.seed + r) for r in range(args.repeats) for d in args.domains}
    toks = domain_tokens(tok, config, draws, args.domains)
    timings = run_dir.load_json(llm_logic.TIMINGS) if run_dir.has(llm_logic.TIMINGS) else {}
    methods = method_names(config_dict["ranks"])
    progress = not args.no_progress
    chosen, sweeps = {}, {}
    for method in methods:
        fn = eif_fn(method, apply_fn, params, config, args.seed)
        sweeps[method] = _sweep(run_dir, method, fn, toks, args, timings)
        lr = chosen[method] = sweeps[method]["chosen"]
        for name in tqdm(args.domains, desc=f"{method} at lr {lr:g}", disable=not progress):
            for r in range(args.repeats):
                cached(run_dir, matrix_key(method, name, r, lr), lambda: fn(toks[(name, r)], lr), timings)
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    per_repeat = {
        (m, d): np.stack([run_dir.load_npy(matrix_key(m, d, r, chosen[m])) for r in range(args.repeats)])
        for m in methods
        for d in args.domains
    }
    results = summarise(per_repeat, methods, args.domains, draws)
    results.update(
        {
            "config": config_dict,
            "lr": chosen,
            "sweeps": sweeps,
            "metadata": runs.run_metadata(seed=args.seed, elapsed_s=elapsed, cpu_s=cpu),
            "sign": "M[i, j] = loss after - loss before (negative = learned)",
        }
    )
    run_dir.save_json("results.json", results)
    run_dir.save_figure("heatmaps.png", heatmap_figure(results, methods, args.domains))
    print(format_table(results, methods))
    return {"out": str(run_dir.path), "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1), "lr": chosen}


def _sweep(run_dir, method, fn, toks, args, timings) -> dict:
    """The method's lr by the plateau rule: its EIF on repeat 0 of the sweep domains at every grid lr (cached)."""

    def eif_at(lr):
        return [
            cached(run_dir, matrix_key(method, d, 0, lr), lambda d=d: fn(toks[(d, 0)], lr), timings)
            for d in args.sweep_domains
        ]

    sweep = lr_choice.lr_sweep(eif_at, args.lr_grid, rule=llm_logic.RULE, progress=not args.no_progress)
    out = {
        "lrs": sweep.lrs.tolist(),
        "median_abs_eif": sweep.magnitude.tolist(),
        "agreement_with_previous": sweep.agreement.tolist(),
        "chosen": sweep.chosen,
        "threshold": sweep.threshold,
        "rule": lr_choice.RULES[sweep.rule],
        "domains": list(args.sweep_domains),
    }
    run_dir.save_json(f"sweep_{method}.json", out)
    print(f"{method}: plateau lr {sweep.chosen:g}")
    return out


def summarise(per_repeat: dict, methods, names, draws) -> dict:
    """Per domain and method: mean matrix, corr with dense (per repeat and of the means), symmetry, probes."""
    out = {"domains": {}}
    for name in names:
        dense = per_repeat[(DENSE, name)]
        entry = {"templates": [s.template for s in draws[(name, 0)]]}
        for m in methods:
            mats = per_repeat[(m, name)]
            mean = mats.mean(axis=0)
            corr = [lr_choice.agreement(d, x) for d, x in zip(dense, mats)]
            entry[m] = {
                "mean_matrix": mean.tolist(),
                "median_abs_eif": lr_choice.magnitude(mean),
                "corr_with_dense_per_repeat": corr,
                "corr_with_dense": {"mean": float(np.mean(corr)), "std": _std(corr)},
                "corr_with_dense_of_means": lr_choice.agreement(dense.mean(axis=0), mean),
                "inverse_asymmetry": float(desiderata.inverse_asymmetry(mean)),
                "symmetry_corr": float(desiderata.symmetry_corr(mean)),
                "symmetry_corr_per_repeat": [float(desiderata.symmetry_corr(x)) for x in mats],
                "probes": desiderata.probe_scores(mats, domains.domain(name).probe_rows),
            }
        out["domains"][name] = entry
    return out


def _std(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def heatmap_figure(results: dict, methods, names):
    """Every domain (rows) x method (columns): the mean matrix, sign -EIF, titled with corr to dense and symmetry."""
    import matplotlib.pyplot as plt  # slow to import, only the figure needs it

    from jaxeif import plot  # matplotlib: slow to import

    fig, axes = plt.subplots(
        len(names), len(methods), figsize=(3.6 * len(methods), 3.2 * len(names)), layout="constrained", squeeze=False
    )
    for row, name in zip(axes, names):
        for ax, m in zip(row, methods):
            e = results["domains"][name][m]
            title = (
                f"{name}: {m}, lr {results['lr'][m]:g}\n"
                f"corr dense {e['corr_with_dense']['mean']:.2f}, corr(M,Mᵀ) {e['symmetry_corr']:.2f}"
            )
            plot.heatmap(np.asarray(e["mean_matrix"]), ax=ax, sign="logprob", title=title)
            ax.title.set_fontsize(8)
    return fig


def format_table(results: dict, methods) -> str:
    """Markdown: per domain and method, corr with dense, symmetry and the probes (mean ± sd, right share)."""
    lines = [
        "| domain | method | lr | corr with dense (mean ± sd) | corr(M, Mᵀ) | 1/‖M−Mᵀ‖ | probes: mean ± sd (right) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results["domains"].items():
        for m in methods:
            x = e[m]
            probes = "; ".join(f"{p['mean']:+.3g} ± {p['std']:.2g} ({p['right_direction']:.0%})" for p in x["probes"])
            lines.append(
                f"| {name} | {m} | {results['lr'][m]:g} | {x['corr_with_dense']['mean']:.3f} ± "
                f"{x['corr_with_dense']['std']:.3f} | {x['symmetry_corr']:.3f} | {x['inverse_asymmetry']:.3g} | "
                f"{probes} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
