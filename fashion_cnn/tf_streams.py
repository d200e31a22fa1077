"""The training batches on TensorFlow: a tf.data pipeline with TensorFlow's stateless random ops, keyed by (seed,
epoch, batch). On TensorFlow it feeds the batches faster than the NumPy batches of fashion_cnn.streams
(benchmarks/throughput.py measures both), so fashion_cnn.streams uses it there and only there.

Needs TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fashion_cnn.backends import import_tensorflow
from fashion_cnn.common import CLASS_NAMES, ERASE_AREA, ERASE_ASPECT, IMAGE_SIDE, Settings


def tf_batches(cfg: Settings, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Any, Callable[[int], None]]:
    """The training batches as a tf.data set of (uint8 images, one-hot labels), augmented with --shift, --flip and
    --erase, whose order and draws are a function of (seed, epoch); and the function that sets the epoch."""
    tf = import_tensorflow()
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    images, labels = tf.constant(x), tf.constant(y)

    def epoch_key() -> Any:
        return tf.stack([tf.constant(seed, tf.int64), epoch.read_value()])

    # Plain TensorFlow ops: AutoGraph has nothing to convert, and in a Ray task, where this module's code came by
    # value, it cannot find the module and warns.
    @tf.autograph.experimental.do_not_convert
    def epoch_order(_: Any) -> Any:
        return tf.random.experimental.stateless_shuffle(tf.range(len(y), dtype=tf.int64), seed=epoch_key())

    @tf.autograph.experimental.do_not_convert
    def batch(number: Any, idx: Any) -> tuple[Any, Any]:
        key = tf.random.experimental.stateless_fold_in(epoch_key(), number)
        return (augment_batch(tf.gather(images, idx), key, cfg.shift, cfg.flip, cfg.erase),
                tf.one_hot(tf.gather(labels, idx), len(CLASS_NAMES)))

    @tf.autograph.experimental.do_not_convert
    def numbered_batches(order: Any) -> Any:
        return tf.data.Dataset.from_tensor_slices(order).batch(cfg.batch_size).enumerate()

    batches = (tf.data.Dataset.range(1).map(epoch_order).flat_map(numbered_batches)
               .map(batch, num_parallel_calls=tf.data.AUTOTUNE)
               .apply(tf.data.experimental.assert_cardinality(math.ceil(len(y) / cfg.batch_size)))
               .prefetch(tf.data.AUTOTUNE))
    return batches, epoch.assign


def augment_batch(images: Any, key: Any, shift: int, flip: bool, erase: float = 0.0) -> Any:
    """Each image of the batch mirrored left-right with probability 1/2 (flip), moved by -shift..shift pixels
    down and right, zero-filled, and with probability erase given a noise rectangle (random_erasing); the draws
    are a function of key."""
    tf = import_tensorflow()
    if flip:
        images = tf.image.stateless_random_flip_left_right(images, seed=key)
    if shift:
        key = tf.random.experimental.stateless_fold_in(key, 1)  # not the flip's draws
        offsets = tf.random.stateless_uniform([2, tf.shape(images)[0], 1], key, 0, 2 * shift + 1, tf.int32)
        window = tf.range(IMAGE_SIDE)
        padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
        rows = tf.gather(padded, offsets[0] + window, axis=1, batch_dims=1)
        images = tf.gather(rows, offsets[1] + window, axis=2, batch_dims=1)
    if erase:
        images = random_erasing(images, tf.random.experimental.stateless_fold_in(key, 2), erase)
    return images


def random_erasing(images: Any, key: Any, probability: float) -> Any:
    """Random erasing (Zhong et al. 2017, arXiv:1708.04896): with the given probability an image gets one
    rectangle of random area and aspect, at a random place, filled with uniform noise; a function of key.

    A rectangle taller or wider than the image is cut at its edge rather than drawn again.
    """
    tf = import_tensorflow()
    count = tf.shape(images)[0]
    u = tf.random.stateless_uniform([5, count], key)
    area = (ERASE_AREA[0] + u[1] * (ERASE_AREA[1] - ERASE_AREA[0])) * IMAGE_SIDE**2
    low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = tf.exp(low + u[2] * (high - low))
    height = tf.clip_by_value(tf.round(tf.sqrt(area * aspect)), 1, IMAGE_SIDE)
    width = tf.clip_by_value(tf.round(tf.sqrt(area / aspect)), 1, IMAGE_SIDE)
    top = tf.floor(u[3] * (IMAGE_SIDE - height + 1))
    left = tf.floor(u[4] * (IMAGE_SIDE - width + 1))
    side = tf.range(IMAGE_SIDE, dtype=tf.float32)

    def within(start: Any, length: Any) -> Any:
        return (side >= start[:, None]) & (side < (start + length)[:, None])

    inside = within(top, height)[:, :, None] & within(left, width)[:, None, :] & (u[0] < probability)[:, None, None]
    noise = tf.random.stateless_uniform(tf.shape(images), tf.random.experimental.stateless_fold_in(key, 1), 0, 256,
                                        tf.int32)
    return tf.where(inside[..., None], tf.cast(noise, images.dtype), images)
