"""The pictures a training run writes: the kept epoch marked on the curves, mistakes in red with their true class,
and the history as CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import class_image
from fashion_cnn import plots

HISTORY = {"loss": [0.9, 0.6, 0.5], "accuracy": [0.7, 0.8, 0.85], "val_loss": [0.8, 0.55, 0.6],
           "val_accuracy": [0.72, 0.83, 0.82]}


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures the plots module saves, by file name, instead of saving them."""
    saved: dict[str, Any] = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.setdefault(Path(path).name, fig))
    return saved


def test_the_curves_mark_the_kept_epoch(figures: dict[str, Any]) -> None:
    plots.plot_curves(HISTORY, "accuracy", 2, Path("accuracy.png"))
    [ax] = figures["accuracy.png"].axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["training accuracy", "validation accuracy", "kept epoch 2"]
    assert list(ax.lines[1].get_ydata()) == HISTORY["val_accuracy"]
    assert list(ax.lines[2].get_xdata()) == [2, 2], "a vertical line at the kept epoch"


def test_a_mistaken_test_image_is_captioned_in_red_with_its_true_class(figures: dict[str, Any]) -> None:
    images = np.stack([class_image(label) for label in range(4)])[..., None]
    labels, predicted = np.arange(4), np.array([0, 1, 9, 3])
    plots.plot_predictions(images, labels, predicted, Path("predictions.png"))
    captions = {text.get_text(): text.get_color() for text in figures["predictions.png"].axes[0].texts}
    assert captions == {"T-shirt/top": "black", "Trouser": "black", "Ankle boot\n(true: Pullover)": "red",
                        "Dress": "black"}


def test_the_history_is_one_csv_row_per_epoch(tmp_path: Path) -> None:
    plots.write_history_csv(HISTORY, tmp_path / "history.csv")
    with open(tmp_path / "history.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert rows[2] == ["2", "0.600000", "0.800000", "0.550000", "0.830000"]
    assert len(rows) == 1 + len(HISTORY["loss"])
