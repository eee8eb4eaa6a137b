"""A digit classifier trained on real digits, to judge whether generated digits show the class they were asked for.

It is an RBF support-vector machine on 8x8 images, trained (in about a second, deterministically) at first use and
cached in memory. Its training images take the same path generated images take: real 8x8 digits upsampled to the
pipelines' 32x32 resolution, then area-downsampled back to 8x8 (:func:`ditkern.zoo.data.to_8x8`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import data

SEED = 0
TEST_FRACTION = 0.25


@functools.lru_cache(maxsize=1)
def _fit():
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, y = data.digits()
    feats = data.to_8x8((x + 1) / 2).numpy()
    xtr, xte, ytr, yte = train_test_split(feats, y.numpy(), test_size=TEST_FRACTION, random_state=SEED, stratify=y)
    clf = SVC(C=10.0, gamma="scale").fit(xtr, ytr)
    return clf, float((clf.predict(xte) == yte).mean()), len(yte)


def heldout_accuracy() -> float:
    """Accuracy on the 25% of real digits held out of the classifier's training (stratified, fixed seed)."""
    return _fit()[1]


def predict(images: torch.Tensor) -> np.ndarray:
    """Predicted digit class for ``[N, 1, H, W]`` images in [0, 1] (any H, W that area-pool to 8x8)."""
    return _fit()[0].predict(data.to_8x8(images).numpy())


def accuracy(images: torch.Tensor, classes) -> float:
    """Fraction of ``images`` classified as the class in ``classes`` that they were generated for."""
    return float((predict(images) == np.asarray(list(classes))).mean())
