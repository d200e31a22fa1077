"""Any image file Pillow can open (with pillow-heif, the iPhone's HEIC), decoded as 8-bit gray or RGB, upright,
or one UserError saying why it cannot be.

Needs NumPy and Pillow.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import IMAGE_SIDE, UserError, first_line

PREDICT_MAX_PIXELS = 200_000_000  # larger images are refused (a 200-megapixel phone photo still passes)
DEEP_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": None, "F": None}  # full scale
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def open_image(path: Path) -> Any:
    """Decode an image file as 8-bit grayscale or RGB, upright, or say in one line why it cannot be."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    register_photo_formats()
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > PREDICT_MAX_PIXELS:
                raise UserError(f"{path}: {width}x{height} is {width * height / 1e6:,.0f} megapixels, over the "
                                f"{PREDICT_MAX_PIXELS / 1e6:,.0f}-megapixel limit for --predict; shrink it first")
            img.draft(None, (IMAGE_SIDE * 16, IMAGE_SIDE * 16))  # JPEG: decode big photos smaller, in colour
            return to_gray_or_rgb(ImageOps.exif_transpose(img))  # phone photos store their rotation in EXIF
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({first_line(e)})") from None


@functools.cache
def register_photo_formats() -> None:
    """Teach Pillow the iPhone's HEIC/HEIF (pillow-heif; Pillow reads AVIF itself), once, and replace Pillow's
    decompression-bomb warning on stderr with open_image's own size check."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with contextlib.suppress(ImportError):  # without pillow-heif a HEIC file is one "not a readable image" line
        import pillow_heif

        pillow_heif.register_heif_opener()


def to_gray_or_rgb(img: Any) -> Any:
    """Any image Pillow opens, as 8-bit grayscale ("L") or, if it has colour, RGB: deep images scaled (not
    clipped), transparency as white."""
    from PIL import Image

    if img.mode in DEEP_MODES:
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scaled = np.clip(np.rint(values * (255 / deep_full_scale(img.mode, values))), 0, 255)
        return Image.fromarray(scaled.astype(np.uint8), "L")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))  # transparent parts become white background
    if img.mode == "LAB":  # Pillow cannot convert LAB; its L channel is the lightness
        return img.getchannel("L")
    if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;"):
        return img.convert("L")
    try:
        rgb = img.convert("RGB")
    except ValueError:  # a mode Pillow cannot turn into RGB (HSV): its gray is enough
        return img.convert("L")
    channels = np.asarray(rgb)
    gray = np.ptp(channels, axis=2).max() == 0 if channels.size else True
    return rgb.convert("L") if gray else rgb  # a gray picture stored as RGB (a scan, a JPEG) is gray


def deep_full_scale(mode: str, values: np.ndarray) -> float:
    """The value that means white in a 16-bit, 32-bit integer or float image.

    16-bit modes declare it; 32-bit integer and float images do not, so they get the smallest of the usual
    ranges that holds their brightest pixel: [0, 1] (floats only), 8, 16 or 31 bits.
    """
    if DEEP_MODES[mode]:
        return float(DEEP_MODES[mode])
    brightest = float(np.nanmax(values)) if values.size else 0.0
    scales = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0, 2.0**31 - 1)
    return next((scale for scale in scales if brightest <= scale), brightest)
