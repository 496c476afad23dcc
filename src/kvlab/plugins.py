"""Finding self-registering files: every public submodule of a package is imported once, so a new
technique, model family, conversion target or CLI command is one new file in its package."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: str) -> list[ModuleType]:
    """Import the submodules of ``package`` whose names do not start with ``_``, in name order."""
    pkg = importlib.import_module(package)
    return [importlib.import_module(f"{package}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)
            if not info.name.startswith("_")]
