"""--predict on photos as people take them: the item found by GrabCut and tidied, HEIC files, the unsure flag,
and the picture of what the network saw. Every picture here is made by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHAPES
from fashion_cnn import photos
from pictures import floor, paint, rendered_photo, save_image, saved, tshirt


def crop_of(path: Path) -> tuple[int, int, int, int]:
    """The crop box --predict's reading of the file found."""
    seen = photos.to_network_input(path)
    assert seen.item_found and seen.photo
    return seen.box


def test_a_hanger_above_a_garment_is_not_part_of_the_crop(tmp_path: Path) -> None:
    picture = floor()
    item = tshirt(400, 300, 110, 40, 220)
    paint(picture, item, (40, 60, 130))
    hook = np.zeros((400, 300), bool)
    hook[60:132, 148:152] = True   # the hook, 4 px thick, from well above the collar down into it
    hook[58:62, 130:170] = True    # and the hanger's bar
    paint(picture, hook & ~item, (50, 50, 50))
    left, top, right, bottom = crop_of(saved(tmp_path, picture))
    assert 132 - 12 <= top <= 132 + 6, "the crop starts at the shoulders (a stub of the hook at most), not at it"
    assert abs(left - 40) <= 6 and abs(right - 260) <= 6 and abs(bottom - 330) <= 6


def test_a_striped_item_is_found_whole_even_where_its_stripes_match_the_floor(tmp_path: Path) -> None:
    picture = floor()
    item = tshirt(400, 300, 90, 40, 220)  # from (40, 112) to (261, 311)
    stripes = (np.mgrid[0:400, 0:300][0] // 12) % 2 == 0
    paint(picture, item & stripes, (30, 30, 90))
    paint(picture, item & ~stripes, (205, 200, 192))  # the floor's colour: such a stripe on the item's edge is lost
    left, top, right, bottom = crop_of(saved(tmp_path, picture))
    stripe = 12 + 4
    assert abs(left - 40) <= stripe and abs(right - 261) <= stripe, "the sleeves are kept"
    assert abs(top - 112) <= stripe and abs(bottom - 311) <= stripe, "the item is not cut at a stripe"


def test_an_item_that_runs_off_the_picture_is_still_found(tmp_path: Path) -> None:
    picture = floor()
    y, x = np.mgrid[0:400, 0:300]
    trouser_legs = ((np.abs(x - 110) <= 40) | (np.abs(x - 200) <= 40)) & (y >= 60)  # leaves at the bottom edge
    trouser_legs |= (x >= 70) & (x <= 240) & (y >= 60) & (y <= 140)
    paint(picture, trouser_legs, (60, 70, 110))
    left, top, right, bottom = crop_of(saved(tmp_path, picture))
    assert abs(left - 70) <= 6 and abs(right - 241) <= 6 and abs(top - 60) <= 6 and bottom >= 394


def test_a_garment_as_light_as_the_floor_but_of_another_colour_is_found(tmp_path: Path) -> None:
    picture = floor()
    item = tshirt(400, 300, 90, 40, 220)
    paint(picture, item, (150, 236, 150))  # a pale green of the floor's own lightness: in gray it would vanish
    left, top, right, bottom = crop_of(saved(tmp_path, picture))  # a JPEG, read in colour
    assert abs(left - 40) <= 6 and abs(right - 261) <= 6 and abs(top - 112) <= 6 and abs(bottom - 311) <= 6


def test_a_garment_under_uneven_light_keeps_even_gray_levels(tmp_path: Path) -> None:
    light = np.linspace(1.0, 0.4, 300)[None, :, None]  # the window on the left, a dim room on the right
    picture = floor() * light
    item = tshirt(400, 300, 90, 40, 220)
    picture[item] = np.array([150.0, 140, 130]) * light[0, np.mgrid[0:400, 0:300][1][item]]
    seen = photos.to_network_input(saved(tmp_path, picture, "photo.png"))
    inner = seen.pixels[12:24, 9:19]  # the body, well inside its edges
    assert inner.min() > 0 and np.percentile(inner, 95) - np.percentile(inner, 5) < 20, "shading, not the room's"


def height(pixels: np.ndarray) -> int:
    """How many rows the item spans."""
    return int(np.ptp(np.flatnonzero(pixels.any(axis=1)))) + 1


def width(pixels: np.ndarray) -> int:
    """How many columns the item spans."""
    return int(np.ptp(np.flatnonzero(pixels.any(axis=0)))) + 1


def test_a_wide_garment_is_also_read_stretched_to_a_garments_proportions(tmp_path: Path) -> None:
    picture = floor(300, 400)
    item = tshirt(300, 400, 20, 20, 360) & (np.mgrid[0:300, 0:400][0] < 230)  # arms spread, twice as wide as tall
    paint(picture, item, (40, 60, 130))
    seen = photos.to_network_input(saved(tmp_path, picture))
    assert width(seen.pixels) == 28 and abs(height(seen.pixels) - 28 * height(item) / width(item)) <= 1.5
    assert height(seen.garment) == 28 and abs(width(seen.garment) - 28 / photos.GARMENT_ASPECT) <= 1.5, "stretched"
    tall = floor()
    paint(tall, np.pad(np.ones((300, 150), bool), ((50, 50), (75, 75))), (40, 60, 130))
    assert photos.to_network_input(saved(tmp_path, tall, "tall.jpg")).garment is None, "tall enough as it is"


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 3), (1, 500, 3), (500, 1, 3), (3, 40), (300, 200, 3)])
def test_tiny_thin_or_flat_pictures_are_still_read(tmp_path: Path, shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, shape) if shape[0] < 300 else np.full(shape, 128)
    seen = photos.to_network_input(saved(tmp_path, pixels.astype(float), "picture.png"))
    assert seen.pixels.shape == (28, 28) and seen.pixels.dtype == np.uint8


