"""Patch engine and model families: the engine (``engine.py``) does the walking, reporting and undoing; every model
family is declared in one file under ``families/`` (``family.py`` says what a declaration holds); the features
(cache, quant, attention, moe) read those declarations.

This module wires them together: importing it registers every feature and every family with the engine, which
imports neither.
"""

from ditkern.attention import feature as _attention_feature  # noqa: F401  (features register when imported)
from ditkern.cache import feature as _cache_feature  # noqa: F401
from ditkern.moe import feature as _moe_feature  # noqa: F401
from ditkern.patch import engine, families
from ditkern.patch.engine import is_patched, patch, patched, supported_models, unpatch
from ditkern.patch.report import PatchReport
from ditkern.quant import feature as _quant_feature  # noqa: F401

for _family in families.load():
    engine.register_family(_family)

__all__ = ["patch", "unpatch", "patched", "is_patched", "supported_models", "PatchReport"]
