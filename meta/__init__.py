"""meta: learn fine-tuning controls (per-sample rates, a rate predictor, per-layer multipliers)
by backpropagating an objective on the influence matrix through jaxeif.eif.

Example (per-sample log-rates toward "learn within class, leave other classes alone")::

    import jaxeif, optax
    from jaxeif import meta

    def objective(log_lr, params, train):   # arrays as arguments: no XLA constant folding
        M = jaxeif.eif(loss_fn, params, train, lr=meta.per_sample_lr(log_lr), steps=1)
        return meta.class_blocks(M, labels)

    result = meta.fit(objective, meta.init_log_lr(n, 1e-2), optimizer=optax.adam(0.05), steps=100,
                      data=(params, train), checkpoint_dir="runs/meta_ckpt", every=10)
    lr = meta.per_sample_lr(result.controls)      # result.history: objective per step

Per-layer multipliers: `optimizer=meta.layer_optimizer(log_scales)` inside the objective,
with `log_scales = meta.init_layer_log_scales(params)` as the controls.
"""

from jaxeif import deprecation
from jaxeif.meta.controls import (
    Amortised,
    amortised,
    image_features,
    init_layer_log_scales,
    init_log_lr,
    layer_optimizer,
    load_amortised,
    per_sample_lr,
    save_amortised,
)
from jaxeif.meta.objectives import (
    class_blocks,
    class_learning,
    keep_learning,
    logic,
    noise_invariance,
    sparsity,
    stay_below,
    symmetry,
    toward,
)
from jaxeif.meta.outer import MetaResult, StaleCheckpointError, fit

__all__ = [
    "Amortised",
    "amortised",
    "image_features",
    "init_layer_log_scales",
    "init_log_lr",
    "layer_optimizer",
    "load_amortised",
    "per_sample_lr",
    "save_amortised",
    "class_blocks",
    "class_learning",
    "keep_learning",
    "logic",
    "noise_invariance",
    "sparsity",
    "stay_below",
    "symmetry",
    "toward",
    "MetaResult",
    "StaleCheckpointError",
    "fit",
]

# helpers importable from jaxeif.meta before its public list was cut to what users call (one release)
__getattr__ = deprecation.moved(
    "jaxeif.meta",
    {
        "LRPredictor": "jaxeif.meta.controls",
        "Standardizer": "jaxeif.meta.controls",
        "layer_names": "jaxeif.meta.controls",
        "scale_by_layer": "jaxeif.meta.controls",
        "make_step": "jaxeif.meta.outer",
    },
)
