"""Meta study 1: learn a learning-rate predictor so that noisy digits influence less.

The Fashion-MNIST CNN of figure 1 is fine-tuned on single MNIST digits, clean and with pixel
noise. An amortised predictor lr = base_lr * exp(f_phi(image statistics)) (meta.amortised) is
trained through jaxeif.eif on one set of digits (the first --per-digit of each class) so that
noisy samples influence the clean ones less (meta.noise_invariance) while clean within-class
learning and the size of between-class influence stay at the uniform-lr level. It is then evaluated on
held-out digits (the next --heldout-per-digit of each class, never seen by the predictor):
noise influence and within-class learning before (uniform base_lr) and after. Writes into --out:
config.json, meta_ckpt/ (orbax; a rerun resumes), history.npy, objective.png, eif_heldout_*.npy,
eif_heldout_before_after.png, lr_heldout.json, predictor.npz (meta.load_amortised), metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxeif
from jaxeif import meta, runs
from jaxeif.data import noisy_digits
from jaxeif.experiments import options
from jaxeif.meta.image_study import Split, clean_learning, heldout_metrics, pairs, split_set  # noqa: F401 (tests use them from here)
from jaxeif.models import cnn

DEFAULT_CKPT = options.CNN_CKPT


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options, listed once: they generate its flags (`add_arguments`) and its config.json (`_config`)."""

    out: str = options.out("results/meta_cnn_noise")
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
    per_digit: int = options.field(2, "meta-training MNIST test images per digit", type=options.positive_int)
    heldout_per_digit: int = options.field(3, "held-out images per digit (the next ones)", type=options.positive_int)
    noise_stds: list = options.field(
        [0.5, 1.0], "pixel noise standard deviations", type=options.positive_float, nargs="+"
    )
    lr: float = options.field(1e-3, "uniform base fine-tuning rate (SGD; the 'before')", type=options.positive_float)
    steps: int = options.field(1, "SGD steps per one-sample fine-tune", type=options.positive_int)
    chunk_size: int = options.field(10, "fine-tunes vmapped at once (lax.map over chunks)", type=options.positive_int)
    meta_steps: int = options.field(30, "outer (Adam) steps", type=options.positive_int)
    meta_lr: float = options.field(0.1, "outer Adam learning rate", type=options.positive_float)
    hidden: list = options.field([16], "hidden widths of the predictor MLP", type=options.positive_int, nargs="*")
    max_log_gain: float = options.field(3.0, "bound on |log(lr / base lr)|", type=options.positive_float)
    keep_weight: float = options.field(
        10.0, "weight of keeping clean within-class learning", type=options.nonnegative_float
    )
    guard_weight: float = options.field(
        1.0, "weight of not raising |between-class influence|", type=options.nonnegative_float
    )
    every: int = options.field(5, "checkpoint the outer loop every N steps", type=options.positive_int)
    seed: int = options.seed("seed of the base CNN, the noise and the predictor init")
    quick: bool = options.switch("smoke run: 2+2 digits per class, base CNN on 3000 images for 1 epoch, 6 meta steps")
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _resolved(config: Config) -> Config:
    """The options a run uses: --quick's smaller sizes applied, the default checkpoint folder filled in."""
    if config.quick:
        config = dataclasses.replace(
            config,
            per_digit=min(config.per_digit, 2),
            heldout_per_digit=min(config.heldout_per_digit, 2),
            train_size=config.train_size or 3000,
            epochs=1,
            meta_steps=min(config.meta_steps, 6),
            every=min(config.every, 3),
        )
    if config.ckpt is None:
        config = dataclasses.replace(config, ckpt=DEFAULT_CKPT + ("_quick" if config.quick else ""))
    return config


def _config(config: Config) -> dict:
    """config.json: the resolved options that change results, and what the study fixes; a resumed run must match it."""
    varying = {k: v for k, v in options.as_json(config).items() if k not in ("out", "quick", "no_progress")}
    return {
        **varying,
        "study": "meta_cnn_noise",
        "ckpt": str(Path(config.ckpt).expanduser().absolute()),
        "noise_stds": [float(s) for s in config.noise_stds],
        "hidden": list(config.hidden),
        "optimizer": "sgd",
        "meta_optimizer": "adam",
        "features": "meta.image_features",
    }


# ----------------------------------------------------------------------------- objective
# The split and the held-out metrics live in meta.image_study (shared with `jaxeif meta-cnn-transfer`).


