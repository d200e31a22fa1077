#!/usr/bin/env python3
"""Train, study and use a convolutional network on Zalando's Fashion-MNIST.

What it does
    Loads Fashion-MNIST (through ``keras.datasets`` or, offline, from the four
    IDX ``.gz`` files with ``--data-dir``), trains a Conv2D / MaxPooling2D /
    Dropout / Flatten / Dense network with 128 3x3 filters for 20 epochs with
    Adam at learning rate 0.001 on a stratified 80/20 train/validation split,
    keeps the weights of the epoch with the best validation accuracy, evaluates
    them once on the 10,000 test images, and writes plots, metrics and the
    model. Several values after ``--lr`` run the learning-rate study;
    ``--predict`` classifies your own images with the saved model.

Result (see README.md for the full table and how it was measured)
    The default run's test accuracy, measured on the real data, is in
    ``plots/metrics.json`` and in the README with the machine it ran on.

How to run
    python3 ConvolutionalNN.py                                   # default run
    python3 ConvolutionalNN.py --data-dir ~/fashion-mnist        # offline
    python3 ConvolutionalNN.py --lr 0.1 0.01 0.001 0.0001        # LR study
    python3 ConvolutionalNN.py --predict shoe.jpg shirt.png      # classify
    python3 ConvolutionalNN.py --help                            # every flag
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ log is noise here; real failures raise in Python

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIDE = 28
TRAIN_COUNT, TEST_COUNT = 60_000, 10_000
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED = 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run; built from the command line by parse_args()."""

    lrs: tuple[float, ...] = (0.001,)  # Adam learning rate(s); several run the study
    epochs: int = 20                  # passes over the training split
    batch_size: int = 128             # images per optimisation step
    val_split: float = 0.2            # fraction of the 60,000 training images held out
    seed: int = 0                     # seeds the split, the weights and dropout
    limit: int | None = None          # train on the first N training images only
    schedule: str = "cosine"          # learning rate over time: cosine decay or constant
    filters: int = 128                # filters in each Conv2D layer
    kernel_size: int = 3              # side of the square convolution kernels
    padding: str = "same"             # Conv2D padding: same (original project) or valid
    dense_units: int = 128            # width of the hidden Dense layer
    dropout: float = 0.5              # dropout before the output layer
    data_dir: Path | None = None      # read the four IDX .gz files here instead of keras.datasets
    plots_dir: Path = Path("plots")   # where plots, history.csv and metrics.json go
    model_path: Path = Path("models/fashion_cnn.keras")  # the trained model
    predict: tuple[Path, ...] = ()    # images or folders to classify with the saved model
    json_output: bool = False         # print --predict results as JSON
    resume: bool = False              # continue the unfinished run saved beside --model-path

    @property
    def lr(self) -> float:
        """The learning rate of a single run (the first of --lr)."""
        return self.lrs[0]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def parse_number(text: str) -> float:
    """A float from the command line, or argparse's usage error."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = parse_number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    value = parse_number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1, exclusive")
    return value


def dropout_rate(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = parse_number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with every flag's default in its help."""
    d = Config()
    p = OneLineErrorParser(
        prog="ConvolutionalNN.py",
        description="Train, study and use a CNN on Fashion-MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--lr", type=positive_float, nargs="+", default=list(d.lrs), metavar="LR",
                   help="Adam learning rate; several values run the learning-rate study")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per step")
    p.add_argument("--val-split", type=open_fraction, default=d.val_split,
                   help="fraction of the training images held out for validation (stratified)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (split, weights, dropout)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images (quick tries); at least one batch")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule,
                   help="learning rate over the run: cosine decay from --lr to 0, or constant")
    p.add_argument("--filters", type=positive_int, default=d.filters, help="filters per Conv2D layer")
    p.add_argument("--kernel-size", type=positive_int, default=d.kernel_size, help="Conv2D kernel side")
    p.add_argument("--padding", choices=("same", "valid"), default=d.padding, help="Conv2D padding")
    p.add_argument("--dense-units", type=positive_int, default=d.dense_units, help="hidden Dense width")
    p.add_argument("--dropout", type=dropout_rate, default=d.dropout, help="dropout before the output layer")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four Fashion-MNIST IDX .gz files (offline use); "
                        "default: keras.datasets, cached under $KERAS_HOME or ~/.keras")
    p.add_argument("--plots-dir", type=Path, default=d.plots_dir, help="folder for plots and metrics")
    p.add_argument("--model-path", type=Path, default=d.model_path, help="trained model (.keras)")
    p.add_argument("--predict", type=Path, nargs="+", default=[], metavar="IMAGE",
                   help="classify these images (or every image in these folders) with --model-path")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted or killed run from its last finished epoch (same flags)")
    p.add_argument("--json", dest="json_output", action="store_true", help="print --predict results as JSON")
    return p


