"""experiments/options.py: one config dataclass gives a study its flags and its config.json; shared checks."""

import argparse
import dataclasses

import pytest

import jaxeif
from jaxeif.experiments import options


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = options.out("results/toy")
    seed: int = options.seed("seed of the toy data")
    lrs: list = options.field([1e-3, 1e-2], "learning rates", type=options.positive_float, nargs="+")
    chunk_size: object = options.field("auto", "fine-tunes per step", type=options.chunk_size)
    precision: str = options.field("difference", "arithmetic", type=options.precision)
    quick: bool = options.switch("a smoke run")


def parse(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    options.add_config(parser, Config)
    return options.config_of(Config, parser.parse_args(list(argv)))


def test_a_config_dataclass_gives_the_flags_and_the_config_json():
    assert parse() == Config()
    got = parse("--out", "r", "--seed", "3", "--lrs", "0.5", "0.25", "--chunk-size", "4", "--quick")
    assert got == Config(out="r", seed=3, lrs=[0.5, 0.25], chunk_size=4, quick=True)
    assert options.as_json(got) == {
        "out": "r",
        "seed": 3,
        "lrs": [0.5, 0.25],
        "chunk_size": 4,
        "precision": "difference",
        "quick": True,
    }
    assert Config().lrs is not Config().lrs  # list defaults are not shared between configs
    assert options.precision_of(got.precision) == jaxeif.Precision(difference=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed", "-1"],
        ["--lrs", "0"],
        ["--lrs", "nan"],
        ["--chunk-size", "0"],
        ["--precision", "fp8"],
        ["--seed", "x"],
    ],
)
def test_bad_values_stop_at_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert argv[0] in capsys.readouterr().err


def test_shared_flags():
    parser = argparse.ArgumentParser()
    options.add_out(parser, None, "where to write")
    options.add_seed(parser, "seed")
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --out is required without a default
    assert vars(parser.parse_args(["--out", "x"])) == {"out": "x", "seed": 0}


def test_quick_cnn_runs_never_share_the_full_runs_base_cnn():
    """`make demo` then `jaxeif cnn --quick` (what CI does): the quick run trains its own base CNN in
    `<default>_quick` instead of meeting the full run's checkpoint, whose training config differs."""
    from jaxeif.experiments import cnn_noise, meta_cnn_noise, meta_cnn_toward

    for study in (cnn_noise, meta_cnn_noise, meta_cnn_toward):
        full = study._resolved(study.Config())
        quick = study._resolved(study.Config(quick=True))
        assert full.ckpt == options.CNN_CKPT and quick.ckpt == options.CNN_CKPT + "_quick", study.__name__
        given = study._resolved(study.Config(quick=True, ckpt="mine"))
        assert given.ckpt == "mine"
