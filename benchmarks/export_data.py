"""Export Fashion-MNIST (through tensorflow-datasets) to one .npz for a machine without TensorFlow.

The file holds uint8 images [n, 28, 28] and int32 labels of the test split (and of the first
--train images of the train split, to train the CNN there): what `jaxeif bench-cnn --device-report
--data FILE` reads on an accelerator that has jax, flax, optax, orbax and torch but no TensorFlow.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxeif import io
from jaxeif.data import images
from jaxeif.experiments import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_out(parser, None, "the .npz file to write")
    parser.add_argument("--test", type=int, default=10_000, help="test images (the first N of the split)")
    parser.add_argument("--train", type=int, default=20_000, help="train images (the first N; 0 for none)")


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(x[..., 0] * 255.0).astype(np.uint8)


def load(path: str) -> dict[str, np.ndarray]:
    """The arrays of an exported file, images as f32[n, 28, 28, 1] in [0, 1] (no pickles are read)."""
    with np.load(path, allow_pickle=False) as f:
        missing = {"test_images", "test_labels"} - set(f.files)
        if missing:
            raise ValueError(
                f"{path} is not a jaxeif data export (missing {sorted(missing)}); write one with `jaxeif export-data`"
            )
        out = {k: f[k] for k in f.files}
    for split in ("test", "train"):
        if f"{split}_images" in out:
            out[f"{split}_images"] = out[f"{split}_images"].astype(np.float32)[..., None] / 255.0
    return out


def run(args: argparse.Namespace) -> dict:
    if not 1 <= args.test <= 10_000 or not 0 <= args.train <= 60_000:
        raise ValueError(f"--test must be in 1..10000 and --train in 0..60000, got {args.test} and {args.train}")
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out}")
    arrays = {}
    x, y = images.load_head("fashion_mnist", "test", args.test)
    arrays.update(test_images=_uint8(x), test_labels=y)
    if args.train:
        x, y = images.load_head("fashion_mnist", "train", args.train)
        arrays.update(train_images=_uint8(x), train_labels=y)
    with io.atomic_file(args.out) as fh:
        np.savez_compressed(fh, **arrays)
    return {"out": args.out, "test": args.test, "train": args.train}


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