def parse_args(argv: Sequence[str] | None) -> Config:
    """Parse and cross-check the flags; usage problems exit with code 2."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.model_path.suffix != ".keras":
        parser.error(f"--model-path {a.model_path} must end in .keras")
    if a.limit is not None and a.limit < a.batch_size:
        parser.error(f"--limit {a.limit} is smaller than one batch (--batch-size {a.batch_size})")
    if feature_side(a.kernel_size, a.padding) < 1:
        parser.error(f"--kernel-size {a.kernel_size} with --padding valid leaves no pixels; use a smaller kernel")
    if a.resume and (a.predict or len(a.lr) > 1):
        parser.error("--resume applies to a single training run, not to --predict or a study")
    if a.json_output and not a.predict:
        parser.error("--json only applies to --predict")
    return Config(
        lrs=tuple(a.lr), epochs=a.epochs, batch_size=a.batch_size, val_split=a.val_split,
        seed=a.seed, limit=a.limit, schedule=a.schedule, filters=a.filters,
        kernel_size=a.kernel_size, padding=a.padding, dense_units=a.dense_units,
        dropout=a.dropout, data_dir=a.data_dir, plots_dir=a.plots_dir,
        model_path=a.model_path, predict=tuple(a.predict), json_output=a.json_output,
        resume=a.resume,
    )


def conv_sides(kernel_size: int, padding: str) -> tuple[int, int]:
    """Output side of each of the two Conv2D layers (each is followed by 2x2 pooling)."""
    sides, side = [], IMAGE_SIDE
    for _ in range(2):
        side = side if padding == "same" else side - kernel_size + 1
        sides.append(side)
        side //= 2
    return sides[0], sides[1]


def feature_side(kernel_size: int, padding: str) -> int:
    """Side of the feature maps after both conv + pool blocks."""
    return conv_sides(kernel_size, padding)[1] // 2


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Dataset:
    """uint8 images (N, 28, 28, 1) and uint8 labels for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the format Fashion-MNIST ships in) as uint8."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"missing data file {path}; the folder needs {', '.join(IDX_FILES.values())}") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise UserError(f"cannot read {path} as gzip ({e}); re-download the original Fashion-MNIST file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path} has a truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data, but its header promises shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_folder(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four Fashion-MNIST arrays from a folder of IDX .gz files."""
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; point it at the four Fashion-MNIST .gz files")
    arrays = {key: read_idx(data_dir / name) for key, name in IDX_FILES.items()}
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def download_with_keras() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four arrays through keras.datasets (downloads once, then uses its cache)."""
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception when the download fails
        raise UserError(f"could not load Fashion-MNIST through keras.datasets ({first_line(e)}); "
                        "without internet, use --data-dir with the four .gz files") from None
    return x_train, y_train, x_test, y_test


def check_arrays(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
    """Refuse data that is not Fashion-MNIST-shaped before any training starts."""
    for name, x, y, count in (("training", x_train, y_train, TRAIN_COUNT), ("test", x_test, y_test, TEST_COUNT)):
        if x.dtype != np.uint8 or x.shape != (count, IMAGE_SIDE, IMAGE_SIDE):
            raise UserError(f"{name} images have shape {x.shape} ({x.dtype}); expected ({count}, 28, 28) uint8")
        if y.dtype != np.uint8 or y.shape != (count,):
            raise UserError(f"{name} labels have shape {y.shape} ({y.dtype}); expected ({count},) uint8")
        if y.max() >= len(CLASS_NAMES):
            raise UserError(f"{name} labels go up to {y.max()}; Fashion-MNIST labels are 0..9")


def load_data(cfg: Config) -> Dataset:
    """Load, check, optionally limit, and split the data; images stay uint8."""
    from sklearn.model_selection import train_test_split

    arrays = read_idx_folder(cfg.data_dir) if cfg.data_dir else download_with_keras()
    check_arrays(*arrays)
    x_train, y_train, x_test, y_test = arrays
    if cfg.limit:
        x_train, y_train = x_train[:cfg.limit], y_train[:cfg.limit]
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(y_train)), test_size=cfg.val_split, stratify=y_train, random_state=cfg.seed)
    except ValueError as e:
        raise UserError(f"cannot split {len(y_train)} images stratified with --val-split {cfg.val_split} "
                        f"({e}); use a larger --limit") from None
    if len(train_idx) < cfg.batch_size:
        raise UserError(f"only {len(train_idx)} training images after the split, less than one batch; "
                        "use a larger --limit or a smaller --val-split")
    with_channel = (lambda x: x[..., np.newaxis])
    return Dataset(
        with_channel(x_train[train_idx]), y_train[train_idx],
        with_channel(x_train[val_idx]), y_train[val_idx],
        with_channel(x_test), y_test,
    )


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

