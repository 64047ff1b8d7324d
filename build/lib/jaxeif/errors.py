"""The base class of every error jaxeif raises on purpose.

Catch `jaxeif.Error` to handle any of them; each specific error also derives from the builtin
exception it refines (ValueError, TypeError, FloatingPointError, ...), so existing `except` clauses
keep working.
"""


class Error(Exception):
    """Base of every exception that jaxeif raises on purpose, with a message naming the cause and the fix."""
