"""Transfer of meta study 1: does the lr predictor learned on Gaussian noise down-weight noise it never saw?

The amortised predictor lr = base_lr * exp(f_phi(image statistics)) of `jaxeif meta-cnn` is trained
exactly as that command trains it (its `run` is called with the same options, results in --meta-out,
the predictor read back from its predictor.npz). It is then applied to the held-out digits of study 1
(the next --heldout-per-digit of each class), clean, with the Gaussian noise it was trained on
(reference) and corrupted in ways it never saw: salt-and-pepper (a fraction p of pixels set to 0 or
1) and Gaussian blur. For each corruption: mean predicted lr of clean and corrupted digits, the
fraction of corrupted digits given a lower lr than their clean twin, and study 1's held-out metrics
(noisy/clean same-class teaching ratio, clean within-class learning) under the uniform base lr and
under the learned lr. Only the clean digits' columns of the EIF are needed, so every held-out
digit is fine-tuned on and evaluated on the clean ones.

Writes into --out: config.json, features.npy (meta.image_features of the held-out digits, in the
order of results.json's samples), eif_uniform.npy and eif_learned.npy (f[n_heldout, n_clean]),
results.json (every number), transfer.png; study 1's folder is --meta-out (default OUT/meta_cnn_noise).
A rerun of the same command resumes both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxeif
from jaxeif import meta, runs
from jaxeif.data import noisy_digits as data
from jaxeif.experiments import meta_cnn_noise, options
from jaxeif.meta.image_study import Split, heldout_metrics, split_set
from jaxeif.models import cnn

CLEAN = "clean"


@dataclasses.dataclass(frozen=True)
class Config(meta_cnn_noise.Config):
    """Study 1's options (the predictor is trained with them) plus the unseen corruptions, listed once."""

    out: str = options.out("results/meta_cnn_transfer")
    meta_out: str | None = options.field(
        None,
        "results folder of the study-1 run that trains the predictor (default "
        "OUT/meta_cnn_noise; a finished `jaxeif meta-cnn` folder with the same "
        "options is reused)",
    )
    salt_pepper: list = options.field(
        [0.1, 0.3],
        "salt-and-pepper fractions p (each pixel set to 0 or 1 with probability p)",
        type=options.unit_fraction,
        nargs="+",
    )
    blur_sigmas: list = options.field(
        [1.0, 2.0], "Gaussian blur standard deviations (pixels, < 28/3)", type=options.positive_float, nargs="+"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _config(config: Config) -> tuple[Config, dict]:
    """(the options with meta_out filled in, config.json: the command line as given; --quick is applied by study 1)."""
    for s in config.blur_sigmas:
        if int(np.ceil(3 * s)) >= 28:
            raise ValueError(f"--blur-sigmas must have radius ceil(3 sigma) < 28 pixels (sigma <= 9), got {s}")
        data.gaussian_kernel(s)
    if config.meta_out is None:
        config = dataclasses.replace(config, meta_out=str(Path(config.out) / "meta_cnn_noise"))
    study1 = {
        k: v
        for k, v in options.as_json(config).items()
        if k not in ("out", "meta_out", "salt_pepper", "blur_sigmas", "no_progress")
    }
    return config, {
        "study": "meta_cnn_transfer",
        "meta_out": str(Path(config.meta_out).expanduser().absolute()),
        "salt_pepper": [float(p) for p in config.salt_pepper],
        "blur_sigmas": [float(s) for s in config.blur_sigmas],
        "study1_options": study1,
        "corruption_seed_offset": 1000,
    }


# ----------------------------------------------------------------------------- data


def transfer_split(held, salt_pepper, blur_sigmas, seed: int, offset: int = 1000):
    """Study 1's held-out split (clean, then its Gaussian levels) plus salt-and-pepper and blurred copies
    of its clean digits; each sample named by its corruption ("clean", "gaussian_0.5", "salt_pepper_0.1",
    "blur_1"). Salt-and-pepper level k uses key fold_in(key(seed), offset + k)."""
    clean = np.flatnonzero(held.noise_std == 0)
    x_clean, y_clean = held.images[clean], held.labels[clean]
    names = [CLEAN if s == 0 else f"gaussian_{s:g}" for s in held.noise_std.tolist()]
    images, labels, source = [held.images], [held.labels], [held.source]
    twins = np.arange(len(clean), dtype=np.int32)
    key = jax.random.key(seed)
    for k, p in enumerate(salt_pepper):
        images.append(np.asarray(data.add_salt_and_pepper(x_clean, p, jax.random.fold_in(key, offset + k))))
        names += [f"salt_pepper_{p:g}"] * len(clean)
        labels.append(y_clean), source.append(twins)
    for s in blur_sigmas:
        images.append(np.asarray(data.gaussian_blur(x_clean, s)))
        names += [f"blur_{s:g}"] * len(clean)
        labels.append(y_clean), source.append(twins)
    return Split(
        images=np.concatenate(images).astype(np.float32),
        labels=np.concatenate(labels).astype(np.int32),
        noise_std=None,
        source=np.concatenate(source).astype(np.int32),
        corruption=np.array(names),
    )


def table(metrics: dict) -> dict:
    """Per corruption: mean lr clean / corrupted (learned), teaching ratio uniform / learned, lr below twin."""
    u, l = metrics["uniform"], metrics["learned"]
    return {
        name: {
            "lr_mean_clean": l["lr_mean_clean"],
            "lr_mean_corrupted": l["noise"][name]["lr_mean"],
            "lr_ratio_corrupted_to_clean": l["noise"][name]["lr_mean"] / l["lr_mean_clean"],
            "lr_below_twin_fraction": l["noise"][name]["lr_below_twin_fraction"],
            "teaching_ratio_uniform": u["noise"][name]["teaching_ratio_same_class"],
            "teaching_ratio_learned": l["noise"][name]["teaching_ratio_same_class"],
        }
        for name in u["noise"]
    }


# ----------------------------------------------------------------------------- the study


def run(args: argparse.Namespace) -> dict:
    """Train (or resume) study 1's predictor, corrupt its held-out digits, compare uniform and learned lr."""
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    start = time.perf_counter()
    args, config = _config(options.config_of(Config, args))
    run_dir = runs.RunDir.open(args.out, config)
    study1_args = dataclasses.replace(args, out=config["meta_out"])
    t = time.perf_counter()
    study1 = meta_cnn_noise.run(study1_args)
    study1_seconds = time.perf_counter() - t
    s1 = json.loads((Path(study1["out"]) / "config.json").read_text())  # its options after --quick
    predictor, phi = meta.load_amortised(study1["predictor"])

    params = cnn.load_or_train(
        s1["ckpt"],
        epochs=s1["epochs"],
        batch_size=s1["batch_size"],
        seed=s1["seed"],
        progress=not args.no_progress,
        train_size=s1["train_size"],
    )
    total = s1["per_digit"] + s1["heldout_per_digit"]
    fs = data.finetune_set(per_digit=total, noise_stds=tuple(s1["noise_stds"]), seed=s1["seed"])
    held = transfer_split(
        split_set(fs, total, s1["per_digit"], s1["heldout_per_digit"]),
        config["salt_pepper"],
        config["blur_sigmas"],
        s1["seed"],
        config["corruption_seed_offset"],
    )
    clean = np.flatnonzero(held.corruption == CLEAN)
    features = np.asarray(meta.image_features(held.images))
    run_dir.save_npy("features", features)
    lrs = {
        "uniform": np.full(len(features), s1["lr"], np.float32),
        "learned": np.asarray(predictor.lr(phi, jnp.asarray(features))),
    }
    x, y = jnp.asarray(held.images), jnp.asarray(held.labels)
    mats, t = {}, time.perf_counter()
    for name, lr in lrs.items():
        if not run_dir.has(f"eif_{name}.npy"):
            run_dir.save_npy(
                f"eif_{name}",
                np.asarray(
                    jaxeif.eif(
                        cnn.loss_fn,
                        params,
                        (x, y),
                        (x[clean], y[clean]),
                        lr=lr,
                        steps=s1["steps"],
                        chunk_size=s1["chunk_size"],
                    )
                ),
            )
        mats[name] = run_dir.load_npy(f"eif_{name}")
    eif_seconds = time.perf_counter() - t
    metrics = {name: heldout_metrics(mats[name], held, lrs[name]) for name in lrs}
    results = {
        "sign": "loss after minus loss before (negative = learned); learning = -mean; teaching ratio = "
        "same-class learning taught by corrupted digits / by their clean twins (twin itself left out)",
        "table": table(metrics),
        "within_class_learning_clean": {
            "uniform": metrics["uniform"]["within_class_learning_clean"],
            "learned": metrics["learned"]["within_class_learning_clean"],
            "kept": metrics["learned"]["within_class_learning_clean"]
            >= metrics["uniform"]["within_class_learning_clean"],
        },
        "heldout": metrics,
        "study1": {
            "out": study1["out"],
            "config": s1,
            "heldout": study1["metrics"]["heldout"],
            "meta_train_lr_mean": study1["metrics"]["meta_train_lr_mean"],
            "objective": study1["metrics"]["objective"],
        },
        "samples": {
            "corruption": held.corruption,
            "labels": held.labels,
            "source": held.source,
            "lr_learned": lrs["learned"],
            "features": features,
        },
        "feature_names": ["mean", "std", "mean |dx|+|dy|", "fraction outside [0, 1]", "min", "max"],
        "feature_means": {g: features[held.corruption == g].mean(0) for g in dict.fromkeys(held.corruption.tolist())},
        "n_heldout": int(len(features)),
        "n_clean": int(len(clean)),
        "seconds": {"study1": study1_seconds, "eif": eif_seconds},
        "metadata": runs.run_metadata(seed=s1["seed"], study="meta_cnn_transfer"),
    }
    _figure(run_dir, held, lrs["learned"], results["table"], plot)
    results["seconds"]["total"] = time.perf_counter() - start
    run_dir.save_json("results.json", results)
    summary = _summary(results)
    print(summary)
    return {"out": str(run_dir.path), "summary": summary, "results": results}


def _figure(run_dir, held, lr, rows: dict, plot) -> None:
    """Left: predicted lr of every held-out digit per corruption (dots, mean as a bar); right: teaching ratios."""
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    order = [CLEAN] + list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    rng = np.random.default_rng(0)
    for i, name in enumerate(order):
        v = lr[held.corruption == name]
        color = "tab:green" if name == CLEAN else ("tab:blue" if name.startswith("gaussian") else "tab:red")
        ax1.scatter(i + rng.uniform(-0.2, 0.2, len(v)), v, s=9, alpha=0.6, color=color)
        ax1.hlines(v.mean(), i - 0.3, i + 0.3, color="k", lw=2)
    ax1.axhline(lr[held.corruption == CLEAN].mean(), color="tab:green", ls=":", lw=1)
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax1.set_ylabel("predicted lr (bar: mean)")
    ax1.set_title("lr predicted for held-out digits\n(blue: trained on, red: never seen)")
    names = list(rows)
    pos = np.arange(len(names))
    ax2.bar(pos - 0.2, [rows[n]["teaching_ratio_uniform"] for n in names], 0.4, label="uniform lr", color="0.6")
    ax2.bar(pos + 0.2, [rows[n]["teaching_ratio_learned"] for n in names], 0.4, label="learned lr", color="tab:purple")
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set_xticks(pos, names, rotation=30, ha="right")
    ax2.set_ylabel("corrupted / clean same-class teaching")
    ax2.set_title("teaching ratio of corrupted digits (1 = as clean)")
    ax2.legend()
    plot.save(fig, run_dir.path / "transfer.png")


def _summary(r: dict) -> str:
    lines = [
        f"\nTransfer of the study-1 lr predictor ({r['n_heldout']} held-out samples, {r['n_clean']} clean)",
        f"  {'corruption':<18}{'lr clean':>10}{'lr corr.':>10}{'below twin':>11}"
        f"{'ratio unif.':>12}{'ratio learned':>14}",
    ]
    for name, row in r["table"].items():
        lines.append(
            f"  {name:<18}{row['lr_mean_clean']:>10.3g}{row['lr_mean_corrupted']:>10.3g}"
            f"{row['lr_below_twin_fraction']:>11.2f}{row['teaching_ratio_uniform']:>12.3g}{row['teaching_ratio_learned']:>14.3g}"
        )
    w = r["within_class_learning_clean"]
    lines.append(
        f"  clean within-class learning: uniform {w['uniform']:.4g}, learned {w['learned']:.4g} "
        f"({'kept' if w['kept'] else 'not kept'})"
    )
    lines.append(
        f"  study 1 {r['seconds']['study1']:.0f} s, held-out EIFs {r['seconds']['eif']:.0f} s, "
        f"total {r['seconds']['total']:.0f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
