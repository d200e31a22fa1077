#!/usr/bin/env python3
"""Train, study and use a convolutional network on Zalando's Fashion-MNIST.

Loads Fashion-MNIST (through ``keras.datasets`` or, offline, ``--data-dir``: the IDX files,
torchvision's or Kaggle's copy), trains Conv2D(128, 3x3) -> MaxPooling2D -> Dropout ->
Conv2D(128, 3x3) -> MaxPooling2D -> Dropout -> Flatten -> Dense -> Dropout -> Dense(10)
for 20 epochs with Adam at learning rate 0.001 in batches of 64 on a stratified 80/20
train/validation split (label smoothing 0.1, an exponential moving average of the weights,
1-pixel random shifts), keeps the epoch with the best validation accuracy, tests it once
on the 10,000 test images (averaging each over its 1-pixel moves), and writes plots,
metrics, the model and (``--tensorboard``) TensorBoard logs. Several ``--lr`` values run
the learning-rate study (stopping rates that cannot learn), several ``--seed`` values
report the mean and spread, ``--ray`` spreads the runs over a Ray cluster; ``--predict``
classifies your own images, ``--finetune`` teaches the network your photos, ``--serve`` both
on a page in the browser.

With the defaults it tests above 93.5% (mean over seeds 0-2; the original project: 92%),
in 7 to 50 minutes a run on a 2-core CPU (AMX to AVX2-only). The figures, the machine and
commit of each, how to reproduce them: README.md and the dated log docs/RESULTS.md.

    python3 ConvolutionalNN.py                                   # default run
    python3 ConvolutionalNN.py --data-dir ~/fashion-mnist        # offline
    python3 ConvolutionalNN.py --lr 0.1 0.01 0.001 0.0001        # learning-rate study
    python3 ConvolutionalNN.py --seeds 0 1 2                     # mean ± std over seeds
    python3 ConvolutionalNN.py --predict shoe.jpg shirt.heic     # classify your images
    python3 ConvolutionalNN.py --finetune my-clothes/            # teach it your photos, a folder a class
    python3 ConvolutionalNN.py --serve                           # the same on a page: http://127.0.0.1:7860

This file is the story of a run, top to bottom: settings, main, data, model, training,
testing and outputs. Each other capability (the study, --predict and its photo reading,
--finetune, --serve, --resume's journal, Ray, precision and devices, the batches) is a module
of the package beside it, fashion_cnn/, imported when its flag asks for it (CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn import backends, plots
from fashion_cnn.backends import (
    BACKENDS,
    backend_name,
    default_backend,
    import_keras,
    library_versions,
    on_keras,
    use_backend,
)
from fashion_cnn.common import (
    BEST_MONITOR,
    CLASS_NAMES,
    DIVERGED,
    ERASE_AREA,
    EVALUATION_BATCH,
    EXIT_DIVERGED,
    EXIT_FAILURE,
    EXIT_SIGINT,
    EXIT_USAGE,
    FAILED,
    IMAGE_SIDE,
    INTERRUPTED,
    Arrays,
    TrainResult,
    UserError,
    confusion_and_per_class,
    epochs_done,
    first_line,
    how_it_ended,
    stalled,
)
from fashion_cnn.hardware import (
    available_memory,
    check_memory,
    compute_device,
    conv_sides,
    distribution_scope,
    out_of_memory_as_error,
    peak_memory_mb,
    set_precision,
    steps_per_execution,
)
from fashion_cnn.journal import (
    RunState,
    TrainingInterrupted,
    discard_unfinished_run,
    nothing_to_resume,
    resume_root,
    resume_state,
    run_folder,
    stop_requests,
)
from fashion_cnn.model_file import save_model
from fashion_cnn.outputs import check_writable, output_set, write_json
from fashion_cnn.streams import epoch_streams, seed_everything
from fashion_cnn.tta import class_probabilities, test_time_augmentation

TRAIN_COUNT, TEST_COUNT = 60_000, 10_000  # Fashion-MNIST's training and test images


# =============================================================================
# Settings: each one defined once (flag, default, help, check); Config, --help,
# the resume check and metrics.json all come from here
# =============================================================================


def bounded(kind: type, low: float, high: float | None = None, *, above: bool = False) -> Callable[[str], Any]:
    """An argparse type for a number of `kind` that is >= low (> low if above) and, if high is given, < high."""
    if high is None:
        rule = f"a finite number above {low:g}" if above else f"at least {low:g}"
    elif kind is int:
        rule = f"between {low} and {high - 1}"
    else:
        rule = f"between {low:g} and {high:g}, exclusive" if above else f"at least {low:g} and below {high:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        finite = kind is int or math.isfinite(value)  # a huge int would overflow isfinite
        if not (finite and (value > low if above else value >= low) and (high is None or value < high)):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value

    return parse


def setting(default: Any, help: str, *flags: str, group: str = "training", resume_must_match: bool = False,
            recorded: bool = True, **argparse_options: Any) -> Any:
    """A Config field with its command line: flags (default --field-name), help, argparse type or choices.

    resume_must_match: --resume refuses to continue a run saved with another value.
    recorded: written into metrics.json's "config".
    """
    return dataclasses.field(default=default, metadata={
        "flags": flags, "help": help, "group": group, "resume_must_match": resume_must_match,
        "recorded": recorded, "argparse": argparse_options})


POSITIVE = bounded(int, 1, 2**31)  # counts and sizes; the upper bound keeps them within TensorFlow's int32


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a call; parse_args() builds it from the command line."""

    # training
    lrs: tuple[float, ...] = setting((0.001,), "Adam learning rate; several values run the learning-rate study",
                                     "--lr", type=bounded(float, 0, above=True), nargs="+", metavar="LR")
    epochs: int = setting(20, "training epochs", type=POSITIVE, resume_must_match=True)
    batch_size: int = setting(64, "images per step", type=POSITIVE, resume_must_match=True)
    schedule: str = setting("cosine", "learning rate over the run: cosine decay from --lr to 0, or constant",
                            choices=("cosine", "constant"), resume_must_match=True)
    warmup_epochs: float = setting(0.0, "epochs over which the learning rate first rises linearly from 0 to --lr "
                                   "(0: start at --lr)", type=bounded(float, 0), metavar="E", resume_must_match=True)
    label_smoothing: float = setting(0.1, "share of each label spread over all classes in the training loss (0: off)",
                                     type=bounded(float, 0, 1), resume_must_match=True)
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW) per step, times the learning rate",
                                  type=bounded(float, 0), resume_must_match=True)
    ema: float = setting(0.99, "momentum per step of an exponential moving average of the weights, which is then "
                         "validated, kept and tested instead of the raw weights (0: off)", type=bounded(float, 0, 1),
                         metavar="MOMENTUM", resume_must_match=True)
    shift: int = setting(1, "move each training image by a random 0 to N pixels each way (zero fill)",
                         type=bounded(int, 0, IMAGE_SIDE // 2), metavar="N", resume_must_match=True)
    flip: bool = setting(False, "mirror a random half of the training images left-right", action="store_true",
                         resume_must_match=True)
    erase: float = setting(0.0, "random erasing: the share of training images that get one random rectangle "
                           f"({ERASE_AREA[0] * 100:g}%% to {ERASE_AREA[1] * 100:g}%% of the image) filled with noise "
                           "(0: off)",
                           type=bounded(float, 0, 1), metavar="P", resume_must_match=True)
    tta: bool = setting(True, "test-time augmentation: average each tested image's class probabilities over its "
                        "mirrored (with --flip) and 1-pixel-moved (with --shift) copies; without either, nothing to "
                        "average", action=argparse.BooleanOptionalAction)
    seeds: tuple[int, ...] = setting((0,), "random seed (split, weights, dropout); several train once per seed and "
                                     "report the mean ± std of the test accuracy", "--seed", "--seeds",
                                     type=bounded(int, 0, 2**32), nargs="+", metavar="SEED")
    # network
    filters: int = setting(128, "filters per Conv2D layer", type=POSITIVE, group="network", resume_must_match=True)
    kernel_size: int = setting(3, "Conv2D kernel side", type=POSITIVE, group="network", resume_must_match=True)
    padding: str = setting("same", "Conv2D padding", choices=("same", "valid"), group="network",
                           resume_must_match=True)
    dense_units: int = setting(128, "hidden Dense width", type=POSITIVE, group="network", resume_must_match=True)
    conv_dropout: float = setting(0.1, "dropout after each pooling layer", type=bounded(float, 0, 1),
                                  group="network", resume_must_match=True)
    dropout: float = setting(0.2, "dropout before the output layer", type=bounded(float, 0, 1), group="network",
                             resume_must_match=True)
    # data and outputs
    data_dir: Path | None = setting(None, "folder with Fashion-MNIST (offline use): the four IDX files, gzipped "
                                    "or not, torchvision's root or FashionMNIST/raw folder, or Kaggle's two CSV files; "
                                    "default: keras.datasets, cached under $KERAS_HOME or ~/.keras", type=Path,
                                    group="data")
    val_split: float = setting(0.2, "fraction of the training images held out for validation (stratified)",
                               type=bounded(float, 0, 1, above=True), group="data", resume_must_match=True)
    limit: int | None = setting(None, "use only the first N training images (quick tries); at least one batch",
                                type=POSITIVE, metavar="N", group="data", resume_must_match=True)
    plots_dir: Path = setting(Path("plots"), "folder for plots and metrics", type=Path, group="data")
    model_path: Path = setting(Path("models/fashion_cnn.keras"), "trained model (.keras)", type=Path, group="data")
    tensorboard: Path | None = setting(None, "also write Keras's TensorBoard logs (losses, accuracies and learning "
                                       "rate per epoch) under DIR/<start time>/, one folder per run; view them with "
                                       "tensorboard --logdir DIR", type=Path, metavar="DIR", group="data")
    resume: bool = setting(False, "continue an interrupted or killed run from its last finished epoch (same flags)",
                           action="store_true", group="data", recorded=False)
    # hardware and scaling
    precision: str = setting("auto", "arithmetic: float32, or mixed bfloat16/float16 (float32 weights); auto picks "
                             "the fastest this CPU or GPU runs well and says which",
                             choices=("auto", "float32", "bfloat16", "float16"), group="hardware")
    backend: str | None = setting(None, "Keras backend to train and predict on; none given: $KERAS_BACKEND, else "
                                  "tensorflow, else (not installed) jax or torch", choices=tuple(BACKENDS),
                                  group="hardware", resume_must_match=True)
    distribute: str = setting("none", "mirrored: train one run on every local GPU (tf.distribute.MirroredStrategy "
                              "on TensorFlow, keras.distribution.DataParallel on JAX), --batch-size being the global "
                              "batch", choices=("none", "mirrored"),
                              group="hardware")
    ray: str | None = setting(None, "train the runs (rates x seeds) as Ray tasks: on a local Ray instance, or on "
                              "the cluster at ADDRESS (host:port, or auto)", nargs="?", const="local",
                              metavar="ADDRESS", group="hardware")
    # prediction
    predict: tuple[Path, ...] = setting((), "classify these images (or every image in these folders) with "
                                        "--model-path", type=Path, nargs="+", metavar="IMAGE", group="prediction",
                                        recorded=False)
    json_output: bool = setting(False, "print --predict results as JSON", "--json", action="store_true",
                                group="prediction", recorded=False)
    finetune: Path | None = setting(None, "teach the trained model (--model-path) your own photos: DIR holds a "
                                    "folder of photos per class, named for the class; --epochs, --lr, "
                                    "--batch-size and --seed apply when given", type=Path, metavar="DIR",
                                    group="prediction", recorded=False)
    finetuned_path: Path | None = setting(None, "where --finetune saves the adapted model; none given: beside "
                                          "--model-path, named for DIR (models/fashion_cnn_DIR.keras)", type=Path,
                                          metavar="PATH", group="prediction", recorded=False)
    serve: bool = setting(False, "start a page in the browser to classify photos and teach the network yours "
                          "(needs requirements-serve.txt); Ctrl-C stops it", action="store_true", group="prediction",
                          recorded=False)
    port: int = setting(7860, "the page's port (--serve)", type=bounded(int, 1, 65536), group="prediction",
                        recorded=False)
    host: str = setting("127.0.0.1", "the page's address (--serve): another than 127.0.0.1 lets other computers "
                        "reach it", group="prediction", recorded=False)

    @property
    def lr(self) -> float:
        """The learning rate of a single run (the first of --lr)."""
        return self.lrs[0]

    @property
    def seed(self) -> int:
        """The seed of a single run (the first of --seed)."""
        return self.seeds[0]

    @property
    def runs(self) -> list[tuple[float, int]]:
        """Every (learning rate, seed) pair to train, rate by rate; a plain run is the 1 x 1 case."""
        return [(lr, seed) for lr in self.lrs for seed in self.seeds]

    @property
    def is_study(self) -> bool:
        """Whether several learning rates are compared: the learning-rate study."""
        return len(self.lrs) > 1

    @property
    def several_seeds(self) -> bool:
        """Whether each rate is trained once per seed, for the mean and spread."""
        return len(self.seeds) > 1

    @property
    def single_run(self) -> bool:
        """One rate, one seed: a plain run."""
        return len(self.runs) == 1


GROUP_TITLES = {"training": "training", "network": "network (the layers stay; their sizes change)",
                "data": "data and outputs", "hardware": "hardware and scaling", "prediction": "your own images"}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per Config field, with every default in its help."""
    parser = OneLineErrorParser(prog="ConvolutionalNN.py", description="Train, study and use a CNN on Fashion-MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for field in dataclasses.fields(Config):
        meta = field.metadata
        flags = meta["flags"] or (f"--{field.name.replace('_', '-')}",)
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        groups[meta["group"]].add_argument(*flags, dest=field.name, default=default, help=meta["help"],
                                           **meta["argparse"])
    return parser


def parse_args(argv: Sequence[str] | None) -> Config:
    """Parse and cross-check the flags; usage problems exit with code 2."""
    parser = build_parser()
    flags = parser.parse_args(argv)
    if flags.model_path.suffix != ".keras":
        parser.error(f"--model-path {flags.model_path} must end in .keras")
    if flags.limit is not None and flags.limit < flags.batch_size:
        parser.error(f"--limit {flags.limit} is smaller than one batch (--batch-size {flags.batch_size})")
    if flags.warmup_epochs >= flags.epochs:
        parser.error(f"--warmup-epochs {flags.warmup_epochs:g} leaves nothing of --epochs {flags.epochs}; "
                     "warm up for fewer")
    if conv_sides(flags.kernel_size, flags.padding)[1] // 2 < 1:
        parser.error(f"--kernel-size {flags.kernel_size} with --padding valid leaves no pixels; use a smaller kernel")
    for flag, values in (("--lr", flags.lrs), ("--seed", flags.seeds)):
        if len(set(values)) < len(values):
            parser.error(f"{flag} lists a value twice; give each once")
    if flags.resume and (flags.predict or flags.ray):
        parser.error("--resume applies to training runs on this machine, not to --predict or --ray")
    if flags.ray not in (None, "local", "auto"):
        from fashion_cnn.ray_runs import ray_address_parts

        if not ray_address_parts(flags.ray):
            parser.error(f"--ray {flags.ray}: give HOST:PORT, auto, or no value for a local Ray instance")
    flags.backend = flags.backend or os.environ.get("KERAS_BACKEND") or default_backend()
    if flags.backend not in BACKENDS:
        parser.error(f"KERAS_BACKEND={flags.backend} is not a backend this script runs on; use {', '.join(BACKENDS)}")
    if flags.distribute != "none" and flags.backend not in ("tensorflow", "jax"):  # not a typo, so exit 1, not 2
        raise UserError(f"--distribute mirrored needs --backend tensorflow (MirroredStrategy) or jax "
                        f"(DataParallel); {flags.backend} has no such strategy here")
    if flags.ray and flags.distribute != "none":
        parser.error("--ray and --distribute mirrored do not combine; Ray gives each run its own devices")
    if flags.predict and any(getattr(flags, k) != parser.get_default(k) for k in ("tta", "shift", "flip")):
        parser.error("--predict uses the test-time augmentation the model was trained with; drop --tta/--no-tta, "
                     "--shift and --flip")
    if flags.predict and flags.tensorboard:
        parser.error("--tensorboard applies to training, not to --predict")
    if flags.json_output and not flags.predict:
        parser.error("--json only applies to --predict")
    check_finetune_flags(parser, flags)
    check_serve_flags(parser, flags)
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(flags).items()})


def check_finetune_flags(parser: argparse.ArgumentParser, flags: argparse.Namespace) -> None:
    """Usage errors of --finetune: what it does not combine with, and --finetuned-path without it."""
    if flags.finetuned_path and not flags.finetune:
        parser.error("--finetuned-path only applies to --finetune")
    if flags.finetuned_path and flags.finetuned_path.suffix != ".keras":
        parser.error(f"--finetuned-path {flags.finetuned_path} must end in .keras")
    if not flags.finetune:
        return
    if flags.predict:
        parser.error("--finetune and --predict are two calls: adapt first, then --predict --model-path ADAPTED")
    clashes = [flag for flag, given in (("--resume", flags.resume), ("--ray", flags.ray),
                                        ("--tensorboard", flags.tensorboard), ("several --lr", len(flags.lrs) > 1),
                                        ("several --seed", len(flags.seeds) > 1),
                                        ("--distribute", flags.distribute != "none")) if given]
    if clashes:
        parser.error(f"--finetune trains one adapted model here; drop {' and '.join(clashes)}")


def check_serve_flags(parser: argparse.ArgumentParser, flags: argparse.Namespace) -> None:
    """Usage errors of --serve: --port and --host without it, and what it does not combine with."""
    if not flags.serve:
        given = [flag for flag, key in (("--port", "port"), ("--host", "host"))
                 if getattr(flags, key) != parser.get_default(key)]
        if given:
            parser.error(f"{' and '.join(given)}: for the page of --serve only")
        return
    clashes = [flag for flag, given in (("--predict", flags.predict), ("--finetune", flags.finetune),
                                        ("--resume", flags.resume), ("--ray", flags.ray),
                                        ("--tensorboard", flags.tensorboard), ("several --lr", len(flags.lrs) > 1),
                                        ("several --seed", len(flags.seeds) > 1)) if given]
    if clashes:
        parser.error(f"--serve classifies and teaches on a page; drop {' and '.join(clashes)}")


def config_dict(cfg: Config) -> dict[str, Any]:
    """The recorded settings as JSON values, for metrics.json and lr_study.json."""
    def plain(value: Any) -> Any:
        return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(Config) if f.metadata["recorded"]}


def run_identity(cfg: Config, lr: float, seed: int, precision: str) -> dict[str, Any]:
    """What shapes one run's model, data or schedule: a resumed run must match it all."""
    same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if f.metadata["resume_must_match"]}
    return {"data": str(cfg.data_dir) if cfg.data_dir else "keras.datasets", **same, "lr": lr, "seed": seed,
            "precision": precision}


# =============================================================================
# main: the whole story of a call
# =============================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """Classify images, or train, choose, test and report; known problems become one line and an exit code."""
    try:
        cfg = parse_args(argv)
        use_backend(cfg.backend)
        if cfg.predict:
            from fashion_cnn.predict import predict

            return predict(cfg)
        if cfg.finetune:
            from fashion_cnn.finetune import finetune

            return finetune(cfg)
        if cfg.serve:
            from fashion_cnn.serve import serve

            return serve(cfg)
        return train_and_report(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted; earlier outputs are untouched.", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE


def train_and_report(cfg: Config) -> int:
    """Load and split -> train every (rate, seed) run, here or on Ray -> report."""
    if cfg.resume and not resume_root(cfg).is_dir():  # before any folder is made or any data read
        raise nothing_to_resume(resume_root(cfg))
    check_writable(cfg.plots_dir, cfg.model_path.parent, *([cfg.tensorboard] if cfg.tensorboard else []))
    if cfg.tensorboard and cfg.backend != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        raise UserError("--tensorboard needs TensorFlow (Keras's TensorBoard callback writes through tf.summary), "
                        "which is not installed: use --backend tensorflow (pip install -r requirements.txt)")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if cfg.ray:
        from fashion_cnn import ray_runs

        ray_runs.check_ray_reachable(cfg.ray)
    else:
        check_memory(cfg, available_memory())
    arrays, source = load_arrays(cfg)
    split = functools.lru_cache(maxsize=1)(functools.partial(split_data, arrays, cfg))  # seed -> its split
    data = split(cfg.seed)
    print(f"Data: {len(data.y_train)} training, {len(data.y_val)} validation, {len(data.y_test)} test images "
          f"({source})")
    with out_of_memory_as_error():
        runs = ray_runs.train_on_ray(cfg, train_on_node, build_model) if cfg.ray else train_here(cfg, split)
        code = report(cfg, split, runs)
    if runs[-1].ended != INTERRUPTED and not cfg.ray:
        shutil.rmtree(resume_root(cfg), ignore_errors=True)  # done with: nothing is left to resume
    return code


def report(cfg: Config, split: Callable[[int], Dataset], runs: list[TrainResult]) -> int:
    """Choose the rate by validation, test its runs, write all outputs as one set; the exit code."""
    interrupted = runs[-1].ended == INTERRUPTED
    chosen = None
    if not interrupted or cfg.single_run:  # an interrupted single run still writes its best epoch so far
        with output_set("" if cfg.ray else "; to write them without training again, run the same command "
                                           "with --resume"):
            chosen = choose_rate(cfg, runs) if cfg.is_study else runs  # never by the test set
            if chosen is not None:
                test_and_write(cfg, split, chosen, test=not interrupted)
    message, code = outcome(cfg, runs, chosen)
    if code:
        print(message, file=sys.stderr)
    return code


def choose_rate(cfg: Config, runs: list[TrainResult]) -> list[TrainResult] | None:
    """The learning-rate study's chosen rate's runs, by validation loss (fashion_cnn.study); None if none learned."""
    from fashion_cnn import study

    return study.choose_rate(cfg, runs, config_dict(cfg))


def outcome(cfg: Config, runs: list[TrainResult], chosen: list[TrainResult] | None) -> tuple[str, int]:
    """What happened, in one line, and the exit code that says it: the one place where they are decided."""
    last, smaller = runs[-1], "Try a smaller --lr."
    failed = [r for r in runs if r.ended == FAILED]
    if last.ended == INTERRUPTED:
        resume = "To continue, run the same command with --resume."
        if not cfg.single_run:
            return (f"Interrupted in run {len(runs)} of {len(cfg.runs)}; the finished runs and the best epoch so far "
                    f"are saved in {resume_root(cfg)}. {resume}"), 128 + last.signal
        if last.best_epoch is None:
            return "No epoch finished; nothing was written and earlier outputs are untouched.", 128 + last.signal
        return (f"Interrupted after {epochs_done(last.history)} of {cfg.epochs} epochs; the best weights so far "
                f"were saved. {resume}"), 128 + last.signal
    if chosen is None:
        return ("error: every learning rate diverged or failed; try smaller values.",
                EXIT_FAILURE if len(failed) == len(runs) else EXIT_DIVERGED)
    if failed:
        names = ", ".join(f"lr={r.lr:g} seed {r.seed}" for r in failed)
        return f"error: {len(failed)} of {len(runs)} runs failed ({names}); the rest were reported and written.", \
            EXIT_FAILURE
    nan = f"the loss became NaN or infinite at learning rate {last.lr:g}"
    if all(r.best_epoch is None for r in chosen):
        what = "no run of this rate finished an epoch" if len(chosen) > 1 else f"{nan} before any epoch finished"
        return f"error: {what}; nothing was written. {smaller}", EXIT_DIVERGED
    if any(r.ended == DIVERGED for r in chosen):
        kept = "some seeds diverged (loss became NaN or infinite); their best epochs before that were tested" \
            if len(chosen) > 1 else f"{nan}; the best weights before that were kept"
        return f"error: {kept}. {smaller}", EXIT_DIVERGED
    return "", 0


# =============================================================================
# Data
# =============================================================================


@dataclasses.dataclass
class Dataset:
    """uint8 images (N, 28, 28, 1) and uint8 labels for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def download_with_keras() -> Arrays:
    """The four arrays through keras.datasets (downloads once, then uses its cache)."""
    keras = import_keras()
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


def load_arrays(cfg: Config) -> tuple[Arrays, str]:
    """Load and check the data, keeping only the first --limit training images; also say where it came from."""
    if cfg.data_dir:
        from fashion_cnn.data_files import read_data_dir

        arrays, source = read_data_dir(cfg.data_dir)
    else:
        arrays, source = download_with_keras(), "keras.datasets"
    x_train, y_train, x_test, y_test = arrays
    check_arrays(x_train, y_train, x_test, y_test)
    if cfg.limit:
        x_train, y_train = x_train[:cfg.limit], y_train[:cfg.limit]
    return (x_train, y_train, x_test, y_test), source


def split_data(arrays: Arrays, cfg: Config, seed: int) -> Dataset:
    """Stratified, seeded train/validation split; images stay uint8 and gain a channel axis."""
    from sklearn.model_selection import train_test_split

    x_train, y_train, x_test, y_test = arrays
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(y_train)), test_size=cfg.val_split, stratify=y_train, random_state=seed)
    except ValueError as e:
        raise UserError(f"cannot split {len(y_train)} images stratified with --val-split {cfg.val_split} "
                        f"({e}); use a larger --limit") from None
    if len(train_idx) < cfg.batch_size:
        raise UserError(f"only {len(train_idx)} training images after the split, less than one batch; "
                        "use a larger --limit or a smaller --val-split")
    return Dataset(x_train[train_idx, ..., None], y_train[train_idx], x_train[val_idx, ..., None], y_train[val_idx],
                   x_test[..., None], y_test)


# =============================================================================
# Model
# =============================================================================


def build_model(cfg: Config, lr: float, steps_per_epoch: int) -> Any:
    """The CNN, compiled with Adam; pixels are scaled to [0, 1] inside the model, so it takes raw uint8 images."""
    keras = import_keras()
    layers = keras.layers
    model = keras.Sequential(name="fashion_cnn")
    model.add(keras.Input(shape=(IMAGE_SIDE, IMAGE_SIDE, 1), dtype="uint8", name="image"))
    model.add(layers.Rescaling(1 / 255, name="scale"))
    for block in (1, 2):
        model.add(layers.Conv2D(cfg.filters, cfg.kernel_size, padding=cfg.padding,
                                activation="relu", name=f"conv{block}"))
        model.add(layers.MaxPooling2D(2, name=f"pool{block}"))
        model.add(seeded_dropout(cfg.conv_dropout, f"dropout{block}"))
    model.add(layers.Flatten(name="flatten"))
    model.add(layers.Dense(cfg.dense_units, activation="relu", name="dense"))
    model.add(seeded_dropout(cfg.dropout, "dropout3"))
    model.add(layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32", name="class_probabilities"))
    schedule: Any = lr
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine" or warmup_steps:
        # alpha=1 keeps a constant schedule flat after its warm-up
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else lr, decay_steps=max(1, cfg.epochs * steps_per_epoch - warmup_steps),
            alpha=0.0 if cfg.schedule == "cosine" else 1.0, warmup_target=lr if warmup_steps else None,
            warmup_steps=warmup_steps)
    adam = on_keras(WarmedUpEMAAdam, "optimizers.Adam") if cfg.ema else keras.optimizers.Adam
    optimizer = adam(schedule, weight_decay=cfg.weight_decay or None, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99)
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"],
                  # several steps per compiled call, so that a step costs no round trip to Python and back
                  steps_per_execution=steps_per_execution(cfg, steps_per_epoch, compute_device()))
    return model


def seeded_dropout(rate: float, name: str) -> Any:
    """keras.layers.Dropout with its seed drawn as Keras draws it for a layer without one, so TensorFlow and JAX
    get the very masks they got before; on PyTorch an unseeded Dropout draws from torch's global random state,
    which a resumed run cannot restore, while a seeded one follows the layer's seed state (keyed by epoch)."""
    seed = random.randint(1, int(1e9)) if rate > 0 else None  # keras.random.SeedGenerator's make_default_seed
    return import_keras().layers.Dropout(rate, seed=seed, name=name)


EMA_WARM_UP = 10  # the average's momentum at step t is at most (1 + t) / (EMA_WARM_UP + t)


class WarmedUpEMAAdam:
    """Keras's Adam (on_keras joins them) whose weight average (use_ema) warms up like TensorFlow's
    ExponentialMovingAverage with num_updates: at step t it moves with momentum at most (1 + t) / (EMA_WARM_UP + t).

    Keras averages with the full momentum from the first step, so after a few dozen steps its average is still
    mostly the initial weights, and those are what is validated, kept and tested. The rule needs only the
    optimizer's step count, which BackupAndRestore saves, so a resumed run averages exactly like one that was
    not interrupted. Used for training only: the saved model carries a plain Adam (save_model).
    """

    def _update_model_variables_moving_average(self, trainable_variables: list[Any]) -> None:
        ops = import_keras().ops
        step = ops.cast(self.iterations, "float32")
        momentum = ops.minimum(self.ema_momentum, (1 + step) / (EMA_WARM_UP + step))
        for var, average in zip(trainable_variables, self._model_variables_moving_average, strict=True):
            if average is not None:
                m = ops.cast(momentum, var.dtype)
                average.assign(m * average + (1 - m) * var)


# =============================================================================
# Training one run
# =============================================================================


def train_here(cfg: Config, split: Callable[[int], Dataset]) -> list[TrainResult]:
    """Train every run on this machine, one after another; stop at the first interrupted one."""
    discard_unfinished_run(cfg)
    if cfg.tensorboard:
        from fashion_cnn.tensorboard_logs import with_tensorboard_group

        cfg = with_tensorboard_group(cfg)
    if not cfg.single_run:
        from fashion_cnn.study import run_banner
    results = []
    for number, (lr, seed) in enumerate(cfg.runs, start=1):
        if not cfg.single_run:
            print(f"\n{run_banner(cfg, number, lr, seed)}", flush=True)
        results.append(train(cfg, split(seed), lr, seed, run_folder(cfg, lr, seed)))
        if results[-1].ended == INTERRUPTED:
            break
        if results[-1].ended == DIVERGED and not cfg.single_run:
            print(f"lr={lr:g}, seed {seed} diverged (loss became NaN or infinite); going on with the other runs.")
    return results


def train(cfg: Config, data: Dataset, lr: float, seed: int, folder: Path, *,
          handle_signals: bool = True) -> TrainResult:
    """Train one model at rate lr with seed (or resume it from folder); it ends holding its best epoch's weights."""
    precision, why = set_precision(cfg.precision)
    print(f"Backend: {backend_name()}{backends.fallback_note}; precision: {precision} ({why})", flush=True)
    seed_everything(seed)
    state = resume_state(cfg, run_identity(cfg, lr, seed, precision), folder)
    with distribution_scope(cfg.distribute):
        model = build_model(cfg, lr, steps_per_epoch=math.ceil(len(data.y_train) / cfg.batch_size))
    if cfg.is_study and stalled(state.history):  # killed between the stalled epoch and the end of the run
        state.finished = True
    stopped_by = None
    if not state.finished:
        if cfg.tensorboard:
            from fashion_cnn.tensorboard_logs import epoch_log
        log = epoch_log(cfg, lr, seed) if cfg.tensorboard else None
        batches, start_epoch = epoch_streams(cfg, data.x_train, data.y_train, seed, model)
        with stop_requests() if handle_signals else contextlib.nullcontext([]) as received:
            keeper = on_keras(RunKeeper, "callbacks.Callback")(state, folder, start_epoch, received, cfg.is_study)
            stopped_by = fit(cfg, model, batches, data, keeper, log)
    if state.best_weights is not None:
        model.set_weights(state.best_weights)
    if stopped_by is None and not state.finished:
        state.finished = True
        state.save(folder)
        shutil.rmtree(folder / "backup", ignore_errors=True)
    ended = how_it_ended(state.history, cfg.epochs) if stopped_by is None else INTERRUPTED
    return TrainResult(model, lr, seed, state.history, best_epoch=state.best_epoch, best_value=state.best_value,
                       seconds=state.seconds, precision=precision, ended=ended, signal=stopped_by)


def train_on_node(cfg: Config, lr: float, seed: int) -> tuple[TrainResult, int]:
    """One run in a Ray task (--ray: fashion_cnn.ray_runs), on a node that reads the data itself; the run and its
    steps per epoch."""
    data = split_data(load_arrays(cfg)[0], cfg, seed)
    with tempfile.TemporaryDirectory(prefix="fashion_cnn_run_") as folder:
        result = train(dataclasses.replace(cfg, resume=False), data, lr, seed, Path(folder), handle_signals=False)
    return result, math.ceil(len(data.y_train) / cfg.batch_size)


def fit(cfg: Config, model: Any, batches: Any, data: Dataset, keeper: RunKeeper, log: Any | None,
        first_epoch: int = 0) -> int | None:
    """model.fit over the epoch streams from first_epoch, validating on data every epoch, with the keeper and (log)
    TensorBoard's callback; the number of the signal that stopped it, if one did."""
    keras = import_keras()
    backup = keras.callbacks.BackupAndRestore(str(keeper.folder / "backup"), double_checkpoint=True)
    backup.async_safe = True  # it saves at epoch ends only: its per-batch hook must not make each step wait
    callbacks = [keeper,  # first: sees each hook before the others
                 *([keras.callbacks.SwapEMAWeights()] if cfg.ema else []),  # validate the average
                 *([log] if log else []),
                 backup]
    try:
        model.fit(batches, validation_data=(data.x_val, keras.utils.to_categorical(data.y_val, len(CLASS_NAMES))),
                  validation_batch_size=EVALUATION_BATCH, initial_epoch=first_epoch, epochs=cfg.epochs,
                  shuffle=False,  # the batches come shuffled, per epoch
                  verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in a log file or pipe
                  callbacks=callbacks)
    except TrainingInterrupted as stop:
        return stop.signum
    except (OSError, ValueError) as e:
        if not cfg.resume:
            raise
        raise UserError(f"cannot restore the saved run from {keeper.folder} ({first_line(e)}); "
                        "run without --resume to start afresh") from None
    return None


class RunKeeper:
    """The run's own Keras callback (on_keras makes it one). Before each epoch it keys the epoch's batches and
    dropout masks (start_epoch, from epoch_streams); before each batch it stops the run if a signal came; after each
    epoch it records the figures, keeps the weights validation measured (with --ema, the average: SwapEMAWeights
    swaps it in for validation) if they are the best so far, and saves all that in folder for --resume
    (EarlyStopping(restore_best_weights) forgets them on resume). It ends a run whose loss is no longer finite,
    and in a study (stops_stalled) one stalled at chance level. It has no batch-end hook: one (TerminateOnNaN's)
    makes Keras wait for every step and copy its logs to the host."""

    def __init__(self, state: RunState, folder: Path, start_epoch: Callable[[int], None], stop: list[int],
                 stops_stalled: bool) -> None:
        super().__init__()
        self.state, self.folder, self.start_epoch, self.stop = state, folder, start_epoch, stop
        self.stops_stalled = stops_stalled

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.seconds_before, self.started = self.state.seconds, time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start_epoch(epoch)
        for values in self.state.history.values():  # a kill between this save and BackupAndRestore's redoes an epoch
            del values[epoch:]

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.stop:
            raise TrainingInterrupted(self.stop[0])

    def on_test_end(self, logs: dict | None = None) -> None:
        self.validated_weights = self.model.get_weights()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs, state = logs or {}, self.state
        for key, value in logs.items():
            state.history.setdefault(key, []).append(float(value))
        value = logs.get(BEST_MONITOR)
        healthy = all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "val_loss"))
        if healthy and value is not None and (state.best_value is None or value > state.best_value):
            state.best_epoch, state.best_value, state.best_weights = epoch + 1, float(value), self.validated_weights
        state.seconds = self.seconds_before + time.perf_counter() - self.started
        state.save(self.folder)
        if not healthy or (self.stops_stalled and stalled(state.history)):
            self.model.stop_training = True


