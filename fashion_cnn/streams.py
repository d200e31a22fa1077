"""The training batches of each epoch: their order, the shifts, mirroring and random erasing (--shift, --flip,
--erase), and the dropout masks, all a function of (seed, epoch), so that the same seed gives the same run on a
backend and a resumed run sees exactly what the uninterrupted one would have.

On TensorFlow the batches come from tf.data (fashion_cnn.tf_streams, the faster feed there); on JAX they are
drawn on the device inside the compiled training steps (fashion_cnn.jax_steps); on PyTorch they come from a
keras.utils.PyDataset drawing with NumPy (EpochBatches). Nothing here imports TensorFlow. Draws differ between
the three, so a run repeats exactly within one backend, not across them. Needs NumPy and Keras.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fashion_cnn.augment import augmented
from fashion_cnn.backends import backend_name, import_keras, import_tensorflow, on_keras, quiet_native_start
from fashion_cnn.common import CLASS_NAMES, Settings


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same flags: the same run."""
    keras = import_keras()
    with quiet_native_start():  # Keras seeds TensorFlow too where it is installed, importing it on any backend
        keras.utils.set_random_seed(seed)
    if backend_name() == "tensorflow":
        import_tensorflow().config.experimental.enable_op_determinism()


def epoch_streams(cfg: Settings, x: np.ndarray, y: np.ndarray, seed: int, model: Any
                  ) -> tuple[Any, Callable[[int], None]]:
    """Training batches (augmented with --shift, --flip, --erase) and dropout masks that are a function of (seed,
    epoch): batches of (uint8 images, one-hot labels), and the function that starts an epoch. fit(shuffle=True)
    gives the same batch order every epoch (or, on a PyDataset, an unseeded one), and BackupAndRestore saves
    neither that nor the dropout layers' random state; keyed by epoch, every epoch gets a new order and new masks,
    and a resumed run sees exactly the batches and masks the uninterrupted run would have."""
    if backend_name() == "tensorflow":
        from fashion_cnn.tf_streams import tf_batches

        batches, set_epoch = tf_batches(cfg, x, y, seed)
    elif backend_name() == "jax":
        from fashion_cnn.jax_steps import device_steps

        batches, set_epoch = device_steps(cfg, model, x, y, seed)
    else:
        batches = on_keras(EpochBatches, "utils.PyDataset")(cfg, x, y, seed)
        set_epoch = batches.set_epoch
    return batches, epoch_starter(set_epoch, model)


def epoch_starter(set_epoch: Callable[[int], Any], model: Any) -> Callable[[int], None]:
    """The function that starts an epoch: it tells the batches their epoch (set_epoch) and keys the masks of every
    dropout layer of model by it."""
    keras = import_keras()
    generators = [layer.seed_generator for layer in model.layers if hasattr(layer, "seed_generator")]
    layer_seeds = [int(keras.ops.convert_to_numpy(g.state)[0]) for g in generators]

    def start_epoch(number: int) -> None:
        set_epoch(number)
        for generator, layer_seed in zip(generators, layer_seeds, strict=True):
            # state is (key, draws so far); TensorFlow folds the key below 2**31, so mix the epoch into it
            key = np.random.SeedSequence([layer_seed, number]).generate_state(1)[0] % (2**31 - 2)
            generator.state.assign([int(key), 0])

    return start_epoch


class EpochBatches:
    """The training batches as a keras.utils.PyDataset (on_keras joins them), for PyTorch: batch `number`
    of an epoch holds the images at its place in the epoch's order, augmented, both drawn by NumPy from (seed,
    epoch, number) alone, so that it is the same batch whenever and in whatever thread it is made. fit() reads the
    batches in order (shuffle=False); start_epoch sets the epoch before each one."""

    def __init__(self, cfg: Settings, x: np.ndarray, y: np.ndarray, seed: int, classes: int = len(CLASS_NAMES)
                 ) -> None:
        super().__init__()  # one worker, no processes: each batch is made when fit() asks for it
        self.images, self.labels, self.seed = x, y, seed
        self.one_hot = np.eye(classes, dtype=np.float32)  # row k: the label of class k
        self.batch_size, self.shift, self.flip, self.erase = cfg.batch_size, cfg.shift, cfg.flip, cfg.erase
        self.set_epoch(0)

    def set_epoch(self, number: int) -> None:
        """Start epoch `number`: its order of the images."""
        self.epoch = number
        self.order = np.random.default_rng([self.seed, number]).permutation(len(self.labels))

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        picked = self.order[number * self.batch_size:(number + 1) * self.batch_size]
        draws = np.random.default_rng([self.seed, self.epoch, number])
        images = augmented(self.images[picked], draws, self.shift, self.flip, self.erase)
        return images, self.one_hot[self.labels[picked]]
