"""Test-time augmentation: the copies averaged over follow the training augmentation."""

from __future__ import annotations

import numpy as np
import pytest

import ConvolutionalNN as cnn
from fashion_cnn import tta
from pictures import BrightnessRule


def test_tta_averages_each_image_with_its_mirror_and_one_pixel_moves() -> None:
    left_lit = np.zeros((1, 28, 28, 1), np.uint8)
    left_lit[:, :, :5] = 200
    left_rule = BrightnessRule((slice(None), slice(0, 14)))
    flip = tta.test_time_augmentation(cnn.parse_args(["--flip", "--shift", "0"]))
    assert tta.class_probabilities(left_rule, left_lit, None)[0, :2].tolist() == [1, 0]
    assert tta.class_probabilities(left_rule, left_lit, flip)[0, :2].tolist() == [0.5, 0.5], "mirror not averaged"
    second_row_lit = np.zeros((1, 28, 28, 1), np.uint8)
    second_row_lit[:, 1] = 200
    top_row_rule = BrightnessRule((slice(0, 1), slice(None)))
    shift = tta.test_time_augmentation(cnn.parse_args([]))
    # of the image and its 4 one-pixel moves, only the move up lights the top row
    assert tta.class_probabilities(top_row_rule, second_row_lit, shift)[0, 0] == pytest.approx(1 / 5)
    assert len(tta.test_time_views(second_row_lit, shift=True, flip=True)) == 10


@pytest.mark.parametrize(("flags", "copies"), [
    ([], {"flip": False, "shift": True}),  # the default run shifts in training and averages over 1-pixel moves
    (["--flip"], {"flip": True, "shift": True}),
    (["--no-tta"], None),
    (["--shift", "0"], None),  # nothing trained to average over
])
def test_test_time_augmentation_follows_the_training_augmentation(flags: list[str], copies: dict | None) -> None:
    assert tta.test_time_augmentation(cnn.parse_args(flags)) == copies