def make_objective(loss_fn, split: Split, predictor, *, steps, chunk_size, refs, keep_weight, guard_weight):
    """(phi, params, images, labels, features) -> noise_invariance + keep * keep_learning(within)
    + guard * stay_below(|between|); arrays are arguments so XLA does not constant-fold them."""
    clean = np.flatnonzero(split.noise_std == 0)
    twins, noisy = pairs(split)

    def objective(phi, params, images, labels, features):
        M = jaxeif.eif(
            loss_fn,
            params,
            (images, labels),
            (images[clean], labels[clean]),
            lr=predictor.lr(phi, features),
            steps=steps,
            chunk_size=chunk_size,
        )
        within, between = clean_learning(M, split)
        return (
            meta.noise_invariance(M, twins, noisy)
            + keep_weight * meta.keep_learning(within, refs["within"])
            + guard_weight * meta.stay_below(jnp.abs(between), refs["between_abs"])
        )

    return objective


# ----------------------------------------------------------------------------- the study


def run(args: argparse.Namespace) -> dict:
    """Restore the CNN, learn the predictor on the meta-training digits, evaluate on held-out digits."""
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

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
    train_split, held = _splits(args)
    refs = _references(params, train_split, args)
    t = time.perf_counter()
    predictor, result = _learn_predictor(params, train_split, refs, args, run_dir, progress)
    meta_seconds = time.perf_counter() - t
    run_dir.save_npy("history", result.history)
    lr_after = np.asarray(predictor.lr(result.controls, meta.image_features(held.images)))
    lrs = {"before": np.full_like(lr_after, args.lr), "after": lr_after}
    mats = _heldout_matrices(params, held, lrs, args, run_dir)
    metrics = _metrics(args, result, refs, predictor, train_split, held, mats, lrs, meta_seconds)
    run_dir.save_json("lr_heldout.json", {"noise_std": held.noise_std, "labels": held.labels, "lr": lr_after})
    meta.save_amortised(run_dir.file("predictor.npz"), predictor, result.controls)
    _figures(run_dir, result.history, mats, held, plot)
    metrics["seconds"]["total"] = time.perf_counter() - start
    run_dir.save_json("metrics.json", metrics)
    summary = _summary(metrics)
    print(summary)
    return {
        "out": str(run_dir.path),
        "summary": summary,
        "metrics": metrics,
        "predictor": str(run_dir.file("predictor.npz")),
    }


def _splits(args) -> tuple[Split, Split]:
    """(meta-training, held-out) digits: the first --per-digit of each class, then the next --heldout-per-digit."""
    total = args.per_digit + args.heldout_per_digit
    fs = noisy_digits.finetune_set(per_digit=total, noise_stds=tuple(args.noise_stds), seed=args.seed)
    return split_set(fs, total, 0, args.per_digit), split_set(fs, total, args.per_digit, args.heldout_per_digit)


def _references(params, split: Split, args) -> dict:
    """Clean within- and |between|-class learning of the uniform-lr EIF on the meta-training digits."""
    clean = np.flatnonzero(split.noise_std == 0)
    x, y = jnp.asarray(split.images), jnp.asarray(split.labels)
    M0 = jaxeif.eif(
        cnn.loss_fn, params, (x, y), (x[clean], y[clean]), lr=args.lr, steps=args.steps, chunk_size=args.chunk_size
    )
    within0, between0 = (float(v) for v in clean_learning(M0, split))
    if not (within0 > 0 and between0 != 0):
        raise ValueError(
            f"at --lr {args.lr:g} the clean digits teach their class {within0:.3g} (must be > 0 to be "
            f"kept) and other classes {between0:.3g} (must be nonzero to be bounded); choose another --lr"
        )
    return {"within": within0, "between_abs": abs(between0)}


def _learn_predictor(params, split: Split, refs: dict, args, run_dir, progress: bool):
    """(predictor, meta.fit's result): the amortised lr predictor trained on `split` (resumed from meta_ckpt/)."""
    features = meta.image_features(split.images)
    predictor = meta.amortised(features, args.lr, hidden=args.hidden, max_log_gain=args.max_log_gain)
    phi0 = predictor.init(jax.random.key(args.seed), features)
    objective = make_objective(
        cnn.loss_fn,
        split,
        predictor,
        steps=args.steps,
        chunk_size=args.chunk_size,
        refs=refs,
        keep_weight=args.keep_weight,
        guard_weight=args.guard_weight,
    )
    result = meta.fit(
        objective,
        phi0,
        optimizer=optax.adam(args.meta_lr),
        steps=args.meta_steps,
        checkpoint_dir=run_dir.path / "meta_ckpt",
        every=args.every,
        progress=progress,
        data=(params, jnp.asarray(split.images), jnp.asarray(split.labels), features),
    )
    return predictor, result


