"""Names that left a public namespace keep working for one release, with a DeprecationWarning.

A package's `__init__` lists the names users call; helpers that used to be importable from it are
served by a module `__getattr__` (PEP 562) from the submodule that defines them:

    __getattr__ = deprecation.moved("jaxeif.lm", {"slot_nll": "jaxeif.lm.loss"})
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


class JaxeifDeprecationWarning(DeprecationWarning):
    """Something jaxeif will remove in a later release; the message names what to use instead.

    A DeprecationWarning of its own, so a project (or jaxeif's own tests) can turn exactly these into
    errors: `warnings.filterwarnings("error", category=JaxeifDeprecationWarning)`.
    """


def moved(namespace: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` serving each old name from its module, with a DeprecationWarning.

    Args:
        namespace: the package whose `__getattr__` this is, e.g. "jaxeif.lm".
        names: old public name -> the module that defines it (and where users import it from now).

    Returns:
        The `__getattr__` function; unknown names raise AttributeError as usual.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {namespace!r} has no attribute {name!r}")
        warnings.warn(
            f"{namespace}.{name} is not part of the public API and will be removed from {namespace}; "
            f"import it from {names[name]}",
            JaxeifDeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
