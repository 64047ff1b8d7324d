"""The `jaxeif` command: one subcommand per experiment/benchmark, imported lazily.

User errors print one line `error: ...` and exit 2 (JAXEIF_DEBUG=1 shows the traceback);
Ctrl-C exits 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

from jaxeif import compile_cache
from jaxeif.checks import NonFiniteInfluenceError
from jaxeif.errors import Error

# subcommand -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> dict.
COMMANDS: dict[str, tuple[str, str]] = {
    "cnn": ("jaxeif.experiments.cnn_noise", "EIF of a Fashion-MNIST CNN fine-tuned on clean and noisy MNIST digits"),
    "llm": ("jaxeif.experiments.llm_logic", "EIF of a language model on synthetic logic facts"),
    "llm-peft": (
        "jaxeif.experiments.llm_peft",
        "does LoRA (ranks 4, 16, 64) change the language-model EIF? beside dense SGD",
    ),
    "llm-linear": (
        "jaxeif.experiments.llm_linear",
        "where one SGD step stops being linear: eif_linearized vs the exact EIF over lr",
    ),
    "meta-cnn": ("jaxeif.experiments.meta_cnn_noise", "learn an lr predictor for the CNN noise study"),
    "meta-cnn-transfer": (
        "jaxeif.experiments.meta_cnn_transfer",
        "does the meta-cnn lr predictor down-weight noise it never saw (salt-and-pepper, blur)?",
    ),
    "meta-cnn-toward": (
        "jaxeif.experiments.meta_cnn_toward",
        "per-sample lrs toward a hand-drawn influence target (meta.toward) on the CNN",
    ),
    "meta-llm": ("jaxeif.experiments.meta_llm_logic", "learn per-layer lr multipliers for the LLM logic study"),
    "store": ("jaxeif.store.command", "an influence store: `status PATH` (complete, missing, damaged) or `plan`"),
    "bench-cnn": ("jaxeif.benchmarks.cnn", "CNN EIF speed: jaxeif vs a PyTorch loop"),
    "bench-lm": ("jaxeif.benchmarks.lm", "language-model EIF speed: jaxeif vs a PyTorch loop"),
    "bench-lm-device": (
        "jaxeif.benchmarks.lm_device",
        "the logic study's five domains on a random Phi-3-mini-shaped decoder (one GPU; --sizes tiny on CPU)",
    ),
    "bench-lm-memory": (
        "jaxeif.benchmarks.lm_memory",
        "lm.memory_estimate against measured peak memory of each LM EIF path (CPU)",
    ),
    "bench-lm-bf16": (
        "jaxeif.benchmarks.lm_bf16",
        "error of the bfloat16-weight LM EIF against float32 (SmolLM2, five domains)",
    ),
    "bench-meta-memory": (
        "jaxeif.benchmarks.meta_memory",
        "memory of a meta-gradient through eif, before/after rematerialisation",
    ),
    "export-data": ("jaxeif.benchmarks.export_data", "write Fashion-MNIST to an .npz for a machine without TensorFlow"),
    "export-tokenizer": (
        "jaxeif.benchmarks.export_tokenizer",
        "write the default tokenizer's files for `bench-lm-device`",
    ),
}

# Exceptions that mean "the input was wrong", shown as one line. KeyError is left out on
# purpose: its message is a bare key, so it usually marks a bug, not a user mistake.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, NonFiniteInfluenceError)

RESUME_HINT = "interrupted; finished work is saved in the results folder: run the same command again to resume"


class UsageError(Error, ValueError):
    """Bad command line (unknown subcommand, bad option)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _top_parser() -> _Parser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    parser = _Parser(
        prog="jaxeif",
        description="Exact empirical influence functions in JAX.",
        epilog=f"commands:\n{listing}\n\nRun `jaxeif COMMAND --help` for a command's options. "
        "A stopped run resumes when the same command is run again.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def load_command(command: str) -> types.ModuleType:
    """Import the module behind a subcommand; a missing module or dependency is a UsageError."""
    module_name, _ = COMMANDS[command]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(
                f"`jaxeif {command}` needs the module {module_name}, which is not in this installation"
            ) from None
        raise UsageError(
            f"`jaxeif {command}` needs the Python package '{e.name}': install it (pip install {e.name})"
        ) from None


def module_parser(module: types.ModuleType, prog: str) -> _Parser:
    """A parser filled by the module's add_arguments(parser); description from its docstring."""
    doc = (module.__doc__ or "").strip()
    parser = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def _report(result: Any) -> None:
    """Print the scalar entries of a run's result dict, one per line."""
    if not isinstance(result, dict):
        return
    for key, value in result.items():
        if value is None or isinstance(value, (str, int, float, bool)):
            print(f"{key}: {value}")


def _error_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror or e}: {e.filename}"
    text = " ".join([text, *getattr(e, "__notes__", [])]).replace("\n", " ").strip()
    return text or type(e).__name__


