"""What every part shares: how a run ended, and when it stalled at chance level."""

from __future__ import annotations

import numpy as np
import pytest

from fashion_cnn import common


@pytest.mark.parametrize(("val_accuracy", "val_loss", "stops"), [
    ([0.10, 0.11], [2.33, 2.3026], True),                  # dead from the start
    ([0.85, 0.10, 0.10], [0.5, 2.31, 2.31], True),         # learned, then died
    ([0.12, 0.12, 0.12], [2.2968, 2.3007, 2.2951], True),  # hovering at chance (a split not quite balanced)
    ([0.10], [2.31], False),                               # too early to tell
    ([0.10, 0.12], [2.294, 2.282], False),                 # slow starter: its loss has left chance
    ([0.10, 0.20], [2.31, 2.31], False),                   # slow starter: its accuracy has left chance
    ([0.10, 0.10, 0.20, 0.30], [2.31, 2.31, 2.2, 2.1], False),  # ... though a study would have stopped it at 2
])
def test_stalled_means_accuracy_and_loss_at_chance_for_two_epochs(val_accuracy: list[float], val_loss: list[float],
                                                                   stops: bool) -> None:
    assert common.stalled({"val_accuracy": val_accuracy, "val_loss": val_loss}) is stops
    history = {"loss": val_loss, "val_accuracy": val_accuracy, "val_loss": val_loss}
    assert common.how_it_ended(history, epochs=20) == (common.STALLED if stops else common.COMPLETED)
    assert common.how_it_ended(history, epochs=len(val_loss)) == common.COMPLETED, "a run that did every epoch goes on"


def test_a_run_whose_loss_became_nan_or_infinite_diverged() -> None:
    finite = {"loss": [0.9, 0.7], "val_loss": [0.8, 0.6], "val_accuracy": [0.7, 0.8]}
    assert common.how_it_ended(finite, epochs=2) == common.COMPLETED
    assert common.how_it_ended({**finite, "loss": [0.9, float("nan")]}, epochs=20) == common.DIVERGED
    assert common.how_it_ended({**finite, "val_loss": [0.8, float("inf")]}, epochs=20) == common.DIVERGED
    assert common.epochs_done(finite) == 2 and common.epochs_done({}) == 0


def test_an_error_is_told_by_its_first_line_or_its_type() -> None:
    assert common.first_line(ValueError("bad header\n  at byte 12\n")) == "bad header"
    assert common.first_line(KeyError()) == "KeyError"
    assert common.UserError("no model").exit_code == common.EXIT_FAILURE
    assert common.UserError("bad flag", common.EXIT_USAGE).exit_code == 2


def test_answers_are_scored_by_class_with_a_class_never_seen_at_zero() -> None:
    confusion, per_class = common.confusion_and_per_class(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]),
                                                          ("a", "b", "c"))
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert per_class == {"a": 0.5, "b": 1.0, "c": 0.0}
