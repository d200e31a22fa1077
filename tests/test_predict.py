"""--predict on image files: formats, modes, bit depths, sizes, bad files and models, test-time augmentation,
and 28x28 images and renders of them read like the test set."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ConvolutionalNN as cnn
from conftest import call_main, class_image, run_cli
from fashion_cnn import common, photos, predict, tta
from pictures import TallOrWide, floor, paint, rendered_photo, save_image, saved, tshirt


def shirt_like(size: tuple[int, int], mode: str, dark_on_light: bool) -> Image.Image:
    """A drawn bar image at any size and mode (for tests where the class does not matter)."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[h // 3: h // 3 + max(1, h // 14), w // 7: w - w // 7] = 220
    if dark_on_light:
        arr = 255 - arr
    return Image.fromarray(arr, "L").convert(mode)


def photo_of(label: int, side: int, mode: str, dark_on_light: bool) -> Image.Image:
    """A picture of synthetic class `label` as a user might have it: larger (the item with a margin around it, as
    in a photo), in another mode, maybe inverted; at side 28, the 28x28 image itself."""
    arr = class_image(label, seed=label + 100)
    if side != 28:
        margin = np.random.default_rng(label).integers(0, 40, (40, 40), dtype=np.uint8)
        margin[6:34, 6:34] = arr
        arr = margin
    if dark_on_light:
        arr = 255 - arr
    return Image.fromarray(arr, "L").resize((side, side), Image.Resampling.NEAREST).convert(mode)


