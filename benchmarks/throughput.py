#!/usr/bin/env python3
"""Training speed of the default network: whole 48,000-image epochs with validation, variant against variant.

Run by hand on a quiet machine, not in CI (about 3 minutes an epoch on a 2-core Zen 3):

    python3 benchmarks/throughput.py --data-dir ../shared/data/fashion-mnist

and the per-step cost beyond the arithmetic (issue 48: the network shrunk to 1 filter and 1 dense unit, on JAX,
about 6 s an epoch on a 2-core CPU):

    python3 benchmarks/throughput.py --data-dir ../shared/data/fashion-mnist --backend jax --shrunk \
        --variants keras-float32 program --repeats 5

Each variant trains in its own process (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import), warmed up
on 30 batches; then the variants take turns, one whole epoch each (48,000 training images, then the 12,000
validation images), for --repeats rounds, so that machine noise hits them alike. Variants:

  keras-float32   the textbook path: float32 arrays scaled in NumPy, fit(shuffle=True), TensorFlow's own
                  oneDNN choice for this CPU (the ratio column is against this one)
  program-eigen   the program's training path with TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's Eigen kernels)
  program         the program's training path as `python3 ConvolutionalNN.py` runs it: uint8 input scaled in
                  the model, epoch streams with 1-pixel shifts, EMA, label smoothing, oneDNN on, --precision auto
  program-no-levers  the same without the default's levers (no EMA, label smoothing or shifts): what they cost
  program-bf16    the program's path in mixed bfloat16 (fast only on CPUs with AVX512-BF16 or AMX)
  program-float32 the program's path in float32 (what --precision auto gains where it picks bfloat16)
  program-numpy   the program's path on TensorFlow fed by the NumPy batches that JAX and PyTorch train on (a
                  keras.utils.PyDataset) instead of tf.data: which feed is faster on TensorFlow
  program-jax     the program's path on Keras's JAX backend (--backend jax; NumPy batches, no TensorFlow: the
                  only variant that runs where TensorFlow is not installed, such as a GPU machine with JAX)
  program-torch   the same on the PyTorch backend (--backend torch; run this script with a Python that has torch)

Every variant runs on TensorFlow unless it names its backend or --backend names another: --backend jax compares
the textbook path and the program's on JAX, where TensorFlow is not installed (a GPU machine with JAX).

Prints, per variant, the median seconds per epoch (training and validation), the images/s that makes (48,000
training images over the whole epoch), the ratio to keras-float32, and the fraction of this machine's matmul
peak (measured in each process, in the precision it trains in) that the epoch's arithmetic achieved (training
images at 3x the forward pass, validation images at 1x). Only whole epochs are timed: split at the start of
validation, epochs whose totals agreed to 0.1 s differed by 10 s in their training part, and at 30 steps one
epoch measured anything from 745 to 1,419 images/s.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ONEDNN_SET_OUTSIDE = "TF_ENABLE_ONEDNN_OPTS" in os.environ
import ConvolutionalNN as cnn  # the script lives one folder up; importing it (its backends module) turns oneDNN on
from fashion_cnn import backends, common, data_files, hardware, journal, streams

if sys.argv[1:3] == ["--worker", "keras-float32"] and not ONEDNN_SET_OUTSIDE:
    del os.environ["TF_ENABLE_ONEDNN_OPTS"]  # TensorFlow as it comes (it has not been imported yet)

SHRUNK = ["--filters", "1", "--dense-units", "1"]  # --shrunk: next to no arithmetic, the per-step cost laid bare
NO_LEVERS = ["--ema", "0", "--label-smoothing", "0", "--shift", "0", "--conv-dropout", "0.25"]  # the old recipe
VARIANTS = {  # name: (environment it needs, precision, program's path?, extra flags)
    "keras-float32": ({"TF_ENABLE_ONEDNN_OPTS": None}, "float32", False, NO_LEVERS),  # None: TensorFlow decides
    "program-eigen": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "auto", True, []),
    "program": ({}, "auto", True, []),
    "program-no-levers": ({}, "auto", True, NO_LEVERS),
    "program-bf16": ({}, "bfloat16", True, []),
    "program-float32": ({}, "float32", True, []),
    "program-numpy": ({}, "auto", True, []),
    "program-jax": ({"KERAS_BACKEND": "jax"}, "auto", True, []),
    "program-torch": ({"KERAS_BACKEND": "torch"}, "auto", True, []),
}
DEFAULT_VARIANTS = ["keras-float32", "program-eigen", "program", "program-no-levers"]


# Driver ------------------------------------------------------------------------------------------------------

def main() -> int:
    """Start a worker per variant, let them take turns epoch by epoch, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/fashion-mnist"))
    p.add_argument("--repeats", type=int, default=3, help="rounds of one epoch per variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    p.add_argument("--limit", type=int, help="train on the first N images only (a quick check of this script; "
                   "the figures are for whole epochs)")
    p.add_argument("--backend", choices=("tensorflow", "jax", "torch"), default="tensorflow",
                   help="the Keras backend of the variants that name none")
    p.add_argument("--shrunk", action="store_true", help="the same network shrunk to 1 filter and 1 dense unit: "
                   "what a step costs beyond its arithmetic (Keras's loop, the batch feed, callbacks)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.data_dir, a.limit, a.shrunk)
    if not (a.data_dir / data_files.IDX_FILES["train_images"]).exists():
        sys.exit(f"error: no Fashion-MNIST in {a.data_dir}; give --data-dir (the figures need the real data)")
    workers, ready = {}, {}
    for v in a.variants:  # one after another, so that each measures its matmul peak alone
        workers[v] = start_worker(v, a.data_dir, a.limit, a.backend, a.shrunk)
        ready[v] = read_reply(workers[v])
    epochs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for r in range(a.repeats):
        for variant, proc in workers.items():
            proc.stdin.write("epoch\n")
            proc.stdin.flush()
            epochs[variant].append(read_reply(proc))
            e = epochs[variant][-1]
            print(f"round {r + 1}/{a.repeats} {variant:>17}: {e['epoch_s']:6.1f} s/epoch, "
                  f"{e['train_images'] / e['epoch_s']:4,.0f} img/s", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    print_table(ready, epochs)
    return 0


def start_worker(variant: str, data_dir: Path, limit: int | None, backend: str, shrunk: bool
                 ) -> subprocess.Popen[str]:
    """A process that trains variant one epoch at a time, on request, on backend unless the variant names one."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", KERAS_BACKEND=backend)
    for key, value in VARIANTS[variant][0].items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    limit_flag = ["--limit", str(limit)] if limit else []
    return subprocess.Popen([sys.executable, __file__, "--worker", variant, "--data-dir", str(data_dir), *limit_flag,
                             *(["--shrunk"] if shrunk else [])],
                            env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def read_reply(proc: subprocess.Popen[str]) -> dict:
    """The worker's next JSON line."""
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"error: a worker stopped (exit code {proc.wait()})")
    return json.loads(line)


def print_table(ready: dict[str, dict], epochs: dict[str, list[dict]]) -> None:
    """Medians per variant, ratio to the first variant, fraction of the matmul peak."""
    first = next(iter(epochs))
    peak = {}  # the best matmul rate any process reached in each precision
    for info in ready.values():
        peak[info["precision"]] = max(peak.get(info["precision"], 0), info["peak_gflops"])
    seconds = {v: statistics.median(e["epoch_s"] for e in es) for v, es in epochs.items()}
    print(f"\n{'variant':>17} {'precision':>9} {'oneDNN':>6} {'s/epoch':>7} {'min':>6} {'max':>6} {'img/s':>5} "
          f"{'ratio':>5} {'GFLOP/s':>7} {'of peak':>7}")
    for v, es in epochs.items():
        info, e = ready[v], es[0]
        flops = (e["train_images"] + e["val_images"] / 3) * info["flops_per_image"]
        gflops = flops / seconds[v] / 1e9
        print(f"{v:>17} {info['precision']:>9} {info['onednn']:>6} {seconds[v]:>7.1f} "
              f"{min(x['epoch_s'] for x in es):>6.1f} {max(x['epoch_s'] for x in es):>6.1f} "
              f"{e['train_images'] / seconds[v]:>5,.0f} {seconds[first] / seconds[v]:>5.2f} {gflops:>7,.0f} "
              f"{gflops / peak[info['precision']]:>7.0%}")
    each = ", ".join(f"{v} {i['peak_gflops']:,.0f}" for v, i in ready.items())
    print(f"matmul peak, GFLOP/s, as each process measured it: {each}; training costs "
          f"{next(iter(ready.values()))['flops_per_image'] / 1e6:,.0f} MFLOP per image; medians of "
          f"{len(next(iter(epochs.values())))} epochs each, {os.cpu_count()} CPUs")


# Worker ------------------------------------------------------------------------------------------------------

def worker(variant: str, data_dir: Path, limit: int | None, shrunk: bool) -> int:
    """Build the variant, warm it up, then train one whole epoch per 'epoch' line on stdin."""
    cfg, chosen, one_epoch = prepare(variant, data_dir, limit, SHRUNK if shrunk else [])
    one_epoch(0, steps=30)  # traces the functions
    reply({"precision": chosen, "onednn": onednn_state(cfg.backend),
           "peak_gflops": matmul_peak_gflops(chosen), "flops_per_image": hardware.training_flops_per_image(cfg)})
    for epoch, _ in enumerate(sys.stdin, start=1):
        reply(one_epoch(epoch))
    return 0


def prepare(variant: str, data_dir: Path, limit: int | None, sizes: list[str]
            ) -> tuple[cnn.Config, str, Callable[..., dict]]:
    """The variant's settings, the precision it trains in, and its one_epoch(epoch, steps=None): one epoch of
    training with validation, and its seconds (with `steps`: a warm-up of that many steps, untimed)."""
    _, precision, program, extra_flags = VARIANTS[variant]
    flags = ["--precision", precision] if precision != "auto" else []
    flags += ["--data-dir", str(data_dir), *(["--limit", str(limit)] if limit else [])]
    cfg = cnn.parse_args(flags + extra_flags + sizes)
    backends.use_backend(cfg.backend)  # KERAS_BACKEND, as the driver set it for this variant
    keras = backends.import_keras()
    chosen, _ = hardware.set_precision(cfg.precision)
    data = cnn.split_data(cnn.load_arrays(cfg)[0], cfg, seed=0)
    streams.seed_everything(0)
    model = cnn.build_model(cfg, cfg.lr, -(-len(data.y_train) // cfg.batch_size))
    train = program_epochs(variant, cfg, data, model) if program else textbook_epochs(keras, cfg, data, model)

    def one_epoch(epoch: int, steps: int | None = None) -> dict:
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # stdout: the replies
            train(epoch, steps)
        seconds = time.perf_counter() - start
        # At the end of fit Keras copies the weight average into the weights (use_ema); on JAX the two then share
        # one buffer, which the next fit donates twice ("Attempt to donate the same buffer twice"): part them.
        for variable in model.trainable_variables:
            variable.assign(keras.ops.copy(variable))
        return {"train_images": len(data.y_train), "val_images": len(data.y_val), "epoch_s": seconds}

    return cfg, chosen, one_epoch


def program_epochs(variant: str, cfg: cnn.Config, data: cnn.Dataset, model: object) -> Callable[[int, int | None], None]:
    """train(epoch, steps) for the program: an epoch of the script's own fit(), its callbacks and validation
    included, or a warm-up of `steps` steps that compiles what the epochs run."""
    keras = backends.import_keras()
    batches, start_epoch = program_batches(variant, cfg, data, model)
    folder = Path(tempfile.mkdtemp(prefix="throughput_"))  # the keeper's and BackupAndRestore's saves
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    keeper = backends.on_keras(cnn.RunKeeper, "callbacks.Callback")(journal.RunState({}), folder, start_epoch, [], False)
    y_val = keras.utils.to_categorical(data.y_val, len(common.CLASS_NAMES))

    def train(epoch: int, steps: int | None) -> None:
        if steps:
            start_epoch(epoch)
            model.fit(batches, steps_per_epoch=steps, validation_data=(data.x_val, y_val), verbose=0, shuffle=False,
                      validation_batch_size=common.EVALUATION_BATCH)
        else:
            cnn.fit(dataclasses.replace(cfg, epochs=epoch + 1), model, batches, data, keeper, None, first_epoch=epoch)

    return train


def textbook_epochs(keras: object, cfg: cnn.Config, data: cnn.Dataset, model: object
                    ) -> Callable[[int, int | None], None]:
    """train(epoch, steps) for textbook Keras: fit on float32 arrays in [0, 1], shuffled by Keras, validated in
    batches of the same size, no callbacks."""
    plain = textbook_model(keras, model)
    x, x_val = (images.astype(np.float32) / 255 for images in (data.x_train, data.x_val))

    def train(epoch: int, steps: int | None) -> None:
        plain.fit(x, data.y_train, batch_size=cfg.batch_size, shuffle=True, steps_per_epoch=steps,
                  initial_epoch=epoch, epochs=epoch + 1, validation_data=(x_val, data.y_val), verbose=0)

    return train


def program_batches(variant: str, cfg: cnn.Config, data: cnn.Dataset, model: object) -> tuple[object, Callable]:
    """The program's training batches and the function that starts an epoch; for program-numpy, the NumPy batches
    (JAX's and PyTorch's feed) on whatever backend runs."""
    if variant != "program-numpy":
        return streams.epoch_streams(cfg, data.x_train, data.y_train, 0, model)
    batches = backends.on_keras(streams.EpochBatches, "utils.PyDataset")(cfg, data.x_train, data.y_train, 0)
    return batches, streams.epoch_starter(batches.set_epoch, model)


def reply(payload: dict) -> None:
    """One JSON line to the driver."""
    print(json.dumps(payload), flush=True)


def textbook_model(keras: object, model: object) -> object:
    """The program's layers fed float32 images already in [0, 1]: what a textbook Keras script trains."""
    plain = keras.Sequential([keras.Input((28, 28, 1), dtype="float32"), *model.layers[1:]])
    plain.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return plain


def onednn_state(backend: str) -> str:
    """Whether TensorFlow runs its oneDNN kernels (its own answer, after its CPU check); n/a on other backends."""
    if backend != "tensorflow":
        return "n/a"
    from tensorflow.python.util import _pywrap_util_port

    return "on" if _pywrap_util_port.IsMklEnabled() else "off"


def matmul_peak_gflops(precision: str, repeats: int = 5) -> float:
    """Best observed GFLOP/s of an n x n matmul in the precision trained in, on the backend's device (a GPU if it
    has one): this machine's practical peak. n is 2048 on a CPU, 8192 on a GPU (smaller ones leave it idle)."""
    ops = backends.import_keras().ops
    n = 8192 if hardware.gpu_capabilities() else 2048
    a = ops.cast(ops.convert_to_tensor(np.random.default_rng(0).normal(size=(n, n))),
                 "bfloat16" if precision == "bfloat16" else "float32")

    def product() -> float:  # waits for the product; copies one number back, not n x n
        return float(ops.convert_to_numpy(ops.cast(ops.matmul(a, a)[0, 0], "float32")))

    product()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    sys.exit(main())
