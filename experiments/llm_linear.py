"""The linear-regime check: where does one SGD step stop being linear for a language model?

For repeat 0 of the logic study's domains (experiments/llm_logic.py), the exact single-step SGD EIF
(`lm.lowrank_sgd_eif`, float32 loss differences) at each lr of --lrs beside the first-order EIF
-lr <g_i, g_j> (`lm.linearized_sgd_eif`, equal to `jaxeif.eif_linearized` but in low-rank form, without
weight-sized gradients; linear in lr, so computed once at lr 1 and scaled). Agreement
is scale-free: Pearson correlation of the off-diagonal entries and their median relative error
|lin - exact| / |exact|. The CNN of experiments/cnn_noise.py (its cached base model, its 150 clean and
noisy digits) gets the same curve, its exact EIF in both jaxeif.precision modes "difference" and
"highest". Writes into --out: config.json, exact_<domain>_lr<lr>.npy, gram_<domain>.npy,
cnn_exact_<precision>.npy, cnn_gram.npy (all resumable), linear_regime.png, timings.json, results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxeif
from jaxeif import compile_cache, lm, lr_choice, runs
from jaxeif.data import domains, noisy_digits
from jaxeif.experiments import llm_logic, llm_peft, options
from jaxeif.models import cnn, loading, tokenizer

DEFAULT_LRS = tuple(float(10.0**k) for k in range(-6, 0))  # 1e-6 .. 1e-1
CNN_PRECISIONS = ("difference", "highest")
LINEAR_CORR = 0.95  # "still linear": off-diagonal corr of first-order and exact EIF at least this


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options (defaults: SmolLM2, all five domains, repeat 0, lrs 1e-6..1e-1, the CNN study's cached
    model), listed once: they generate its flags (`add_arguments`) and its config.json (`_config`)."""

    model: str | None = options.field(None, "checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    out: str = options.out("results/llm_linear")
    domains: list = options.field(
        list(domains.DOMAINS), f"any of {', '.join(domains.DOMAINS)}", nargs="+", choices=domains.DOMAINS
    )
    lrs: list = options.field(list(DEFAULT_LRS), "ascending lrs", type=options.positive_float, nargs="+")
    seed: int = options.seed("the draw of entity names (repeat 0)")
    cnn_ckpt: str = options.field(
        options.CNN_CKPT,
        "the CNN study's base-model checkpoint (made by `jaxeif cnn`), or 'none' for no CNN curve",
    )
    cnn_per_digit: int = options.field(5, "MNIST test digits per class (CNN)", type=options.positive_int)
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _config(config: Config) -> dict:
    """config.json (what a resumed run must match), after checking what argparse cannot: the lrs ascend, the CNN
    checkpoint exists."""
    lrs = [float(x) for x in config.lrs]
    if len(lrs) < 2 or lrs != sorted(lrs):
        raise ValueError(f"--lrs needs at least 2 learning rates in ascending order, got {lrs}")
    ckpt = None if config.cnn_ckpt == "none" else str(Path(config.cnn_ckpt).expanduser().absolute())
    if ckpt is not None and cnn.checkpoint_info(ckpt) is None:
        raise ValueError(
            f"no CNN checkpoint in {ckpt}: run `jaxeif cnn` first (it trains and caches the base CNN), "
            "point --cnn-ckpt at one, or pass --cnn-ckpt none"
        )
    return {
        "study": "llm_linear",
        "model": config.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "domains": list(config.domains),
        "lrs": lrs,
        "seed": config.seed,
        "cnn_ckpt": ckpt,
        "cnn_per_digit": config.cnn_per_digit,
        "optimizer": "sgd, 1 step",
        "first_order": "lm.linearized_sgd_eif",
    }


def agreement(exact, linear) -> dict:
    """Off-diagonal agreement of first-order and exact EIF (matrices or lists pooled): corr and median relative
    error."""
    e, l = lr_choice.offdiag(exact).astype(np.float64), lr_choice.offdiag(linear).astype(np.float64)
    nonzero = e != 0  # an exact 0 (a float32 difference that rounded away) has no relative error: counted apart
    return {
        "corr": lr_choice.agreement(exact, linear),
        "median_rel_error": float(np.median(np.abs(l - e)[nonzero] / np.abs(e[nonzero]))),
        "median_abs_exact": float(np.median(np.abs(e))),
        "exact_zero_entries": int((~nonzero).sum()),
    }


def linear_up_to(lrs, corrs, threshold: float = LINEAR_CORR) -> float:
    """The largest lr below which every lr of the grid has corr >= threshold (NaN if the first has not)."""
    last = float("nan")
    for lr, c in zip(lrs, corrs):
        if not c >= threshold:
            break
        last = float(lr)
    return last


def run(args: argparse.Namespace) -> dict:
    args = options.config_of(Config, args)
    config_dict = _config(args)
    run_dir = runs.RunDir.open(args.out, config_dict)
    compile_cache.enable()  # a rerun or resume loads its programs from disk
    progress = not args.no_progress
    t0, cpu0 = time.time(), time.process_time()
    timings = run_dir.load_json(llm_logic.TIMINGS) if run_dir.has(llm_logic.TIMINGS) else {}
    lrs = config_dict["lrs"]
    apply_fn, params, config = loading.from_pretrained(args.model)
    tok = tokenizer.load_tokenizer(args.model)
    lm.check_vocab(tok, config)
    draws = {(d, 0): domains.draw(d, args.seed) for d in args.domains}
    toks = llm_peft.domain_tokens(tok, config, draws, args.domains)
    exact, grams = {}, {}
    for name in tqdm(args.domains, desc="llm_linear: domains", disable=not progress):
        t = toks[(name, 0)]
        grams[name] = llm_peft.cached(
            run_dir,
            f"gram_{name}.npy",
            lambda: np.asarray(lm.linearized_sgd_eif(apply_fn, params, t, config=config, lr=1.0)),
            timings,
        )
        for lr in lrs:
            exact[(name, lr)] = llm_peft.cached(
                run_dir,
                f"exact_{name}_lr{lr:g}.npy",
                lambda: np.asarray(lm.lowrank_sgd_eif(apply_fn, params, t, config=config, lr=lr)),
                timings,
            )
    results = {"config": config_dict, "lrs": lrs, "lm": {"pooled": [], "domains": {d: [] for d in args.domains}}}
    for lr in lrs:
        results["lm"]["pooled"].append(
            agreement([exact[(d, lr)] for d in args.domains], [lr * grams[d] for d in args.domains])
        )
        for d in args.domains:
            results["lm"]["domains"][d].append(agreement(exact[(d, lr)], lr * grams[d]))
    results["lm"]["linear_up_to"] = linear_up_to(lrs, [a["corr"] for a in results["lm"]["pooled"]])
    if config_dict["cnn_ckpt"]:
        results["cnn"] = _cnn(run_dir, config_dict, lrs, timings)
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    results["metadata"] = runs.run_metadata(seed=args.seed, elapsed_s=elapsed, cpu_s=cpu)
    results["linear_corr_threshold"] = LINEAR_CORR
    run_dir.save_json("results.json", results)
    run_dir.save_figure("linear_regime.png", figure(results))
    print(format_table(results))
    return {
        "out": str(run_dir.path),
        "elapsed_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
        "linear_up_to": results["lm"]["linear_up_to"],
    }


def _cnn(run_dir, config_dict, lrs, timings) -> dict:
    """The same curve for the CNN study's base model and fine-tune set, exact EIF in each of CNN_PRECISIONS."""
    c = cnn.checkpoint_info(config_dict["cnn_ckpt"])["config"]  # it exists: checked in _config
    params = cnn.load_or_train(
        config_dict["cnn_ckpt"],
        epochs=c["epochs"],
        batch_size=c["batch_size"],
        seed=c["seed"],
        learning_rate=c["learning_rate"],
        train_size=c["train_size"],
        progress=False,
    )
    fs = noisy_digits.finetune_set(per_digit=config_dict["cnn_per_digit"], seed=config_dict["seed"])
    train = (jnp.asarray(fs.images), jnp.asarray(fs.labels))
    g = llm_peft.cached(
        run_dir, "cnn_gram.npy", lambda: jaxeif.eif_linearized(cnn.loss_fn, params, train, lr=1.0), timings
    )
    out = {"n": int(train[1].shape[0]), "base_cnn": cnn.checkpoint_info(config_dict["cnn_ckpt"]), "precisions": {}}
    for p in CNN_PRECISIONS:
        mats = llm_peft.cached(
            run_dir,
            f"cnn_exact_{p}.npy",
            lambda: jaxeif.eif_sweep(
                cnn.loss_fn, params, train, lrs=jnp.asarray(lrs, jnp.float32), precision=options.precision_of(p)
            ),
            timings,
        )
        curve = [agreement(M, lr * g) for M, lr in zip(mats, lrs)]
        out["precisions"][p] = {"curve": curve, "linear_up_to": linear_up_to(lrs, [a["corr"] for a in curve])}
    return out


def figure(results: dict):
    """Corr and median relative error of first-order vs exact EIF over lr: the LM (pooled, per domain) and the CNN."""
    import matplotlib.pyplot as plt  # slow to import, only the figure needs it

    lrs = results["lrs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    model = Path(results["config"]["model"]).name
    curves = [(f"{model}, domains pooled", results["lm"]["pooled"], dict(color="C0", lw=2.5, marker="o"))]
    curves += [(f"  {d}", c, dict(color="C0", lw=0.8, alpha=0.5)) for d, c in results["lm"]["domains"].items()]
    for k, (p, e) in enumerate(results.get("cnn", {}).get("precisions", {}).items()):
        curves.append(
            (
                f"CNN (Fashion-MNIST), exact in '{p}'",
                e["curve"],
                dict(color=f"C{k + 1}", lw=2, marker="s", ls="-" if p == "difference" else "--"),
            )
        )
    for label, curve, style in curves:
        axes[0].plot(lrs, [a["corr"] for a in curve], label=label, **style)
        axes[1].plot(lrs, [a["median_rel_error"] for a in curve], **style)
    axes[0].axhline(results["linear_corr_threshold"], color="grey", lw=0.8, ls=":")
    axes[0].set(
        xscale="log",
        xlabel="lr (one SGD step)",
        ylabel="corr(-lr g_i·g_j, exact EIF), off-diagonal",
        title="first-order vs exact EIF: correlation",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="lr (one SGD step)",
        ylabel="median |lin - exact| / |exact|",
        title="first-order vs exact EIF: median relative error",
    )
    axes[0].legend(fontsize=7)
    return fig


def format_table(results: dict) -> str:
    """Markdown: corr / median relative error per lr, LM pooled and CNN."""
    cols = [("language model (pooled)", results["lm"]["pooled"])]
    cols += [(f"CNN {p}", e["curve"]) for p, e in results.get("cnn", {}).get("precisions", {}).items()]
    lines = [
        "| lr | " + " | ".join(f"{c}: corr, median rel. err." for c, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for k, lr in enumerate(results["lrs"]):
        lines.append(
            f"| {lr:g} | " + " | ".join(f"{c[k]['corr']:.4f}, {c[k]['median_rel_error']:.2g}" for _, c in cols) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
