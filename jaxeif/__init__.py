"""jaxeif: exact empirical influence functions in pure JAX."""

from jaxeif.checks import NonFiniteInfluenceError
from jaxeif.chunking import MemoryBudgetError
from jaxeif.errors import Error
from jaxeif.finetune import finetune, losses
from jaxeif.influence import chunk_plan, eif, eif_sweep
from jaxeif.linearized import eif_linearized
from jaxeif.noise_floor import noise_floor
from jaxeif.precision import Precision
from jaxeif.sharding import eif_sharded

__all__ = [
    "Error",
    "eif",
    "eif_sweep",
    "eif_linearized",
    "eif_sharded",
    "noise_floor",
    "chunk_plan",
    "finetune",
    "losses",
    "Precision",
    "NonFiniteInfluenceError",
    "MemoryBudgetError",
]
__version__ = "0.1.0"
