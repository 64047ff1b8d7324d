"""EIF accuracy and cost: direct float32, propagated difference in float32 (jaxeif.difference), direct float64.

For each model (the project's CNN, a tanh/GELU MLP, a tiny random Llama through the Flax decoder) and
lr in {1e-6, 1e-4, 1e-2}: one SGD step on each of n samples, the loss change on the same n samples.
The truth is float64 on the same weights and the same (float32) fine-tune deltas. Reported: off-diagonal
sign agreement and median relative error against it, and the wall time of each method's EIF (fine-tunes,
one row at a time, plus the matrix of loss changes; compilation excluded), all measured in the same run.

    python -m jaxeif.benchmarks.difference [--n 64] [--models cnn,mlp,decoder] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif.benchmarks import common
from jaxeif.desiderata import agreement
from jaxeif.difference import loss_difference
from jaxeif.finetune import finetune_delta
from jaxeif.models import cnn, phi3

LRS = (1e-6, 1e-4, 1e-2)
MODELS = ("cnn", "mlp", "decoder")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model's per-example loss, its float32 params and n examples (leading axis)."""

    name: str
    loss_fn: Callable
    params: Any
    data: Any
    note: str


# ----------------------------------------------------------------------------- models
def _fashion_mnist(split: str, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first n (after `offset`) Fashion-MNIST images f32[n, 28, 28, 1] and labels, read from the local IDX."""
    from jaxeif.data.images import FASHION_MNIST_DIR, IDX_FILES

    def idx(key):
        with gzip.open(FASHION_MNIST_DIR / IDX_FILES[f"{split}_{key}"]) as f:
            raw = f.read()
        ndim = raw[3]
        shape = np.frombuffer(raw[4 : 4 + 4 * ndim], ">u4").astype(int)
        return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(shape)

    images, labels = idx("images"), idx("labels")
    sl = slice(offset, offset + n)
    return images[sl, :, :, None].astype(np.float32) / 255.0, labels[sl].astype(np.int32)


def _adam_train(loss_fn: Callable, params, data, steps: int, batch: int, lr: float = 1e-3, seed: int = 0):
    """A short Adam run on mini-batches of `data` (so that losses are small, as in a trained model)."""
    opt = optax.adam(lr)
    batch_loss = lambda p, b: jnp.mean(jax.vmap(loss_fn, (None, 0))(p, b))

    @jax.jit
    def step(p, s, b):
        g = jax.grad(batch_loss)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    n = jax.tree.leaves(data)[0].shape[0]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(n, batch, replace=False)
        params, state = step(params, state, jax.tree.map(lambda a: a[idx], data))
    return params


def cnn_problem(n: int, *, train_steps: int = 300, checkpoint: str | None = None, seed: int = 0) -> Problem:
    """The project's CNN on n Fashion-MNIST test images: the cached trained checkpoint if given, else a short
    Adam run on 8,192 Fashion-MNIST train images."""
    x, y = _fashion_mnist("test", n)
    data = (jnp.asarray(x), jnp.asarray(y))
    if checkpoint:
        params = cnn.load_or_train(checkpoint, progress=False)
        note = f"trained checkpoint {checkpoint}"
    else:
        tx, ty = _fashion_mnist("train", 8192)
        params = _adam_train(
            cnn.loss_fn,
            cnn.init_params(jax.random.key(seed)),
            (jnp.asarray(tx), jnp.asarray(ty)),
            train_steps,
            128,
            seed=seed,
        )
        note = f"{train_steps} Adam steps (batch 128) on 8,192 Fashion-MNIST train images"
    acc = cnn.accuracy(params, x, y)
    return Problem("cnn", cnn.loss_fn, params, data, f"{note}; accuracy on these {n} test images {acc:.1%}")


def mlp_init(key, sizes=(32, 64, 64, 10)) -> dict:
    """Params of the tanh/GELU MLP: {"w0", "b0", ...} with LeCun-normal weights."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        **{
            f"w{i}": jax.random.normal(k, (a, b)) / np.sqrt(a)
            for i, (k, a, b) in enumerate(zip(keys, sizes, sizes[1:]))
        },
        **{f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])},
    }


