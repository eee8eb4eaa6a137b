"""Patch engine and model families. One file per family; the engine does the walking, reporting and undoing."""

from ditkern.patch.engine import is_patched, patch, patched, supported_models, unpatch
from ditkern.patch.report import PatchReport

__all__ = ["patch", "unpatch", "patched", "is_patched", "supported_models", "PatchReport"]
