"""Bad numbers on the study commands stop them before any work (nothing written); a tokenizer folder
without tokenizer files and a single unbatched example get errors that say what to do."""

import jax
import jax.numpy as jnp
import pytest

import jaxeif
from jaxeif import cli
from jaxeif.models import tokenizer

BAD_FLAGS = {
    "cnn": [
        ("--steps", "0", "must be >= 1"),
        ("--lr", "-1e-3", "must be > 0"),
        ("--plateau", "1.5", "in (0, 1]"),
        ("--epochs", "0", "must be >= 1"),
        ("--block-size", "-2", "must be >= 1"),
        ("--lr-grid", "nan", "finite"),
        ("--noise-stds", "-0.5", "must be > 0"),
        ("--per-digit", "0", "must be >= 1"),
    ],
    "llm": [
        ("--steps", "0", "must be >= 1"),
        ("--repeats", "0", "must be >= 1"),
        ("--lr", "0", "number > 0"),
        ("--lora-rank", "-1", "must be >= 0"),
        ("--chunk-size", "0", "must be >= 1"),
    ],
    "meta-cnn": [
        ("--meta-steps", "0", "must be >= 1"),
        ("--every", "0", "must be >= 1"),
        ("--meta-lr", "-1", "must be > 0"),
        ("--hidden", "0", "must be >= 1"),
        ("--keep-weight", "-1", "must be >= 0"),
        ("--steps", "0", "must be >= 1"),
    ],
    "meta-llm": [
        ("--draws", "0", "must be >= 1"),
        ("--meta-steps", "0", "must be >= 1"),
        ("--lr-grid", "0", "must be > 0"),
        ("--every", "0", "must be >= 1"),
        ("--seed", "-1", "must be >= 0"),
    ],
}


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_bad_numeric_flags_stop_before_any_work(command, tmp_path, capsys):
    for flag, value, expected in BAD_FLAGS[command]:
        out = tmp_path / f"{command}{flag}"
        assert cli.main([command, "--out", str(out), f"{flag}={value}"]) == 2, (command, flag)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert flag in err and expected in err, err
        assert not out.exists()  # no config.json written, no base model trained


def test_tokenizer_folder_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} has no tokenizer files.*tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)


def test_one_unbatched_example_says_add_a_leading_axis():
    params = {"w": jnp.ones((3, 2))}
    x, y = jnp.ones((3,)), jnp.zeros((2,))
    with pytest.raises(ValueError, match=r"single example, add a leading example axis"):
        jaxeif.eif(lambda p, ex: jnp.sum((ex[0] @ p["w"] - ex[1]) ** 2), params, (x, y), lr=0.1)
    jaxeif.eif(
        lambda p, ex: jnp.sum((ex[0] @ p["w"] - ex[1]) ** 2), params, jax.tree.map(lambda a: a[None], (x, y)), lr=0.1
    )
