"""The logic study's five domains on a RANDOM-weight decoder of Phi-3-mini's shape, on one accelerator.

Needs jax, flax, optax, tokenizers and the tokenizer files of `jaxeif export-tokenizer` (no GGUF
weights, no `gguf`, no TensorFlow). Phi-3-mini: 32 layers, hidden 3,072, intermediate 8,192, 32/32
heads, vocabulary 32,064, untied, 3.8B params, stored in bfloat16 (--dtype) and computing in float32
(--compute-dtype; jaxeif.models.upcast widens them inside each call). The only tokenizer offline is SmolLM2's
(49,152 ids), so its ids are folded into
the model's vocabulary (id % 32,064): the texts' token counts are real, their meaning to a random
model is irrelevant. For each domain (one repeat, seed 0) and path (prompted, exact low-rank SGD,
dense SGD fine-tuned; one SGD step at --lr) it prints the seconds (first call, compiling included;
--warm also times a second call), pairs/s, lm.memory_estimate and the device's peak memory
(`memory_stats()`, cumulative: paths run in that order so each peak adds its own path), and writes
every number to --json after each step. --budget-s stops starting new steps once spent;
--sizes tiny runs a tiny decoder of the same layout on CPU (the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jaxeif import chunking, io, lm
from jaxeif.benchmarks import common
from jaxeif.data import domains
from jaxeif.experiments import options
from jaxeif.lm import memory
from jaxeif.models import phi3, upcast

PHI3_MINI = phi3.Phi3Config(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=96,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    sliding_window=2047,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=32000,
)
SIZES = {
    "phi3-mini": PHI3_MINI,
    "tiny": dataclasses.replace(
        PHI3_MINI,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
    ),
}
PATHS = ("prompted", "lowrank", "dense")  # this order: the cumulative peak memory grows path by path
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="folder from `jaxeif export-tokenizer` (tokenizer.json)")
    parser.add_argument(
        "--sizes",
        choices=("auto", *SIZES),
        default="auto",
        help="phi3-mini (3.8B) or tiny (CPU tests); auto: phi3-mini on an accelerator, tiny on CPU",
    )
    parser.add_argument("--stages", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument(
        "--domains", nargs="+", default=list(domains.DOMAINS), help=f"any of {', '.join(domains.DOMAINS)}"
    )
    parser.add_argument(
        "--budget-s",
        type=options.positive_float,
        default=420.0,
        help="overall seconds: no new step starts after this (a running one finishes)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="the params' dtype")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default="float32", help="activations' dtype")
    parser.add_argument("--lr", type=options.positive_float, default=1e-4, help="SGD learning rate")
    parser.add_argument("--chunk-size", type=options.positive_int, default=1, help="dense: fine-tunes at once")
    parser.add_argument(
        "--lowrank-chunk-size",
        type=options.chunk_size,
        default="auto",
        help="low-rank: fine-tunes at once (auto: as many as fit on an accelerator, one on CPU)",
    )
    parser.add_argument("--warm", action="store_true", help="time a second (compiled) call of every step too")
    options.add_seed(parser, "entity names and random weights")
    parser.add_argument("--json", default=None, help="write every number here (after each step)")


class FoldedTokenizer:
    """A tokenizer whose ids are folded into a smaller vocabulary (id % vocab), for `lm.tokenize` and
    `lm.prompted_eif`: lets SmolLM2's tokenizer feed a decoder with Phi-3's 32,064 ids."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab: int, bos_token_id: int | None, pad_token_id: int | None):
        self.tokenizer, self.vocab = tokenizer, int(vocab)
        self.bos_token_id = None if bos_token_id is None else bos_token_id % self.vocab
        self.pad_token_id = None if pad_token_id is None else pad_token_id % self.vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [i % self.vocab for i in self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids]

    def __len__(self) -> int:
        return self.vocab


def load_folded(folder: str, vocab: int) -> FoldedTokenizer:
    """The tokenizer in `folder` (tokenizer.json, and tokenizer_config.json for BOS/pad), folded into `vocab` ids."""
    path = pathlib.Path(folder)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; write one with `jaxeif export-tokenizer --out {path}`")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    special = (
        json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    )
    ids = {
        k: tok.token_to_id(special[k]) if isinstance(special.get(k), str) else None for k in ("bos_token", "pad_token")
    }
    return FoldedTokenizer(tok, vocab, ids["bos_token"], ids["pad_token"])


