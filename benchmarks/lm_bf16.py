"""bfloat16 weights against float32: the error of the fine-tuned EIF of SmolLM2 (real weights) at the study's lr.

The reference is the float32 model's exact single-step SGD EIF (`lm.lowrank_sgd_eif`, equal to the
dense path to float32 rounding) on the five logic domains (seed 0). Each variant's matrix is compared
with it entry by entry; every number goes to --json. Variants:
  bf16-weights    params stored in bfloat16, the model computing in float32
                  (jaxeif.models.upcast.upcast_apply_fn: the params are widened inside each call);
  bf16-model      make_apply_fn(config, bfloat16): bfloat16 weights and activations, float32 logits
                  and loss (XLA accumulates bfloat16 matmuls in float32);
  f32-rounded     float32 model on the bfloat16-rounded weights: how much is the weights' rounding alone.
Each with the low-rank path and the dense path (`lm.finetuned_eif`, whose fine-tuned copy has the
params' dtype). A path that fails is recorded with its error, not hidden.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeif import io, lm, runs
from jaxeif.benchmarks import common
from jaxeif.data import domains
from jaxeif.experiments import options
from jaxeif.models import loading, phi3, tokenizer, upcast

PATHS = ("lowrank", "dense")
VARIANTS = ("bf16-model", "bf16-weights", "f32-rounded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="docs/lm_bf16_error.json", help="write every number here")
    parser.add_argument("--lr", type=options.positive_float, default=1e-4, help="SGD learning rate (the study's: 1e-4)")
    parser.add_argument(
        "--domains", nargs="+", default=list(domains.DOMAINS), help=f"any of {', '.join(domains.DOMAINS)}"
    )
    options.add_seed(parser, "entity names of domains.draw")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--reference",
        default="results/lm_bf16_reference.npz",
        help="the float32 matrices: read if there (same domains, seed, lr), else computed and written",
    )


def agreement(M: np.ndarray, ref: np.ndarray) -> dict:
    """Error of M against ref: max |diff| / max |ref|, median of |diff| / |ref| per entry, share of equal signs."""
    M, ref = np.asarray(M, np.float64), np.asarray(ref, np.float64)
    err = np.abs(M - ref)
    nonzero = ref != 0
    return {
        "max_rel_error": float(err.max() / np.abs(ref).max()),
        "median_rel_error": float(np.median(err[nonzero] / np.abs(ref[nonzero]))),
        "sign_agreement": float(np.mean(np.sign(M) == np.sign(ref))),
        "entries": int(ref.size),
        "max_abs_ref": float(np.abs(ref).max()),
    }


def eif(path: str, apply_fn, params, config, toks: lm.Tokens, lr: float) -> np.ndarray:
    if path == "lowrank":
        return np.asarray(lm.lowrank_sgd_eif(apply_fn, params, toks, config=config, lr=lr))
    return np.asarray(lm.finetuned_eif(apply_fn, params, toks, lr=lr, chunk_size=1, path="dense", config=config))


def reference(args, compute) -> dict:
    """The float32 matrices {domain: M}, from --reference when it holds this run's (domains, seed, lr)."""
    key = np.array(json.dumps([args.domains, args.seed, args.lr]))
    if os.path.isfile(args.reference):
        with np.load(args.reference, allow_pickle=False) as f:
            if str(f["key"]) == str(key):
                return {d: f[d] for d in args.domains}
    start = time.perf_counter()
    ref = compute()
    print(f"float32 reference: {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(os.path.dirname(args.reference) or ".", exist_ok=True)
    with io.atomic_file(args.reference) as fh:
        np.savez(fh, key=key, **ref)
    return ref


def run(args: argparse.Namespace) -> dict:
    apply32, p32, config = loading.from_pretrained(None)
    tok = tokenizer.load_tokenizer(None)
    toks = {
        d: lm.tokenize(tok, [s.text for s in domains.draw(d, args.seed)], config=config, pad_multiple=16)
        for d in args.domains
    }
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    variants = {
        "f32-rounded": (apply32, jax.tree.map(lambda x: x.astype(jnp.float32), p16)),
        "bf16-weights": (jax.jit(upcast.upcast_apply_fn(phi3.make_apply_fn(config))), p16),
        "bf16-model": (jax.jit(phi3.make_apply_fn(config, jnp.bfloat16)), p16),
    }
    logits_dtype = str(variants["bf16-model"][0](p16, jnp.asarray(toks[args.domains[0]].ids[:1])).dtype)
    report = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "lr": args.lr,
        "optimizer": "sgd, 1 step",
        "domains": {d: int(np.asarray(t.ids).shape[0]) for d, t in toks.items()},
        "bf16_model_logits_dtype": logits_dtype,
        "date": datetime.date.today().isoformat(),
        "machine": common.machine(),
        "metadata": runs.run_metadata(seed=args.seed),
        "reference": "float32 lowrank",
        "results": {},
    }
    ref = reference(args, lambda: {d: eif("lowrank", apply32, p32, config, t, args.lr) for d, t in toks.items()})
    for variant in args.variants:
        apply_fn, params = variants[variant]
        for path in args.paths:
            start = time.perf_counter()
            try:
                got = {d: eif(path, apply_fn, params, config, t, args.lr) for d, t in toks.items()}
            except Exception as e:  # a path that cannot run this dtype is a result, recorded
                row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            else:
                row = agreement(
                    np.concatenate([got[d].ravel() for d in toks]), np.concatenate([ref[d].ravel() for d in toks])
                )
                row["finite"] = bool(all(np.isfinite(m).all() for m in got.values()))
            row["seconds"] = time.perf_counter() - start
            report["results"][f"{variant}/{path}"] = row
            print(f"{variant:13s} {path:8s} {row}", flush=True)
            io.save_json(args.json, report)
    io.save_json(args.json, report)
    return {"json": args.json}


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
