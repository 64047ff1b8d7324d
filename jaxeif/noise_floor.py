"""noise_floor(): how large an EIF entry must be to be more than rounding error.

An entry is a small difference of two losses (or of two fine-tuned models' losses), so in finite
precision it carries an error that does not shrink with the entry. We measure that error, not
guess it: on a few evenly spaced train rows the EIF is computed at the requested precision and
in float64; per eval column, the floor is `sigmas` times the root-mean-square difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeif import checks, influence
from jaxeif import precision as precision_lib
from jaxeif.finetune import LossFn, PyTree
from jaxeif.options import ChunkSize
from jaxeif.precision import Precision

EPS_RATIO_64_32 = float(np.finfo(np.float64).eps / np.finfo(np.float32).eps)


def noise_floor(
    loss_fn: LossFn,
    params: PyTree,
    train: PyTree,
    evals: PyTree | None = None,
    *,
    lr: jax.Array | float,
    steps: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: ChunkSize = "auto",
    precision: Precision = Precision(),
    memory_budget: float | None = None,
    progress: bool = False,
    samples: int = 16,
    sigmas: float = 4.0,
) -> jax.Array:
    """Per entry, an estimate of the rounding error of `eif(..., precision=precision)`.

    Entries with |M| above the floor have a trustworthy sign (validated against float64 in the
    tests). Costs two EIFs of `samples` rows (one in float64). For dtype "float64" the float32
    floor is scaled by the ratio of the two machine epsilons.

    Args:
        loss_fn: loss_fn(params, example) -> f32[], the loss of ONE example (no leading axis).
        params: the pytree of floating parameters to fine-tune from.
        train: pytree of arrays with a leading example axis of size n.
        evals: pytree with a leading axis of size m (None: `train`).
        lr: learning rate, a scalar or f[n] (one per train example); required.
        steps: optimizer steps per fine-tune.
        optimizer: an optax.GradientTransformation (None: SGD with unit rate).
        chunk_size: rows per step ("auto": planned by XLA's memory analysis within `memory_budget`).
        memory_budget: bytes "auto" may plan for (None: 75% of the free device memory).
        precision: the arithmetic of the EIF whose floor is measured, a jaxeif.Precision.
        progress: a bar of rows on stderr for each of the two EIFs (float64 first; not under jit/grad).
        samples: evenly spaced train rows compared with float64.
        sigmas: the floor in root-mean-square errors of those rows.

    Returns:
        f32[n, m], the same floor for every row of a column.

    Raises:
        TypeError, ValueError: bad arguments, named in the message.
    """
    evals, n, lr, precision = influence.validate(
        loss_fn,
        params,
        train,
        evals,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        chunk_size=chunk_size,
        precision=precision,
        memory_budget=memory_budget,
        progress=progress,
    )
    if isinstance(samples, bool) or not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"`samples` must be an int >= 1 (train rows compared with float64), got {samples!r}")
    sigmas = checks.positive_real("sigmas", sigmas)
    rows = np.unique(np.round(np.linspace(0, n - 1, min(samples, n))).astype(int))
    sub = checks.take(train, rows)
    sub_lr = lr if jnp.ndim(lr) == 0 else lr[rows]
    run = lambda mode: influence.eif(
        loss_fn,
        params,
        sub,
        evals,
        lr=sub_lr,
        steps=steps,
        optimizer=optimizer,  # noqa: E731
        chunk_size=chunk_size,
        precision=mode,
        memory_budget=memory_budget,
        progress=progress,
    )
    reference = run(Precision(dtype="float64"))
    measured = run(Precision() if precision_lib.is_float64(precision) else precision)
    rms = jnp.sqrt(jnp.mean((measured.astype(jnp.float32) - reference) ** 2, axis=0))
    scale = sigmas * (EPS_RATIO_64_32 if precision_lib.is_float64(precision) else 1.0)
    return jnp.broadcast_to(scale * rms, (n, rms.shape[0])).astype(jnp.float32)
