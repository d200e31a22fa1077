#!/usr/bin/env python3
"""Training throughput of the default network: plain Keras float32 against the program's own path.

Run by hand, not in CI (it takes minutes and needs a quiet machine):

    python3 benchmarks/throughput.py --data-dir ../shared/data/fashion-mnist

Variants, alternated in every repeat so that machine noise hits them alike:
  plain-float32   float32 arrays scaled in NumPy, fed to model.fit (the textbook path)
  program         ConvolutionalNN.build_model: uint8 arrays, scaling inside the model, fed
                  by ConvolutionalNN.epoch_streams (a new batch order every epoch)
  program-arrays  the same model fed the arrays by fit(shuffle=True) (the input path
                  before epoch_streams; not a choice the program offers)
  program-bf16    the same under Keras's mixed_bfloat16 policy (fast only where the
                  CPU has AVX512-BF16/AMX, or on a GPU)
Prints steady-state images/s (median, min, max over repeats, first epoch of each fit
dropped as warm-up), seconds per 48,000-image epoch, the ratio to plain-float32, the
achieved GFLOP/s against this machine's measured matmul peak, and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ConvolutionalNN as cnn  # the script lives one folder up


def load_images(data_dir: Path | None, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real training images, or random ones of the same shape."""
    if data_dir and (data_dir / cnn.IDX_FILES["train_images"]).exists():
        x, y, _, _ = cnn.read_idx_folder(data_dir)
        return x[:count, :, :, None], y[:count]
    print("real data not found: using random images of the same shape")
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, count).astype(np.uint8)


def plain_float32_model(cfg: cnn.Config) -> object:
    """The same layers without in-model scaling: the textbook float32 model."""
    import keras

    model = cnn.build_model(cfg, cfg.lr, steps_per_epoch=100)
    plain = keras.Sequential([keras.Input((28, 28, 1), dtype="float32"), *model.layers[1:]])
    plain.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return plain


def time_epochs(model: object, x: np.ndarray, y: np.ndarray, batch: int, epochs: int, program: bool) -> list[float]:
    """Seconds of each epoch of one fit() call; program: fed by the program's own per-epoch-shuffled batches."""
    import keras

    marks: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: marks.append(time.perf_counter()),
                                           on_epoch_end=lambda e, logs: marks.append(time.perf_counter()))
    if program:
        batches, start_epoch = cnn.epoch_streams(x, y, batch, 0, model)
        streams = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: start_epoch(e))
        model.fit(batches, epochs=epochs, verbose=0, shuffle=False, callbacks=[streams, clock])
    else:
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[clock])
    return [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]


def matmul_peak_gflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Best observed GFLOP/s of an n x n matmul in dtype: this machine's practical peak."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    tf.matmul(a, a).numpy()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, a).numpy()
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def training_flops_per_image(cfg: cnn.Config) -> float:
    """Multiply-adds of the conv and dense layers, x2 for FLOPs, x3 for forward + backward."""
    side1, side2 = cnn.conv_sides(cfg.kernel_size, cfg.padding)
    k2 = cfg.kernel_size ** 2
    flat = (side2 // 2) ** 2 * cfg.filters
    macs = (side1**2 * cfg.filters * k2 + side2**2 * cfg.filters * cfg.filters * k2
            + flat * cfg.dense_units + cfg.dense_units * 10)
    return 2 * 3 * macs


def main() -> int:
    """Measure, alternate, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/fashion-mnist"))
    p.add_argument("--repeats", type=int, default=3, help="rounds of all variants")
    p.add_argument("--images", type=int, default=3840, help="images per timed epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is warm-up")
    p.add_argument("--variants", nargs="+", default=["plain-float32", "program", "program-bf16"])
    a = p.parse_args()

    import keras

    cfg = cnn.Config()
    x, y = load_images(a.data_dir, a.images)
    x_float = x.astype(np.float32) / 255
    rates: dict[str, list[float]] = {v: [] for v in a.variants}
    for r in range(a.repeats):
        for variant in a.variants:
            keras.mixed_precision.set_global_policy("mixed_bfloat16" if variant.endswith("bf16") else "float32")
            keras.utils.set_random_seed(r)
            if variant == "plain-float32":
                model, inputs = plain_float32_model(cfg), x_float
            else:
                model, inputs = cnn.build_model(cfg, cfg.lr, steps_per_epoch=100), x
            streams = variant in ("program", "program-bf16")
            seconds = time_epochs(model, inputs, y, cfg.batch_size, a.epochs, streams)[1:]
            rates[variant] += [len(x) / s for s in seconds]
            print(f"repeat {r + 1}/{a.repeats} {variant:>14}: " + ", ".join(f"{len(x) / s:,.0f}" for s in seconds)
                  + " img/s", flush=True)
    keras.mixed_precision.set_global_policy("float32")

    flops = training_flops_per_image(cfg)
    peaks = {"float32": matmul_peak_gflops("float32"), "bfloat16": matmul_peak_gflops("bfloat16")}
    base = statistics.median(rates[a.variants[0]])
    print(f"\nmatmul peak here: float32 {peaks['float32']:,.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:,.0f} GFLOP/s;"
          f" training costs {flops / 1e6:,.0f} MFLOP per image")
    print(f"{'variant':>14} {'median img/s':>12} {'min':>7} {'max':>7} {'s/epoch (48k)':>13} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for variant, values in rates.items():
        med = statistics.median(values)
        peak = peaks["bfloat16" if variant.endswith("bf16") else "float32"]
        gflops = med * flops / 1e9
        print(f"{variant:>14} {med:>12,.0f} {min(values):>7,.0f} {max(values):>7,.0f} {48000 / med:>13,.1f} "
              f"{med / base:>6.2f} {gflops:>8,.0f} {gflops / peak:>8.0%}")
    print(f"peak memory of this process: {cnn.peak_memory_mb()} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
