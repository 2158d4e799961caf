"""Exceptions of the export package and the lazy import helper for optional dependencies."""

from __future__ import annotations

import importlib
from types import ModuleType


class ExportError(RuntimeError):
    """An artifact could not be produced (bad arguments, unsupported graph, failed build)."""


class MissingDependencyError(ExportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


class ValidationError(ExportError):
    """An artifact's outputs differ from the PyTorch generator by more than the tolerance."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming `pip install 'lanit-rt[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module} is not installed ({err}); install it with: pip install 'lanit-rt[{extra}]'"
        ) from None
