"""Training on JAX with the data on the device: the training images and labels go there once, and each call of the
training function runs `steps_per_execution` steps in one compiled program, drawing every batch there (the
epoch's order, the shifts, mirroring and erasing, the one-hot labels) from (seed, epoch, step) alone. Between the
steps of a call nothing crosses to the host: no batch, no log, no check.

Keras's loop stays as it is: fit(), its callbacks and Keras's own train_step (loss, optimizer, weight average,
metrics). Keras 3 runs `steps_per_execution` as a Python loop around separately compiled steps on JAX; this module
puts its own function in model.train_function, which fit() then calls once per `steps_per_execution` steps. fit()
iterates over the EpochSteps of an epoch, so that its progress bar and the callbacks count real steps; which
steps a call runs it knows from Position, so a resumed run draws exactly the batches the uninterrupted one would.

Needs JAX and Keras on its JAX backend (fashion_cnn.streams chooses this feed there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fashion_cnn.augment import augmented
from fashion_cnn.backends import import_keras, on_keras
from fashion_cnn.common import CLASS_NAMES, IMAGE_SIDE, Settings
from fashion_cnn.hardware import compute_device, steps_in_a_loop

# JAX returns from a call at once and runs it later, so fit() could queue a whole epoch of calls before the first
# has run, and a Ctrl-C, noticed between calls, would wait for all of them. At most this many calls are queued:
# the device always has the next one, and the host is never more than a call or two ahead.
CALLS_IN_FLIGHT = 2


class EpochSteps:
    """What fit() iterates over (a keras.utils.PyDataset, joined by on_keras): the steps of an epoch, as many as
    it has batches. Their items are never read: each compiled call knows which steps it runs from Position, so
    that no step costs a batch of data on the host."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> np.ndarray:
        return np.array([step], np.int32)


class Position:
    """Where training stands: the epoch, its order of the images (on the device), and the next step of it that a
    call of the training function runs."""

    def __init__(self, steps: int) -> None:
        self.steps, self.epoch, self.step, self.order = steps, 0, 0, None

    def start_epoch(self, number: int, order: Any = None) -> None:
        """Start epoch `number`, whose order of the images is order, at its first step."""
        self.epoch, self.step, self.order = number, 0, order

    def take(self, count: int) -> tuple[int, int]:
        """The next call's first step and how many steps it runs (fewer than count at the end of the epoch)."""
        first = self.step
        self.step = min(first + count, self.steps)
        return first, self.step - first


class KeyDraws:
    """The two draws fashion_cnn.augment.augmented asks a NumPy Generator for, made by jax.random from one key:
    each call folds its own number into the key, so a batch's draws are a function of that key alone."""

    def __init__(self, key: Any) -> None:
        self.key, self.calls = key, 0

    def next_key(self) -> Any:
        import jax

        self.calls += 1
        return jax.random.fold_in(self.key, self.calls)

    def random(self, shape: int | tuple[int, ...]) -> Any:
        import jax

        return jax.random.uniform(self.next_key(), shape if isinstance(shape, tuple) else (shape,))

    def integers(self, low: int, high: int, size: tuple[int, ...], dtype: Any = None) -> Any:
        import jax

        drawn = jax.random.randint(self.next_key(), size, low, high)
        return drawn if dtype is None else drawn.astype(dtype)


def device_steps(cfg: Settings, model: Any, x: np.ndarray, y: np.ndarray, seed: int
                 ) -> tuple[Any, Callable[[int], None]]:
    """Put the training images and labels on the device and make model.train_function run its steps there: the
    epoch's steps to fit() on, and the function that starts an epoch (its order of the images, drawn there)."""
    import jax

    keras = import_keras()
    build_for_training(model, cfg.batch_size)
    steps = math.ceil(len(y) / cfg.batch_size)
    images, labels = (jax.device_put(a, replicated(keras.distribution.distribution())) for a in (x, y))
    order_of = jax.jit(lambda epoch: epoch_order(seed, epoch, len(y)))
    train_calls = jax.jit(training_call(model, cfg, seed, model.steps_per_execution), donate_argnums=0)
    position, in_flight = Position(steps), []

    def start_epoch(number: int) -> None:
        position.start_epoch(number, order_of(number))

    def train_function(state: Any, _: Iterator[Any]) -> tuple[dict[str, Any], Any]:
        first, count = position.take(model.steps_per_execution)
        if len(in_flight) == CALLS_IN_FLIGHT:  # the device still has work queued; wait for the oldest call
            jax.block_until_ready(in_flight.pop(0))
        logs, state = train_calls(state, images, labels, position.order, *np.int32([position.epoch, first, count]))
        in_flight.append(logs)
        return logs, state

    model.train_function = train_function
    start_epoch(0)
    return on_keras(EpochSteps, "utils.PyDataset")(steps), start_epoch


