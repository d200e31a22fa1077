"""Pictures the tests draw and files they encode: floors, garments and rendered photos, 16-bit PNGs, TIFFs, JPEGs,
and a stand-in model that classifies by brightness."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import SHAPES
from fashion_cnn import common, decode


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
    decode.register_photo_formats()  # Pillow writes HEIC only once pillow-heif is registered, whichever test ran first
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def tshirt(h: int, w: int, top: int, left: int, side: int) -> np.ndarray:
    """A T-shirt's silhouette (body and two sleeves) in a side x side square at (top, left)."""
    y, x = np.mgrid[0:h, 0:w]
    y, x = (y - top) / side, (x - left) / side
    body = (x >= 0.25) & (x <= 0.75) & (y >= 0.1) & (y <= 1.0)
    sleeves = (y >= 0.1) & (y <= 0.1 + 0.35 - np.abs(x - 0.5) * 0.5) & (x >= 0) & (x <= 1)
    return body | sleeves


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


def save_image(path: Path, image: Image.Image, **options: object) -> Path:
    image.save(path, **options)
    return path


class BrightnessRule:
    """A stand-in model: class 0 where the pixels in `region` are lit, class 1 elsewhere."""

    def __init__(self, region: tuple[slice, slice]) -> None:
        self.region = region

    def predict(self, images: np.ndarray, batch_size: int, verbose: int) -> np.ndarray:
        lit = images[:, self.region[0], self.region[1]].sum(axis=(1, 2, 3)) > 0
        probabilities = np.zeros((len(images), len(common.CLASS_NAMES)))
        probabilities[:, 0], probabilities[:, 1] = lit, ~lit
        return probabilities


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
