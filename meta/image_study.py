"""Splits and held-out metrics shared by the image meta studies (`jaxeif meta-cnn`, `jaxeif meta-cnn-transfer`).

A Split holds images, labels, noise_std (0 = clean), source (row of each sample's clean twin among
the split's clean samples) and, optionally, corruption (a name per sample, "clean" for the clean
ones; without it the group of a sample is "clean" or "std_<noise std>").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxeif.meta.objectives import class_learning, noise_invariance

CLEAN = "clean"


class Split(NamedTuple):
    """A held-out or training split of the image meta studies (see the module docstring)."""

    images: np.ndarray  # f32[n, 28, 28, 1]
    labels: np.ndarray  # int32[n]
    noise_std: np.ndarray | None  # f32[n], 0 for clean (None when `corruption` names the groups)
    source: np.ndarray  # int32[n], clean twin row of each sample
    corruption: np.ndarray | None = None  # str[n], "clean" or the corruption's name


def split_set(fs, per_digit: int, first: int, count: int) -> Split:
    """Samples whose image is among digits' [first, first+count) images of a finetune_set made with per_digit."""
    rank = fs.source % per_digit  # finetune_set orders each level by digit, then by MNIST index
    keep = np.flatnonzero((rank >= first) & (rank < first + count))
    src = fs.source[keep]
    clean_pos = {int(s): i for i, s in enumerate(src) if fs.noise_std[keep][i] == 0}
    return Split(
        images=fs.images[keep],
        labels=fs.labels[keep],
        noise_std=fs.noise_std[keep],
        source=np.array([clean_pos[int(s)] for s in src], np.int32),
    )


def groups(split: Split) -> np.ndarray:
    """str[n]: each sample's corruption ("clean", "std_0.5", ...)."""
    if split.corruption is not None:
        return np.asarray(split.corruption, dtype=str)
    return np.array([CLEAN if s == 0 else f"std_{s:g}" for s in np.asarray(split.noise_std).tolist()], dtype=str)


def clean_rows(split: Split) -> np.ndarray:
    """Rows of the clean samples."""
    return np.flatnonzero(groups(split) == CLEAN)


def pairs(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(clean twin rows, corrupted rows) over every corruption."""
    noisy = np.flatnonzero(groups(split) != CLEAN)
    return split.source[noisy], noisy


def clean_learning(M, split: Split):
    """(within, between) learning of clean rows on clean columns, self-influence left out (M: [n, n_clean])."""
    clean = clean_rows(split)
    self_pair = split.source[:, None] == np.arange(len(clean))[None, :]
    return class_learning(M, split.labels, split.labels[clean], rows=clean, exclude=self_pair)


def heldout_metrics(M: np.ndarray, split: Split, lr: np.ndarray) -> dict:
    """Noise influence and class learning of a held-out EIF (loss units; negative = learned).

    M: f[n, n] (square) or f[n, n_clean] (clean columns only); only the clean columns are used.
    Per corruption: rms of its rows over the clean rows' rms, its same-class teaching over that of
    the clean twins (the twin itself left out), meta.noise_invariance, its mean lr and the
    fraction of its samples given a lower lr than their clean twin."""
    M = np.asarray(M)
    lr = np.asarray(lr)
    clean = clean_rows(split)
    group = groups(split)
    if M.ndim != 2 or M.shape[0] != len(group) or M.shape[1] not in (len(group), len(clean)):
        raise ValueError(f"M must be [{len(group)}, {len(group)}] or [{len(group)}, {len(clean)}], got {M.shape}")
    Mc = M[:, clean] if M.shape[1] == len(group) else M
    within, between = clean_learning(Mc, split)
    out = {
        "within_class_learning_clean": float(within),
        "between_class_learning_clean": float(between),
        "lr_mean_clean": float(lr[clean].mean()),
        "noise": {},
    }
    clean_rms = float(np.sqrt(np.mean(Mc[clean] ** 2)))
    for name in dict.fromkeys(g for g in group.tolist() if g != CLEAN):
        noisy = np.flatnonzero(group == name)
        twins = split.source[noisy]
        same = split.labels[noisy][:, None] == split.labels[clean][None, :]
        same &= twins[:, None] != np.arange(len(clean))[None, :]  # leave out the twin itself
        out["noise"][name] = {
            "rms_ratio_noisy_to_clean_rows": float(np.sqrt(np.mean(Mc[noisy] ** 2))) / clean_rms,
            "teaching_ratio_same_class": float(-Mc[noisy][same].mean() / -Mc[twins][same].mean()),
            "noise_invariance_objective": float(noise_invariance(Mc, twins, noisy)),
            "lr_mean": float(lr[noisy].mean()),
            "lr_below_twin_fraction": float(np.mean(lr[noisy] < lr[clean][twins])),
        }
    return out
