"""Figure 1 of the paper: EIF of a Fashion-MNIST CNN fine-tuned on single clean and noisy MNIST digits.

A small CNN is trained on Fashion-MNIST (once; cached with orbax). Each of 50 MNIST test digits
(5 per digit, sorted), clean and with Gaussian pixel noise of std 0.5 and 1.0, is a one-sample
fine-tune toward Fashion class = digit. The 150 x 150 EIF (loss after minus before) is computed
with jaxeif at a learning rate chosen by a sweep (jaxeif.lr_choice, RULE), then summarised with
jaxeif.desiderata. Writes into --out: config.json, lr_sweep.json/.png, eif.npy, metrics.json,
eif_heatmap.png (sign: -EIF, positive = more likely, as in the paper), eif_histogram.png.
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
from tqdm.auto import tqdm

import jaxeif
from jaxeif import desiderata as D
from jaxeif import lr_choice, runs
from jaxeif.data import noisy_digits
from jaxeif.experiments import options
from jaxeif.models import cnn

PAPER = {"symmetry_corr": 0.81, "block_symmetry_corr": 0.9}
DEFAULT_LR_GRID = tuple(float(x) for x in 10.0 ** np.arange(-6.0, 0.01, 0.5))


DEFAULT_CKPT = options.CNN_CKPT

# --quick runs with at most these values (jaxeif.cli refuses a larger one given with it: it would be ignored)
QUICK_CAPS = {"epochs": 1, "per_digit": 2}


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's options (defaults reproduce the paper's figure 1), listed once: they generate its flags
    (`add_arguments`) and its config.json (`_config`)."""

    out: str = options.out("results/cnn_noise")
    ckpt: str | None = options.field(
        None,
        f"orbax checkpoint folder of the base CNN (default {DEFAULT_CKPT}; --quick: that + '_quick', so a smoke "
        "run never meets the full run's base CNN); trained there on first use",
    )
    epochs: int = options.field(4, "base CNN training epochs (Adam, lr 1e-3)", type=options.positive_int)
    batch_size: int = options.field(128, "base CNN training batch size", type=options.positive_int)
    train_size: int | None = options.field(
        None, "train the base CNN on the first N images only", type=options.positive_int
    )
    per_digit: int = options.field(5, "MNIST test images per digit", type=options.positive_int)
    noise_stds: list = options.field(
        [0.5, 1.0], "pixel noise standard deviations", type=options.positive_float, nargs="*"
    )
    lr: float | None = options.field(
        None, "fine-tuning learning rate (default: chosen by the sweep)", type=options.positive_float
    )
    lr_grid: list = options.field(
        list(DEFAULT_LR_GRID),
        "learning rates of the sweep, ascending (default 1e-6 .. 1 in half decades)",
        type=options.positive_float,
        nargs="+",
    )
    plateau: float = options.field(
        0.95,
        "sweep rule: the largest lr whose EIF correlates >= this with the previous lr's",
        type=options.unit_fraction,
    )
    precision: str = options.field(
        "difference",
        "arithmetic of the EIF (jaxeif.precision); default: the propagated "
        "difference, float32 relative accuracy per entry at any lr (1.2x the "
        "cost of 'highest' on CPU)",
        type=options.precision,
    )
    steps: int = options.field(1, "SGD steps per one-sample fine-tune", type=options.positive_int)
    block_size: int = options.field(50, "fine-tunes per checkpointed block", type=options.positive_int)
    seed: int = options.seed("seed of the base CNN and of the pixel noise")
    quick: bool = options.switch("smoke run: 2 digits per class, base CNN on 3000 images for 1 epoch, short lr grid")
    no_progress: bool = options.switch("no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the study: the fields of `Config`."""
    options.add_config(parser, Config)


def _resolved(config: Config) -> Config:
    """The options a run uses: --quick's smaller sizes and short lr grid applied, the grid checked ascending, the
    default checkpoint folder filled in."""
    if config.quick:
        grid = [1e-3, 3e-3, 1e-2, 3e-2] if list(config.lr_grid) == list(DEFAULT_LR_GRID) else config.lr_grid
        config = dataclasses.replace(
            config,
            per_digit=min(config.per_digit, QUICK_CAPS["per_digit"]),
            train_size=config.train_size or 3000,
            epochs=QUICK_CAPS["epochs"],
            lr_grid=grid,
        )
    if list(config.lr_grid) != sorted(config.lr_grid) or len(config.lr_grid) < 2:
        raise ValueError(f"--lr-grid must hold at least two learning rates in ascending order, got {config.lr_grid}")
    if config.ckpt is None:
        config = dataclasses.replace(config, ckpt=DEFAULT_CKPT + ("_quick" if config.quick else ""))
    return config


def _config(config: Config) -> dict:
    """config.json: the resolved options that change results, and what the study fixes; a resumed run must match it."""
    varying = {k: v for k, v in options.as_json(config).items() if k not in ("out", "quick", "no_progress")}
    return {
        **varying,
        "study": "cnn_noise",
        "ckpt": str(Path(config.ckpt).expanduser().absolute()),
        "noise_stds": [float(s) for s in config.noise_stds],
        "lr_grid": [float(x) for x in config.lr_grid],
        "optimizer": "sgd",
        "loss": "softmax cross-entropy toward Fashion class = digit",
    }


# ----------------------------------------------------------------------------- the lr rule
RULE = "top_of_first_plateau"  # jaxeif.lr_choice.RULES: the largest lr of the first plateau (strongest signal on it)


def sweep_matrices(params, train, lrs, *, steps: int, precision: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The EIF at every lr of the grid in one program (jaxeif.eif_sweep), f32[k, n, n], and each
    lr's noise floor f32[k, n, n] (NaN where rows diverged: they are counted, not hidden)."""
    try:
        matrices = np.asarray(
            jaxeif.eif_sweep(
                cnn.loss_fn,
                params,
                train,
                lrs=jnp.asarray(lrs, jnp.float32),
                steps=steps,
                precision=options.precision_of(precision),
            )
        )
    except jaxeif.NonFiniteInfluenceError as e:
        matrices = np.array(e.matrix)
    floors = np.full_like(matrices, np.nan)
    for a, lr in enumerate(tqdm(lrs, desc="noise floor per lr", unit="lr", disable=not progress)):
        if np.all(np.isfinite(matrices[a])):
            floors[a] = noise_floor(params, train, lr, steps, precision)
    return matrices, floors


def lr_sweep(lrs, matrices: np.ndarray, floors: np.ndarray, *, threshold: float) -> dict:
    """Magnitudes, neighbour agreements, share of entries above the floor, and the chosen lr (jaxeif.lr_choice,
    RULE)."""
    sweep = lr_choice.summarise(lrs, list(matrices), threshold=threshold, rule=RULE)
    off = lr_choice.offdiag
    return {
        "lrs": list(map(float, lrs)),
        "median_abs_eif": sweep.magnitude.tolist(),
        "agreement_with_previous": sweep.agreement.tolist(),
        "share_above_noise_floor": [
            float(np.mean(np.abs(off(M)) > off(F))) if np.all(np.isfinite(F)) else float("nan")
            for M, F in zip(matrices, floors)
        ],
        "diverged_rows": [int(np.sum(~np.all(np.isfinite(M), axis=1))) for M in matrices],
        "threshold": threshold,
        "chosen_lr": sweep.chosen,
        "rule": lr_choice.RULES[RULE],
    }


def noise_floor(params, train, lr: float, steps: int, precision: str) -> np.ndarray:
    """jaxeif.noise_floor of the study's EIF at this lr and precision (against float64 on 16 rows)."""
    return np.asarray(
        jaxeif.noise_floor(cnn.loss_fn, params, train, lr=lr, steps=steps, precision=options.precision_of(precision))
    )


# Each finding of the paper as a curve over lr: (panel title, metrics key path, paper's value or None)
FINDINGS = (
    ("corr(M, Mᵀ), off-diagonal", ("symmetry_corr",), PAPER["symmetry_corr"]),
    ("corr(M, Mᵀ) inside digit blocks", ("block_symmetry_corr_digit",), PAPER["block_symmetry_corr"]),
    ("within-class mean EIF (<0: learned)", ("within_class_mean",), None),
    ("between-class mean EIF (>0: unlearned, paper)", ("between_class_mean",), None),
    ("between-class pairs unlearned, above floor", ("between_class_frac_unlearned_above_floor",), None),
    ("noisy/clean teaching ratio, σ=0.5", ("noise", "std_0.5", "teaching_ratio_same_class_clean"), 1.0),
    ("noisy/clean teaching ratio, σ=1", ("noise", "std_1", "teaching_ratio_same_class_clean"), 1.0),
    ("Hoyer sparsity", ("sparsity_hoyer",), None),
)


def _dig(metrics: dict, path: tuple) -> float:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return float("nan")
        metrics = metrics[key]
    return float(metrics)


def lr_findings(lrs, matrices: np.ndarray, floors: np.ndarray, fs) -> dict:
    """Every study metric at every lr of the sweep (NaN where fine-tunes diverged), and the curves."""
    per_lr = [
        study_metrics(M, fs.labels, fs.noise_std, fs.source, floor=F) if np.all(np.isfinite(M)) else None
        for M, F in zip(matrices, floors)
    ]
    return {
        "lrs": list(map(float, lrs)),
        "curves": {title: [_dig(m, path) if m else float("nan") for m in per_lr] for title, path, _ in FINDINGS},
        "paper": {title: ref for title, _, ref in FINDINGS if ref is not None},
        "metrics_per_lr": per_lr,
    }


# ----------------------------------------------------------------------------- metrics


def _mean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else float("nan")


def class_means(M: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """f64[c, c]: mean of M over rows of class a and columns of class b (diagonal entries left out)."""
    classes = np.unique(labels)
    off = ~np.eye(len(M), dtype=bool)
    return np.array(
        [[_mean(M[(labels[:, None] == a) & (labels[None, :] == b) & off]) for b in classes] for a in classes]
    )


def study_metrics(
    M: np.ndarray, digits: np.ndarray, noise_std: np.ndarray, source: np.ndarray, floor: np.ndarray | None = None
) -> dict:
    """The desiderata of the figure-1 matrix (M in loss units: negative = learned); sign shares
    count only entries above the noise `floor` when one is given."""
    n = len(M)
    levels = sorted(set(noise_std.tolist()))
    level_id = np.searchsorted(levels, noise_std)
    cell = level_id * 100 + digits
    within, between = D.within_between(M, digits)
    same = (digits[:, None] == digits[None, :]) & ~np.eye(n, dtype=bool)
    diff = digits[:, None] != digits[None, :]
    clean = noise_std == 0
    signs = D.sign_shares(M, digits, floor=floor)
    out = {
        "sign": "loss after minus loss before (negative = learned); figures show -EIF",
        "n": n,
        "symmetry_corr": float(D.symmetry_corr(M)),
        "block_symmetry_corr_digit": float(D.block_symmetry_corr(M, digits)),
        "block_symmetry_corr_noise_level": float(D.block_symmetry_corr(M, level_id)),
        "block_symmetry_corr_digit_and_noise": float(D.block_symmetry_corr(M, cell)),
        "inverse_asymmetry": float(D.inverse_asymmetry(M)),
        "relative_asymmetry": float(np.linalg.norm(M - M.T) / np.linalg.norm(M)),
        "within_class_mean": float(within),
        "between_class_mean": float(between),
        "within_class_frac_learned_above_floor": float(signs["within_learned"]),
        "between_class_frac_unlearned_above_floor": float(signs["between_unlearned"]),
        "share_below_noise_floor": float(signs["excluded"]),
        "within_class_frac_learned": float(np.mean(M[same] < 0)),
        "between_class_frac_unlearned": float(np.mean(M[diff] > 0)),
        "self_influence_mean": float(np.mean(np.diag(M))),
        "sparsity_hoyer": float(D.sparsity(M)),
        "class_mean_matrix_clean": class_means(M[np.ix_(clean, clean)], digits[clean]).tolist(),
        "noise": {},
    }
    clean_rows = np.flatnonzero(clean)
    for lvl in levels[1:]:
        noisy_rows = np.flatnonzero(noise_std == lvl)
        noisy_rows = noisy_rows[np.argsort(source[noisy_rows])]
        pair_clean = clean_rows[np.searchsorted(source[clean_rows], source[noisy_rows])]
        E = np.asarray(D.noise_influence(M, pair_clean, noisy_rows))  # [k, n]
        cols_same = (digits[pair_clean][:, None] == digits[None, :]) & clean[None, :]
        cols_same &= source[None, :] != source[pair_clean][:, None]  # leave out the image itself
        teach_noisy = -M[noisy_rows][cols_same]
        teach_clean = -M[pair_clean][cols_same]
        out["noise"][f"std_{lvl:g}"] = {
            "eif_noise_mean": _mean(E),
            "eif_noise_mean_on_clean_evals": _mean(E[:, clean]),
            "eif_noise_mean_on_same_class_clean_evals": _mean(E[cols_same]),
            "teaching_ratio_same_class_clean": _mean(teach_noisy) / _mean(teach_clean),
            "clean_to_noisy_abs_mean": _mean(np.abs(M[np.ix_(clean_rows, noisy_rows)])),
            "noisy_to_clean_abs_mean": _mean(np.abs(M[np.ix_(noisy_rows, clean_rows)])),
        }
    return out


# ----------------------------------------------------------------------------- figures


def _figures(run, M, fs, lr: float, sweep: dict | None, findings: dict | None, title_extra: str) -> None:
    from jaxeif import plot  # matplotlib: slow to import, only the figures need it

    per_level = int(np.sum(fs.noise_std == 0))
    level_names = ["clean" if s == 0 else f"noise σ={s:g}" for s in fs.noise_std]
    digit_runs = [i for i in range(1, len(M)) if fs.labels[i] != fs.labels[i - 1]]
    major = list(range(per_level, len(M), per_level))
    fig = plot.heatmap(
        M,
        labels=fs.labels.tolist(),
        groups=level_names,
        boundaries=[b for b in digit_runs if b not in major],
        major_boundaries=major,
        sign="logprob",
        title=f"EIF of a Fashion-MNIST CNN fine-tuned on single MNIST digits\n"
        f"(digit d → Fashion class d; SGD, 1 step, lr {lr:g}{title_extra})",
    )
    plot.save(fig, run.path / "eif_heatmap.png")

    same = (fs.labels[:, None] == fs.labels[None, :]) & ~np.eye(len(M), dtype=bool)
    diff = fs.labels[:, None] != fs.labels[None, :]
    fig = plot.histogram(
        {"same digit": M[same], "different digit": M[diff]}, sign="logprob", title="Influence within vs between classes"
    )
    plot.save(fig, run.path / "eif_histogram.png")
    if sweep is not None:
        fig = plot.lr_sweep(
            sweep["lrs"],
            sweep["median_abs_eif"],
            sweep["agreement_with_previous"],
            threshold=sweep["threshold"],
            chosen=lr,
            title="Learning-rate sweep (plateau rule)",
            above_floor=sweep.get("share_above_noise_floor"),
        )
        plot.save(fig, run.path / "lr_sweep.png")
    if findings is not None:
        ordered = {title: findings["curves"][title] for title, _, _ in FINDINGS if title in findings["curves"]}
        fig = plot.curves(
            findings["lrs"],
            ordered,
            reference=findings["paper"],
            chosen=lr,
            title="The paper's findings across the learning rate (CNN, figure-1 set; dotted: the plateau lr)",
        )
        plot.save(fig, run.path / "lr_findings.png")


# ----------------------------------------------------------------------------- the study


def run(args: argparse.Namespace) -> dict:
    """Train or restore the CNN, sweep lr, compute the EIF, write matrix, metrics and figures."""
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
    info = cnn.checkpoint_info(args.ckpt)
    fs = noisy_digits.finetune_set(per_digit=args.per_digit, noise_stds=tuple(args.noise_stds), seed=args.seed)
    train = (jax.numpy.asarray(fs.images), jax.numpy.asarray(fs.labels))

    sweep, findings, sweep_seconds = None, None, 0.0
    if run_dir.has("lr_sweep.json") and run_dir.has("lr_findings.json"):
        sweep, findings = run_dir.load_json("lr_sweep.json"), run_dir.load_json("lr_findings.json")
    elif args.lr is None:
        t = time.perf_counter()
        matrices, floors = sweep_matrices(
            params, train, config["lr_grid"], steps=args.steps, precision=args.precision, progress=progress
        )
        sweep = lr_sweep(config["lr_grid"], matrices, floors, threshold=args.plateau)
        findings = lr_findings(config["lr_grid"], matrices, floors, fs)
        sweep_seconds = sweep["seconds"] = time.perf_counter() - t
        run_dir.save_json("lr_findings.json", findings)
        run_dir.save_json("lr_sweep.json", sweep)
    lr = args.lr if args.lr is not None else sweep["chosen_lr"]

    t = time.perf_counter()
    M = np.asarray(
        runs.sweep_eif(
            cnn.loss_fn,
            params,
            train,
            lr=lr,
            steps=args.steps,
            precision=options.precision_of(args.precision),
            progress=progress,
            block_size=args.block_size,
            run=run_dir,
            name="eif",
        )
    )
    eif_seconds = time.perf_counter() - t  # diverged rows raise NonFiniteInfluenceError (matrix saved as eif.npy)

    metrics = study_metrics(
        M, fs.labels, fs.noise_std, fs.source, floor=noise_floor(params, train, lr, args.steps, args.precision)
    )
    metrics.update(
        {
            "lr": lr,
            "lr_source": "sweep" if args.lr is None else "--lr",
            "base_cnn": info,
            "paper": PAPER,
            "seconds": {"lr_sweep": sweep_seconds, "eif": eif_seconds, "total": None},
            "metadata": runs.run_metadata(seed=args.seed, study="cnn_noise"),
        }
    )
    quick = " — quick smoke run" if args.quick else ""
    _figures(run_dir, M, fs, lr, sweep, findings, quick)
    metrics["seconds"]["total"] = time.perf_counter() - start
    run_dir.save_json("metrics.json", metrics)
    _print_summary(run_dir.path, metrics)
    return {
        "out": str(run_dir.path),
        "lr": lr,
        "symmetry_corr": metrics["symmetry_corr"],
        "block_symmetry_corr_digit": metrics["block_symmetry_corr_digit"],
        "within_class_mean": metrics["within_class_mean"],
        "between_class_mean": metrics["between_class_mean"],
        "seconds": metrics["seconds"]["total"],
        "metrics": metrics,
    }


def _print_summary(path: Path, m: dict) -> None:
    acc = m["base_cnn"]["test_accuracy"] if m["base_cnn"] else float("nan")
    lines = [
        "",
        f"CNN noise study (figure 1): {m['n']} x {m['n']} EIF at lr {m['lr']:g} ({m['lr_source']}); "
        f"base CNN test accuracy {acc:.4f}",
        f"  {'metric':<44}{'ours':>10}{'paper':>10}",
        f"  {'corr(M, M^T), off-diagonal':<44}{m['symmetry_corr']:>10.3f}{'~0.81':>10}",
        f"  {'corr(M, M^T) inside digit blocks':<44}{m['block_symmetry_corr_digit']:>10.3f}{'~0.9':>10}",
        f"  {'corr(M, M^T) inside noise-level blocks':<44}{m['block_symmetry_corr_noise_level']:>10.3f}{'':>10}",
        f"  {'1 / ||M - M^T||_F':<44}{m['inverse_asymmetry']:>10.3g}{'':>10}",
        f"  {'within-class mean EIF (loss; <0 = learned)':<44}{m['within_class_mean']:>10.3g}{'<0':>10}",
        f"  {'between-class mean EIF (loss)':<44}{m['between_class_mean']:>10.3g}{'>0':>10}",
        f"  {'sparsity (Hoyer, 0 dense .. 1 one entry)':<44}{m['sparsity_hoyer']:>10.3f}{'':>10}",
    ]
    for lvl, d in m["noise"].items():
        lines.append(
            f"  {'noisy/clean teaching ratio, ' + lvl:<44}{d['teaching_ratio_same_class_clean']:>10.3f}{'~1':>10}"
        )
    lines.append(
        f"  wall time {m['seconds']['total']:.1f} s (lr sweep {m['seconds']['lr_sweep']:.1f} s, "
        f"EIF {m['seconds']['eif']:.1f} s); results in {path}"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