def build_model(cfg: Config, lr: float, steps_per_epoch: int) -> Any:
    """The CNN, compiled with Adam; pixels are scaled to [0, 1] inside the model."""
    import keras
    from keras import layers

    model = keras.Sequential(name="fashion_cnn")
    model.add(keras.Input(shape=(IMAGE_SIDE, IMAGE_SIDE, 1), dtype="uint8", name="image"))
    model.add(layers.Rescaling(1 / 255, name="scale"))
    for block in (1, 2):
        model.add(layers.Conv2D(cfg.filters, cfg.kernel_size, padding=cfg.padding,
                                activation="relu", name=f"conv{block}"))
        model.add(layers.MaxPooling2D(2, name=f"pool{block}"))
        model.add(layers.Dropout(0.25, name=f"dropout{block}"))
    model.add(layers.Flatten(name="flatten"))
    model.add(layers.Dense(cfg.dense_units, activation="relu", name="dense"))
    model.add(layers.Dropout(cfg.dropout, name="dropout3"))
    model.add(layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32", name="class_probabilities"))
    schedule: Any = lr
    if cfg.schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=cfg.epochs * steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

BEST_MONITOR = "val_accuracy"  # the reported figure is accuracy; val_loss bottoms out earlier from overconfidence


class TrainingInterrupted(Exception):
    """Raised inside fit() after the batch during which SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying; a second signal kills as usual."""
    received: list[int] = []

    def note(signum: int, _frame: Any) -> None:
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name} received: stopping after this batch "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupt_callback(received: list[int]) -> Any:
    """A Keras callback that aborts fit() once a stop signal has been recorded."""
    import keras

    class StopOnSignal(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if received:
                raise TrainingInterrupted(received[0])

    return StopOnSignal()


@dataclasses.dataclass
class TrainResult:
    """What one training run produced."""

    model: Any
    lr: float
    history: dict[str, list[float]]
    best_epoch: int | None     # 1-based epoch whose weights the model holds; None if no epoch finished
    seconds: float
    diverged: bool = False
    interrupted_by: int | None = None  # signal number, if stopped by one


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same flags: the same run."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def has_non_finite(history: dict[str, list[float]]) -> bool:
    """True if any logged loss is NaN or infinite."""
    return any(not math.isfinite(v) for key in ("loss", "val_loss") for v in history.get(key, []))


def resume_dir(cfg: Config) -> Path:
    """Where an unfinished run keeps what --resume needs (beside the model)."""
    return cfg.model_path.with_name(f".{cfg.model_path.stem}.resume")


def run_identity(cfg: Config, lr: float) -> dict[str, Any]:
    """The settings that shape the model, the data or the schedule: a resume must match them all."""
    return {"data": str(cfg.data_dir) if cfg.data_dir else "keras.datasets", "limit": cfg.limit,
            "val_split": cfg.val_split, "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "lr": lr, "schedule": cfg.schedule, "filters": cfg.filters, "kernel_size": cfg.kernel_size,
            "padding": cfg.padding, "dense_units": cfg.dense_units, "dropout": cfg.dropout}


@dataclasses.dataclass
class RunState:
    """Progress of a run as saved after every epoch: enough to resume it."""

    identity: dict[str, Any]
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    best_epoch: int | None = None        # 1-based
    best_value: float | None = None      # BEST_MONITOR at best_epoch
    best_weights: list[np.ndarray] | None = None
    seconds: float = 0.0                 # training time of the finished epochs, across resumes

    def save(self, folder: Path) -> None:
        """Write the best weights, then the JSON that points at them, each atomically."""
        if self.best_weights is not None:
            with atomic_path(folder / "best_weights.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, *self.best_weights)
        meta = {"identity": self.identity, "history": self.history, "seconds": self.seconds,
                "best_epoch": self.best_epoch, "best_value": self.best_value}
        write_json(folder / "state.json", meta)

    @classmethod
    def load(cls, folder: Path) -> RunState:
        """Read a saved state, or say there is nothing to resume."""
        try:
            meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            weights = None
            if meta["best_epoch"] is not None:
                with np.load(folder / "best_weights.npz") as npz:
                    weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except FileNotFoundError:
            raise UserError(f"nothing to resume at {folder}: no unfinished run with this --model-path; "
                            "run without --resume") from None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"the resume state in {folder} is damaged ({first_line(e)}); "
                            "run without --resume to start afresh") from None
        history = {k: [math.nan if v is None else v for v in vs] for k, vs in meta["history"].items()}
        return cls(meta["identity"], history, meta["best_epoch"], meta["best_value"], weights, meta["seconds"])


def resume_state(cfg: Config, lr: float, folder: Path) -> RunState:
    """A fresh state, or (with --resume) the one saved in folder after checking that nothing that matters changed."""
    identity = run_identity(cfg, lr)
    if not cfg.resume:
        if folder.exists():
            print(f"Note: starting afresh; discarding the unfinished run saved in {folder}")
            shutil.rmtree(folder)
        return RunState(identity)
    state = RunState.load(folder)
    changed = [f"{k} was {state.identity.get(k)!r}, now {v!r}" for k, v in identity.items()
               if state.identity.get(k) != v]
    if changed:
        raise UserError(f"cannot resume with different settings ({'; '.join(changed)}); "
                        "use the original flags, or run without --resume to start afresh")
    print(f"Resuming after epoch {len(state.history.get('loss', []))} of {cfg.epochs} from {folder}")
    return state


def journal_callback(state: RunState, folder: Path) -> Any:
    """A Keras callback that keeps the best epoch's weights and saves the run's state after every epoch.

    EarlyStopping(restore_best_weights=True) does the first half, but forgets
    everything on a resumed fit(); this keeps it in `state`, on disk.
    """
    import keras

    class Journal(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.seconds_before, self.started = state.seconds, time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            # A kill between this journal's save and BackupAndRestore's makes Keras redo an epoch.
            for values in state.history.values():
                del values[epoch:]

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            for key, value in logs.items():
                state.history.setdefault(key, []).append(float(value))
            value = logs.get(BEST_MONITOR)
            healthy = all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "val_loss"))
            if healthy and value is not None and (state.best_value is None or value > state.best_value):
                state.best_epoch, state.best_value = epoch + 1, float(value)
                state.best_weights = self.model.get_weights()
            state.seconds = self.seconds_before + time.perf_counter() - self.started
            state.save(folder)

    return Journal()