# =============================================================================
# Testing and outputs
# =============================================================================


def test_and_write(cfg: Config, split: Callable[[int], Dataset], runs: list[TrainResult], test: bool) -> None:
    """Test the chosen rate's runs (every seed), print the results, and write the outputs of the seed with the best
    validation accuracy. Without `test` (an interrupted run) only the best epoch so far is written."""
    usable = [r for r in runs if r.model is not None and r.best_epoch is not None]
    if not usable:
        return
    best = max(usable, key=lambda r: r.best_value)
    data = split(best.seed)  # every seed's split shares the one test set
    evals = {r.seed: evaluate(r.model, data, cfg) for r in usable} if test else {}
    extra = {"validation_accuracy": best.best_value}
    if test and (cfg.shift or cfg.flip):  # what --tta gives on the validation set, whether or not it is on
        predicted = class_probabilities(best.model, data.x_val, test_time_augmentation(cfg, tta=True)).argmax(axis=1)
        extra["validation_accuracy_with_tta"] = float(np.mean(predicted == data.y_val))
        print(f"\nValidation accuracy of the kept epoch: {best.best_value:.2%}; "
              f"with test-time augmentation (--tta): {extra['validation_accuracy_with_tta']:.2%}")
    if len(runs) > 1:  # several seeds
        from fashion_cnn.study import report_seeds

        extra |= report_seeds(runs, evals, best)
    if best.seed in evals:
        print_evaluation(evals[best.seed], test_time_augmentation(cfg))
    write_run_outputs(cfg, data, best, evals.get(best.seed), extra)
    print(f"Kept epoch {best.best_epoch} of {epochs_done(best.history)} (best {BEST_MONITOR}); model: "
          f"{cfg.model_path}; plots and metrics: {cfg.plots_dir}/")