def _guarded(fn, *args: Any) -> int:
    """Run fn(*args): 0 on success, 2 on a user error (one line), 130 on Ctrl-C."""
    debug = os.environ.get("JAXEIF_DEBUG", "") not in ("", "0")
    try:
        code = fn(*args)
        return 0 if code is None else int(code)
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{RESUME_HINT}", file=sys.stderr)
        return 130
    except (UsageError, *USER_ERRORS) as e:
        if debug:
            raise
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 2


def _run_module(module: types.ModuleType, argv: Sequence[str], prog: str) -> int:
    parser = module_parser(module, prog)
    args = parser.parse_args(list(argv))
    check_quick_caps(parser, args, list(argv), getattr(module, "QUICK_CAPS", {}))
    compile_cache.enable()  # on disk ($JAXEIF_COMPILE_CACHE, default ~/.cache/jaxeif/xla): a rerun skips compiling
    _report(module.run(args))
    return 0


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The `dest` names of the options given on the command line `argv` (not left at their defaults)."""
    unset = object()
    saved = {action: action.default for action in parser._actions}
    try:
        for action in saved:
            action.default = unset
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in saved.items():
            action.default = default
    return {name for name, value in vars(ns).items() if value is not unset}


def check_quick_caps(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str], caps: Mapping[str, int]
) -> None:
    """UsageError when `--quick` is given with an option above the value it caps it at (`caps`: dest name ->
    cap), which the smoke run would otherwise lower without a word; a value within the cap is used as given."""
    if not caps or not getattr(args, "quick", False):
        return
    clash = sorted(name for name in explicit_options(parser, argv) & set(caps) if getattr(args, name) > caps[name])
    if clash:
        given = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in clash)
        limits = ", ".join(f"--{name.replace('_', '-')} <= {caps[name]}" for name in clash)
        raise UsageError(
            f"--quick runs with {limits}, so {given} would be ignored; drop --quick for the full sizes, or give "
            f"values within those limits (see `{parser.prog} --help`)"
        )


def _main(argv: Sequence[str]) -> int:
    parser = _top_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    ns = parser.parse_args(list(argv))
    return _run_module(load_command(ns.command), ns.args, f"jaxeif {ns.command}")


def _headless() -> None:
    """Commands write figures to files: matplotlib's file backend unless the user chose one (MPLBACKEND)."""
    os.environ.setdefault("MPLBACKEND", "Agg")


def main(argv: Sequence[str] | None = None) -> int:
    """The `jaxeif` entry point; returns the exit code."""
    _headless()
    return _guarded(_main, sys.argv[1:] if argv is None else list(argv))


def experiment_main(module: types.ModuleType, argv: Sequence[str] | None = None) -> int:
    """`python -m jaxeif.experiments.X` entry: same options, errors and exit codes as `jaxeif X`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _headless()
    return _guarded(_run_module, module, argv, f"python -m {getattr(module.__spec__, 'name', None) or module.__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
