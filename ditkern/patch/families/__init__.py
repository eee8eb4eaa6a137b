"""The registry of model families: each module listed in MODULES defines ``FAMILY``, a ``ditkern.patch.family.Family``.

A new model is one new file here and one line in MODULES (docs/adding_a_family.md). The engine imports none of them:
``ditkern/patch/__init__.py`` registers what :func:`load` returns.
"""

from __future__ import annotations

import importlib

from ditkern.patch.family import Family

MODULES = (
    "flux",
    "sd3",
    "pixart",
    "dit",
    "wan",
    "sana",
    "hidream",
    "flux2",
    "chroma",
    "qwenimage",
    "wan_vace",
    "lumina2",
    "ltx2",
    "cogview4",
    "hunyuan_video15",
    "nucleusmoe",
    "zimage",
    "hunyuanimage",
)


def load() -> tuple[Family, ...]:
    """The ``FAMILY`` of every module in MODULES, in that order."""
    families = []
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(f"{module.__name__} must define FAMILY = ditkern.patch.family.Family(...)")
        families.append(family)
    return tuple(families)
