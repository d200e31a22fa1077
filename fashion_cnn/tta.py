"""Test-time augmentation: a model's class probabilities for images, averaged over the mirrored and 1-pixel-moved
copies that training used (--tta); the test set and --predict read images through it.

Needs NumPy and a Keras model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fashion_cnn.common import EVALUATION_BATCH, IMAGE_SIDE, Settings


def test_time_augmentation(cfg: Settings, tta: bool | None = None) -> dict[str, bool] | None:
    """The copies that test-time augmentation (tta, default --tta) averages over, as saved with the model; None
    when it is off or training neither flipped nor shifted."""
    on = (cfg.tta if tta is None else tta) and (cfg.flip or cfg.shift > 0)
    return {"flip": cfg.flip, "shift": cfg.shift > 0} if on else None


def class_probabilities(model: Any, images: np.ndarray, tta: dict[str, bool] | None) -> np.ndarray:
    """The model's class probabilities for uint8 images; with test-time augmentation, the mean over each image
    and its copies."""
    views = test_time_views(images, **tta) if tta else [images]
    return np.mean([model.predict(v, batch_size=EVALUATION_BATCH, verbose=0) for v in views], axis=0)


def test_time_views(images: np.ndarray, shift: bool, flip: bool) -> list[np.ndarray]:
    """A batch of images (N, 28, 28, 1) and the copies test-time augmentation averages over: mirrored (if
    training flipped) and each of those moved one pixel up, down, left and right (if training shifted)."""
    views = [images, images[:, :, ::-1]] if flip else [images]
    if shift:
        padded = [np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0))) for v in views]
        views += [p[:, 1 - dy:1 - dy + IMAGE_SIDE, 1 - dx:1 - dx + IMAGE_SIDE]
                  for p in padded for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    return views
