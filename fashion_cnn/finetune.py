"""--finetune DIR: teach the trained Fashion-MNIST model the user's own labelled photos. DIR holds a folder of
photos per class, named for the class (Keras's image_dataset_from_directory layout). Each photo is read exactly
as --predict reads it (fashion_cnn.photos); the network keeps what it learned on Fashion-MNIST and gets a new last
layer for the folders' classes, started from each class's mean features (imprinting), then all of it is trained;
a stratified share of the photos is held out and reported on; the adapted model is saved beside the base model,
never over it, and --predict --model-path ADAPTED names the folders.

Needs what --predict needs (Pillow, SciPy, OpenCV) and Keras; the batches are NumPy's (fashion_cnn.streams).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn import plots
from fashion_cnn.backends import import_keras, library_versions, on_keras
from fashion_cnn.common import EVALUATION_BATCH, Settings, UserError, confusion_and_per_class, setting_defaults
from fashion_cnn.journal import TrainingInterrupted, stop_requests
from fashion_cnn.model_file import load_trained_model, save_model
from fashion_cnn.outputs import check_writable, output_set, write_json
from fashion_cnn.photos import read_all, require_opencv
from fashion_cnn.predict import IMAGE_SUFFIXES
from fashion_cnn.streams import EpochBatches, epoch_starter, seed_everything
from fashion_cnn.tta import class_probabilities

MIN_PHOTOS = 5        # a class needs at least this many readable photos: some to learn from, one to hold out
HOLD_OUT = 0.15       # the share of each class's photos held out and reported on (at least one)
# The recipe for tens of photos a class, chosen on the tuning photos of real-clothes-dev (docs/RESULTS.md); each
# applies unless its flag is given with another value than the training default.
RECIPE = {"epochs": 20, "lrs": (0.002,), "batch_size": 16}  # by Config field: 20 epochs, --lr 0.002, batches of 16
SHIFT, FLIP = 2, True  # the photos' readings moved by up to 2 pixels and mirrored while training
TTA = {"flip": FLIP, "shift": True}  # and averaged over the same copies when tested and predicted
IMPRINT_LENGTH = 2.0  # the new last layer starts imprinted (imprinted_head): each class's weights this long


@dataclasses.dataclass
class Photos:
    """The photos of a --finetune folder as the network reads them."""

    images: np.ndarray          # (N, 28, 28, 1) uint8
    labels: np.ndarray          # (N,) index into classes
    classes: tuple[str, ...]    # the class folders' names, sorted
    ignored: dict[str, int]     # what was passed over: files beside the class folders, subfolders, other files
    unreadable: int = 0         # image files that could not be read (one line each on stderr)


@dataclasses.dataclass
class Adapted:
    """An adapted model and what teaching it gave: its curves, the held-out report, the settings and the time."""

    model: Any
    history: dict[str, list[float]]
    report: dict[str, Any]
    settings: Settings
    seconds: float


def finetune(cfg: Settings) -> int:
    """Read the folder's photos, adapt the model at --model-path to their classes, report on the held-out photos,
    and save the adapted model with its curves, confusion matrix and metrics; the exit code."""
    folder = cfg.finetune
    require_opencv("--finetune")
    class_files, ignored = class_folders(folder)
    target, out = finetuned_path(cfg), cfg.plots_dir / f"finetune-{folder.resolve().name}"
    base, _ = load_trained_model(cfg.model_path)
    check_writable(target.parent, cfg.plots_dir)
    photos = read_class_photos(class_files, ignored, folder)
    try:
        adapted = adapt(cfg, base, photos)
    except TrainingInterrupted as stop:
        print("\nInterrupted; nothing was written and earlier outputs are untouched.", file=sys.stderr)
        return 128 + stop.signum
    save_adapted(adapted, photos, target, out, cfg.model_path)
    print(f"Adapted model: {target} (--predict --model-path {target}); curves, confusion matrix and metrics: {out}/")
    return 0


def adapt(cfg: Settings, base: Any, photos: Photos, on_epoch: Callable[[int, int], None] | None = None,
          handle_signals: bool = True) -> Adapted:
    """The base model adapted to the photos by the recipe, with HOLD_OUT of each class held out and reported on;
    on_epoch(done, epochs) after each epoch. With handle_signals, Ctrl-C or SIGTERM stops it after the batch
    (TrainingInterrupted); only the main thread can take signals."""
    settings = recipe(cfg)
    started = time.perf_counter()
    held = held_out(photos.labels, cfg.seed)
    with stop_requests() if handle_signals else contextlib.nullcontext([]) as received:
        model, history = train_adapted(base, photos, held, settings, received, on_epoch)
    seconds = time.perf_counter() - started
    return Adapted(model, history, held_out_report(model, photos, held), settings, seconds)


def save_adapted(adapted: Adapted, photos: Photos, target: Path, out: Path, base_path: Path) -> None:
    """The adapted model at target (never over the base model) and its curves, confusion matrix and metrics in
    out, as one set: a failure leaves the earlier ones as they were."""
    with output_set():
        save_model(adapted.model, target, {"test_time_augmentation": TTA, "class_names": list(photos.classes),
                                           "unsure_above": adapted.report["unsure_above"],
                                           "adapted_from": str(base_path)})
        write_outputs(out, adapted, photos, base_path)


def class_folders(folder: Path, named: str = "") -> tuple[dict[str, list[Path]], dict[str, int]]:
    """The image files of each class folder, by class name; and what was passed over. One line naming the problem
    and the fix for a folder that is missing, empty, of one class, or with a class of too few photos (named: how
    the messages call the folder; default --finetune FOLDER)."""
    named = named or default_name(folder)
    layout = f"put each class's photos in a folder of its own inside it ({folder}/shirt/, {folder}/shoes/, ...)"
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise UserError(f"{named}: {what}; {layout}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{named} holds no class folders; {layout}")
    if len(classes) == 1:
        raise UserError(f"{named} holds one class folder ({classes[0].name}); the network needs two or "
                        f"more classes to tell apart: add a folder of photos for each other class")
    ignored = {"files beside the class folders": sum(p.is_file() for p in folder.iterdir()),
               "folders inside class folders": 0, "files that are not images": 0}
    files = {}
    for c in classes:
        entries = list(c.iterdir())
        files[c.name] = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        ignored["folders inside class folders"] += sum(p.is_dir() for p in entries)
        ignored["files that are not images"] += sum(p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                                                    for p in entries)
    check_class_sizes({name: len(paths) for name, paths in files.items()}, named)
    return files, ignored


def default_name(folder: Path) -> str:
    """How the messages call the folder of class folders where the caller names it no other way."""
    return f"--finetune {folder}"


def check_class_sizes(sizes: dict[str, int], named: str) -> None:
    """One line for the classes with fewer than MIN_PHOTOS photos (named: how it calls their folder)."""
    small = {name: n for name, n in sizes.items() if n < MIN_PHOTOS}
    if small:
        listed = ", ".join(f"{name} ({n})" for name, n in small.items())
        raise UserError(f"{named}: each class needs at least {MIN_PHOTOS} readable photos; too few in "
                        f"{listed}: add photos there, or remove the folder")


def finetuned_path(cfg: Settings) -> Path:
    """Where the adapted model goes: --finetuned-path, or beside the base model, named for the folder."""
    path = cfg.finetuned_path or cfg.model_path.with_name(f"{cfg.model_path.stem}_{cfg.finetune.resolve().name}.keras")
    if path.resolve() == cfg.model_path.resolve():
        raise UserError(f"--finetuned-path {path} is the base model; the adapted model never replaces it: "
                        "give another path")
    return path


def read_class_photos(class_files: dict[str, list[Path]], ignored: dict[str, int], folder: Path, named: str = "",
                      progress: Callable[[int, int], None] | None = None) -> Photos:
    """Every photo read as --predict reads it, with progress(done, total) (default: printed); an unreadable one is
    one line on stderr and skipped (named: how messages call the folder, as class_folders)."""
    paths = [path for class_paths in class_files.values() for path in class_paths]
    path_labels = [label for label, class_paths in enumerate(class_files.values()) for _ in class_paths]
    images, labels, unreadable = [], [], 0
    for done, (label, (_, seen)) in enumerate(zip(path_labels, read_all(paths), strict=True), 1):
        if isinstance(seen, str):
            print(f"\nerror: {seen} (skipped)" if sys.stdout.isatty() else f"error: {seen} (skipped)", file=sys.stderr)
            unreadable += 1
        else:
            images.append(seen.pixels)
            labels.append(label)
        (progress or show_progress)(done, len(paths))
    check_class_sizes({name: labels.count(k) for k, name in enumerate(class_files)}, named or default_name(folder))
    passed_over = ", ".join(f"{n} {what}" for what, n in ignored.items() if n)
    print(f"Photos: {len(labels)} in {len(class_files)} classes ({', '.join(class_files)})"
          + (f"; ignored: {passed_over}" if passed_over else "")
          + (f"; {unreadable} could not be read" if unreadable else ""), flush=True)
    return Photos(np.stack(images)[..., None], np.array(labels), tuple(class_files), ignored, unreadable)


def show_progress(done: int, total: int) -> None:
    """'Reading photos: 120 of 350', in place on a terminal, every tenth of the way in a log."""
    if sys.stdout.isatty():
        print(f"\rReading photos: {done} of {total}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, math.ceil(total / 10)) == 0:
        print(f"Reading photos: {done} of {total}", flush=True)


def recipe(cfg: Settings) -> Settings:
    """cfg with the recipe's epochs, rate and batch size, except where a flag gave another value than the training
    default; the photos shifted and mirrored, not erased."""
    defaults = setting_defaults(cfg)
    chosen = {name: value if getattr(cfg, name) == defaults[name] else getattr(cfg, name)
              for name, value in RECIPE.items()}
    return dataclasses.replace(cfg, **chosen, shift=SHIFT, flip=FLIP, erase=0.0)


def held_out(labels: np.ndarray, seed: int) -> np.ndarray:
    """A mask of the photos held out: HOLD_OUT of each class (at least one, and never all but none), drawn by seed."""
    draws = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members) - 1, max(1, round(HOLD_OUT * len(members))))
        held[draws.choice(members, count, replace=False)] = True
    return held


def train_adapted(base: Any, photos: Photos, held: np.ndarray, cfg: Settings, stop: list[int],
                  on_epoch: Callable[[int, int], None] | None = None) -> tuple[Any, dict[str, list[float]]]:
    """The base network with a new last layer for the photos' classes, imprinted, then all of it trained on the
    photos not held out (validated on the held-out ones each epoch, for the curves only); the model and its
    history. A signal number in stop ends it after the batch (TrainingInterrupted); on_epoch(done, epochs) after
    each epoch."""
    keras = import_keras()
    seed_everything(cfg.seed)
    model = adapted_network(keras, base, len(photos.classes))
    model.layers[-1].set_weights(imprinted_head(keras, model, photos.images[~held], photos.labels[~held],
                                                len(photos.classes)))
    steps = math.ceil((~held).sum() / cfg.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.epochs * steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), metrics=["accuracy"],
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing))
    batches = on_keras(EpochBatches, "utils.PyDataset")(cfg, photos.images[~held], photos.labels[~held], cfg.seed,
                                                         classes=len(photos.classes))
    start_epoch = epoch_starter(batches.set_epoch, model)
    held_labels = np.eye(len(photos.classes), dtype=np.float32)[photos.labels[held]]
    def stop_if_asked(*_: Any, **__: Any) -> None:
        if stop:
            raise TrainingInterrupted(stop[0])

    def epoch_done(epoch: int, _: Any) -> None:
        if on_epoch:
            on_epoch(epoch + 1, cfg.epochs)

    fitted = model.fit(batches, validation_data=(photos.images[held], held_labels), epochs=cfg.epochs,
                       shuffle=False, verbose=(1 if sys.stdout.isatty() else 2) if on_epoch is None else 0,
                       callbacks=[keras.callbacks.LambdaCallback(
                           on_epoch_begin=lambda epoch, _: start_epoch(epoch), on_train_batch_begin=stop_if_asked,
                           on_epoch_end=epoch_done)])
    return model, {k: [float(v) for v in vs] for k, vs in fitted.history.items()}


def adapted_network(keras: Any, base: Any, classes: int) -> Any:
    """The base network's layers (shared, with what they learned) and a new softmax layer for `classes`."""
    head = keras.layers.Dense(classes, activation="softmax", dtype="float32", name="class_probabilities")
    return keras.Sequential([keras.Input(shape=base.input_shape[1:], dtype="uint8", name="image"),
                             *base.layers[:-1], head], name="fashion_cnn_adapted")