def train(cfg: Config, data: Dataset, lr: float) -> TrainResult:
    """Train a model at learning rate lr (or resume one); end with the best epoch's weights."""
    import keras

    seed_everything(cfg.seed)
    folder = resume_dir(cfg)
    state = resume_state(cfg, lr, folder)
    steps = math.ceil(len(data.y_train) / cfg.batch_size)
    model = build_model(cfg, lr, steps)
    callbacks = [
        journal_callback(state, folder),  # before BackupAndRestore: see Journal.on_epoch_begin
        keras.callbacks.BackupAndRestore(str(folder / "backup"), double_checkpoint=True),
        keras.callbacks.TerminateOnNaN(),
    ]
    interrupted_by = None
    with stop_requests() as received:
        try:
            model.fit(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val),
                      epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True, verbose="auto",
                      callbacks=[*callbacks, interrupt_callback(received)])
        except TrainingInterrupted as stop:
            interrupted_by = stop.signum
        except (OSError, ValueError) as e:
            if not cfg.resume:
                raise
            raise UserError(f"cannot restore the saved run from {folder} ({first_line(e)}); "
                            "run without --resume to start afresh") from None
    if state.best_weights is not None:
        model.set_weights(state.best_weights)
    if interrupted_by is None:
        shutil.rmtree(folder, ignore_errors=True)
    return TrainResult(model, lr, state.history, state.best_epoch, state.seconds, has_non_finite(state.history),
                       interrupted_by)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Evaluation:
    """Test-set results of one trained model."""

    loss: float
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray
    predicted: np.ndarray


