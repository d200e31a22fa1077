"""--predict on image files: formats, modes, bit depths, sizes, bad files and models, test-time augmentation,
and 28x28 images and renders of them read like the test set."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ConvolutionalNN as cnn
from conftest import SHAPES, call_main, class_image, run_cli


def save_image(path: Path, image: Image.Image, **options: object) -> Path:
    image.save(path, **options)
    return path


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
    assert [r["class"] for r in results] == [cnn.CLASS_NAMES[k] for k in (3, 7, 0, 9)]
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
    seen = cnn.to_network_input(save_image(tmp_path / "wide.png", Image.fromarray(wide)))
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
    tested = cnn.class_probabilities(model, x[:100, :, :, None], cnn.test_time_augmentation(cnn.parse_args([])))
    assert from_files == [cnn.CLASS_NAMES[k] for k in tested.argmax(axis=1)], "the classes the test evaluation gives"


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
    pixels = cnn.to_network_input(path).pixels
    filled_cols = np.flatnonzero(pixels.max(axis=0) > 100)
    assert 4 <= len(filled_cols) <= 9, "the displayed image is tall, so the object must be narrow"


def png_16bit(path: Path, channels: np.ndarray, color_type: int) -> Path:
    """Write a 16-bit-per-channel PNG by hand (Pillow cannot write 16-bit colour): color_type 0 gray, 2 RGB."""
    h, w = channels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in channels.reshape(h, w, -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def jpeg(path: Path, image: Image.Image) -> Path:
    image.save(path, quality=100)  # nearly lossless, so that the twins differ only by the mode
    return path


def tiff(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path, format="TIFF")
    return path


# Each makes the high-bit (or otherwise unusual) twin of an 8-bit grayscale image.
TWINS: dict[str, Callable[[Path, np.ndarray], Path]] = {
    "16-bit grayscale PNG": lambda p, a: png_16bit(p.with_suffix(".png"), a.astype(np.uint16) * 257, 0),
    "16-bit RGB PNG": lambda p, a: png_16bit(p.with_suffix(".png"), np.stack([a.astype(np.uint16) * 257] * 3, -1), 2),
    "32-bit integer TIFF": lambda p, a: tiff(p.with_suffix(".tif"), a.astype(np.int32) * 257),
    "32-bit integer TIFF, 8-bit values": lambda p, a: tiff(p.with_suffix(".tif"), a.astype(np.int32)),
    "float TIFF in [0, 1]": lambda p, a: tiff(p.with_suffix(".tif"), a.astype(np.float32) / 255),
    "float TIFF in [0, 255]": lambda p, a: tiff(p.with_suffix(".tif"), a.astype(np.float32)),
    "palette PNG": lambda p, a: save_image(p.with_suffix(".png"), Image.fromarray(a).convert("P")),
    "CMYK JPEG": lambda p, a: jpeg(p.with_suffix(".jpg"), Image.fromarray(a).convert("CMYK")),
    "CMYK TIFF": lambda p, a: save_image(p.with_suffix(".tif"), Image.fromarray(a).convert("CMYK")),
    "LA PNG": lambda p, a: save_image(p.with_suffix(".png"), Image.fromarray(a).convert("LA")),
    "RGBA PNG": lambda p, a: save_image(p.with_suffix(".png"), Image.fromarray(a).convert("RGBA")),
}


def clothing_like(seed: int) -> np.ndarray:
    """A 28x28 8-bit image with the full range of gray levels: a bright ramp object on a dark background."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 30, (28, 28)).astype(np.uint8)
    a[6:22, 4:24] = np.linspace(80, 255, 20, dtype=np.uint8)
    return a


@pytest.mark.parametrize("kind", list(TWINS))
def test_high_bit_and_other_modes_decode_like_their_8_bit_twin(tmp_path: Path, kind: str) -> None:
    a = clothing_like(0)
    eight_bit = cnn.to_network_input(save_image(tmp_path / "eight.png", Image.fromarray(a))).pixels
    seen = cnn.to_network_input(TWINS[kind](tmp_path / "twin", a))
    twin = seen.pixels
    assert not seen.inverted
    assert np.abs(twin.astype(int) - eight_bit.astype(int)).max() <= 1, kind


