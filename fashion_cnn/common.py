"""What every part of the program shares: the classes, the error a user can fix, how a training run ended, and
how a model's answers are scored by class.

Needs NumPy (scikit-learn for the scoring, imported when asked for). ConvolutionalNN.py and every module of the package may import it; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

Settings = Any  # ConvolutionalNN.py's Config: the package reads its fields, never imports the script
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIDE = 28
ERASE_AREA = (0.02, 0.4)  # share of the image a random-erasing rectangle covers (Zhong et al. 2017)
ERASE_ASPECT = (0.3, 1 / 0.3)  # its height / width
EVALUATION_BATCH = 512  # images per step when validating, testing and predicting: fewer, larger steps
BEST_MONITOR = "val_accuracy"  # the kept epoch; accuracy is the figure reported, and val_loss bottoms out earlier
EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED, EXIT_SIGINT = 1, 2, 3, 130


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def setting_defaults(cfg: Settings) -> dict[str, Any]:
    """The default of each of cfg's settings, by field name: what a run gets where no flag is given."""
    return {field.name: field.default for field in dataclasses.fields(cfg)}


def confusion_and_per_class(truth: np.ndarray, predicted: np.ndarray, names: tuple[str, ...]
                            ) -> tuple[np.ndarray, dict[str, float]]:
    """The confusion matrix of the answers (rows: true class) and each class's accuracy, by name."""
    from sklearn.metrics import confusion_matrix

    confusion = confusion_matrix(truth, predicted, labels=range(len(names)))
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return confusion, dict(zip(names, map(float, per_class), strict=True))


def first_line(e: BaseException) -> str:
    """An exception's message, cut to its first line."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


COMPLETED, DIVERGED, INTERRUPTED, FAILED = "completed", "diverged", "interrupted", "failed"  # and STALLED: how runs end


@dataclasses.dataclass
class TrainResult:
    """What one training run produced, and how it ended."""

    model: Any                       # None if the run failed
    lr: float
    seed: int
    history: dict[str, list[float]]
    best_epoch: int | None           # 1-based epoch whose weights the model holds; None if no epoch finished
    best_value: float | None         # BEST_MONITOR at best_epoch
    seconds: float
    precision: str = "float32"
    ended: str = COMPLETED           # COMPLETED, DIVERGED, STALLED (a study stopped it), INTERRUPTED or FAILED
    signal: int | None = None        # INTERRUPTED: by which signal
    failure: str | None = None       # FAILED: what went wrong (a Ray task that could not finish)


# With too high a rate the network can die at chance level (1/10) without its loss ever becoming NaN, so
# "diverged" alone would not show it. A study stops a run whose last STALL_EPOCHS epochs were all at chance level:
# validation accuracy below STALLED_BELOW_ACCURACY, and validation loss not clearly below a uniform guess's, ln 10
# (with or without label smoothing). Accuracy alone would stop a slow starter, whose loss falls below ln 10 while
# its accuracy is still at chance; a dead network's does not. docs/RESULTS.md has the runs the rule was made from.
STALLED_BELOW_ACCURACY = 1.5 / len(CLASS_NAMES)
STALL_EPOCHS = 2
CHANCE_LOSS = math.log(len(CLASS_NAMES)) - 0.01
STALLED = "stalled at chance level"


def stalled(history: dict[str, list[float]]) -> bool:
    """Whether the run's last STALL_EPOCHS epochs were all at chance level (accuracy and loss)."""
    recent = list(zip(history.get("val_accuracy", []), history.get("val_loss", []), strict=False))[-STALL_EPOCHS:]
    return len(recent) == STALL_EPOCHS and all(acc < STALLED_BELOW_ACCURACY and not loss < CHANCE_LOSS
                                               for acc, loss in recent)


def how_it_ended(history: dict[str, list[float]], epochs: int) -> str:
    """How a run that was not interrupted ended: DIVERGED, STALLED (stopped early at chance level) or COMPLETED."""
    if any(not math.isfinite(v) for key in ("loss", "val_loss") for v in history.get(key, [])):
        return DIVERGED
    return STALLED if epochs_done(history) < epochs and stalled(history) else COMPLETED


def epochs_done(history: dict[str, list[float]]) -> int:
    """How many epochs a run's history holds."""
    return len(history.get("loss", []))
