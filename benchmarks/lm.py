"""Language-model EIF speed: jaxeif low-rank vs jaxeif dense vs a per-sample PyTorch/transformers loop.

Default: SmolLM2-135M (the packaged GGUF), the 12-sample `transitivity` domain, one dense SGD
step per sample. All three compute the same matrix; max |diff| against the low-rank path is printed.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxeif import cli, lm
from jaxeif.data import domains
from jaxeif.models import loading, tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: packaged SmolLM2-135M)")
    parser.add_argument("--domain", default="transitivity", help=f"one of {', '.join(domains.DOMAINS)}")
    parser.add_argument("--n", type=int, default=0, help="use the first n samples (0: all)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--no-dense", action="store_true", help="skip jaxeif's dense path")
    parser.add_argument("--matmul-size", type=int, default=2048)


def torch_loop(model, toks: lm.Tokens, lr: float) -> np.ndarray:
    """Per sample: deepcopy, one SGD step on its length-normalised NLL, NLL of every sample."""
    import torch

    ids, att, score = (torch.from_numpy(np.array(a)) for a in toks)
    ids, att = ids.long(), att.long()

    def nll(m, rows):
        logp = torch.log_softmax(m(input_ids=ids[rows], attention_mask=att[rows]).logits[:, :-1].float(), -1)
        tok = torch.gather(logp, -1, ids[rows, 1:, None])[..., 0]
        w = score[rows, 1:]
        return -(w * tok).sum(-1) / w.sum(-1)

    everything = torch.arange(ids.shape[0])
    with torch.no_grad():
        base = nll(model, everything)
    rows = []
    for i in range(ids.shape[0]):
        tuned = copy.deepcopy(model)
        opt = torch.optim.SGD(tuned.parameters(), lr=lr)
        opt.zero_grad()
        nll(tuned, torch.tensor([i])).sum().backward()
        opt.step()
        with torch.no_grad():
            rows.append(nll(tuned, everything) - base)
        del tuned, opt
    return torch.stack(rows).numpy()


def run(args: argparse.Namespace) -> dict:
    samples = domains.draw(args.domain, args.seed)
    samples = samples[: args.n] if args.n else samples
    apply_fn, params, config = loading.from_pretrained(args.model)
    tok = tokenizer.load_tokenizer(args.model)
    toks = lm.tokenize(tok, [s.text for s in samples], config=config, pad_multiple=16)
    n, t = np.asarray(toks.ids).shape
    pairs = n * n
    one = jax.tree.map(lambda a: jnp.asarray(a)[0], toks)
    pair_flops = common.compiled_flops(lm.NLL(apply_fn), params, one)
    matmul = common.matmul_gflops(args.matmul_size)

    contenders = [("jaxeif low-rank single-step SGD (lm.lowrank_sgd_eif)",
                   lambda: lm.lowrank_sgd_eif(apply_fn, params, toks, lr=args.lr, config=config))]
    if not args.no_dense:
        contenders.append(("jaxeif dense (lm.finetuned_eif, chunk_size=1)",
                           lambda: lm.finetuned_eif(apply_fn, params, toks, lr=args.lr, chunk_size=1)))
    if not args.no_torch:
        import torch
        import transformers
        torch.set_num_threads(os.cpu_count() or 1)
        path = loading.default_gguf_path() if args.model is None else args.model
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(os.path.dirname(path)), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        contenders.append(("PyTorch loop (transformers, deepcopy, SGD step)", lambda: torch_loop(model, toks, args.lr)))
    rates, matrices = {}, {}
    for name, fn in contenders:
        if "PyTorch" in name:  # no compilation to exclude: time one pass
            start = time.perf_counter(); matrices[name] = np.asarray(fn()); seconds = time.perf_counter() - start
        else:
            seconds = common.timed(fn)
            matrices[name] = np.asarray(fn())
        rates[name] = pairs / seconds
    ref = matrices[contenders[0][0]]
    torch_rate = rates.get(contenders[-1][0]) if not args.no_torch else None
    dense_rate = rates.get("jaxeif dense (lm.finetuned_eif, chunk_size=1)")
    rows = [[name, rate, rate / torch_rate if torch_rate else "-", rate / dense_rate if dense_rate else "-",
             pair_flops * rate / 1e9, pair_flops * rate / 1e9 / matmul, f"{np.abs(matrices[name] - ref).max():.1e}"]
            for name, rate in rates.items()]
    print(f"LM EIF benchmark, {datetime.date.today().isoformat()}, {common.machine()}, {os.cpu_count()} CPU cores; "
          f"{args.model or 'SmolLM2-135M (GGUF Q4_1 dequantised, f32)'}, domain {args.domain}: n=m={n}, {t} tokens, "
          f"1 SGD step lr={args.lr}; {pair_flops / 1e9:.2f} GFLOP per forward (XLA count; pair rate x this, "
          f"gradients not counted); matmul {args.matmul_size}^2: {matmul:.1f} GFLOP/s")
    print(common.table(["contender", "pairs/s", "x PyTorch loop", "x jaxeif dense", "GFLOP/s", "of matmul",
                        "max |diff| vs low-rank"], rows))
    print(f"peak RSS of this process: {common.peak_rss_mb():.0f} MB")
    return {"pairs_per_s": rates, "matmul_gflops": matmul, "peak_rss_mb": common.peak_rss_mb()}


if __name__ == "__main__":
    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
