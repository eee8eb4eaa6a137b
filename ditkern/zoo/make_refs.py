"""Regenerate the reference samples the tests compare against: ``python -m ditkern.zoo.make_refs``.

Writes ``tests/zoo/data/reference_samples.safetensors``: for each reference pipeline, a few digits generated with
fixed classes, seeds and a short sampler setting (:data:`REF_SETTINGS`), in float32 on the CPU. Rerun it only when
the shipped weights change on purpose.
"""

from __future__ import annotations

import json
import os

import torch

from . import FAST_NAMES, generate, load

REF_CLASSES = [0, 3, 7, 9]
REF_SEEDS = [11, 12, 13, 14]
REF_SETTINGS = {
    "digits-dit": dict(num_inference_steps=8, guidance_scale=3.0),
    "digits-flux": dict(num_inference_steps=8, true_cfg_scale=3.0),
}
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "zoo", "data", "reference_samples.safetensors")


def make(out: str = OUT) -> str:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors = {}
    for name in FAST_NAMES:  # the stored samples cover the shallow pipelines (the per-pipeline tests run on those)
        tensors[name] = generate(load(name), REF_CLASSES, REF_SEEDS, **REF_SETTINGS[name]).contiguous()
    meta = {"classes": json.dumps(REF_CLASSES), "seeds": json.dumps(REF_SEEDS), "settings": json.dumps(REF_SETTINGS),
            "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=meta)
    return os.path.abspath(out)


if __name__ == "__main__":
    print(make())
