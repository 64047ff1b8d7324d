"""The options studies and benchmarks share: argparse types, `--out`, `--seed`, and
config dataclasses that generate both a study's flags and its `config.json` (configs as data).

A study lists each option once, as a field of a frozen dataclass:

    @dataclasses.dataclass(frozen=True)
    class Config:
        out: str = options.out("results/my_study")
        seed: int = options.seed("seed of the base model")
        lr: float = options.field(1e-3, "fine-tuning learning rate", type=options.positive_float)

    def add_arguments(parser):
        options.add_config(parser, Config)

    def run(args):
        config = options.config_of(Config, args)     # checked by argparse, nothing re-checked
        run_dir = runs.RunDir.open(config.out, options.as_json(config))

Argparse `type=` checks stop a bad number before any work starts (`jaxeif X` prints one line
`error: ...`, see jaxeif.cli).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from jaxeif import precision as precision_lib

T = TypeVar("T")


# ----------------------------------------------------------------------------- argparse `type=` checks
def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _checked_number(kind: type, name: str, ok: Callable[[Any], bool], rule: str, doc: str) -> Callable[[str], Any]:
    """An argparse `type=`: text -> a `kind` number for which ok(value) holds, else "must be {rule}"."""

    def parse(text: str):
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__, parse.__doc__ = name, doc
    return parse


positive_int = _checked_number(int, "positive_int", lambda v: v >= 1, ">= 1", "An int >= 1 (steps, sizes, counts).")
nonnegative_int = _checked_number(
    int, "nonnegative_int", lambda v: v >= 0, ">= 0", "An int >= 0 (seeds, ranks where 0 means off)."
)
positive_float = _checked_number(
    float, "positive_float", lambda v: v > 0, "> 0", "A finite number > 0 (learning rates)."
)
nonnegative_float = _checked_number(
    float, "nonnegative_float", lambda v: v >= 0, ">= 0", "A finite number >= 0 (noise levels, weights)."
)
unit_fraction = _checked_number(
    float,
    "unit_fraction",
    lambda v: 0 < v <= 1,
    "in (0, 1]",
    "A number in (0, 1] (thresholds such as a correlation plateau).",
)


def chunk_size(text: str) -> int | str:
    """ "auto" or an int >= 1 (fine-tunes per step, see jaxeif.chunking)."""
    return text if text == "auto" else positive_int(text)


def precision(text: str) -> str:
    """A jaxeif.precision short name ("highest", "difference", ...); `precision_of` turns it into a Precision."""
    if text not in precision_lib.NAMES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(precision_lib.MODES)}, got {text!r}")
    return text


def precision_of(name: str) -> precision_lib.Precision:
    """The jaxeif.Precision of a `--precision` value (config files record the short name)."""
    return precision_lib.named(name)


# ----------------------------------------------------------------------------- shared flags
def add_out(parser: argparse.ArgumentParser, default: str | None, help: str | None = None) -> None:
    """`--out`: the results folder (resumed if its config matches); required when `default` is None."""
    parser.add_argument(
        "--out",
        default=default,
        required=default is None,
        help=help or "results folder (resumed if its config matches)",
    )


def add_seed(parser: argparse.ArgumentParser, help: str, default: int = 0) -> None:
    """`--seed`: an int >= 0."""
    parser.add_argument("--seed", type=nonnegative_int, default=default, help=help)


CNN_CKPT = "results/checkpoints/cnn_fashion_mnist"  # the base CNN's folder, shared by the CNN studies


# ----------------------------------------------------------------------------- config dataclasses
def field(
    default: Any,
    help: str,
    *,
    type: Callable[[str], Any] | None = None,
    nargs: str | None = None,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
) -> Any:
    """A config field that is also a command-line option (`--name-with-dashes` unless `flag` names it).

    Args:
        default: the value when the flag is not given (lists are copied per instance).
        help: the option's help line.
        type: the argparse `type=` (one of this module's checks for numbers).
        nargs: argparse `nargs=` ("+", "*") for list options.
        choices: the allowed values.
        flag: the flag, when not derived from the field name.

    Returns:
        A dataclasses.field carrying the option's metadata.
    """
    meta = {"help": help, "type": type, "nargs": nargs, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=default.copy, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def out(default: str) -> Any:
    """The `--out` field: the results folder (resumed if its config matches)."""
    return field(default, "results folder (resumed if its config matches)")


def seed(help: str) -> Any:
    """The `--seed` field: an int >= 0."""
    return field(0, help, type=nonnegative_int)


def switch(help: str) -> Any:
    """A boolean field, False unless its flag is given (`store_true`)."""
    return field(False, help)


def add_config(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argparse option per field of the dataclass `config_cls` (bool fields: store_true flags)."""
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta.get("help"))
            continue
        kwargs = {k: meta[k] for k in ("type", "nargs", "choices") if meta.get(k) is not None}
        parser.add_argument(flag, dest=f.name, default=default, help=meta.get("help"), **kwargs)


def config_of(config_cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `config_cls` filled from parsed arguments (extra attributes of `args` ignored)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def as_json(config: Any) -> dict:
    """The config as a JSON-ready dict (what a study writes to config.json and resumes against)."""
    return dataclasses.asdict(config)