@pytest.mark.parametrize("label", range(10))
@pytest.mark.parametrize("kind", ["light", "dark", "banner"])
def test_a_photo_becomes_its_item_on_black_fitted_to_28_and_centred(tmp_path: Path, label: int, kind: str) -> None:
    picture, item = rendered_photo(label, dark=kind == "dark", banner=kind == "banner", seed=label)
    seen = photos.to_network_input(save_image(tmp_path / "photo.jpg", picture, quality=90))
    assert seen.item_found and seen.photo and seen.inverted is (kind != "dark")
    left, top, right, bottom = seen.box
    assert abs(left - item[0]) <= 4 and abs(top - item[1]) <= 4, "the crop starts at the item"
    assert abs(right - item[2]) <= 4 and abs(bottom - item[3]) <= 4, "and ends at it: no banner, no label"
    pixels = seen.pixels.astype(int)
    rows, cols = np.flatnonzero(pixels.max(axis=1) > 0), np.flatnonzero(pixels.max(axis=0) > 0)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 28, "the longest side spans the frame"
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1, "centred"
    from scipy import ndimage

    truth = SHAPES[label]
    assert (pixels[~ndimage.binary_dilation(truth, iterations=2)] == 0).all(), "the background is exactly 0"
    assert pixels.max() >= 245 and np.median(pixels[truth]) > 150, "the item has the data set's contrast"


def test_a_picture_with_nothing_on_it_is_used_whole_and_says_so(tmp_path: Path) -> None:
    flat = np.random.default_rng(0).normal(200, 3, (120, 90)).clip(0, 255).astype(np.uint8)
    seen = photos.to_network_input(save_image(tmp_path / "wall.png", Image.fromarray(flat)))
    assert not seen.item_found and seen.box is None and seen.pixels.shape == (28, 28)
    assert np.ptp(seen.pixels[4:-4, 7:-7]) < 25, "nothing to see is an even square, not a bright texture"


def test_many_photos_are_read_on_every_core_in_order_and_as_one_at_a_time(tmp_path: Path) -> None:
    """read_all in threads gives what reading each file here gives, in the files' order, with an
    unreadable file as its one-line error in its place."""
    files = [save_image(tmp_path / f"photo{label}.jpg", rendered_photo(label, seed=label)[0], quality=90)
             for label in range(4)]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    files.insert(2, tmp_path / "broken.jpg")
    read = list(photos.read_all(files, per_thread=1))
    assert [path for path, _ in read] == files
    assert isinstance(read[2][1], str) and "broken.jpg" in read[2][1] and "\n" not in read[2][1]
    for path, seen in read[:2] + read[3:]:
        assert (seen.pixels == photos.to_network_input(path).pixels).all() and seen.box == crop_of(path)
