"""Deprecated keyword aliases of public functions and constructors.

A renamed keyword keeps working for a while: ``old=`` is passed on as ``new=`` with a
FutureWarning naming the new keyword; giving both is a TypeError.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable


def renamed_keywords(**renames: str | tuple[str, Callable[[object], bool]]):
    """Decorator: accept each ``old=`` keyword of ``renames`` (old -> new) as ``new=``.

    A value ``(new, accepts)`` renames only values for which ``accepts(value)`` holds (e.g.
    a kind string, not a tensor); others are passed on unchanged as ``old=``.
    """
    table = {
        old: spec if isinstance(spec, tuple) else (spec, None) for old, spec in renames.items()
    }

    def decorate(fn):
        name = fn.__qualname__.replace(".__init__", "")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, (new, accepts) in table.items():
                if old not in kwargs or (accepts is not None and not accepts(kwargs[old])):
                    continue
                if new in kwargs:
                    raise TypeError(f"{name}() got both {new}= and its deprecated alias {old}=")
                warnings.warn(
                    f"{name}(): the keyword {old}= is deprecated, use {new}= instead",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