def mlp_loss(params: dict, example) -> jax.Array:
    """Cross-entropy of x -> tanh -> GELU (tanh form) -> logits, for ONE example (x f32[d], label int32[])."""
    x, y = example
    h = jnp.tanh(x @ params["w0"] + params["b0"])
    h = jax.nn.gelu(h @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def mlp_problem(n: int, *, train_steps: int = 300, seed: int = 0) -> Problem:
    """The MLP trained briefly on labels of a random teacher; n fresh examples."""
    kx, kt, kp, kf, kr = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (4096 + n, 32))
    teacher = jax.random.normal(kt, (32, 10))
    y = jnp.argmax(x @ teacher, axis=-1).astype(jnp.int32)
    flip = jax.random.bernoulli(kf, 0.2, y.shape)  # label noise: the model cannot become certain of every sample
    y = jnp.where(flip, jax.random.randint(kr, y.shape, 0, 10), y).astype(jnp.int32)
    params = _adam_train(mlp_loss, mlp_init(kp), (x[n:], y[n:]), train_steps, 128, lr=1e-3, seed=seed)
    return Problem(
        "mlp",
        mlp_loss,
        params,
        (x[:n], y[:n]),
        f"32-64-64-10 tanh/GELU, {train_steps} Adam steps on a random teacher with 20% label noise",
    )


DECODER = phi3.Phi3Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    model_type="llama",
    rms_norm_eps=1e-5,
)


@functools.cache
def _decoder_apply(config: phi3.Phi3Config):
    return phi3.make_apply_fn(config)


@dataclasses.dataclass(frozen=True)
class DecoderLoss:
    """Mean next-token NLL of ONE sequence (ids int32[t]) under the Flax decoder, in the params' dtype."""

    config: phi3.Phi3Config

    def __call__(self, params, ids):
        logits = _decoder_apply(self.config)(params, ids[None])[0]
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[1:, None], axis=-1))


def decoder_problem(n: int, *, length: int = 12, seed: int = 0, config: phi3.Phi3Config = DECODER) -> Problem:
    """A tiny random Llama (2 layers, GQA, tied embeddings; norm weights perturbed) on n random token sequences."""
    kp, kn, kd = jax.random.split(jax.random.key(seed), 3)
    params = phi3.init_params(kp, config)
    leaves, tree = jax.tree.flatten_with_path(params)
    keys = jax.random.split(kn, len(leaves))
    params = jax.tree.unflatten(
        tree,
        [
            v + 0.1 * jax.random.normal(k, v.shape) if "norm" in jax.tree_util.keystr(p) else v
            for (p, v), k in zip(leaves, keys)
        ],
    )
    ids = jax.random.randint(kd, (n, length), 0, config.vocab_size, jnp.int32)
    return Problem(
        "decoder",
        DecoderLoss(config),
        params,
        ids,
        f"random Llama: {config.num_hidden_layers} layers, d={config.hidden_size}, vocab {config.vocab_size}, "
        f"t={length}",
    )


# ----------------------------------------------------------------------------- the matrices
@functools.partial(jax.jit, static_argnames=("loss_fn",))
def deltas(loss_fn, params, train, lr):
    """One SGD step on each train example: the params deltas, stacked on a leading axis."""
    return jax.lax.map(lambda e: finetune_delta(loss_fn, params, e, lr=lr), train)  # one row at a time (fastest on CPU)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def direct_matrix(loss_fn, params, ds, evals):
    """M[i, j] = loss(params + ds[i], evals[j]) - loss(params, evals[j]), two losses and a subtraction."""
    base = jax.vmap(loss_fn, (None, 0))(params, evals)
    row = lambda d: jax.vmap(loss_fn, (None, 0))(jax.tree.map(jnp.add, params, d), evals) - base
    return jax.lax.map(row, ds)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def propagated_matrix(loss_fn, params, ds, evals):
    """The same matrix, each entry by jaxeif.difference.loss_difference."""
    row = lambda d: jax.vmap(lambda e: loss_difference(loss_fn, params, d, e))(evals)
    return jax.lax.map(row, ds)


def to_float64(tree):
    """Float leaves as float64 (call under jax.enable_x64(True))."""
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a, np.float64)) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.asarray(a),
        tree,
    )


def truth64(loss_fn, params, ds, evals) -> np.ndarray:
    """The direct matrix in float64 on the same weights and float32 deltas."""
    with jax.enable_x64(True):
        return np.asarray(direct_matrix(loss_fn, to_float64(params), to_float64(ds), to_float64(evals)))


