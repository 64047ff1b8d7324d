"""Meta study 1b: per-sample learning rates toward an influence structure drawn by hand (meta.toward).

The drawn target, over MNIST digits (clean, and one noisy copy of each, pixel noise --noise-std) that
the Fashion-MNIST CNN of figure 1 is fine-tuned on one at a time: "learn only from the same class, and
from noisy copies only half as much":

    T[i, j] = -1 if digits i and j share a class and i is clean, -0.5 (--noisy-weight) if i is noisy, else 0,

self-influence left out (sign of jaxeif: negative = learned). meta.fit learns one log-lr per training
sample minimising meta.toward(M, T, mask), M = jaxeif.eif(train, train), from the uniform --lr. The
same target drawn against held-out digits (the next --heldout-per-digit of each class, clean and
noisy, never seen by meta.fit) scores whether the learned rates shape influence on new samples too.
Writes into --out: config.json, meta_ckpt/ (a rerun resumes), history.npy, lr.json,
eif_{train,heldout}_{before,after}.npy, toward.png (target, before and after heatmaps, objective
curve, the learned rates), results.json (every number).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

import jaxeif
from jaxeif import meta, runs
from jaxeif.data import noisy_digits
from jaxeif.experiments import options
from jaxeif.meta.image_study import Split, split_set
from jaxeif.models import cnn

DEFAULT_CKPT = options.CNN_CKPT


# --quick runs with at most these values (jaxeif.cli refuses a larger one given with it: it would be ignored)
QUICK_CAPS = {"per_digit": 1, "heldout_per_digit": 1, "epochs": 1, "meta_steps": 4, "every": 2}


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options, listed once: they generate its flags (`add_arguments`) and its config.json (`_config`)."""

    out: str = options.out("results/meta_cnn_toward")
    ckpt: str | None = options.field(
        None,
        f"orbax checkpoint folder of the base CNN (default {DEFAULT_CKPT}, shared "
        "with `jaxeif cnn`; --quick: that + '_quick'); trained there on first use",
    )
    epochs: int = options.field(4, "base CNN training epochs", type=options.positive_int)
    batch_size: int = options.field(128, "base CNN training batch size", type=options.positive_int)
    train_size: int | None = options.field(
        None, "train the base CNN on the first N images only", type=options.positive_int
    )
    per_digit: int = options.field(1, "meta-training MNIST test images per digit", type=options.positive_int)
    heldout_per_digit: int = options.field(2, "held-out images per digit (the next ones)", type=options.positive_int)
    noise_std: float = options.field(0.5, "pixel noise of the noisy copies", type=options.positive_float)
    noisy_weight: float = options.field(
        0.5,
        "drawn same-class learning from a noisy copy, relative to a clean digit's 1",
        type=options.nonnegative_float,
    )
    lr: float = options.field(
        1e-3, "uniform fine-tuning rate (SGD), the start and the 'before'", type=options.positive_float
    )
    chunk_size: int | str = options.field(
        "auto", "fine-tunes vmapped at once: auto (1 on CPU) or an int", type=options.chunk_size
    )
    meta_steps: int = options.field(30, "outer (Adam) steps", type=options.positive_int)
    meta_lr: float = options.field(0.1, "outer Adam learning rate (on log-lrs)", type=options.positive_float)
    every: int = options.field(10, "checkpoint the outer loop every N steps", type=options.positive_int)
    seed: int = options.seed("seed of the base CNN and the noise")
    quick: bool = options.switch("smoke run: 1+1 digits per class, base CNN on 3000 images for 1 epoch, 4 meta steps")
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _resolved(config: Config) -> Config:
    """The options a run uses: --quick's smaller sizes applied, the default checkpoint folder filled in."""
    if config.quick:
        config = dataclasses.replace(
            config,
            per_digit=min(config.per_digit, QUICK_CAPS["per_digit"]),
            heldout_per_digit=min(config.heldout_per_digit, QUICK_CAPS["heldout_per_digit"]),
            train_size=config.train_size or 3000,
            epochs=QUICK_CAPS["epochs"],
            meta_steps=min(config.meta_steps, QUICK_CAPS["meta_steps"]),
            every=min(config.every, QUICK_CAPS["every"]),
        )
    if config.ckpt is None:
        config = dataclasses.replace(config, ckpt=DEFAULT_CKPT + ("_quick" if config.quick else ""))
    return config


