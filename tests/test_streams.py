"""The training batches of each epoch: their order, shifts, mirroring, erasing and dropout masks, keyed by seed and
epoch, from tf.data on TensorFlow and from NumPy on JAX and PyTorch."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest

import ConvolutionalNN as cnn
from fashion_cnn import streams

Epochs = Callable[[int], list[np.ndarray]]  # epoch -> the image batches of that epoch


def tf_data_epochs(cfg: cnn.Config, images: np.ndarray, labels: np.ndarray, seed: int) -> Epochs:
    """The batches the TensorFlow backend trains on (tf.data), by epoch."""
    batches, start_epoch = streams.epoch_streams(cfg, images, labels, seed, cnn.build_model(cfg, 0.01, 10))
    return lambda epoch: (start_epoch(epoch), [x.numpy() for x, _ in batches])[1]


def numpy_epochs(cfg: cnn.Config, images: np.ndarray, labels: np.ndarray, seed: int) -> Epochs:
    """The batches JAX and PyTorch train on (NumPy, a PyDataset there; here without Keras), by epoch."""
    batches = streams.EpochBatches(cfg, images, labels, seed)
    return lambda epoch: (batches.set_epoch(epoch), [batches[i][0] for i in range(len(batches))])[1]


def jax_device_epochs(cfg: cnn.Config, images: np.ndarray, labels: np.ndarray, seed: int) -> Epochs:
    """The batches JAX trains on, drawn as its compiled training calls draw them (fashion_cnn.jax_steps), by epoch;
    only their real images (a last batch can be partly padding)."""
    import jax

    from fashion_cnn import jax_steps

    on_device = jax.device_put((images, labels))
    draw = jax.jit(lambda order, epoch, step: jax_steps.draw_batch(
        *on_device, order, step, jax_steps.batch_draws(seed, epoch, step), cfg))

    def epoch(number: int) -> list[np.ndarray]:
        order = jax_steps.epoch_order(seed, number, len(labels))
        batches = [draw(order, number, step) for step in range(-(-len(labels) // cfg.batch_size))]
        return [np.asarray(x)[np.asarray(weights) > 0] for x, _, weights in batches]

    return epoch


FEEDS = [pytest.param(tf_data_epochs, marks=pytest.mark.slow, id="tf.data"),  # imports TensorFlow: 10 s or more
         pytest.param(numpy_epochs, id="NumPy"),
         pytest.param(jax_device_epochs, id="JAX device", marks=[pytest.mark.slow, pytest.mark.skipif(  # compiles
             importlib.util.find_spec("jax") is None, reason="jax is not installed")])]


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_every_epoch_gets_its_own_batch_order_and_dropout_masks() -> None:
    """fit(shuffle=True) with a seed set gives the same order every epoch; the epoch streams must not."""
    import keras

    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "0", "--batch-size", "16"])
    streams.seed_everything(0)
    model = cnn.build_model(cfg, 0.01, 10)
    index = np.arange(64, dtype=np.uint8)
    images = np.broadcast_to(index[:, None, None, None], (64, 28, 28, 1)).copy()  # image k is all k
    batches, start_epoch = streams.epoch_streams(cfg, images, index % 10, 0, model)
    dropout = [layer.seed_generator for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

    def epoch(number: int) -> tuple[list[int], list[list[int]]]:
        start_epoch(number)
        order = [int(v) for x, _ in batches for v in x.numpy()[:, 0, 0, 0]]
        return order, [g.state.numpy().tolist() for g in dropout]

    first, second = epoch(0), epoch(1)
    assert sorted(first[0]) == index.tolist(), "each epoch sees every image once"
    assert first[0] != second[0], "same batch order in consecutive epochs"
    assert all(a != b for a, b in zip(first[1], second[1], strict=True)), "same dropout masks in consecutive epochs"
    assert epoch(0) == first and epoch(1) == second, "an epoch's order and masks depend on (seed, epoch) alone"


def augmentation_of_each_image(feed: Callable[..., Epochs], images: np.ndarray, seed: int, epoch: int
                               ) -> dict[int, tuple[bool, int, int]]:
    """For one epoch of --shift 2 --flip batches: image index -> (mirrored, pixels moved down, pixels moved right)."""
    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "2", "--flip", "--batch-size", "16"])
    batches = feed(cfg, images, np.zeros(len(images), np.uint8), seed)(epoch)
    copies = {moved(images[k, :, ::-1] if flipped else images[k], dy, dx).tobytes(): (k, flipped, dy, dx)
              for k in range(len(images)) for flipped in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)}
    found = [copies.get(image.tobytes()) for x in batches for image in x]
    assert None not in found, "every training image is a source image, flipped or not, moved by at most 2 px"
    assert sorted(k for k, *_ in found) == list(range(len(images))), "each image once an epoch"
    return {k: (flipped, dy, dx) for k, flipped, dy, dx in found}


@pytest.mark.parametrize("feed", FEEDS)
def test_random_erasing_puts_one_noise_rectangle_in_the_chosen_share_of_images_keyed_by_seed_and_epoch(
        feed: Callable[..., Epochs]) -> None:
    """--erase 0.5: about half the images of an epoch get a rectangle of 2-40% of the image, the rest are untouched."""
    images = np.zeros((400, 28, 28, 1), np.uint8)
    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "0", "--erase", "0.5",
                          "--batch-size", "100"])
    epochs = feed(cfg, images, np.zeros(len(images), np.uint8), 0)

    def erased(epoch: int) -> np.ndarray:
        return np.concatenate(epochs(epoch))[..., 0] != 0  # noise is 0 in 1 pixel of 256

    first = erased(0)
    hit = first.reshape(len(images), -1).any(axis=1)
    assert 150 < hit.sum() < 250
    for mask in first[hit]:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.mean() > 0.9, "the noise fills one rectangle"
        assert 0.015 <= box.size / mask.size <= 0.42  # 2-40% before its sides are rounded to whole pixels (18 x 18)
    assert (erased(0) == first).all() and (erased(1) != first).any(), "a function of (seed, epoch)"


def moved(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image moved dy pixels down and dx right, zero-filled."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("feed", FEEDS)
def test_augmented_batches_are_shifted_and_flipped_copies_keyed_by_seed_and_epoch(feed: Callable[..., Epochs]) -> None:
    images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)  # no 0: the fill shows
    first = augmentation_of_each_image(feed, images, seed=0, epoch=0)
    assert 16 < sum(flipped for flipped, _, _ in first.values()) < 48, "about half the images are mirrored"
    assert len({move[1:] for move in first.values()}) > 15, "shifts take many of the 25 values"
    assert augmentation_of_each_image(feed, images, seed=0, epoch=0) == first, "(seed, epoch) decides it all"
    for other in (augmentation_of_each_image(feed, images, seed=0, epoch=1),
                  augmentation_of_each_image(feed, images, 1, 0)):
        assert sum(other[k] != first[k] for k in first) > 48, "an image gets a new augmentation each epoch and seed"