@pytest.mark.parametrize(("mode", "via", "tolerance"), [
    ("PA", "L", 0), ("RGBa", "RGBA", 0), ("HSV", "RGB", 1), ("YCbCr", "RGB", 1),
    ("LAB", "RGB", 10),  # LAB's L channel is perceptual lightness, close to but not the same as luma
])
def test_modes_pillow_opens_but_cannot_save_convert_to_the_same_gray(mode: str, via: str, tolerance: int) -> None:
    a = clothing_like(1)
    gray = np.asarray(cnn.to_gray_or_rgb(Image.fromarray(a).convert(via).convert(mode)).convert("L")).astype(int)
    assert gray.shape == (28, 28) and np.abs(gray - a).max() <= tolerance, mode


def test_big_endian_16_bit_images_are_scaled_too() -> None:
    a = clothing_like(2)
    image = Image.frombytes("I;16B", (28, 28), (a.astype(">u2") * 257).tobytes())
    assert np.array_equal(np.asarray(cnn.to_gray_or_rgb(image)), a)


@pytest.mark.slow
def test_high_bit_images_get_the_class_of_their_8_bit_twins(tmp_path: Path, trained: dict, test_arrays) -> None:
    x, _ = test_arrays
    eights, twins = [], []
    for i in range(10):
        eights.append(save_image(tmp_path / f"{i}_8bit.png", Image.fromarray(x[i])))
        twins.append(png_16bit(tmp_path / f"{i}_16bit.png", x[i].astype(np.uint16) * 257, 0))
        twins.append(tiff(tmp_path / f"{i}_float.tif", x[i].astype(np.float32) / 255))
    proc = run_cli("--predict", *eights, *twins, "--model-path", trained["model"], "--json",
                   env={"TF_ENABLE_ONEDNN_OPTS": "1"})  # oneDNN on: TensorFlow's start-up lines must not show
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    classes = [r["class"] for r in json.loads(proc.stdout)]
    assert len(set(classes[:10])) > 1, "the test images should not all get one class"
    assert classes[10::2] == classes[:10] and classes[11::2] == classes[:10]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims a size but holds no pixels: enough for Pillow to read the size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))  # empty: no pixels follow
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + idat)
    return path


@pytest.mark.slow
def test_huge_images_are_classified_quietly_or_refused_in_one_line(tmp_path: Path, trained: dict) -> None:
    big = np.zeros((9600, 9600), np.uint8)  # 92 megapixels: Pillow would warn about a decompression bomb
    big[3000:6000, 2000:7000] = 200
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG", compress_level=1)
    (tmp_path / "big.png").write_bytes(buffer.getvalue())
    huge = png_header_only(tmp_path / "huge.png", 20000, 20000)  # past Pillow's own hard limit too
    proc = run_cli("--predict", tmp_path / "big.png", huge, "--model-path", trained["model"])
    assert proc.returncode == 1
    assert "big.png: " in proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: {huge}: 20000x20000 is 400 megapixels, over the 200-megapixel limit for --predict; shrink it first",
        "1 of 2 files could not be classified."]


class BrightnessRule:
    """A stand-in model: class 0 where the pixels in `region` are lit, class 1 elsewhere."""

    def __init__(self, region: tuple[slice, slice]) -> None:
        self.region = region

    def predict(self, images: np.ndarray, batch_size: int, verbose: int) -> np.ndarray:
        lit = images[:, self.region[0], self.region[1]].sum(axis=(1, 2, 3)) > 0
        probabilities = np.zeros((len(images), len(cnn.CLASS_NAMES)))
        probabilities[:, 0], probabilities[:, 1] = lit, ~lit
        return probabilities


def test_tta_averages_each_image_with_its_mirror_and_one_pixel_moves() -> None:
    left_lit = np.zeros((1, 28, 28, 1), np.uint8)
    left_lit[:, :, :5] = 200
    left_rule = BrightnessRule((slice(None), slice(0, 14)))
    flip = cnn.test_time_augmentation(cnn.parse_args(["--flip", "--shift", "0"]))
    assert cnn.class_probabilities(left_rule, left_lit, None)[0, :2].tolist() == [1, 0]
    assert cnn.class_probabilities(left_rule, left_lit, flip)[0, :2].tolist() == [0.5, 0.5], "mirror not averaged"
    second_row_lit = np.zeros((1, 28, 28, 1), np.uint8)
    second_row_lit[:, 1] = 200
    top_row_rule = BrightnessRule((slice(0, 1), slice(None)))
    shift = cnn.test_time_augmentation(cnn.parse_args([]))
    # of the image and its 4 one-pixel moves, only the move up lights the top row
    assert cnn.class_probabilities(top_row_rule, second_row_lit, shift)[0, 0] == pytest.approx(1 / 5)
    assert len(cnn.test_time_views(second_row_lit, shift=True, flip=True)) == 10


