"""Lowering per runtime: each sub-package turns the canonical QDQ graph into its runtime's form."""

from __future__ import annotations

import importlib
from types import ModuleType


def backend_for(name: str) -> ModuleType:
    """The backend package named by a `Target.backend` (imported on demand)."""
    return importlib.import_module(f"qcompiler.backends.{name}")
