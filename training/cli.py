"""What the command-line entry points share."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings as `warning: MESSAGE` lines on stderr (the category when it is not a plain
    UserWarning), without the file, line and source line that Python adds; restored on exit."""

    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        print(f"warning{kind}: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