def _config(config: Config) -> dict:
    """config.json: the resolved options that change results, and what the study fixes; a resumed run must match it."""
    varying = {k: v for k, v in options.as_json(config).items() if k not in ("out", "quick", "no_progress")}
    return {
        **varying,
        "study": "meta_cnn_toward",
        "ckpt": str(Path(config.ckpt).expanduser().absolute()),
        "target": "T[i, j] = -[same class] * (noisy_weight if i noisy else 1), self-influence masked",
        "steps": 1,
        "optimizer": "sgd",
        "meta_optimizer": "adam",
        "controls": "per-sample log-lr",
    }


# ----------------------------------------------------------------------------- the drawn target


class Drawn(NamedTuple):
    """A hand-drawn target f32[n, m] and the bool[n, m] mask of the entries that count."""

    target: np.ndarray
    mask: np.ndarray


def drawn_target(rows: Split, cols: Split, noisy_weight: float, *, square: bool) -> Drawn:
    """ "Learn only from the same class, and from noisy copies `noisy_weight` as much": -1 on same-class
    pairs of a clean row, -noisy_weight of a noisy row, 0 across classes; the diagonal masked when square."""
    same = rows.labels[:, None] == cols.labels[None, :]
    weight = np.where(np.asarray(rows.noise_std) > 0, noisy_weight, 1.0)[:, None]
    target = -(same * weight).astype(np.float32)
    mask = ~np.eye(*target.shape, dtype=bool) if square else np.ones(target.shape, bool)
    return Drawn(target, mask)


def drawn_metrics(M: np.ndarray, rows: Split, drawn: Drawn) -> dict:
    """meta.toward, and the drawn quantities in loss units: same-class learning from clean and from noisy
    rows (their ratio is drawn as noisy_weight), and between-class learning (drawn as 0)."""
    same = (drawn.target != 0) & drawn.mask
    other = (drawn.target == 0) & drawn.mask
    noisy = (np.asarray(rows.noise_std) > 0)[:, None]
    learn = lambda keep: float(-M[keep].mean())  # noqa: E731
    clean_same, noisy_same = learn(same & ~noisy), learn(same & noisy)
    return {
        "toward": float(meta.toward(jnp.asarray(M), drawn.target, drawn.mask)),
        "same_class_learning_clean_rows": clean_same,
        "same_class_learning_noisy_rows": noisy_same,
        "noisy_to_clean_ratio": noisy_same / clean_same,
        "between_class_learning": learn(other),
        "between_to_clean_same_ratio": learn(other) / clean_same,
    }


# ----------------------------------------------------------------------------- the study, stage by stage


class Data(NamedTuple):
    """Meta-training and held-out splits (clean digits, then their noisy copies)."""

    train: Split
    heldout: Split


def load_data(args: argparse.Namespace) -> Data:
    """The first --per-digit digits of each class for meta-training, the next --heldout-per-digit held out."""
    total = args.per_digit + args.heldout_per_digit
    fs = noisy_digits.finetune_set(per_digit=total, noise_stds=(args.noise_std,), seed=args.seed)
    return Data(split_set(fs, total, 0, args.per_digit), split_set(fs, total, args.per_digit, args.heldout_per_digit))


def make_objective(drawn: Drawn, chunk_size):
    """(log_lr, params, images, labels) -> meta.toward(eif(train, train), target, mask)."""

    def objective(log_lr, params, images, labels):
        M = jaxeif.eif(cnn.loss_fn, params, (images, labels), lr=meta.per_sample_lr(log_lr), chunk_size=chunk_size)
        return meta.toward(M, drawn.target, drawn.mask)

    return objective


