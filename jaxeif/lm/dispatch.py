"""Which exact path computes a fine-tuned EIF: `choose_path`, the rule behind `finetuned_eif(path="auto")`.

Both paths compute the same matrix (tested equal to float32 rounding); they differ in speed:
- "lowrank" (`lowrank_sgd_eif`) applies only to ONE plain SGD step (optimizer None, steps 1). It never
  copies the weights: every fine-tune is a rank <= T delta (T: the sample's tokens, rounded up to the
  rank bucket) applied to the packed evals.
- "dense" (`jaxeif.eif`) copies and updates every weight per fine-tune; any optimizer and step count.
The rule for "auto": low-rank iff one plain SGD step, on CPU, with the rank below the hidden size.
Measured (SmolLM2-135M shape, n = m = 64): on a 2-core CPU low-rank was 2.5x dense; on one H100 it was
0.73x with its fine-tunes batched (2,660 vs 3,640 pairs/s), so GPU/TPU take the dense path (`jaxeif
bench-lm --random` measures both on any device). A rank at or above the hidden size is no lower than the
weights themselves.
Without a DecoderConfig (`config=`) the decoder's layers are unknown and
"auto" takes the dense path.
"""

from __future__ import annotations

import optax

from jaxeif.lm.lowrank import RANK_BUCKET
from jaxeif.models.decoder import DecoderConfig
from jaxeif.packing import round_up

PATHS = ("auto", "dense", "lowrank")
LOWRANK_BACKENDS = ("cpu",)  # measured faster there; on GPU (H100) dense was 1.37x low-rank


def choose_path(
    path: str,
    *,
    optimizer: optax.GradientTransformation | None,
    steps: int,
    backend: str,
    longest: int,
    config: DecoderConfig | None,
    rank_bucket: int = RANK_BUCKET,
) -> str:
    """ "dense" or "lowrank" for `path` ("auto" applies the rule above; a forced "lowrank" must be one SGD step)."""
    if path not in PATHS:
        raise ValueError(f"`path` must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    one_sgd_step = optimizer is None and steps == 1
    if path == "lowrank" and not one_sgd_step:
        raise ValueError(
            f"path='lowrank' computes exactly one plain SGD step: it needs optimizer=None and steps=1, got "
            f"optimizer={optimizer!r}, steps={steps}; use path='dense' (or 'auto') for other fine-tunes"
        )
    if path != "auto":
        return path
    if not one_sgd_step or config is None or backend not in LOWRANK_BACKENDS:
        return "dense"
    return "lowrank" if round_up(longest, rank_bucket) < config.hidden_size else "dense"
