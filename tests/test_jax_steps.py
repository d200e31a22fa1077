"""Training on JAX with the data on the device: the batches drawn inside the compiled calls, and calls of any number
of steps computing the very same run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, run_cli
from fashion_cnn import common, jax_steps

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def test_calls_take_the_epochs_steps_in_order_and_the_last_call_takes_what_is_left() -> None:
    position = jax_steps.Position(steps=10)
    assert [position.take(4) for _ in range(3)] == [(0, 4), (4, 4), (8, 2)]
    position.start_epoch(1)
    assert (position.epoch, position.take(4)) == (1, (0, 4))


@needs_jax
@pytest.mark.slow  # compiles a training step: 5-10 s
def test_a_last_partial_batch_gives_its_real_images_the_whole_loss_and_the_padding_none() -> None:
    import jax
    import jax.numpy as jnp

    import ConvolutionalNN as cnn

    cfg = cnn.parse_args(["--batch-size", "32", "--shift", "0"])
    images = jnp.asarray(np.arange(100, dtype=np.uint8)[:, None, None, None] * np.ones((1, 28, 28, 1), np.uint8))
    labels = jnp.asarray(np.arange(100) % 10, dtype=jnp.uint8)
    order = jax.random.permutation(jax.random.key(0), 100)
    seen = []
    for step in range(4):  # 32 + 32 + 32 + 4 images
        x, y, weights = jax_steps.draw_batch(images, labels, order, step, jax_steps.KeyDraws(jax.random.key(step)), cfg)
        real = int(np.sum(np.asarray(weights) > 0))
        seen += np.asarray(x)[:real, 0, 0, 0].tolist()
        assert float(np.sum(weights)) == pytest.approx(32), "the loss is the mean over the real images"
        assert np.asarray(y).argmax(axis=1)[:real].tolist() == [v % 10 for v in np.asarray(x)[:real, 0, 0, 0]]
    assert real == 4 and sorted(seen) == list(range(100)), "each image once an epoch, the padding weighing nothing"


RUN_WITH_STEPS_PER_CALL = """
import json, sys
import numpy as np
from fashion_cnn import backends
backends.use_backend("jax")
import ConvolutionalNN as cnn
from fashion_cnn import streams
steps_per_call, filters = int(sys.argv[1]), sys.argv[2]
cfg = cnn.parse_args(["--filters", filters, "--dense-units", "8", "--batch-size", "16", "--precision", "float32",
                      "--shift", "2", "--flip", "--erase", "0.5", "--epochs", "2"])
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (150, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 150).astype(np.uint8)
streams.seed_everything(0)
model = cnn.build_model(cfg, 0.01, steps_per_epoch=10)
model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], steps_per_execution=steps_per_call)
batches, start_epoch = streams.epoch_streams(cfg, x, y, 0, model)
losses = []
for epoch in range(2):
    start_epoch(epoch)
    losses += model.fit(batches, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0).history["loss"]
    for variable in model.trainable_variables:  # fit() leaves the weight average sharing the weights' buffers
        variable.assign(variable.numpy())
print(json.dumps({"losses": losses, "weights": [float(np.abs(w).sum()) for w in model.get_weights()]}))
"""


@needs_jax
@pytest.mark.slow
@pytest.mark.parametrize("filters", ["4", "8"])  # on a CPU: the steps of a call in one loop, and written out
def test_how_many_steps_a_call_runs_changes_nothing_that_is_computed(filters: str) -> None:
    """10 steps an epoch, the last of 6 images: calls of 1, 3 (the last one short) and 10 steps, every lever on.
    Written out, XLA fuses across the steps of a call, and the weights can differ in their last bits."""
    def run(steps_per_call: int) -> dict:
        proc = subprocess.run([sys.executable, "-c", RUN_WITH_STEPS_PER_CALL, str(steps_per_call), filters], cwd=REPO,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    one = run(1)
    assert one["losses"][1] < one["losses"][0] + 0.5 and all(np.isfinite(one["losses"]))
    for other in (run(3), run(10)):
        if filters == "4":
            assert other == one
        else:
            assert other["losses"] == pytest.approx(one["losses"], rel=1e-6)
            assert other["weights"] == pytest.approx(one["weights"], rel=1e-6)


@needs_jax
@pytest.mark.slow
def test_a_loss_that_becomes_nan_inside_a_call_ends_the_run_with_exit_3_and_nothing_written(
        tmp_path: Path, data_dir: Path) -> None:
    proc = run_cli("--data-dir", data_dir, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras", *TINY,
                   "--backend", "jax", "--lr", "1e35", "--schedule", "constant", "--epochs", "3")
    assert proc.returncode == common.EXIT_DIVERGED
    said = ("error: the loss became NaN or infinite at learning rate 1e+35 before any epoch finished; nothing was "
            "written. Try a smaller --lr.")
    assert proc.stderr.strip().splitlines() == [said]
    assert not list((tmp_path / "p").glob("*")) and not (tmp_path / "m.keras").exists()


RUN_AHEAD = """
import json, sys
import numpy as np
from fashion_cnn import backends
backends.use_backend("jax")
import jax
import ConvolutionalNN as cnn
from fashion_cnn import jax_steps, streams
jax_steps.CALLS_IN_FLIGHT = int(sys.argv[1])
cfg = cnn.parse_args(["--filters", "32", "--dense-units", "32", "--precision", "float32", "--epochs", "1"])
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (64 * 40, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 64 * 40).astype(np.uint8)
streams.seed_everything(0)
model = cnn.build_model(cfg, 0.01, steps_per_epoch=40)
model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], steps_per_execution=1)
batches, start_epoch = streams.epoch_streams(cfg, x, y, 0, model)
calls, unfinished = [], []
train = model.train_function
def watched(state, data):
    logs, state = train(state, data)
    unfinished.append(sum(not all(leaf.is_ready() for leaf in jax.tree.leaves(old)) for old in calls))
    calls.append(logs)
    return logs, state
model.train_function = watched
model.fit(batches, epochs=1, shuffle=False, verbose=0)
print(json.dumps({"calls": len(calls), "most_unfinished": max(unfinished)}))
"""


@needs_jax
@pytest.mark.slow
def test_the_host_queues_at_most_two_calls_so_that_ctrl_c_is_heard_at_once() -> None:
    """JAX runs a call after returning from it: unbounded, fit() would queue the epoch's 40 calls at once, and a
    Ctrl-C, checked before each call, would wait for all of them (it did on the real data: an epoch's 35 s)."""
    def most_unfinished(calls_in_flight: int) -> int:
        proc = subprocess.run([sys.executable, "-c", RUN_AHEAD, str(calls_in_flight)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, check=False, env={**os.environ, "KERAS_BACKEND": "jax"})
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["calls"] == 40
        return result["most_unfinished"]

    assert most_unfinished(jax_steps.CALLS_IN_FLIGHT) <= jax_steps.CALLS_IN_FLIGHT - 1
    assert most_unfinished(1000) > jax_steps.CALLS_IN_FLIGHT, "unbounded, the host runs ahead of the device"