def make_apply_fn(config, dtype: str, compute_dtype: str):
    """The decoder computing in `compute_dtype` on params of `dtype` (widened inside each call when narrower)."""
    if DTYPES[dtype] == DTYPES[compute_dtype]:
        return phi3.make_apply_fn(config, DTYPES[dtype])
    if np.dtype(DTYPES[compute_dtype]).itemsize < np.dtype(DTYPES[dtype]).itemsize:
        raise ValueError(
            f"--compute-dtype {compute_dtype} is narrower than --dtype {dtype}; store the params in {compute_dtype}"
        )
    return upcast.upcast_apply_fn(phi3.make_apply_fn(config, DTYPES[compute_dtype]), DTYPES[compute_dtype])


def peak_device_bytes() -> int | None:
    """The device allocator's peak bytes in use since the process started (None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _versions() -> dict:
    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
    }
    for name in ("jaxlib", "flax", "optax", "tokenizers"):
        out[name] = getattr(__import__(name), "__version__", None)
    return out


def _step(path: str, apply_fn, params, config, tok, texts: list[str], toks: lm.Tokens, base, args) -> np.ndarray:
    if path == "prompted":
        return lm.prompted_eif(apply_fn, params, tok, config, texts, base=base)
    if path == "lowrank":
        return np.asarray(
            lm.lowrank_sgd_eif(
                apply_fn, params, toks, config=config, lr=args.lr, base=base, chunk_size=args.lowrank_chunk_size
            )
        )
    return np.asarray(
        lm.finetuned_eif(apply_fn, params, toks, lr=args.lr, chunk_size=args.chunk_size, path="dense", config=config)
    )


def _estimate(path: str, config, toks: lm.Tokens, args) -> int:
    n, t = np.asarray(toks.ids).shape
    options = dict(dtype=DTYPES[args.dtype], compute_dtype=DTYPES[args.compute_dtype])
    if path == "dense":
        options.update(tokens=t, chunk_size=args.chunk_size)
    if path == "lowrank":  # "auto" chunks are chosen inside lowrank_sgd_eif: the estimate is for one at a time
        c = args.lowrank_chunk_size
        options.update(rank=int(lm_rank(toks)), chunk_size=1 if c == "auto" else c)
    return lm.check_memory(config, n, n, path=path, **options)


def lm_rank(toks: lm.Tokens, bucket: int = 32) -> int:
    """The largest fine-tune rank of the low-rank path: the longest sample, rounded up to the rank bucket."""
    return -(-int(toks.lengths.max()) // bucket) * bucket


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    size = args.sizes if args.sizes != "auto" else ("phi3-mini" if jax.default_backend() != "cpu" else "tiny")
    config = SIZES[size]
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(PATHS) or not stages:
        raise ValueError(f"--stages: unknown {sorted(set(stages) - set(PATHS))}; choose from {','.join(PATHS)}")
    for name in args.domains:
        domains.domain(name)
    tok = load_folded(args.tokenizer, config.vocab_size)
    report = {
        "versions": _versions(),
        "size": size,
        "config": dataclasses.asdict(config),
        "dtype": args.dtype,
        "compute_dtype": args.compute_dtype,
        "lr": args.lr,
        "budget_s": args.budget_s,
        "free_device_bytes": chunking.free_bytes(),
        "token_ids": f"SmolLM2 tokenizer ids % {config.vocab_size}",
        "steps": [],
    }

    def save():
        if args.json:
            io.save_json(args.json, report)

    print(
        f"bench-lm-device: {size} on {report['versions']['device']} ({report['versions']['backend']}), "
        f"{memory.param_count(config) / 1e9:.2f}B params, {args.dtype} weights, {args.compute_dtype} compute",
        flush=True,
    )
    params = jax.block_until_ready(phi3.init_params(jax.random.key(args.seed), config, DTYPES[args.dtype]))
    apply_fn = jax.jit(make_apply_fn(config, args.dtype, args.compute_dtype))
    report["init_s"], report["peak_after_init_bytes"] = time.perf_counter() - t0, peak_device_bytes()
    print(
        f"[{time.perf_counter() - t0:6.1f} s] random params ready, peak {_gib(report['peak_after_init_bytes'])}",
        flush=True,
    )
    data, lowrank = {}, {}
    for name in args.domains:
        texts = [s.text for s in domains.draw(name, args.seed)]
        toks = lm.tokenize(tok, texts, config=config, pad_multiple=16)
        start = time.perf_counter()
        base = lm.nll(apply_fn, params, toks)
        data[name] = (texts, toks, base)
        report["steps"].append({"path": "base", "domain": name, "seconds": time.perf_counter() - start})
    save()
    for path in stages:
        for name in args.domains:
            texts, toks, base = data[name]
            n = len(texts)
            row = {
                "path": path,
                "domain": name,
                "n": n,
                "m": n,
                "pairs": n * n,
                "tokens": int(np.asarray(toks.ids).shape[1]),
            }
            if time.perf_counter() - t0 > args.budget_s:
                row["skipped"] = f"over the --budget-s of {args.budget_s:.0f} s"
            else:
                try:
                    row["estimate_bytes"] = _estimate(path, config, toks, args)
                except chunking.MemoryBudgetError as e:  # refused before running: a result, recorded
                    row["refused"] = str(e)
                else:
                    start = time.perf_counter()
                    M = _step(path, apply_fn, params, config, tok, texts, toks, base, args)
                    row["seconds"] = time.perf_counter() - start
                    if args.warm:
                        start = time.perf_counter()
                        M = _step(path, apply_fn, params, config, tok, texts, toks, base, args)
                        row["warm_seconds"] = time.perf_counter() - start
                    row.update(
                        finite=bool(np.isfinite(M).all()),
                        max_abs=float(np.abs(M).max()),
                        peak_device_bytes=peak_device_bytes(),
                    )
                    if path == "lowrank":
                        lowrank[name] = M
                    elif path == "dense" and name in lowrank:  # the same exact EIF, up to the params' rounding
                        row["max_abs_diff_vs_lowrank"] = float(np.abs(M - lowrank[name]).max())
            report["steps"].append(row)
            print(f"[{time.perf_counter() - t0:6.1f} s] {_line(row)}", flush=True)
            save()
    report["total_s"], report["peak_rss_mb"] = time.perf_counter() - t0, common.peak_rss_mb()
    report["summary"] = summarise(report["steps"])
    save()
    print(table(report))
    return {"total_s": round(report["total_s"], 1), "json": args.json}


def _gib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _line(row: dict) -> str:
    head = f"{row['path']:8s} {row['domain']:14s} n=m={row['n']:2d}, {row['tokens']} tokens:"
    if "seconds" not in row:
        return f"{head} {row.get('skipped') or row.get('refused')}"
    warm = f", warm {row['warm_seconds']:.2f} s" if "warm_seconds" in row else ""
    return (
        f"{head} {row['seconds']:.2f} s{warm}, estimate {_gib(row['estimate_bytes'])}, "
        f"peak so far {_gib(row['peak_device_bytes'])}, finite {row['finite']}"
    )


def summarise(steps: list[dict]) -> dict:
    """Seconds per domain (all paths, base included) and per path: pairs, seconds, pairs/s (first and warm calls)."""
    done = [s for s in steps if "seconds" in s]
    per_domain: dict = {}
    for s in done:
        per_domain[s["domain"]] = per_domain.get(s["domain"], 0.0) + s["seconds"]
    per_path = {}
    for path in PATHS:
        rows = [s for s in done if s["path"] == path]
        if rows:
            pairs, sec = sum(s["pairs"] for s in rows), sum(s["seconds"] for s in rows)
            entry = {
                "domains": len(rows),
                "pairs": pairs,
                "seconds": sec,
                "pairs_per_s": pairs / sec,
                "peak_device_bytes": rows[-1]["peak_device_bytes"],
                "estimate_bytes": max(s["estimate_bytes"] for s in rows),
            }
            if all("warm_seconds" in s for s in rows):
                entry["warm_pairs_per_s"] = pairs / sum(s["warm_seconds"] for s in rows)
            per_path[path] = entry
    return {
        "seconds_per_domain": per_domain,
        "paths": per_path,
        "not_run": [f"{s['path']}/{s['domain']}" for s in steps if s["path"] != "base" and "seconds" not in s],
    }


def table(report: dict) -> str:
    s = report["summary"]
    rows = [[f"domain {d}", f"{sec:.1f} s (all paths)"] for d, sec in s["seconds_per_domain"].items()]
    for path, p in s["paths"].items():
        warm = f", warm {p['warm_pairs_per_s']:,.1f} pairs/s" if "warm_pairs_per_s" in p else ""
        rows.append(
            [
                f"{path} ({p['domains']} domains)",
                f"{p['pairs_per_s']:,.1f} pairs/s incl. compiling{warm}; "
                f"estimate {_gib(p['estimate_bytes'])}, peak so far {_gib(p['peak_device_bytes'])}",
            ]
        )
    rows.append(["total", f"{report['total_s']:.1f} s; not run: {', '.join(s['not_run']) or 'none'}"])
    return common.table(["what", "measured"], rows)


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
