"""Export the default model's tokenizer (SmolLM2-135M-Instruct, rebuilt from its GGUF) as tokenizer files.

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into --out (about 3.5 MB):
what `jaxeif bench-lm-device --tokenizer DIR` reads on an accelerator without the GGUF weights or the
`gguf` package (only the `tokenizers` library is needed there).
"""

from __future__ import annotations

import argparse
import sys

from jaxeif.experiments import options
from jaxeif.models import tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_out(parser, None, "the folder to write the tokenizer files into")


def run(args: argparse.Namespace) -> dict:
    tok = tokenizer.load_tokenizer(None)
    files = tok.save_pretrained(args.out)
    return {"out": args.out, "files": len(files), "vocabulary": len(tok)}


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