def influence(params, rows: Split, cols: Split, lr, chunk_size) -> np.ndarray:
    """f32[n, m]: the EIF of the `rows` digits (one SGD step each at rates `lr`) on the `cols` digits."""
    return np.asarray(
        jaxeif.eif(
            cnn.loss_fn,
            params,
            (jnp.asarray(rows.images), jnp.asarray(rows.labels)),
            (jnp.asarray(cols.images), jnp.asarray(cols.labels)),
            lr=jnp.asarray(lr),
            chunk_size=chunk_size,
        )
    )


def matrices(run_dir, params, data: Data, lrs: dict, chunk_size) -> dict:
    """{(split, name): M} for split train (train x train) and heldout (train x held-out digits), name
    before (uniform lr) and after (learned lrs); saved as eif_{split}_{name}.npy and resumed."""
    out = {}
    for split, cols in (("train", data.train), ("heldout", data.heldout)):
        for name, lr in lrs.items():
            file = f"eif_{split}_{name}"
            if not run_dir.has(file + ".npy"):
                run_dir.save_npy(file, influence(params, data.train, cols, lr, chunk_size))
            out[split, name] = run_dir.load_npy(file)
    return out


def run(args: argparse.Namespace) -> dict:
    """Fit per-sample lrs toward the drawn target on the meta-training digits, score train and held-out."""
    start = time.perf_counter()
    args = _resolved(options.config_of(Config, args))
    config = _config(args)
    progress = not args.no_progress
    run_dir = runs.RunDir.open(args.out, config)
    params = cnn.load_or_train(
        args.ckpt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress,
        train_size=args.train_size,
    )
    data = load_data(args)
    drawn = {
        "train": drawn_target(data.train, data.train, args.noisy_weight, square=True),
        "heldout": drawn_target(data.train, data.heldout, args.noisy_weight, square=False),
    }

    t = time.perf_counter()
    log_lr0 = meta.init_log_lr(len(data.train.labels), args.lr)
    result = meta.fit(
        make_objective(drawn["train"], args.chunk_size),
        log_lr0,
        optimizer=optax.adam(args.meta_lr),
        steps=args.meta_steps,
        checkpoint_dir=run_dir.path / "meta_ckpt",
        every=args.every,
        progress=progress,
        data=(params, jnp.asarray(data.train.images), jnp.asarray(data.train.labels)),
    )
    meta_seconds = time.perf_counter() - t
    run_dir.save_npy("history", result.history)
    lr_after = np.asarray(meta.per_sample_lr(result.controls))
    lrs = {"before": np.full_like(lr_after, args.lr), "after": lr_after}
    run_dir.save_json("lr.json", {"labels": data.train.labels, "noise_std": data.train.noise_std, "lr": lr_after})
    mats = matrices(run_dir, params, data, lrs, args.chunk_size)

    noisy = np.asarray(data.train.noise_std) > 0
    results = {
        "sign": "EIF = loss after - loss before (negative = learned); learning = -mean",
        "config": config,
        "n_train": int(len(noisy)),
        "n_heldout_cols": int(len(data.heldout.labels)),
        "objective": {"history": result.history.tolist(), "final": result.final, "resumed_from": result.resumed_from},
        "metrics": {
            split: {name: drawn_metrics(mats[split, name], data.train, drawn[split]) for name in lrs} for split in drawn
        },
        "lr_after": {
            "clean_mean": float(lr_after[~noisy].mean()),
            "noisy_mean": float(lr_after[noisy].mean()),
            "min": float(lr_after.min()),
            "max": float(lr_after.max()),
        },
        "seconds": {"meta": meta_seconds, "total": time.perf_counter() - start},
        "base_cnn": cnn.checkpoint_info(args.ckpt),
        "metadata": runs.run_metadata(seed=args.seed, study="meta_cnn_toward"),
    }
    _figure(run_dir, mats, drawn, data, result.history, lr_after)
    results["seconds"]["total"] = time.perf_counter() - start
    run_dir.save_json("results.json", results)
    text = format_summary(results)
    print(text)
    return {"out": str(run_dir.path), "summary": text, "results": results}