def evaluate(model: Any, data: Dataset, batch_size: int) -> Evaluation:
    """Evaluate on the test set: loss, accuracy, per-class accuracy, confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss

    labels = range(len(CLASS_NAMES))
    probabilities = model.predict(data.x_test, batch_size=max(batch_size, 512), verbose=0)
    predicted = probabilities.argmax(axis=1)
    confusion = confusion_matrix(data.y_test, predicted, labels=labels)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return Evaluation(float(log_loss(data.y_test, probabilities, labels=labels)),
                      float(accuracy_score(data.y_test, predicted)),
                      dict(zip(CLASS_NAMES, map(float, per_class))), confusion, predicted)


def print_evaluation(ev: Evaluation) -> None:
    """The test results a user reads at the end of a run."""
    print(f"\nTest loss: {ev.loss:.4f}")
    print(f"Test accuracy: {ev.accuracy:.2%}")
    print("Per-class test accuracy:")
    for name, acc in ev.per_class_accuracy.items():
        print(f"  {name:<12} {acc:7.2%}")


# ----------------------------------------------------------------------------
# Writing outputs (each file appears whole or not at all)
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success, fsync and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def check_writable(*folders: Path) -> None:
    """Fail before training, not after it, if an output folder cannot be written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror or e}); choose another folder "
                            "with --plots-dir / --model-path") from None


def save_model(model: Any, path: Path) -> None:
    """Save a .keras model atomically."""
    with atomic_path(path) as tmp:
        model.save(tmp)


# ----------------------------------------------------------------------------
# Report: plots, history and metrics
# ----------------------------------------------------------------------------

def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks() -> Any:
    """A tick locator for epoch axes: whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def plot_curves(history: dict[str, list[float]], metric: str, best_epoch: int | None, path: Path) -> None:
    """Training and validation `metric` per epoch, with the kept epoch marked."""
    plt = pyplot()
    epochs = range(1, len(history[metric]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, history[metric], "o-", label=f"training {metric}")
    ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel=metric, title=f"Fashion-MNIST CNN: {metric} per epoch")
    ax.xaxis.set_major_locator(integer_ticks())
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, path: Path) -> None:
    """Test-set confusion matrix with class names and counts."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 8))
    ConfusionMatrixDisplay(confusion, display_labels=CLASS_NAMES).plot(
        ax=ax, cmap="Blues", values_format="d", xticks_rotation=45, colorbar=False)
    ax.set_title("Test-set confusion matrix (rows: true class, columns: predicted)")
    save_figure(fig, path)


def plot_predictions(data: Dataset, predicted: np.ndarray, path: Path, count: int = 36) -> None:
    """A grid of test images titled predicted (true); mistakes in red."""
    plt = pyplot()
    cols = 6
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= min(count, len(predicted)):
            continue
        ax.imshow(data.x_test[i, :, :, 0], cmap="gray")
        wrong = predicted[i] != data.y_test[i]
        title = f"{CLASS_NAMES[predicted[i]]}\n(true: {CLASS_NAMES[data.y_test[i]]})" if wrong \
            else CLASS_NAMES[predicted[i]]
        ax.set_title(title, fontsize=8, color="red" if wrong else "black")
    fig.tight_layout()
    fig.suptitle("First test images: predicted class (mistakes in red, true class below)", y=1.02)
    save_figure(fig, path)