@dataclasses.dataclass
class Evaluation:
    """Test-set results of one trained model."""

    loss: float
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray
    predicted: np.ndarray


def evaluate(model: Any, data: Dataset, cfg: Config) -> Evaluation:
    """Evaluate on the test set: loss, accuracy, per-class accuracy, confusion matrix."""
    from sklearn.metrics import accuracy_score, log_loss

    probabilities = class_probabilities(model, data.x_test, test_time_augmentation(cfg))
    predicted = probabilities.argmax(axis=1)
    confusion, per_class = confusion_and_per_class(data.y_test, predicted, CLASS_NAMES)
    return Evaluation(float(log_loss(data.y_test, probabilities, labels=range(len(CLASS_NAMES)))),
                      float(accuracy_score(data.y_test, predicted)), per_class, confusion, predicted)


def print_evaluation(ev: Evaluation, tta: dict[str, bool] | None) -> None:
    """The test results a user reads at the end of a run."""
    print(f"\nTest loss: {ev.loss:.4f}")
    print(f"Test accuracy: {ev.accuracy:.2%}" + (" (with test-time augmentation)" if tta else ""))
    print("Per-class test accuracy:")
    for name, acc in ev.per_class_accuracy.items():
        print(f"  {name:<12} {acc:7.2%}")


