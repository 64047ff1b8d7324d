"""jaxeif: exact empirical influence functions in pure JAX."""
from jaxeif.checks import NonFiniteInfluenceError
from jaxeif.finetune import finetune, losses
from jaxeif.influence import eif
from jaxeif.linearized import eif_linearized
from jaxeif.sharding import eif_sharded

__all__ = ["eif", "eif_linearized", "eif_sharded", "finetune", "losses", "NonFiniteInfluenceError"]
__version__ = "0.1.0"
