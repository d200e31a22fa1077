"""Decoding image files: every mode and bit depth, HEIC, huge files, broken files."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from fashion_cnn import common, decode, photos, predict
from pictures import floor, jpeg, paint, png_16bit, save_image, saved, tiff, tshirt


def clothing_like(seed: int) -> np.ndarray:
    """A 28x28 8-bit image with the full range of gray levels: a bright ramp object on a dark background."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 30, (28, 28)).astype(np.uint8)
    a[6:22, 4:24] = np.linspace(80, 255, 20, dtype=np.uint8)
    return a



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

@pytest.mark.parametrize("kind", list(TWINS))
def test_high_bit_and_other_modes_decode_like_their_8_bit_twin(tmp_path: Path, kind: str) -> None:
    a = clothing_like(0)
    eight_bit = photos.to_network_input(save_image(tmp_path / "eight.png", Image.fromarray(a))).pixels
    seen = photos.to_network_input(TWINS[kind](tmp_path / "twin", a))
    twin = seen.pixels
    assert not seen.inverted
    assert np.abs(twin.astype(int) - eight_bit.astype(int)).max() <= 1, kind


@pytest.mark.parametrize(("mode", "via", "tolerance"), [
    ("PA", "L", 0), ("RGBa", "RGBA", 0), ("HSV", "RGB", 1), ("YCbCr", "RGB", 1),
    ("LAB", "RGB", 10),  # LAB's L channel is perceptual lightness, close to but not the same as luma
])
def test_modes_pillow_opens_but_cannot_save_convert_to_the_same_gray(mode: str, via: str, tolerance: int) -> None:
    a = clothing_like(1)
    gray = np.asarray(decode.to_gray_or_rgb(Image.fromarray(a).convert(via).convert(mode)).convert("L")).astype(int)
    assert gray.shape == (28, 28) and np.abs(gray - a).max() <= tolerance, mode


def test_big_endian_16_bit_images_are_scaled_too() -> None:
    a = clothing_like(2)
    image = Image.frombytes("I;16B", (28, 28), (a.astype(">u2") * 257).tobytes())
    assert np.array_equal(np.asarray(decode.to_gray_or_rgb(image)), a)


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


def test_a_heic_photo_reads_like_the_same_photo_as_png(tmp_path: Path) -> None:
    pytest.importorskip("pillow_heif")
    picture = floor()
    paint(picture, tshirt(400, 300, 90, 40, 220), (40, 60, 130))
    as_png = photos.to_network_input(saved(tmp_path, picture, "photo.png"))
    as_heic = photos.to_network_input(saved(tmp_path, picture, "photo.heic"))
    assert Image.open(tmp_path / "photo.heic").format == "HEIF"
    assert np.abs(np.subtract(as_heic.box, as_png.box)).max() <= 4
    assert np.abs(as_heic.pixels.astype(int) - as_png.pixels).mean() < 8
    assert ".heic" in predict.IMAGE_SUFFIXES and ".avif" in predict.IMAGE_SUFFIXES


def test_a_broken_heic_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    with pytest.raises(common.UserError, match=r"broken\.heic: not a readable image"):
        photos.to_network_input(tmp_path / "broken.heic")