def _figure(run_dir, mats, drawn, data: Data, history, lr_after) -> None:
    import matplotlib.pyplot as plt  # slow to import, only the figure needs it

    from jaxeif import plot  # imports matplotlib

    fig, axes = plt.subplots(2, 4, figsize=(24, 11), layout="constrained")
    level = lambda s: ["clean" if v == 0 else f"noise σ={v:g}" for v in s.noise_std]  # noqa: E731
    for r, (split, cols, what) in enumerate(
        (("train", data.train, "meta-training digits"), ("heldout", data.heldout, "held-out digits (columns)"))
    ):
        shown = [
            ("drawn target", drawn[split].target),
            ("uniform lr (before)", mats[split, "before"]),
            ("learned per-sample lr (after)", mats[split, "after"]),
        ]
        same_layout = np.array_equal(cols.labels, data.train.labels) and np.array_equal(
            cols.noise_std, data.train.noise_std
        )
        for ax, (title, M) in zip(axes[r], shown):
            plot.heatmap(
                np.where(drawn[split].mask, M, np.nan),
                ax=ax,
                sign="logprob",
                title=f"{title}, {what}",
                labels=data.train.labels.tolist() if same_layout else None,
                groups=level(data.train) if same_layout else None,
                major_boundaries=[int(np.argmax(data.train.noise_std > 0))] if same_layout else (),
            )
            if split == "heldout":
                ax.set_xlabel(f"evaluated on held-out digit j ({len(cols.labels)}: clean, then noisy)")
    axes[0, 3].plot(np.arange(len(history)), history, marker=".")
    axes[0, 3].set(
        xlabel="meta step", ylabel="meta.toward (meta-training digits)", title="objective: 1 - cosine(M, target)"
    )
    noisy = data.train.noise_std > 0
    axes[1, 3].scatter(np.arange(len(lr_after))[~noisy], lr_after[~noisy], label="clean", s=14)
    axes[1, 3].scatter(np.arange(len(lr_after))[noisy], lr_after[noisy], label="noisy copy", s=14)
    axes[1, 3].axhline(run_dir.config["lr"], color="k", lw=0.7, ls="--", label="uniform lr (start)")
    axes[1, 3].set(yscale="log", xlabel="training digit", ylabel="learned lr", title="learned per-sample rates")
    axes[1, 3].legend()
    run_dir.save_figure("toward.png", fig)


def format_summary(results: dict) -> str:
    """The drawn quantities before and after, on the meta-training and the held-out digits."""
    h = results["objective"]["history"]
    lines = [
        f"meta.toward objective {h[0]:.4f} -> {results['objective']['final']:.4f} ({len(h)} steps, "
        f"{results['seconds']['meta']:.0f} s); mean learned lr clean {results['lr_after']['clean_mean']:.3g}, "
        f"noisy {results['lr_after']['noisy_mean']:.3g}",
        f"  {'':<38}{'train before':>13}{'after':>10}{'held-out before':>17}{'after':>10}",
    ]
    m = results["metrics"]
    drawn_ratio = results["config"]["noisy_weight"]
    for key, name in (
        ("toward", "meta.toward (0 = drawn structure)"),
        ("noisy_to_clean_ratio", f"noisy/clean same-class (drawn {drawn_ratio:g})"),
        ("between_to_clean_same_ratio", "between/within-class (drawn 0)"),
    ):
        lines.append(
            f"  {name:<38}{m['train']['before'][key]:>13.4f}{m['train']['after'][key]:>10.4f}"
            f"{m['heldout']['before'][key]:>17.4f}{m['heldout']['after'][key]:>10.4f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
