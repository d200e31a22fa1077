"""The pictures a training run writes: its curves, the test set's confusion matrix, the first test images with
their predicted classes, the layers, and the history as CSV.

Needs matplotlib and scikit-learn; each file is written atomically (fashion_cnn.outputs).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import CLASS_NAMES, IMAGE_SIDE
from fashion_cnn.outputs import atomic_path, pyplot, save_figure


def plot_curves(history: dict[str, list[float]], metric: str, best_epoch: int | None, path: Path,
                title: str = "Fashion-MNIST CNN: {metric} per epoch", validation: str = "validation") -> None:
    """Training and validation `metric` per epoch, with the kept epoch marked; title and the name of the validation
    images say what was trained and measured."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = range(1, len(history[metric]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, history[metric], "o-", label=f"training {metric}")
    ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"{validation} {metric}")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel=metric, title=title.format(metric=metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, path: Path, names: tuple[str, ...] = CLASS_NAMES, of: str = "Test-set"
                   ) -> None:
    """A confusion matrix (of the test set, or of what `of` says) with class names and counts."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 8))
    ConfusionMatrixDisplay(confusion, display_labels=names).plot(
        ax=ax, cmap="Blues", values_format="d", xticks_rotation=45, colorbar=False)
    ax.set_title(f"{of} confusion matrix (rows: true class, columns: predicted)")
    save_figure(fig, path)


def plot_predictions(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, path: Path, count: int = 36
                     ) -> None:
    """A grid of the first test images (N, 28, 28, 1) captioned with the predicted class; mistakes in red with the
    true class (labels).

    Drawn as one mosaic image rather than 36 subplots, which take seconds to lay out.
    """
    plt = pyplot()
    cols, count = 6, min(count, len(predicted))
    rows = math.ceil(count / cols)
    cell_w, cell_h, caption = IMAGE_SIDE + 6, IMAGE_SIDE + 16, 14  # pixels; captions sit above each image
    canvas = np.ma.masked_array(np.zeros((rows * cell_h, cols * cell_w)), mask=True)  # masked: white background
    fig, ax = plt.subplots(figsize=(cols * 1.9, rows * 2.0))
    for i in range(count):
        top, left = (i // cols) * cell_h + caption, (i % cols) * cell_w + 3
        canvas[top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = images[i, :, :, 0]
        wrong = predicted[i] != labels[i]
        text = f"{CLASS_NAMES[predicted[i]]}\n(true: {CLASS_NAMES[labels[i]]})" if wrong \
            else CLASS_NAMES[predicted[i]]
        ax.text(left + IMAGE_SIDE / 2, top - 1, text, ha="center", va="bottom", fontsize=8,
                color="red" if wrong else "black")
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title("First test images: predicted class (mistakes in red, true class below)")
    save_figure(fig, path)


def plot_architecture(model: Any, path: Path) -> None:
    """A top-down diagram of the layers with their output shapes and parameter counts.

    Drawn with matplotlib rather than keras.utils.plot_model, which needs the Graphviz program that pip cannot
    install.
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