def write_run_outputs(cfg: Config, data: Dataset, result: TrainResult, ev: Evaluation | None,
                      extra: dict[str, Any]) -> None:
    """Model, plots, history.csv and metrics.json of one run (extra: more fields for metrics.json)."""
    out = cfg.plots_dir
    save_model(result.model, cfg.model_path, {"test_time_augmentation": test_time_augmentation(cfg)})
    plots.plot_curves(result.history, "accuracy", result.best_epoch, out / "accuracy.png")
    plots.plot_curves(result.history, "loss", result.best_epoch, out / "loss.png")
    plots.plot_architecture(result.model, out / "architecture.png")
    plots.write_history_csv(result.history, out / "history.csv")
    if ev is not None:
        plots.plot_confusion(ev.confusion, out / "confusion_matrix.png")
        plots.plot_predictions(data.x_test, data.y_test, ev.predicted, out / "predictions.png")
    write_json(out / "metrics.json", {
        "test_loss": ev.loss if ev else None,
        "test_accuracy": ev.accuracy if ev else None,
        "per_class_test_accuracy": ev.per_class_accuracy if ev else None,
        "learning_rate": result.lr,
        "best_epoch": result.best_epoch,
        "best_epoch_selected_by": BEST_MONITOR,
        "epochs_completed": epochs_done(result.history),
        "interrupted": result.ended == INTERRUPTED,
        "diverged": result.ended == DIVERGED,
        "training_seconds": round(result.seconds, 2),
        "peak_memory_mb": peak_memory_mb(),
        "train_images": len(data.y_train),
        "validation_images": len(data.y_val),
        "test_images": len(data.y_test),
        "seed": result.seed,
        "precision": result.precision,
        **extra,
        "config": config_dict(cfg),
        "history": result.history,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
    })


if __name__ == "__main__":
    sys.exit(main())
