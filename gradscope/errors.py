"""The one error type and the one warning type gradscope raises."""

from __future__ import annotations


class GradscopeError(RuntimeError):
    """Raised for bad input to gradscope; the message says what is wrong and what to do.

    Example:
        >>> import gradscope
        >>> try:
        ...     gradscope.watch("not a model")
        ... except gradscope.GradscopeError as err:
        ...     print(type(err).__name__)
        GradscopeError
    """


class GradscopeWarning(UserWarning):
    """Warned when gradscope works around a problem (a failing hook, an odd setup)."""
