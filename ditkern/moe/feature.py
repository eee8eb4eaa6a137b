"""The ``moe`` feature: registers the option and the HiDream family (the engine imports this module always).

The swap of MoE feed-forwards is a family rule (``ditkern/patch/hidream.py``), on by default because it computes
the same function (fp32 arithmetic, same routing); ``moe=`` only carries its options, validated here.
"""

from __future__ import annotations

from ditkern.moe.config import resolve
from ditkern.patch.engine import Feature, register_feature


def _rules(family, model, config):
    resolve(config.moe)  # a bad value raises here, naming the option
    return None


MOE = register_feature(Feature(name="moe", rules=_rules))
