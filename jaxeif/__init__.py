"""jaxeif: exact empirical influence functions in pure JAX."""
from jaxeif.checks import NonFiniteInfluenceError
from jaxeif.finetune import finetune, losses
from jaxeif.influence import eif

__all__ = ["eif", "finetune", "losses", "NonFiniteInfluenceError"]
__version__ = "0.1.0"
