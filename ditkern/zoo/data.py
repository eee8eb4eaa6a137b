"""The scikit-learn digits as image tensors: 8x8 grey digits upsampled to the reference pipelines' resolution."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

#: Side of the images the reference pipelines generate (pixels).
IMAGE_SIZE = 32
#: Number of digit classes.
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _raw_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    return images, d.target.astype(np.int64)


def digits(size: int = IMAGE_SIZE):
    """All 1,797 digits as ``(x, y)``: x is ``[N, 1, size, size]`` in [-1, 1] (bilinear upsampling), y the classes."""
    images, labels = _raw_digits()
    x = torch.from_numpy(images)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.from_numpy(labels)


def split(seed: int = 0, test_fraction: float = 0.25):
    """A fixed, stratified train/held-out split of the raw 8x8 digits: ``(xtr, ytr, xte, yte)`` as numpy arrays."""
    from sklearn.model_selection import train_test_split

    images, labels = _raw_digits()
    flat = images.reshape(len(images), -1)
    return train_test_split(flat, labels, test_size=test_fraction, random_state=seed, stratify=labels)


def to_8x8(images: torch.Tensor) -> torch.Tensor:
    """Area-downsample ``[N, 1, H, W]`` images in [0, 1] to ``[N, 64]`` (the classifier's input)."""
    x = images.detach().float().cpu()
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, (8, 8))
    return x.reshape(len(x), -1)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels (per image, zero-padded with -1)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out
