"""A persistent XLA compilation cache for the CLI and store workers: a restarted or added worker loads
its programs from disk instead of compiling them again.

The folder is $JAXEIF_COMPILE_CACHE if set (the empty string turns the cache off), else
~/.cache/jaxeif/xla. A cache the user configured (jax_compilation_cache_dir already set) is left as is.
Entries are keyed by the program, the compile options, the backend and the jax version, so a hit is
the same executable (JAX's own guarantee); stale entries are never used, only left on disk.
"""

from __future__ import annotations

import os

import jax

ENV = "JAXEIF_COMPILE_CACHE"
DEFAULT = os.path.join("~", ".cache", "jaxeif", "xla")
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster than this are not worth a file


def folder() -> str | None:
    """The cache folder that `enable` uses (expanded), or None when $JAXEIF_COMPILE_CACHE is ''."""
    path = os.environ.get(ENV, DEFAULT)
    return os.path.expanduser(path) if path else None


def enable() -> str | None:
    """Turn on jax's persistent compilation cache in `folder()` unless a cache is already configured.

    Returns:
        The cache folder in use (the user's own if one was set), or None when turned off.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = folder()
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