def imprinted_head(keras: Any, model: Any, images: np.ndarray, labels: np.ndarray, classes: int
                   ) -> list[np.ndarray]:
    """The new last layer's first weights by imprinting (Qi, Brown and Lowe, CVPR 2018): each class's weights
    point along the mean of its training photos' features (the last hidden layer's output, for each photo and its
    mirror), IMPRINT_LENGTH long, with zero biases. The network starts out naming each photo's nearest class
    mean, instead of from a random layer whose first steps pull the learned features about (docs/RESULTS.md:
    +0.4 to +2.4 points on real photos, the length chosen by cross-validation)."""
    hidden = keras.Sequential([keras.Input(shape=images.shape[1:], dtype="uint8"), *model.layers[:-1]])
    features = np.mean([np.asarray(hidden.predict(view, batch_size=EVALUATION_BATCH, verbose=0), np.float32)
                        for view in (images, images[:, :, ::-1])], axis=0)
    means = np.stack([features[labels == k].mean(axis=0) for k in range(classes)])
    lengths = np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return [(IMPRINT_LENGTH * means / lengths).T.astype(np.float32), np.zeros(classes, np.float32)]


def held_out_report(model: Any, photos: Photos, held: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix on the held-out photos, and the unsure cut chosen there."""
    probabilities = class_probabilities(model, photos.images[held], TTA)
    truth, predicted = photos.labels[held], probabilities.argmax(axis=1)
    confusion, per_class = confusion_and_per_class(truth, predicted, photos.classes)
    report = {"held_out_photos": int(held.sum()), "held_out_accuracy": float(np.mean(predicted == truth)),
              "per_class_held_out_accuracy": per_class, "confusion": confusion, "unsure_above": unsure_cut(1 - probabilities.max(axis=1), predicted == truth)}
    print(f"\nHeld-out photos: {report['held_out_photos']}; right class: {report['held_out_accuracy']:.1%}")
    for name, accuracy in report["per_class_held_out_accuracy"].items():
        print(f"  {name:<16} {accuracy:7.1%}")
    return report


def unsure_cut(scores: np.ndarray, right: np.ndarray, default: float = 0.5) -> float:
    """The unsure score above which an answer is flagged, chosen on the held-out photos: the cut that flags the
    largest share of the wrong answers less the share of the right ones it flags (default where the held-out
    answers are all right or all wrong)."""
    if right.all() or not right.any():
        return default
    cuts = np.unique(scores)[:-1]  # flag scores above the cut: the highest flags nothing
    gains = [np.mean(scores[~right] > cut) - np.mean(scores[right] > cut) for cut in cuts]
    return float(cuts[int(np.argmax(gains))]) if len(cuts) else default


CURVES_TITLE = "Taught your photos: {metric} per epoch"  # what the curves of an adaptation show


def write_outputs(out: Path, adapted: Adapted, photos: Photos, base_path: Path) -> None:
    """The curves, the held-out confusion matrix, history.csv and metrics.json of an adaptation."""
    history, report, cfg = adapted.history, adapted.report, adapted.settings
    epochs = len(history.get("loss", []))
    for metric in ("accuracy", "loss"):
        plots.plot_curves(history, metric, epochs, out / f"{metric}.png", CURVES_TITLE, "held-out photos'")
    plots.plot_confusion(report["confusion"], out / "confusion_matrix.png", photos.classes, "Held-out photos")
    plots.write_history_csv(history, out / "history.csv")
    write_json(out / "metrics.json", {
        **{k: v for k, v in report.items() if k != "confusion"}, "confusion": report["confusion"].tolist(),
        "classes": list(photos.classes), "photos": len(photos.labels), "unreadable": photos.unreadable,
        "ignored": photos.ignored, "epochs": epochs, "learning_rate": cfg.lr, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "training_seconds": round(adapted.seconds, 2), "adapted_from": str(base_path),
        "history": history, "versions": library_versions()})
