"""--predict on photos as people take them: the item found by GrabCut and tidied, HEIC files, the unsure flag,
and the picture of what the network saw. Every picture here is made by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ConvolutionalNN as cnn
from conftest import call_main


def floor(h: int = 400, w: int = 300, seed: int = 0) -> np.ndarray:
    """A light, slightly uneven, noisy floor (float RGB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    light = 1 + 0.06 * (x / w - 0.5) - 0.08 * (y / h - 0.5)
    return np.array([214.0, 208, 198]) * light[..., None] + rng.normal(0, 3, (h, w, 3))


def paint(picture: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Colour the pixels where `where` holds."""
    picture[where] = colour


def saved(tmp_path: Path, picture: np.ndarray, name: str = "photo.jpg") -> Path:
    """The picture as a JPEG (or whatever the name says) in tmp_path."""
    path = tmp_path / name
    cnn.register_photo_formats()  # Pillow writes HEIC only once pillow-heif is registered, whichever test ran first
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def tshirt(h: int, w: int, top: int, left: int, side: int) -> np.ndarray:
    """A T-shirt's silhouette (body and two sleeves) in a side x side square at (top, left)."""
    y, x = np.mgrid[0:h, 0:w]
    y, x = (y - top) / side, (x - left) / side
    body = (x >= 0.25) & (x <= 0.75) & (y >= 0.1) & (y <= 1.0)
    sleeves = (y >= 0.1) & (y <= 0.1 + 0.35 - np.abs(x - 0.5) * 0.5) & (x >= 0) & (x <= 1)
    return body | sleeves


def crop_of(path: Path) -> tuple[int, int, int, int]:
    """The crop box --predict's reading of the file found."""
    seen = cnn.to_network_input(path)
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
    seen = cnn.to_network_input(saved(tmp_path, picture, "photo.png"))
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
    seen = cnn.to_network_input(saved(tmp_path, picture))
    assert width(seen.pixels) == 28 and abs(height(seen.pixels) - 28 * height(item) / width(item)) <= 1.5
    assert height(seen.garment) == 28 and abs(width(seen.garment) - 28 / cnn.GARMENT_ASPECT) <= 1.5, "stretched"
    tall = floor()
    paint(tall, np.pad(np.ones((300, 150), bool), ((50, 50), (75, 75))), (40, 60, 130))
    assert cnn.to_network_input(saved(tmp_path, tall, "tall.jpg")).garment is None, "tall enough as it is"


class TallOrWide:
    """A stand-in model: a Sneaker (90%) or a Bag (90%) when the image's bottom-left or bottom-right pixel is lit
    (markers), else a T-shirt (80%) when the item reaches the frame's top and a Bag (50%) when it does not."""

    def predict(self, images: np.ndarray, **_: object) -> np.ndarray:
        probs = np.full((len(images), 10), 0.01)
        for i, image in enumerate(images[..., 0]):
            k, p = (7, 0.9) if image[-1, 0] else (8, 0.9) if image[-1, -1] else (0, 0.8) if image[0].any() \
                else (8, 0.5)
            probs[i, k] = p
        return probs


def test_a_wide_photo_is_read_stretched_unless_it_is_a_shoe_or_sure_as_photographed() -> None:
    wide, tall = np.zeros((28, 28), np.uint8), np.zeros((28, 28), np.uint8)
    wide[8:20] = 200
    tall[:, 4:24] = 200
    shoe, bag = wide.copy(), wide.copy()
    shoe[-1, 0] = bag[-1, -1] = 255
    photo = {"inverted": True, "box": (0, 0, 9, 9), "item_found": True, "photo": True, "garment": tall}
    inputs = [cnn.NetworkInput(wide, **photo), cnn.NetworkInput(shoe, **photo), cnn.NetworkInput(bag, **photo),
              cnn.NetworkInput(wide, inverted=False, box=None, item_found=True, photo=False)]
    probs, read = cnn.read_photos(TallOrWide(), inputs, tta=None)
    assert [cnn.CLASS_NAMES[k] for k in probs.argmax(axis=1)] == ["T-shirt/top", "Sneaker", "Bag", "Bag"]
    assert read[0].stretched and read[0].as_photographed == "Bag" and np.array_equal(read[0].pixels, tall)
    assert not read[1].stretched and read[1].as_photographed is None, "a shoe is not a garment to stretch"
    assert not read[2].stretched, "90% sure as photographed: that reading stands"
    assert not read[3].stretched, "a 28x28 image is read as it is"
    result = cnn.classification(Path("x.jpg"), probs[0], read[0])
    assert result["stretched"] and result["as_photographed"] == "Bag" and result["class"] == "T-shirt/top"
    assert result["unsure"] and result["unsure_score"] == pytest.approx(0.99), "as photographed, 1% a T-shirt"


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 3), (1, 500, 3), (500, 1, 3), (3, 40), (300, 200, 3)])
def test_tiny_thin_or_flat_pictures_are_still_read(tmp_path: Path, shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, shape) if shape[0] < 300 else np.full(shape, 128)
    seen = cnn.to_network_input(saved(tmp_path, pixels.astype(float), "picture.png"))
    assert seen.pixels.shape == (28, 28) and seen.pixels.dtype == np.uint8


