"""One-line summaries of other libraries' exceptions, for the one-line errors this package raises.

Torch, compiler and runtime errors run to pages; a message of ours quotes only their first line.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-blank line of `err`'s message, or its type's name when the message is blank."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def describe(err: BaseException) -> str:
    """`Type: first line` of `err`, or just `Type` when its message is blank."""
    line = first_line(err)
    name = type(err).__name__
    return name if line == name else f"{name}: {line}"
