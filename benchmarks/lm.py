"""Language-model EIF speed: the exact paths of `lm.finetuned_eif` side by side (low-rank vs dense, ratio),
and a per-sample PyTorch/transformers loop.

Default: SmolLM2-135M (the packaged GGUF), the 12-sample `transitivity` domain, one dense SGD
step per sample. All contenders compute the same matrix; max |diff| against the low-rank path is printed.
`--random SHAPE`: a random-weight decoder of that shape (smollm2: SmolLM2-135M's; tiny: for tests) on
`--n` random samples of 12-27 tokens; no checkpoint, tokenizer, torch or TensorFlow, so it runs on a
GPU machine as is and measures the device side of `lm.dispatch`'s rule. `--json FILE` writes every number.
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

from jaxeif import io, lm
from jaxeif.benchmarks import common
from jaxeif.data import domains
from jaxeif.experiments import options
from jaxeif.lm import dispatch
from jaxeif.models import loading, phi3, tokenizer

SHAPES = {
    "smollm2": phi3.Phi3Config(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        model_type="llama",
    ),
    "tiny": phi3.Phi3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        model_type="llama",
    ),
}
LOWRANK, DENSE = "low-rank (path='lowrank')", "dense (path='dense')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: packaged SmolLM2-135M)")
    parser.add_argument(
        "--random",
        default=None,
        choices=sorted(SHAPES),
        help="a random decoder of this shape on --n random samples (no checkpoint, torch or TensorFlow)",
    )
    parser.add_argument("--domain", default="transitivity", help=f"one of {', '.join(domains.DOMAINS)}")
    parser.add_argument("--n", type=int, default=0, help="use the first n samples (0: all; with --random: 64)")
    parser.add_argument("--lr", type=float, default=1e-4)
    options.add_seed(parser, "seed of the drawn entity names")
    parser.add_argument("--chunk-size", type=options.chunk_size, default="auto", help="fine-tunes per step, or auto")
    parser.add_argument("--precision", default="highest", type=options.precision, help="a jaxeif.precision name")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--no-dense", action="store_true", help="skip jaxeif's dense path")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", default=None, help="write every number to this file")


def random_tokens(n: int, vocab: int, seed: int) -> lm.Tokens:
    """n random samples of 12-27 tokens, right-padded to 32 (every token but the first scored)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 28, size=n)
    ids = rng.integers(0, vocab, size=(n, 32)).astype(np.int32)
    att = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
    score = att.astype(np.float32)
    score[:, 0] = 0
    return lm.Tokens(ids * att, att, score)


def _model(args: argparse.Namespace):
    """(apply_fn, params, config, toks, description) of --random or --model."""
    if args.random:
        config = SHAPES[args.random]
        params = phi3.init_params(jax.random.key(args.seed), config)
        toks = random_tokens(args.n or 64, config.vocab_size, args.seed)
        return loading.jitted_apply_fn(config), params, config, toks, f"random decoder, {args.random} shape"
    samples = domains.draw(args.domain, args.seed)
    samples = samples[: args.n] if args.n else samples
    apply_fn, params, config = loading.from_pretrained(args.model)
    tok = tokenizer.load_tokenizer(args.model)
    toks = lm.tokenize(tok, [s.text for s in samples], config=config, pad_multiple=16)
    return (
        apply_fn,
        params,
        config,
        toks,
        f"{args.model or 'SmolLM2-135M (GGUF Q4_1 dequantised, f32)'}, domain {args.domain}",
    )


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
    apply_fn, params, config, toks, what = _model(args)
    n, t = np.asarray(toks.ids).shape
    pairs = n * n
    one = jax.tree.map(lambda a: jnp.asarray(a)[0], toks)
    pair_flops = common.compiled_flops(lm.NLL(apply_fn), params, one)
    matmul = common.matmul_gflops(args.matmul_size)
    path = lambda p: (
        lambda: lm.finetuned_eif(
            apply_fn,
            params,
            toks,
            lr=args.lr,
            path=p,
            chunk_size=args.chunk_size,  # noqa: E731
            precision=options.precision_of(args.precision),
            config=config,
        )
    )
    contenders = [(LOWRANK, path("lowrank"))]
    if not args.no_dense:
        contenders.append((DENSE, path("dense")))
    if not args.no_torch and not args.random:
        import torch  # optional and slow: only the PyTorch contender needs it
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        source = loading.default_gguf_path() if args.model is None else args.model
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(os.path.dirname(source)), gguf_file=os.path.basename(source), dtype=torch.float32
        ).eval()
        contenders.append(("PyTorch loop (transformers, deepcopy, SGD step)", lambda: torch_loop(model, toks, args.lr)))
    rates, matrices, first_call = {}, {}, {}
    for name, fn in contenders:
        if "PyTorch" in name:  # no compilation to exclude: time one pass
            start = time.perf_counter()
            matrices[name] = np.asarray(fn())
            seconds = time.perf_counter() - start
        else:
            start = time.perf_counter()
            matrices[name] = np.asarray(fn())
            first_call[name] = time.perf_counter() - start
            seconds = common.timed(fn, warmup=False)
        rates[name] = pairs / seconds
    ref = matrices[LOWRANK]
    torch_rate = rates.get(contenders[-1][0]) if "PyTorch" in contenders[-1][0] else None
    dense_rate = rates.get(DENSE)
    diffs = {name: float(np.abs(m - ref).max()) for name, m in matrices.items()}
    rows = [
        [
            name,
            rate,
            rate / torch_rate if torch_rate else "-",
            rate / dense_rate if dense_rate else "-",
            first_call.get(name, "-"),
            pair_flops * rate / 1e9,
            pair_flops * rate / 1e9 / matmul,
            f"{diffs[name]:.1e}",
        ]
        for name, rate in rates.items()
    ]
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    chosen = dispatch.choose_path(
        "auto", optimizer=None, steps=1, backend=jax.default_backend(), longest=int(toks.lengths.max()), config=config
    )
    print(
        f"LM EIF benchmark, {datetime.date.today().isoformat()}, {common.machine()}, {os.cpu_count()} CPU cores, "
        f"{device}; {what}: n=m={n}, {t} tokens, 1 SGD step lr={args.lr}, chunk_size={args.chunk_size}, "
        f"precision={args.precision}; {pair_flops / 1e9:.2f} GFLOP per forward (XLA count; pair rate x this, "
        f"gradients not counted); matmul {args.matmul_size}^2: {matmul:.1f} GFLOP/s"
    )
    print(
        common.table(
            [
                "contender",
                "pairs/s",
                "x PyTorch loop",
                "x dense",
                "first call s",
                "GFLOP/s",
                "of matmul",
                "max |diff| vs low-rank",
            ],
            rows,
        )
    )
    ratio = rates[LOWRANK] / dense_rate if dense_rate else None
    if ratio is not None:
        print(f"low-rank / dense = {ratio:.2f}; path='auto' here picks {chosen!r}")
    print(f"peak RSS of this process: {common.peak_rss_mb():.0f} MB")
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": common.machine(),
        "device": device,
        "model": what,
        "n": int(n),
        "tokens": int(t),
        "lr": args.lr,
        "chunk_size": args.chunk_size,
        "precision": args.precision,
        "pairs_per_s": rates,
        "first_call_s": first_call,
        "lowrank_over_dense": ratio,
        "auto_picks": chosen,
        "max_abs_diff_vs_lowrank": diffs,
        "matmul_gflops": matmul,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    if args.json:
        io.save_json(args.json, out)
    return out


if __name__ == "__main__":
    from jaxeif import cli

    raise SystemExit(cli.experiment_main(sys.modules[__name__]))