def test_a_heic_photo_reads_like_the_same_photo_as_png(tmp_path: Path) -> None:
    pytest.importorskip("pillow_heif")
    picture = floor()
    paint(picture, tshirt(400, 300, 90, 40, 220), (40, 60, 130))
    as_png = cnn.to_network_input(saved(tmp_path, picture, "photo.png"))
    as_heic = cnn.to_network_input(saved(tmp_path, picture, "photo.heic"))
    assert Image.open(tmp_path / "photo.heic").format == "HEIF"
    assert np.abs(np.subtract(as_heic.box, as_png.box)).max() <= 4
    assert np.abs(as_heic.pixels.astype(int) - as_png.pixels).mean() < 8
    assert ".heic" in cnn.IMAGE_SUFFIXES and ".avif" in cnn.IMAGE_SUFFIXES


def test_a_broken_heic_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    with pytest.raises(cnn.UserError, match=r"broken\.heic: not a readable image"):
        cnn.to_network_input(tmp_path / "broken.heic")


@pytest.mark.parametrize(("probs", "as_photographed", "unsure"), [
    ([0.91] + [0.01] * 9, None, False),
    ([0.12] + [0.88 / 9] * 9, None, True),
    ([0.40, 0.35] + [0.25 / 8] * 8, None, True),  # under 46%
    ([0.48, 0.06] + [0.46 / 8] * 8, None, False),  # under half, but far ahead of the rest
    ([0.80, 0.05] + [0.15 / 8] * 8, [0.50, 0.1] + [0.4 / 8] * 8, False),  # read stretched; as photographed the same
    ([0.80, 0.05] + [0.15 / 8] * 8, [0.30, 0.5] + [0.2 / 8] * 8, True),  # as photographed, under 46% for it
])
def test_a_spread_out_or_two_minded_reading_is_marked_unsure_with_its_score(
        probs: list[float], as_photographed: list[float] | None, unsure: bool) -> None:
    other = None if as_photographed is None else np.array(as_photographed)
    seen = cnn.NetworkInput(np.zeros((28, 28), np.uint8), inverted=False, box=None, item_found=True, photo=True,
                            stretched=other is not None, other_reading=other,
                            as_photographed=None if other is None else cnn.CLASS_NAMES[other.argmax()])
    result = cnn.classification(Path("x.jpg"), np.array(probs), seen)
    assert result["class"] == "T-shirt/top"
    assert result["unsure"] is unsure
    both = min(probs[0], 1.0 if other is None else other[0])
    assert result["unsure_score"] == pytest.approx(1 - both, abs=1e-4)
    assert (result["unsure_score"] > cnn.UNSURE_ABOVE) is unsure


def widest_gap(picture: Image.Image, rows: slice) -> int:
    """The widest run of blank columns between the first and the last ink within these rows of the picture."""
    ink = np.flatnonzero((np.asarray(picture.convert("L"))[rows] < 200).any(axis=0))
    return int(np.diff(ink).max()) - 1


def test_the_panel_titles_do_not_overlap_on_a_narrow_portrait_photo(tmp_path: Path) -> None:
    narrow = Image.fromarray(np.full((700, 120, 3), 200, np.uint8))
    seen = cnn.NetworkInput(np.zeros((28, 28), np.uint8), inverted=True, box=(10, 100, 110, 600), item_found=True,
                            photo=True, preview=narrow)
    result = {"top3": [{"class": "Dress", "probability": 0.5}] * 3, "unsure": True}
    cnn.draw_what_the_network_saw(seen, result, tmp_path / "seen.png")
    assert widest_gap(Image.open(tmp_path / "seen.png"), slice(8, 30)) >= 10, "the two titles stand apart"


@pytest.mark.slow
def test_predict_says_unsure_beside_the_class_in_text_and_json(tmp_path: Path, trained: dict) -> None:
    picture = floor()
    paint(picture, tshirt(400, 300, 90, 40, 220), (40, 60, 130))
    saved(tmp_path, picture, "shirt.heic")
    saved(tmp_path, floor(seed=1), "floor.png")  # nothing on it: the network has to guess
    common = ["--predict", tmp_path / "shirt.heic", tmp_path / "floor.png", "--model-path", trained["model"],
              "--plots-dir", tmp_path / "p"]
    as_json = call_main(*common, "--json")
    assert as_json.returncode == 0, as_json.stderr
    results = {Path(r["file"]).name: r for r in json.loads(as_json.stdout)}
    assert set(results) == {"shirt.heic", "floor.png"}
    as_text = call_main(*common)
    for name, r in results.items():
        assert r["unsure"] is (r["unsure_score"] > cnn.UNSURE_ABOVE)
        line = next(t for t in as_text.stdout.splitlines() if t.startswith(str(tmp_path / name)))
        assert ("(unsure: looks unlike the data set's product photos)" in line) is r["unsure"]
        assert (f"as photographed: {r['as_photographed']})" in line) is r["stretched"]


def test_predict_without_opencv_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = cnn.importlib.util.find_spec
    monkeypatch.setattr(cnn.importlib.util, "find_spec", lambda name: None if name == "cv2" else find_spec(name))
    ran = call_main("--predict", saved(tmp_path, floor()), "--model-path", tmp_path / "none.keras")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr == "error: --predict needs OpenCV to find the item in a photo: pip install -r requirements.txt\n"