# ----------------------------------------------------------------------------- the run
def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def evaluate(problem: Problem, lrs=LRS, repeats: int = 3) -> dict:
    """Accuracy of both float32 methods against float64 at each lr; the cost of each method's EIF.

    Cost = the fine-tunes (one per row, same for both float32 methods) + the matrix of loss changes,
    each the best of `repeats` timed calls after a warm-up (compilation excluded)."""
    f, p, data = problem.loss_fn, problem.params, problem.data
    out = {"note": problem.note, "n": int(jax.tree.leaves(data)[0].shape[0]), "lr": {}}
    for lr in lrs:
        ds = deltas(f, p, data, jnp.float32(lr))
        truth = truth64(f, p, ds, data)
        out["lr"][str(lr)] = {
            "direct_f32": agreement(direct_matrix(f, p, ds, data), truth),
            "propagated_f32": agreement(propagated_matrix(f, p, ds, data), truth),
            "median_abs_entry": float(np.median(np.abs(truth))),
        }
    lr = jnp.float32(lrs[len(lrs) // 2])
    ds = deltas(f, p, data, lr)
    finetune = _time(lambda: deltas(f, p, data, lr), repeats)
    matrix = {
        "direct_f32": _time(lambda: direct_matrix(f, p, ds, data), repeats),
        "propagated_f32": _time(lambda: propagated_matrix(f, p, ds, data), repeats),
    }
    with jax.enable_x64(True):
        p64, data64, lr64 = to_float64(p), to_float64(data), jnp.float64(lr)
        ds64 = deltas(f, p64, data64, lr64)
        finetune64 = _time(lambda: deltas(f, p64, data64, lr64), repeats)
        matrix["direct_f64"] = _time(lambda: direct_matrix(f, p64, ds64, data64), repeats)
    seconds = {k: v + (finetune64 if k.endswith("f64") else finetune) for k, v in matrix.items()}
    out.update(
        seconds=seconds,
        matrix_seconds=matrix,
        finetune_seconds={"f32": finetune, "f64": finetune64},
        ratio_to_direct_f32={k: v / seconds["direct_f32"] for k, v in seconds.items()},
        matrix_ratio_to_direct_f32={k: v / matrix["direct_f32"] for k, v in matrix.items()},
    )
    return out


def report(name: str, result: dict) -> str:
    """One markdown table per model: accuracy per lr, cost of each method."""
    rows = []
    for lr, r in result["lr"].items():
        d, q = r["direct_f32"], r["propagated_f32"]
        rows.append(
            [
                lr,
                f"{d['sign_agreement']:.2%}",
                f"{d['median_rel_error']:.2g}",
                f"{q['sign_agreement']:.2%}",
                f"{q['median_rel_error']:.2g}",
                f"{q['p99_rel_error']:.2g}",
            ]
        )
    acc = common.table(
        [
            "lr",
            "direct f32 signs",
            "direct f32 med. rel. err",
            "propagated f32 signs",
            "propagated med. rel. err",
            "propagated p99 rel. err",
        ],
        rows,
    )
    keys = ("direct_f32", "propagated_f32", "direct_f64")
    cost = common.table(
        ["", "direct f32", "propagated f32", "direct f64"],
        [
            ["EIF seconds (fine-tunes + matrix)", *[result["seconds"][k] for k in keys]],
            ["x direct f32", *[result["ratio_to_direct_f32"][k] for k in keys]],
            ["matrix seconds (loss changes only)", *[result["matrix_seconds"][k] for k in keys]],
            ["x direct f32", *[result["matrix_ratio_to_direct_f32"][k] for k in keys]],
        ],
    )
    return f"## {name} (n = m = {result['n']}; {result['note']})\n{acc}\n\n{cost}\n"


def build(name: str, args) -> Problem:
    if name == "cnn":
        return cnn_problem(args.n, train_steps=args.train_steps, checkpoint=args.checkpoint)
    if name == "mlp":
        return mlp_problem(args.n, train_steps=args.train_steps)
    if name == "decoder":
        return decoder_problem(args.n)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=64, help="train = eval samples per model (default 64)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of cnn,mlp,decoder")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps for the CNN and MLP weights")
    parser.add_argument("--checkpoint", default=None, help="a trained CNN checkpoint folder (cnn.load_or_train)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (best is reported)")
    parser.add_argument("--out", default=None, help="write every number to this JSON file")


def run(args: argparse.Namespace) -> dict:
    results = {"machine": common.machine(), "models": {}}
    print(f"# EIF: propagated difference vs direct, against float64 ({results['machine']})\n")
    for name in args.models.split(","):
        start = time.perf_counter()
        results["models"][name] = evaluate(build(name, args), repeats=args.repeats)
        print(report(name, results["models"][name]) + f"({time.perf_counter() - start:.0f} s)\n", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
