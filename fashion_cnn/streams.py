"""The training batches of each epoch: their order, the shifts, mirroring and random erasing (--shift, --flip,
--erase), and the dropout masks, all a function of (seed, epoch), so that the same seed gives the same run and a
resumed run sees exactly what the uninterrupted one would have.

Needs TensorFlow (tf.data and its stateless random ops), on every Keras backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fashion_cnn.backends import import_keras, import_tensorflow
from fashion_cnn.common import CLASS_NAMES, IMAGE_SIDE, Settings

ERASE_AREA = (0.02, 0.4)  # share of the image a random-erasing rectangle covers (Zhong et al. 2017)
ERASE_ASPECT = (0.3, 1 / 0.3)  # its height / width


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same flags: the same run."""
    keras, tf = import_keras(), import_tensorflow()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def epoch_streams(cfg: Settings, x: np.ndarray, y: np.ndarray, seed: int, model: Any
                  ) -> tuple[Any, Callable[[int], None]]:
    """Training batches (augmented with --shift, --flip, --erase) and dropout masks that are a function of (seed,
    epoch): a tf.data set of (uint8 images, one-hot labels), and the function that sets the epoch. fit(shuffle=True)
    with a seed set gives the same batch order every epoch, and BackupAndRestore saves neither that nor the dropout
    layers' random state; keyed by epoch, every epoch gets a new order and new masks, and a resumed run sees
    exactly the batches and masks the uninterrupted run would have."""
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
    return batches, epoch_starter(epoch, model)


def epoch_starter(epoch: Any, model: Any) -> Callable[[int], None]:
    """The function that starts an epoch: it sets the batches' epoch variable and keys the masks of every dropout
    layer of model by the epoch."""
    generators = [layer.seed_generator for layer in model.layers if hasattr(layer, "seed_generator")]
    layer_seeds = [int(g.state.numpy()[0]) for g in generators]

    def start_epoch(number: int) -> None:
        epoch.assign(number)
        for generator, layer_seed in zip(generators, layer_seeds, strict=True):
            # state is (key, draws so far); TensorFlow folds the key below 2**31, so mix the epoch into it
            key = np.random.SeedSequence([layer_seed, number]).generate_state(1)[0] % (2**31 - 2)
            generator.state.assign([int(key), 0])

    return start_epoch


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