def plot_architecture(model: Any, path: Path) -> None:
    """A top-down diagram of the layers with their output shapes and parameter counts.

    Drawn with matplotlib rather than keras.utils.plot_model, which needs the
    Graphviz program that pip cannot install.
    """
    plt = pyplot()
    rows = [("image (Input, uint8)", str((None, IMAGE_SIDE, IMAGE_SIDE, 1)), "")]
    rows += [(f"{layer.name} ({type(layer).__name__})", str(layer.output.shape),
              f"{layer.count_params():,} params") for layer in model.layers]
    fig, ax = plt.subplots(figsize=(7, 0.62 * len(rows) + 0.6))
    ax.set_xlim(0, 1)
    ax.set_ylim(-len(rows) + 0.4, 0.8)
    ax.axis("off")
    for i, (name, shape, params) in enumerate(rows):
        y = -i
        ax.add_patch(plt.Rectangle((0.12, y - 0.3), 0.76, 0.6, facecolor="#dbe9f6", edgecolor="#34618c"))
        ax.text(0.15, y, name, va="center", fontsize=9, weight="bold")
        ax.text(0.60, y, shape, va="center", fontsize=8, family="monospace")
        ax.text(0.90, y, params, va="center", fontsize=7, color="#555555")
        if i:
            ax.annotate("", xy=(0.5, y + 0.3), xytext=(0.5, y + 0.7), arrowprops={"arrowstyle": "->"})
    ax.set_title(f"{model.name}: {model.count_params():,} parameters (output shapes, batch first)")
    save_figure(fig, path)


def write_history_csv(history: dict[str, list[float]], path: Path) -> None:
    """One row per epoch: loss, accuracy, val_loss, val_accuracy."""
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for epoch, values in enumerate(zip(*(history[k] for k in keys)), start=1):
            writer.writerow([epoch, *(f"{v:.6f}" for v in values)])


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    import keras
    import matplotlib
    import sklearn
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__}


def machine_summary() -> dict[str, Any]:
    """The machine a run happened on, for metrics.json."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}


def peak_memory_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kilobytes / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def config_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as JSON-friendly values."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    out["lrs"] = list(cfg.lrs)
    out.pop("predict")
    out.pop("json_output")
    out.pop("resume")
    return out


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty JSON, atomically."""
    write_text(path, json.dumps(json_safe(payload), indent=2) + "\n")


def write_run_outputs(cfg: Config, data: Dataset, result: TrainResult, ev: Evaluation | None) -> None:
    """Model, plots, history.csv and metrics.json of one run."""
    d = cfg.plots_dir
    save_model(result.model, cfg.model_path)
    plot_curves(result.history, "accuracy", result.best_epoch, d / "accuracy.png")
    plot_curves(result.history, "loss", result.best_epoch, d / "loss.png")
    plot_architecture(result.model, d / "architecture.png")
    write_history_csv(result.history, d / "history.csv")
    if ev is not None:
        plot_confusion(ev.confusion, d / "confusion_matrix.png")
        plot_predictions(data, ev.predicted, d / "predictions.png")
    metrics = {
        "test_loss": ev.loss if ev else None,
        "test_accuracy": ev.accuracy if ev else None,
        "per_class_test_accuracy": ev.per_class_accuracy if ev else None,
        "learning_rate": result.lr,
        "best_epoch": result.best_epoch,
        "best_epoch_selected_by": BEST_MONITOR,
        "epochs_completed": len(result.history.get("loss", [])),
        "interrupted": result.interrupted_by is not None,
        "diverged": result.diverged,
        "training_seconds": round(result.seconds, 2),
        "peak_memory_mb": peak_memory_mb(),
        "train_images": len(data.y_train),
        "validation_images": len(data.y_val),
        "test_images": len(data.y_test),
        "seed": cfg.seed,
        "config": config_dict(cfg),
        "history": result.history,
        "versions": library_versions(),
        "machine": machine_summary(),
    }
    write_json(d / "metrics.json", metrics)


# ----------------------------------------------------------------------------
# Single run
# ----------------------------------------------------------------------------