def epoch_order(seed: int, epoch: Any, count: int) -> Any:
    """The order of the `count` training images in an epoch: a function of (seed, epoch)."""
    import jax

    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), 2 * epoch), count)


def batch_draws(seed: int, epoch: Any, step: Any) -> KeyDraws:
    """The draws that augment batch `step` of an epoch: a function of (seed, epoch, step)."""
    import jax

    return KeyDraws(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2 * epoch + 1), step))


def build_for_training(model: Any, batch_size: int) -> None:
    """Build the loss, the metrics and the optimizer, which fit() would build from its first batch of images and
    labels: here its batches are drawn inside the compiled call."""
    keras = import_keras()
    images = keras.KerasTensor((batch_size, IMAGE_SIDE, IMAGE_SIDE, 1), "uint8")
    labels = keras.KerasTensor((batch_size, len(CLASS_NAMES)), "float32")
    model._symbolic_build(data_batch=(images, labels))  # fit()'s own build, given the batch's shapes


def replicated(distribution: Any) -> Any:
    """Where the training data lives: on the one device, or on every device of a data-parallel mesh."""
    import jax

    if distribution is None:
        return None
    mesh = distribution.device_mesh.backend_mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def training_call(model: Any, cfg: Settings, seed: int, steps: int) -> Callable[..., Any]:
    """One call of the training function, to be compiled: up to `steps` of Keras's train_step, each on a batch
    drawn on the device; the metrics after the last step and the new state."""

    keras = import_keras()
    loop = steps_in_a_loop(cfg, compute_device())

    def call(state: Any, images: Any, labels: Any, order: Any, epoch: Any, first: Any, taken: Any
             ) -> tuple[dict[str, Any], Any]:
        partial_batches = len(order) % cfg.batch_size != 0

        def train(state: Any, step: Any) -> Any:
            batch = draw_batch(images, labels, order, step, batch_draws(seed, epoch, step), cfg)
            return model.train_step(state, batch if partial_batches else batch[:2])[1]

        last_is_short = math.ceil(len(order) / cfg.batch_size) % steps != 0
        state = run_steps(train, state, first, taken, steps, loop, last_is_short)
        with keras.StatelessScope(state_mapping=list(zip(model.metrics_variables, state[3], strict=True))):
            return model.get_metrics_result(), state

    return call


def run_steps(train: Callable[[Any, Any], Any], state: Any, first: Any, taken: Any, steps: int, loop: bool,
              last_is_short: bool) -> Any:
    """train(state, step) for the steps first, first + 1, ... of which `taken` count (an epoch's last call can
    have fewer than `steps`): in a lax.scan that skips the steps past the end, or (not loop) written out one after
    another, a step past the end computed and its result not kept (fashion_cnn.hardware.steps_in_a_loop)."""
    import jax
    import jax.numpy as jnp

    if loop:
        def scan_step(state: Any, step: Any) -> tuple[Any, None]:
            return jax.lax.cond(step < first + taken, train, lambda same, _: same, state, step), None

        return jax.lax.scan(scan_step, state, first + jnp.arange(steps))[0]
    for offset in range(steps):
        trained = train(state, first + offset)
        if last_is_short and offset:
            kept = offset < taken
            trained = jax.tree_util.tree_map(lambda new, old, kept=kept: jnp.where(kept, new, old), trained, state)
        state = trained
    return state


def draw_batch(images: Any, labels: Any, order: Any, step: Any, draws: KeyDraws, cfg: Settings
               ) -> tuple[Any, Any, Any]:
    """Batch `step` of the epoch's order: its images augmented (--shift, --flip, --erase), one-hot labels, and
    sample weights that give the real images of a last, partial batch the whole loss (the rest weigh nothing)."""
    import jax
    import jax.numpy as jnp

    keras = import_keras()
    place = step * cfg.batch_size + jnp.arange(cfg.batch_size)
    real = place < len(order)
    picked = order[jnp.minimum(place, len(order) - 1)]
    batch = augmented(images[picked], draws, cfg.shift, cfg.flip, cfg.erase, xp=jnp)
    one_hot = jax.nn.one_hot(labels[picked], len(CLASS_NAMES))
    distribution = keras.distribution.distribution()
    if distribution is not None:  # each replica computes its share of the batch
        layout = distribution.get_data_layout(batch.shape).backend_layout
        batch = jax.lax.with_sharding_constraint(batch, layout)
    weights = jnp.where(real, cfg.batch_size / jnp.maximum(jnp.sum(real), 1), 0.0)
    return batch, one_hot, weights