@pytest.mark.slow
def test_predict_gets_the_class_of_png_and_jpeg_of_any_size_and_mode(tmp_path: Path, trained: dict) -> None:
    files = [
        save_image(tmp_path / "gray.png", photo_of(3, 28, "L", False)),
        save_image(tmp_path / "big_rgb.jpg", photo_of(7, 280, "RGB", True), quality=95),
        save_image(tmp_path / "rgba.png", photo_of(0, 84, "RGBA", True)),
        save_image(tmp_path / "palette.png", photo_of(9, 56, "P", False)),
    ]
    ran = call_main("--predict", *files, "--model-path", trained["model"], "--json")
    assert ran.returncode == 0, ran.stderr
    results = json.loads(ran.stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert [r["class"] for r in results] == [common.CLASS_NAMES[k] for k in (3, 7, 0, 9)]
    assert [r["inverted"] for r in results] == [False, True, True, False]
    for r in results:
        assert len(r["top3"]) == 3 and r["top3"][0]["class"] == r["class"]
        probs = [t["probability"] for t in r["top3"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    text = call_main("--predict", files[1], "--model-path", trained["model"])
    assert text.returncode == 0
    assert text.stdout.startswith(f"{files[1]}: Sneaker ") and "(inverted: light background)" in text.stdout


def test_predict_preprocessing_keeps_aspect_ratio(tmp_path: Path) -> None:
    wide = np.zeros((20, 80), np.uint8)
    wide[1:-1, 1:-1] = 200  # a light 4:1 object on a dark background
    seen = photos.to_network_input(save_image(tmp_path / "wide.png", Image.fromarray(wide)))
    pixels, inverted = seen.pixels, seen.inverted
    assert not inverted and pixels.shape == (28, 28) and pixels.dtype == np.uint8
    filled_rows = np.flatnonzero(pixels.max(axis=1) > 100)
    assert 5 <= len(filled_rows) <= 9, "a 4:1 image must stay about 4:1, padded, not stretched"


@pytest.mark.slow
def test_predict_reports_bad_files_and_still_classifies_the_rest(tmp_path: Path, trained: dict) -> None:
    good = save_image(tmp_path / "good.png", photo_of(5, 28, "L", False))
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    ran = call_main("--predict", text_file, good, empty, tmp_path / "missing.png", "--model-path", trained["model"])
    assert ran.returncode == 1
    assert ran.stdout.startswith(f"{good}: Sandal ")
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("notes.png" in e for e in errors) and any("empty.jpg" in e for e in errors)
    assert any("missing.png" in e for e in errors)
    assert ran.stderr.splitlines()[-1] == "3 of 4 files could not be classified."


@pytest.mark.slow
def test_predict_accepts_a_folder(tmp_path: Path, trained: dict) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for label in (1, 2, 8):
        save_image(folder / f"{label}.png", photo_of(label, 28 * label, "L", False))
    (folder / "README.txt").write_text("ignored")
    ran = call_main("--predict", folder, "--model-path", trained["model"], "--json")
    assert ran.returncode == 0, ran.stderr
    files = [folder / f"{label}.png" for label in (1, 2, 8)]
    one_by_one = [json.loads(call_main("--predict", f, "--model-path", trained["model"], "--json").stdout)[0]
                  for f in files]
    results = json.loads(ran.stdout)
    assert [r["file"] for r in results] == [str(f) for f in files], "the folder's images, in order, no README"
    assert [r["class"] for r in results] == [r["class"] for r in one_by_one] and results[0]["class"] == "Trouser"


def test_predict_without_a_model_says_how_to_train(tmp_path: Path) -> None:
    img = save_image(tmp_path / "x.png", shirt_like((28, 28), "L", False))
    proc = run_cli("--predict", img, "--model-path", tmp_path / "none.keras")
    assert proc.returncode == 1
    assert "no trained model" in proc.stderr and "python3 ConvolutionalNN.py" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"PK\x03\x04 not really a zip", bytes(range(256)) * 40],
                         ids=["zip-signature-only", "random-bytes"])
def test_predict_refuses_a_file_that_is_not_a_model(tmp_path: Path, content: bytes) -> None:
    img = save_image(tmp_path / "x.png", shirt_like((28, 28), "L", False))
    model = tmp_path / "broken.keras"
    model.write_bytes(content)
    proc = run_cli("--predict", img, "--model-path", model)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {model} is not a readable Keras model file")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_predict_refuses_a_zip_that_is_not_a_model(tmp_path: Path) -> None:
    img = save_image(tmp_path / "x.png", shirt_like((28, 28), "L", False))
    model = tmp_path / "archive.keras"
    with zipfile.ZipFile(model, "w") as z:
        z.writestr("notes.txt", "a zip, but no model inside")
    ran = call_main("--predict", img, "--model-path", model)
    assert ran.returncode == 1
    assert ran.stderr.startswith(f"error: {model} is not a readable Keras model file")
    assert len(ran.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_exported_test_images_predict_like_the_arrays(tmp_path: Path, trained: dict, test_arrays) -> None:
    import keras

    x, _ = test_arrays
    folder = tmp_path / "exported"
    folder.mkdir()
    for i in range(100):
        Image.fromarray(x[i]).save(folder / f"{i:03d}.png")
    ran = call_main("--predict", folder, "--model-path", trained["model"], "--json")
    assert ran.returncode == 0, ran.stderr
    from_files = [r["class"] for r in json.loads(ran.stdout)]
    model = keras.models.load_model(trained["model"])
    tested = tta.class_probabilities(model, x[:100, :, :, None], tta.test_time_augmentation(cnn.parse_args([])))
    assert from_files == [common.CLASS_NAMES[k] for k in tested.argmax(axis=1)], "the classes the test evaluation gives"


@pytest.mark.slow
def test_predict_needs_images(tmp_path: Path, trained: dict) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    ran = call_main("--predict", folder, "--model-path", trained["model"])
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [f"warning: no images in folder {folder}", "error: no images to classify."]


def test_predict_follows_exif_rotation(tmp_path: Path) -> None:
    wide = np.zeros((20, 80), np.uint8)
    wide[1:-1, 1:-1] = 200
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    path = tmp_path / "rotated.jpg"
    Image.fromarray(wide).save(path, exif=exif)
    pixels = photos.to_network_input(path).pixels
    filled_cols = np.flatnonzero(pixels.max(axis=0) > 100)
    assert 4 <= len(filled_cols) <= 9, "the displayed image is tall, so the object must be narrow"


@pytest.mark.slow
def test_photos_get_the_class_of_their_array_twins_and_show_what_the_network_saw(tmp_path: Path, trained: dict,
                                                                              test_arrays) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for label in range(10):
        for kind in ("light", "dark", "banner", "mirror"):
            picture, _ = rendered_photo(label, dark=kind == "dark", banner=kind == "banner", mirror=kind == "mirror",
                                        seed=label)
            save_image(folder / f"{label}-{kind}.jpg", picture, quality=85)
        Image.fromarray(class_image(label, seed=label)).save(folder / f"{label}-array.png")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    ran = call_main("--predict", folder, "--model-path", trained["model"], "--json", "--plots-dir", tmp_path / "p")
    assert ran.returncode == 1 and ran.stderr.count("error:") == 1 and "broken.jpg" in ran.stderr
    results = {Path(r["file"]).stem: r for r in json.loads(ran.stdout)}
    for label in range(10):
        for kind in ("light", "dark", "banner", "mirror", "array"):
            r = results[f"{label}-{kind}"]
            assert r["class"] == common.CLASS_NAMES[label], (label, kind)
            assert Image.open(r["seen"]).size[1] == 320, "a picture of what the network saw"
            assert (r["crop_box"] is None) is (kind == "array")
    text = call_main("--predict", folder / "3-banner.jpg", "--model-path", trained["model"],
                     "--plots-dir", tmp_path / "p")
    assert text.stdout.splitlines()[-1] == f"What the network saw: {tmp_path / 'p' / 'predict'}/"


class LeftOrRight:
    """A stand-in model: a Sneaker (90%) when the image's mass is on its left, like Fashion-MNIST's shoes, and a
    less sure Bag (50%) when it is on its right."""

    def predict(self, images: np.ndarray, **_: object) -> np.ndarray:
        left = images[:, :, :14].sum(axis=(1, 2, 3)) > images[:, :, 14:].sum(axis=(1, 2, 3))
        probs = np.full((len(images), 10), 0.05 / 8)
        probs[left, 7], probs[left, 8] = 0.9, 0.05
        probs[~left, 8], probs[~left, 7] = 0.5, 0.45
        probs[~left, :7] = probs[~left, 9:] = 0.05 / 8
        return probs


def test_a_shoe_photo_pointing_the_other_way_is_read_mirrored_and_a_28x28_image_never() -> None:
    right_heavy = np.zeros((28, 28), np.uint8)
    right_heavy[10:20, 16:27] = 200
    photo = photos.NetworkInput(right_heavy.copy(), inverted=True, box=(0, 0, 10, 10), item_found=True, photo=True)
    array = photos.NetworkInput(right_heavy.copy(), inverted=False, box=None, item_found=True, photo=False)
    probs, (photo_read, array_read) = predict.read_photos(LeftOrRight(), [photo, array], tta=None)
    assert [common.CLASS_NAMES[k] for k in probs.argmax(axis=1)] == ["Sneaker", "Bag"]
    assert photo_read.mirrored and np.array_equal(photo_read.pixels, right_heavy[:, ::-1]), "shows what was read"
    assert not array_read.mirrored and np.array_equal(array_read.pixels, right_heavy)
    assert not photo.mirrored and np.array_equal(photo.pixels, right_heavy), "what was decoded is left as it was"


def test_a_wide_photo_is_read_stretched_unless_it_is_a_shoe_or_sure_as_photographed() -> None:
    wide, tall = np.zeros((28, 28), np.uint8), np.zeros((28, 28), np.uint8)
    wide[8:20] = 200
    tall[:, 4:24] = 200
    shoe, bag = wide.copy(), wide.copy()
    shoe[-1, 0] = bag[-1, -1] = 255
    photo = {"inverted": True, "box": (0, 0, 9, 9), "item_found": True, "photo": True, "garment": tall}
    inputs = [photos.NetworkInput(wide, **photo), photos.NetworkInput(shoe, **photo), photos.NetworkInput(bag, **photo),
              photos.NetworkInput(wide, inverted=False, box=None, item_found=True, photo=False)]
    probs, read = predict.read_photos(TallOrWide(), inputs, tta=None)
    assert [common.CLASS_NAMES[k] for k in probs.argmax(axis=1)] == ["T-shirt/top", "Sneaker", "Bag", "Bag"]
    assert read[0].stretched and read[0].as_photographed == "Bag" and np.array_equal(read[0].pixels, tall)
    assert not read[1].stretched and read[1].as_photographed is None, "a shoe is not a garment to stretch"
    assert not read[2].stretched, "90% sure as photographed: that reading stands"
    assert not read[3].stretched, "a 28x28 image is read as it is"
    result = predict.classification(Path("x.jpg"), probs[0], read[0])
    assert result["stretched"] and result["as_photographed"] == "Bag" and result["class"] == "T-shirt/top"
    assert result["unsure"] and result["unsure_score"] == pytest.approx(0.99), "as photographed, 1% a T-shirt"


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
    seen = photos.NetworkInput(np.zeros((28, 28), np.uint8), inverted=False, box=None, item_found=True, photo=True,
                            stretched=other is not None, other_reading=other,
                            as_photographed=None if other is None else common.CLASS_NAMES[other.argmax()])
    result = predict.classification(Path("x.jpg"), np.array(probs), seen)
    assert result["class"] == "T-shirt/top"
    assert result["unsure"] is unsure
    both = min(probs[0], 1.0 if other is None else other[0])
    assert result["unsure_score"] == pytest.approx(1 - both, abs=1e-4)
    assert (result["unsure_score"] > predict.UNSURE_ABOVE) is unsure


def widest_gap(picture: Image.Image, rows: slice) -> int:
    """The widest run of blank columns between the first and the last ink within these rows of the picture."""
    ink = np.flatnonzero((np.asarray(picture.convert("L"))[rows] < 200).any(axis=0))
    return int(np.diff(ink).max()) - 1


def test_the_panel_titles_do_not_overlap_on_a_narrow_portrait_photo(tmp_path: Path) -> None:
    narrow = Image.fromarray(np.full((700, 120, 3), 200, np.uint8))
    seen = photos.NetworkInput(np.zeros((28, 28), np.uint8), inverted=True, box=(10, 100, 110, 600), item_found=True,
                            photo=True, preview=narrow)
    result = {"top3": [{"class": "Dress", "probability": 0.5}] * 3, "unsure": True}
    predict.draw_what_the_network_saw(seen, result, tmp_path / "seen.png")
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
        assert r["unsure"] is (r["unsure_score"] > predict.UNSURE_ABOVE)
        line = next(t for t in as_text.stdout.splitlines() if t.startswith(str(tmp_path / name)))
        assert ("(unsure: looks unlike the data set's product photos)" in line) is r["unsure"]
        assert (f"as photographed: {r['as_photographed']})" in line) is r["stretched"]


def test_predict_without_opencv_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "cv2" else find_spec(name))
    ran = call_main("--predict", saved(tmp_path, floor()), "--model-path", tmp_path / "none.keras")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr == "error: --predict needs OpenCV to find the item in a photo: pip install -r requirements.txt\n"