@pytest.mark.parametrize(("flags", "copies"), [
    ([], {"flip": False, "shift": True}),  # the default run shifts in training and averages over 1-pixel moves
    (["--flip"], {"flip": True, "shift": True}),
    (["--no-tta"], None),
    (["--shift", "0"], None),  # nothing trained to average over
])
def test_test_time_augmentation_follows_the_training_augmentation(flags: list[str], copies: dict | None) -> None:
    assert cnn.test_time_augmentation(cnn.parse_args(flags)) == copies


def rendered_photo(label: int, *, dark: bool = False, banner: bool = False, mirror: bool = False,
                   seed: int = 0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Synthetic class `label` as a phone photo (300x400): the shape scaled 8x and coloured on an uneven, noisy
    background (light, or dark with a light item), optionally under a price banner with a label in a corner.
    Also returns the item's box (left, top, right, bottom) in the photo."""
    rng = np.random.default_rng(seed)
    h, w, scale = 400, 300, 8
    y, x = np.mgrid[0:h, 0:w]
    light = 1 + 0.08 * (x / w - 0.5) - 0.1 * ((x / w - 0.5) ** 2 + (y / h - 0.5) ** 2)  # gradient and vignette
    background = (np.array([60, 62, 66]) if dark else np.array([232, 228, 220])) * light[..., None]
    shape = np.kron(SHAPES[label], np.ones((scale, scale))).astype(np.float32)
    shape = shape[:, ::-1] if mirror else shape
    top, left = 70, 40
    coverage = np.zeros((h, w), np.float32)
    coverage[top:top + 28 * scale, left:left + 28 * scale] = shape
    colour = np.array([225, 220, 210]) if dark else np.array([40, 50, 120])
    photo = background * (1 - coverage[..., None]) + colour * coverage[..., None] + rng.normal(0, 4, (h, w, 3))
    picture = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    if banner:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        draw.rectangle([0, h - 40, w, h], fill=(200, 30, 40))
        draw.text((90, h - 28), "SALE -40%  $19.99", fill="white")
        draw.text((6, 6), "NEW IN", fill=(30, 30, 30))
    rows, cols = np.flatnonzero(coverage.any(axis=1)), np.flatnonzero(coverage.any(axis=0))
    return picture, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


@pytest.mark.parametrize("label", range(10))
@pytest.mark.parametrize("kind", ["light", "dark", "banner"])
def test_a_photo_becomes_its_item_on_black_fitted_to_28_and_centred(tmp_path: Path, label: int, kind: str) -> None:
    picture, item = rendered_photo(label, dark=kind == "dark", banner=kind == "banner", seed=label)
    seen = cnn.to_network_input(save_image(tmp_path / "photo.jpg", picture, quality=90))
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
    seen = cnn.to_network_input(save_image(tmp_path / "wall.png", Image.fromarray(flat)))
    assert not seen.item_found and seen.box is None and seen.pixels.shape == (28, 28)
    assert np.ptp(seen.pixels[4:-4, 7:-7]) < 25, "nothing to see is an even square, not a bright texture"


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
            assert r["class"] == cnn.CLASS_NAMES[label], (label, kind)
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
    photo = cnn.NetworkInput(right_heavy.copy(), inverted=True, box=(0, 0, 10, 10), item_found=True, photo=True)
    array = cnn.NetworkInput(right_heavy.copy(), inverted=False, box=None, item_found=True, photo=False)
    probs, (photo_read, array_read) = cnn.read_photos(LeftOrRight(), [photo, array], tta=None)
    assert [cnn.CLASS_NAMES[k] for k in probs.argmax(axis=1)] == ["Sneaker", "Bag"]
    assert photo_read.mirrored and np.array_equal(photo_read.pixels, right_heavy[:, ::-1]), "shows what was read"
    assert not array_read.mirrored and np.array_equal(array_read.pixels, right_heavy)
    assert not photo.mirrored and np.array_equal(photo.pixels, right_heavy), "what was decoded is left as it was"