def finish_run(cfg: Config, data: Dataset, result: TrainResult) -> int:
    """Evaluate (unless stopped early), write the outputs and pick the exit code."""
    done = len(result.history.get("loss", []))
    if result.best_epoch is None:
        if result.interrupted_by is not None:
            print("No epoch finished; nothing was written and earlier outputs are untouched.", file=sys.stderr)
            return signal_exit_code(result.interrupted_by)
        print(f"error: the loss became NaN or infinite at learning rate {result.lr:g} before any epoch finished; "
              "nothing was written. Try a smaller --lr.", file=sys.stderr)
        return EXIT_DIVERGED
    ev = None
    if result.interrupted_by is None:
        ev = evaluate(result.model, data, cfg.batch_size)
        print_evaluation(ev)
    write_run_outputs(cfg, data, result, ev)
    print(f"Kept epoch {result.best_epoch} of {done} (best {BEST_MONITOR}); "
          f"model: {cfg.model_path}; plots and metrics: {cfg.plots_dir}/")
    if result.interrupted_by is not None:
        print(f"Interrupted after {done} of {cfg.epochs} epochs; the best weights so far were saved. "
              "To continue, run the same command with --resume.", file=sys.stderr)
        return signal_exit_code(result.interrupted_by)
    if result.diverged:
        print(f"error: the loss became NaN or infinite at learning rate {result.lr:g}; "
              "the best weights before that were kept. Try a smaller --lr.", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def signal_exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def run_single(cfg: Config, data: Dataset) -> int:
    """Train one model at cfg.lr, evaluate it on the test set, write everything."""
    result = train(cfg, data, cfg.lr)
    return finish_run(cfg, data, result)


# ----------------------------------------------------------------------------
# Learning-rate study
# ----------------------------------------------------------------------------

def study_row(result: TrainResult) -> dict[str, Any]:
    """One rate's summary: best and final validation figures, timing, divergence."""
    h = result.history
    val_loss = [v if math.isfinite(v) else math.inf for v in h.get("val_loss", [])]
    best = int(np.argmin(val_loss)) if val_loss and math.isfinite(min(val_loss)) else None
    return {
        "lr": result.lr,
        "best_val_loss": val_loss[best] if best is not None else None,
        "best_val_loss_epoch": best + 1 if best is not None else None,
        "best_val_accuracy": max(h["val_accuracy"]) if h.get("val_accuracy") else None,
        "final_val_loss": h["val_loss"][-1] if h.get("val_loss") else None,
        "final_val_accuracy": h["val_accuracy"][-1] if h.get("val_accuracy") else None,
        "epochs_completed": len(h.get("loss", [])),
        "training_seconds": round(result.seconds, 2),
        "diverged": result.diverged,
    }


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rate with the lowest best validation loss among those that did not diverge."""
    usable = [r for r in rows if not r["diverged"] and r["best_val_loss"] is not None]
    return min(usable, key=lambda r: r["best_val_loss"]) if usable else None


def format_study_table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> str:
    """The study's table as printed at the end."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (f"{'lr':>10} {'best val loss':>13} {'at epoch':>8} {'best val acc':>12} "
              f"{'final val loss':>14} {'final val acc':>13} {'seconds':>8}  status")
    lines = [header]
    for r in rows:
        status = "diverged" if r["diverged"] else ("recommended" if r is chosen else "")
        lines.append(f"{r['lr']:>10g} {num(r['best_val_loss'], '.4f'):>13} {num(r['best_val_loss_epoch'], 'd'):>8} "
                     f"{num(r['best_val_accuracy'], '.2%'):>12} {num(r['final_val_loss'], '.4f'):>14} "
                     f"{num(r['final_val_accuracy'], '.2%'):>13} {r['training_seconds']:>8.1f}  {status}")
    return "\n".join(lines)


def plot_study(results: list[TrainResult], path: Path) -> None:
    """Training (dashed) and validation (solid) loss per epoch for every rate."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        color = f"C{i}"
        label = f"lr {r.lr:g}" + (" (diverged)" if r.diverged else "")
        epochs = range(1, len(r.history.get("loss", [])) + 1)
        ax.plot(epochs, r.history.get("val_loss", []), "-o", color=color, markersize=3, label=f"{label} validation")
        ax.plot(epochs, r.history.get("loss", []), "--", color=color, label=f"{label} training")
        if r.diverged:
            ax.plot([len(epochs)], [ax.get_ylim()[1]], "x", color=color, markersize=10)
    ax.set(xlabel="epoch", ylabel="loss (cross-entropy)", yscale="log",
           title="Effect of the learning rate (solid: validation, dashed: training)")
    ax.xaxis.set_major_locator(integer_ticks())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def run_study(cfg: Config, data: Dataset) -> int:
    """Train one model per learning rate; recommend one by validation loss; test only that one."""
    results: list[TrainResult] = []
    for i, lr in enumerate(cfg.lrs, start=1):
        print(f"\n=== Learning-rate study: rate {i} of {len(cfg.lrs)}: lr={lr:g} ===", flush=True)
        result = train(cfg, data, lr)
        if result.interrupted_by is not None:
            print("Study interrupted; earlier outputs are untouched.", file=sys.stderr)
            return signal_exit_code(result.interrupted_by)
        if result.diverged:
            print(f"lr={lr:g} diverged (loss became NaN or infinite); going on with the other rates.")
        results.append(result)
    rows = [study_row(r) for r in results]
    chosen = recommend(rows)
    print("\n" + format_study_table(rows, chosen))
    plot_study(results, cfg.plots_dir / "lr_study.png")
    write_json(cfg.plots_dir / "lr_study.json", {
        "rates": rows, "recommended_lr": chosen["lr"] if chosen else None,
        "selected_by": "lowest best validation loss", "seed": cfg.seed, "config": config_dict(cfg)})
    if chosen is None:
        print("error: every learning rate diverged; try smaller values.", file=sys.stderr)
        return EXIT_DIVERGED
    print(f"\nRecommended learning rate: {chosen['lr']:g} (lowest best validation loss "
          f"{chosen['best_val_loss']:.4f}); evaluating it on the test set.")
    best = next(r for r in results if r.lr == chosen["lr"])
    return finish_run(dataclasses.replace(cfg, lrs=(best.lr,)), data, best)


# ----------------------------------------------------------------------------
# Prediction on your own images
# ----------------------------------------------------------------------------

def image_files(paths: Sequence[Path]) -> list[Path]:
    """The given files, with folders expanded to the images directly inside them."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                print(f"warning: no images in folder {p}", file=sys.stderr)
            files += found
        else:
            files.append(p)
    return files