def _heldout_matrices(params, held: Split, lrs: dict, args, run_dir) -> dict:
    """The square EIF of the held-out digits at each named lr vector, saved as eif_heldout_<name>.npy (reused)."""
    x, y = jnp.asarray(held.images), jnp.asarray(held.labels)
    mats = {}
    for name, lr in lrs.items():
        if not run_dir.has(f"eif_heldout_{name}.npy"):
            run_dir.save_npy(
                f"eif_heldout_{name}",
                np.asarray(
                    jaxeif.eif(cnn.loss_fn, params, (x, y), lr=lr, steps=args.steps, chunk_size=args.chunk_size)
                ),
            )
        mats[name] = run_dir.load_npy(f"eif_heldout_{name}")
    return mats


def _metrics(args, result, refs, predictor, train_split: Split, held: Split, mats, lrs, meta_seconds) -> dict:
    """Every number of the study (metrics.json, less the total time)."""
    lr_train = np.asarray(predictor.lr(result.controls, meta.image_features(train_split.images)))
    return {
        "sign": "loss after minus loss before (negative = learned); learning = -mean",
        "objective": {"first": float(result.history[0]), "final": result.final, "resumed_from": result.resumed_from},
        "references_meta_train": refs,
        "meta_train_lr_mean": {
            f"std_{s:g}": float(lr_train[train_split.noise_std == s].mean())
            for s in sorted(set(train_split.noise_std.tolist()))
        },
        "heldout": {name: heldout_metrics(mats[name], held, lrs[name]) for name in ("before", "after")},
        "n_meta_train": int(len(train_split.labels)),
        "n_heldout": int(len(held.labels)),
        "seconds": {"meta": meta_seconds},
        "base_cnn": cnn.checkpoint_info(args.ckpt),
        "metadata": runs.run_metadata(seed=args.seed, study="meta_cnn_noise"),
    }


def _figures(run_dir, history, mats, held, plot) -> None:
    import matplotlib.pyplot as plt  # slow to import, only the figures need it

    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    ax.plot(np.arange(len(history)), history)
    ax.set_xlabel("meta step")
    ax.set_ylabel("outer objective")
    ax.set_title("Learning the lr predictor (meta-training digits)")
    plot.save(fig, run_dir.path / "objective.png")
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.4), layout="constrained")
    level = ["clean" if s == 0 else f"noise σ={s:g}" for s in held.noise_std]
    major = [i for i in range(1, len(level)) if level[i] != level[i - 1]]
    for ax, name in zip(axes, ("before", "after")):
        plot.heatmap(
            mats[name],
            ax=ax,
            labels=held.labels.tolist(),
            groups=level,
            major_boundaries=major,
            sign="logprob",
            title=f"held-out EIF, {'uniform lr' if name == 'before' else 'learned lr'}",
        )
    plot.save(fig, run_dir.path / "eif_heldout_before_after.png")


def _summary(m: dict) -> str:
    b, a = m["heldout"]["before"], m["heldout"]["after"]
    rows = [
        ("within-class learning, clean rows", b["within_class_learning_clean"], a["within_class_learning_clean"]),
        ("between-class learning, clean rows", b["between_class_learning_clean"], a["between_class_learning_clean"]),
        ("mean lr, clean", b["lr_mean_clean"], a["lr_mean_clean"]),
    ]
    for lvl in b["noise"]:
        rows += [
            (
                f"rms noisy/clean rows, {lvl}",
                b["noise"][lvl]["rms_ratio_noisy_to_clean_rows"],
                a["noise"][lvl]["rms_ratio_noisy_to_clean_rows"],
            ),
            (
                f"noisy/clean teaching ratio, {lvl}",
                b["noise"][lvl]["teaching_ratio_same_class"],
                a["noise"][lvl]["teaching_ratio_same_class"],
            ),
            (f"mean lr, {lvl}", b["noise"][lvl]["lr_mean"], a["noise"][lvl]["lr_mean"]),
        ]
    lines = [
        f"\nMeta study 1, held-out digits ({m['n_heldout']} samples): objective {m['objective']['first']:.4g} -> "
        f"{m['objective']['final']:.4g} on meta-training digits",
        f"  {'metric':<40}{'uniform lr':>12}{'learned lr':>12}",
    ]
    lines += [f"  {name:<40}{x:>12.4g}{y:>12.4g}" for name, x, y in rows]
    lines.append(f"  meta-training {m['seconds']['meta']:.0f} s, total {m['seconds']['total']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
