"""The training images' augmentations (--shift, --flip, --erase), written once for NumPy and for JAX: the same
code draws from a NumPy Generator for the batches of fashion_cnn.streams (PyTorch's feed, and every backend's
without the device feed) and from jax.random inside the compiled steps of fashion_cnn.jax_steps. TensorFlow's
tf.data feed has its own (fashion_cnn.tf_streams).

Needs NumPy; JAX where it is handed jax.numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fashion_cnn.common import ERASE_AREA, ERASE_ASPECT, IMAGE_SIDE


def augmented(images: Any, draws: Any, shift: int, flip: bool, erase: float, xp: Any = np) -> Any:
    """A batch of uint8 images (N, 28, 28, 1), each mirrored left-right with probability 1/2 (flip), moved by
    -shift..shift pixels down and right, zero-filled, and with probability erase given a noise rectangle
    (erased), all drawn from draws: a NumPy Generator here, its JAX counterpart inside the compiled steps of
    fashion_cnn.jax_steps (xp: the array module, numpy or jax.numpy, whose functions both spell alike)."""
    count = len(images)
    if flip:
        mirrored = draws.random(count) < 0.5
        images = xp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
    if shift:
        offsets = draws.integers(0, 2 * shift + 1, size=(2, count, 1, 1))  # rows, columns
        images = xp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
        for axis, offset in enumerate(offsets, start=1):
            images = window_at(images, offset[..., None], axis, 2 * shift, xp)
    return erased(images, draws, erase, xp) if erase else images


def window_at(images: Any, offsets: Any, axis: int, cut: int, xp: Any) -> Any:
    """Each image's window along axis (1: rows, 2: columns), `cut` pixels shorter, starting at its offset: a choice
    among the few windows by xp.where, which costs less than a gather in a compiled step and gives the same."""
    length = images.shape[axis] - cut
    chosen = None
    for start in range(cut + 1):
        window = images[:, start:start + length] if axis == 1 else images[:, :, start:start + length]
        chosen = window if chosen is None else xp.where(offsets == start, window, chosen)
    return chosen


def erased(images: Any, draws: Any, probability: float, xp: Any = np) -> Any:
    """Random erasing (Zhong et al. 2017, arXiv:1708.04896), as fashion_cnn.tf_streams does it on TensorFlow:
    with the given probability an image gets one rectangle of random area (ERASE_AREA) and aspect (ERASE_ASPECT),
    cut at the image's edge, at a random place, filled with uniform noise."""
    chosen, area_share, log_aspect, top_share, left_share = draws.random((5, len(images)))
    area = (ERASE_AREA[0] + area_share * (ERASE_AREA[1] - ERASE_AREA[0])) * IMAGE_SIDE**2
    aspect = xp.exp(np.log(ERASE_ASPECT[0]) + log_aspect * np.log(ERASE_ASPECT[1] / ERASE_ASPECT[0]))
    sides = [xp.clip(xp.round(xp.sqrt(area * k)), 1, IMAGE_SIDE) for k in (aspect, 1 / aspect)]  # height, width
    starts = [xp.floor(share * (IMAGE_SIDE - side + 1)) for share, side in zip((top_share, left_share), sides,
                                                                                 strict=True)]
    pixel = xp.arange(IMAGE_SIDE)
    rows, cols = ((pixel >= start[:, None]) & (pixel < (start + side)[:, None]) for start, side in zip(starts, sides,
                                                                                                    strict=True))
    inside = rows[:, :, None] & cols[:, None, :] & (chosen < probability)[:, None, None]
    noise = draws.integers(0, 256, images.shape, dtype=np.uint8)
    return xp.where(inside[..., None], noise, images)