def to_network_input(path: Path) -> tuple[np.ndarray, bool]:
    """Decode an image into a 28x28 uint8 array like Fashion-MNIST; also say if it was inverted.

    Grayscale, light object on a dark background, aspect ratio kept by padding.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(flat, rgba)  # transparent parts become white background
            gray = img.convert("L")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({first_line(e)})") from None
    pixels = np.asarray(gray, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 127)  # a light background: a photo, not Fashion-MNIST's dark one
    if inverted:
        gray = ImageOps.invert(gray)
    if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
        gray = ImageOps.pad(gray, (IMAGE_SIDE, IMAGE_SIDE), method=Image.Resampling.LANCZOS, color=0)
    return np.asarray(gray, dtype=np.uint8), inverted


def load_trained_model(path: Path) -> Any:
    """Load the saved model, or explain how to get one."""
    if not path.is_file():
        raise UserError(f"no trained model at {path}; train one first with: python3 ConvolutionalNN.py "
                        f"--model-path {path}")
    import keras

    try:
        return keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a corrupt archive
        raise UserError(f"cannot load the model {path} ({first_line(e)}); retrain it") from None


def run_predict(cfg: Config) -> int:
    """Classify each image; print top-3 classes (or JSON); exit 1 if any file failed."""
    model = load_trained_model(cfg.model_path)
    results, failed = [], 0
    for path in image_files(cfg.predict):
        try:
            pixels, inverted = to_network_input(path)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = model.predict(pixels[np.newaxis, :, :, np.newaxis], verbose=0)[0]
        top = np.argsort(probs)[::-1][:3]
        results.append({"file": str(path), "class": CLASS_NAMES[top[0]], "probability": float(probs[top[0]]),
                        "top3": [{"class": CLASS_NAMES[k], "probability": float(probs[k])} for k in top],
                        "inverted": inverted})
        if not cfg.json_output:
            r = results[-1]
            note = " (inverted: light background)" if inverted else ""
            others = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top3"][1:])
            print(f"{path}: {r['class']} {r['probability']:.1%}{note}  [next: {others}]")
    if cfg.json_output:
        print(json.dumps(results, indent=2))
    if failed:
        print(f"{failed} of {failed + len(results)} files could not be classified.", file=sys.stderr)
        return EXIT_FAILURE
    if not results:
        print("error: no images to classify.", file=sys.stderr)
        return EXIT_FAILURE
    return 0


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def first_line(e: BaseException) -> str:
    """An exception's message, cut to its first line."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run what the flags ask for; map known problems to one line and an exit code."""
    try:
        cfg = parse_args(argv)
        if cfg.predict:
            return run_predict(cfg)
        check_writable(cfg.plots_dir, cfg.model_path.parent)
        data = load_data(cfg)
        print(f"Data: {len(data.y_train)} training, {len(data.y_val)} validation, {len(data.y_test)} test images")
        if len(cfg.lrs) > 1:
            return run_study(cfg, data)
        return run_single(cfg, data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted; earlier outputs are untouched.", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
