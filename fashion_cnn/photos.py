"""Reading a picture as a 28x28 image like Fashion-MNIST: a 28x28 image as it is; a photo by finding the item
against its background (GrabCut where it touches the edges), cropping to it, and doing what Zalando did to make
the data set from product photos; many pictures read in a thread for each core (read_all).

Needs NumPy, SciPy, Pillow, OpenCV and threadpoolctl; decoding the file is fashion_cnn.decode's work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import IMAGE_SIDE, UserError
from fashion_cnn.decode import open_image


@dataclasses.dataclass
class NetworkInput:
    """What --predict made of one image file."""

    pixels: np.ndarray                      # 28x28 uint8, light item on a black background, like Fashion-MNIST
    inverted: bool                          # negated: the picture's background was lighter than its item
    box: tuple[int, int, int, int] | None   # the item's crop (left, top, right, bottom) in the picture's pixels
    item_found: bool                        # False: nothing stood out from the background; the whole picture was used
    photo: bool                             # False: a 28x28 image, passed through as it is
    preview: Any = None                     # the picture, small (PIL), for the picture of what the network saw
    preview_scale: float = 1.0              # preview pixels per picture pixel
    garment: np.ndarray | None = None       # a photo's item stretched to at least GARMENT_ASPECT, if wider than that
    mirrored: bool = False                  # read mirrored (read_photos)
    stretched: bool = False                 # read stretched, as garment (read_photos)
    as_photographed: str | None = None      # then: the class it got as photographed
    other_reading: np.ndarray | None = None  # then: its class probabilities as photographed


def to_network_input(path: Path) -> NetworkInput:
    """Decode an image into a 28x28 uint8 array like Fashion-MNIST.

    A 28x28 image is taken as it is (inverted if its border is light); anything larger is read as a photo:
    photo_to_fashion_mnist finds the item, crops to it and makes it look like the data set.
    """
    from PIL import ImageOps

    img = open_image(path)
    if img.size != (IMAGE_SIDE, IMAGE_SIDE):
        return photo_to_fashion_mnist(img)
    gray = img if img.mode == "L" else img.convert("L")
    pixels = np.asarray(gray, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 127)  # a light background: a photo, not Fashion-MNIST's dark one
    if inverted:
        pixels = np.asarray(ImageOps.invert(gray), dtype=np.uint8)
    return NetworkInput(pixels, inverted=inverted, box=None, item_found=True, photo=False, preview=img)


def require_opencv(flag: str) -> None:
    """One line, before any photo is read, where OpenCV is missing (photos need its GrabCut)."""
    if importlib.util.find_spec("cv2") is None:
        raise UserError(f"{flag} needs OpenCV to find the item in a photo: pip install -r requirements.txt")


PHOTOS_PER_THREAD = 8  # fewer photos than this for each core are read one after another


def read_all(paths: Sequence[Path], per_thread: int = PHOTOS_PER_THREAD) -> Iterator[tuple[Path, NetworkInput | str]]:
    """Each file read by to_network_input, in order, as it is read; an unreadable one as its one-line error. A
    photo takes a tenth of a second or more on one core, mostly in OpenCV and NumPy, which let go of Python's lock:
    many are read in a thread for each core, 1.9 times as fast on 2 cores (benchmarks/photo_reading.py)."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    from threadpoolctl import threadpool_limits

    threads = min(usable_cores(), len(paths) // per_thread)
    if threads < 2:
        yield from ((path, read_or_error(path)) for path in paths)
        return
    # One thread each for OpenCV's and the BLAS libraries' own pools while the readers run: their idle threads
    # spin against the readers (1.3 times one thread's speed on 2 cores, instead of 1.9 times).
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ThreadPoolExecutor(threads)
    try:
        with threadpool_limits(1):
            yield from zip(paths, pool.map(read_or_error, paths))
    finally:  # Ctrl-C or an error: the photos not yet started are dropped, not read
        pool.shutdown(cancel_futures=True)
        cv2.setNumThreads(opencv_threads)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_or_error(path: Path) -> NetworkInput | str:
    """to_network_input(path), or its one-line error."""
    try:
        return to_network_input(path)
    except UserError as e:
        return str(e)


# Photos to Fashion-MNIST. Zalando made each image of the data set from a product photo on a plain background:
# trim the edges close to the corner colour, fit the longest side to 28, sharpen, centre on a square, negate,
# 8-bit gray. A user's photo has a background that is not one colour (a gradient, a vignette, noise, a shadow),
# an item that may be small, off-centre, coloured, lighter or darker than the background, and, from a shop, a
# banner, price tag or text beside it. So the steps below estimate the background, find the item, and then do
# what Zalando did.
WORK_SIDE = 256            # photos are analysed at this longest side; the network sees 28 pixels anyway
BORDER_BAND = 0.05         # the share of each side, along the edges, that the background is estimated from
SPECK_SHARE = 0.002        # parts smaller than this share of the picture are noise, a speck, a letter
TRIM_LEVEL = 0.05 * 255    # Zalando's trimming: within 5% of full intensity counts as background
ITEM_LEVEL = 0.2           # and so does less than this share of the item's own contrast (a shadow, a reflection)
GRABCUT_ROUNDS = 5         # GrabCut's iterations of colour models and graph cut
SURE_CORE = 0.03           # the first guess shrunk by this share of the picture's side is surely the item
CENTRE_SEED = 0.1          # with no first guess, the picture less this share each side is probably the item
THIN_PARTS = 0.02          # parts thinner than twice this share of the picture's side are not the garment
KEEP_SHARE = 0.25          # parts of the item smaller than this share of its largest part are dropped
SMALL_HOLE = 0.05          # holes in the item smaller than this share of it are gaps in its print, not holes
GARMENT_ASPECT = 1.3       # a garment laid flat or hung is wider than on Zalando's model: read it this tall too


def photo_to_fashion_mnist(img: Any) -> NetworkInput:
    """A photo as Fashion-MNIST: the item found, cropped, in gray the data set's way round (gray_levels), on
    exactly 0, its longest side 28 pixels, centred; and, if it is wide, the same stretched to a garment's
    proportions."""
    from PIL import Image
    from scipy import ndimage

    work, scale = working_copy(img)
    background = estimate_background(work)
    contrast = np.linalg.norm(work - background, axis=2) / math.sqrt(work.shape[2])
    mask = segment_item(work, item_mask(ndimage.gaussian_filter(contrast, 1.0)))
    found = mask.any()
    if not found:
        mask = np.ones_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    limits = (img.width, img.height) * 2
    box = tuple(min(round(float(v * scale)), limit)
                for v, limit in zip((left, top, right, bottom), limits, strict=True)) if found else None
    lighter_background = float(np.mean(background)) > float(np.mean(work[mask]))
    shown = np.clip(work, 0, 255).astype(np.uint8)
    preview = Image.fromarray(shown[..., 0] if shown.shape[2] == 1 else shown)
    item_mask_crop = mask[top:bottom, left:right]
    item = np.where(mask, gray_levels(work, background, negate=lighter_background), 0.0)[top:bottom, left:right]
    item = stretch_contrast(item, item_mask_crop)
    pixels = fit_to_frame(item, item_mask_crop)
    h, w = item_mask_crop.shape
    garment = fit_to_frame(item, item_mask_crop, GARMENT_ASPECT) if h < GARMENT_ASPECT * w else None
    return NetworkInput(pixels, inverted=lighter_background, box=box, item_found=bool(found), photo=True,
                        preview=preview, preview_scale=1 / scale, garment=garment)


def working_copy(img: Any) -> tuple[np.ndarray, float]:
    """The picture as float32 (height, width, channels) with its longest side at most WORK_SIDE, and the factor
    back to its own pixels."""
    from PIL import Image

    factor = max(img.size) / WORK_SIDE
    if factor > 1:
        img = img.resize((max(1, round(img.width / factor)), max(1, round(img.height / factor))),
                         Image.Resampling.BOX)
    pixels = np.asarray(img, dtype=np.float32)
    return (pixels[..., None] if pixels.ndim == 2 else pixels), max(factor, 1.0)


def border_band(shape: tuple[int, ...]) -> np.ndarray:
    """A mask of the band along the picture's four edges."""
    h, w = shape[:2]
    dy, dx = max(1, round(h * BORDER_BAND)), max(1, round(w * BORDER_BAND))
    band = np.ones((h, w), bool)
    band[dy:h - dy, dx:w - dx] = False
    return band


def estimate_background(work: np.ndarray) -> np.ndarray:
    """The background under the whole picture: a quadratic surface per channel (a gradient, a vignette) fitted to
    the border band, refitted without the band's outliers (a banner, swatches, the item touching an edge)."""
    h, w, _ = work.shape
    y, x = np.mgrid[0:h, 0:w]
    y, x = y / max(h - 1, 1) - 0.5, x / max(w - 1, 1) - 0.5
    terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    band = border_band(work.shape)
    A, values = terms[band], work[band]
    inliers = np.abs(values - np.median(values, axis=0)).max(axis=1) <= 3 * TRIM_LEVEL  # first guess: one colour
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(A[inliers], values[inliers], rcond=None)
        residual = np.abs(values - A @ coef).max(axis=1)
        inliers = residual <= max(3 * 1.4826 * float(np.median(residual[inliers])), 2.0)
    return terms @ coef


def noise_level(contrast: np.ndarray) -> float:
    """The background's own variation (noise, JPEG artefacts, texture), from the border band: a robust sigma."""
    band = contrast[border_band(contrast.shape)]
    median = float(np.median(band))
    return median + 1.4826 * float(np.median(np.abs(band - median)))


def item_mask(contrast: np.ndarray) -> np.ndarray:
    """The pixels of the item: what stands out from the background, in the main central object, not specks,
    not a banner along an edge, not a tag or text in a corner, nor its shadow."""
    from scipy import ndimage

    standing_out = ndimage.binary_closing(contrast > max(4 * noise_level(contrast), TRIM_LEVEL), iterations=2)
    labels, count = ndimage.label(standing_out)
    parts = ndimage.find_objects(labels)
    sizes = ndimage.sum_labels(standing_out, labels, range(1, count + 1))
    candidates = [k for k in range(count) if sizes[k] >= SPECK_SHARE * contrast.size
                  and not is_edge_strip(parts[k], contrast.shape)]
    if not candidates:
        return np.zeros_like(standing_out)
    main = max(candidates, key=lambda k: sizes[k] * centrality(parts[k], contrast.shape))
    kept_labels = [k + 1 for k in candidates if k == main
                   or (sizes[k] >= 0.25 * sizes[main] and overlaps(parts[k], parts[main]))]
    item = np.isin(labels, kept_labels)
    item &= contrast > ITEM_LEVEL * float(np.percentile(contrast[item], 99))  # a shadow is fainter than the item
    return item


def segment_item(work: np.ndarray, first_guess: np.ndarray) -> np.ndarray:
    """The item's pixels, tidied by tidy_item. A first guess (item_mask) clear of the border band stood out from
    a background seen all around it and is kept; GrabCut's colour models would move its outline into the grain
    of a dim photo or onto swatches beside it. Otherwise (the item touches the edges, or nothing stood out)
    OpenCV's GrabCut (colour models of item and background, and a graph cut between them) finds it, seeded by
    the first guess: its core is surely the item, the rest of it probably; the border band outside it is surely
    background, the rest probably. With no first guess (a patterned floor, a light item on a light wall), the
    centre is probably the item. docs/RESULTS.md has the measurements."""
    import cv2
    from scipy import ndimage

    band = border_band(first_guess.shape)
    flat = np.ptp(work, axis=(0, 1)).max() < TRIM_LEVEL  # one colour: nothing to find, and GrabCut takes seconds on it
    if flat or (first_guess.any() and not (first_guess & band).any()):
        return tidy_item(first_guess)
    h, w = first_guess.shape
    seeds = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
    if first_guess.any():
        seeds[first_guess] = cv2.GC_PR_FGD
        seeds[ndimage.binary_erosion(first_guess, iterations=max(1, round(SURE_CORE * max(h, w))))] = cv2.GC_FGD
    else:
        dy, dx = round(CENTRE_SEED * h), round(CENTRE_SEED * w)
        seeds[dy:h - dy, dx:w - dx] = cv2.GC_PR_FGD
    seeds[band & ~first_guess] = cv2.GC_BGD
    maybe_item = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if maybe_item.all() or not maybe_item.any():  # GrabCut needs both; a picture a few pixels across has no room
        return tidy_item(first_guess)
    rgb = np.clip(np.repeat(work, 3 // work.shape[2], axis=2), 0, 255).astype(np.uint8)
    models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)  # GrabCut's colour models, its state
    cv2.setRNGSeed(0)  # GrabCut's k-means starts from OpenCV's generator: the same photo, the same mask
    cv2.grabCut(rgb, seeds, None, *models, GRABCUT_ROUNDS, cv2.GC_INIT_WITH_MASK)
    return tidy_item((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD))


def tidy_item(mask: np.ndarray) -> np.ndarray:
    """The item with the gaps between its stripes closed, without what sticks out thinner than a garment (a
    hanger's hook, a door hook, a strap, a shadow's fringe), its parts of at least a quarter of the largest one,
    and its small holes (gaps in a print) filled; large holes stay (a bag's handle, a sandal's straps)."""
    from scipy import ndimage

    radius = max(1, round(THIN_PARTS * max(mask.shape)))
    square = np.ones((2 * radius + 1,) * 2, bool)
    mask = ndimage.binary_closing(np.pad(mask, radius), structure=square)[radius:-radius, radius:-radius]  # stripes
    opened = ndimage.binary_opening(mask, structure=square)
    mask = ndimage.binary_dilation(opened, iterations=radius, mask=mask)  # the item's own edges and tips come back
    labels, count = ndimage.label(mask)
    if not count:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, count + 1))
    mask = np.isin(labels, 1 + np.flatnonzero(sizes >= KEEP_SHARE * sizes.max()))
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    small = 1 + np.flatnonzero(ndimage.sum_labels(holes > 0, holes, range(1, count + 1)) < SMALL_HOLE * mask.sum())
    return mask | np.isin(holes, small)


def is_edge_strip(part: tuple[slice, slice], shape: tuple[int, ...]) -> bool:
    """Whether a part lies along an edge like a banner: touching it, and thin across it."""
    (rows, cols), (h, w) = part, shape[:2]
    tall, wide = (rows.stop - rows.start) / h, (cols.stop - cols.start) / w
    near = 3  # pixels: the blur and closing in item_mask wear a part's edge pixels away
    touches_top_or_bottom = rows.start <= near or rows.stop >= h - near
    touches_side = cols.start <= near or cols.stop >= w - near
    return (touches_top_or_bottom and tall < 0.2 and wide > 0.5) or (touches_side and wide < 0.2 and tall > 0.5)


def centrality(part: tuple[slice, slice], shape: tuple[int, ...]) -> float:
    """1 for a part centred in the picture, falling to 1/16 for one centred on a corner."""
    (rows, cols), (h, w) = part, shape[:2]
    dy, dx = (rows.start + rows.stop) / 2 / h - 0.5, (cols.start + cols.stop) / 2 / w - 0.5
    return 1 / (1 + 4.24 * math.hypot(dy, dx)) ** 2


def overlaps(part: tuple[slice, slice], main: tuple[slice, slice], reach: float = 0.5) -> bool:
    """Whether a part's box comes within reach (a share of the main part's longest side) of the main part's box:
    a trouser's other leg, a sandal's straps."""
    grow = reach * max(main[0].stop - main[0].start, main[1].stop - main[1].start)

    def near(a: slice, b: slice) -> bool:
        return a.start < b.stop + grow and a.stop > b.start - grow

    return near(part[0], main[0]) and near(part[1], main[1])


def gray_levels(work: np.ndarray, background: np.ndarray, negate: bool) -> np.ndarray:
    """The picture in gray (Pillow's luma) the data set's way round: the data set shows Zalando's product photos,
    taken on white, negated, so a dark garment is bright. On a lighter background, each pixel's darkness relative to
    the background under it (1 - its share of the background's light, so a gradient or a vignette cancels out);
    a light item on a dark background is the right way round as it is."""
    def luma(picture: np.ndarray) -> np.ndarray:
        return picture[..., 0] if picture.shape[2] == 1 else picture @ np.array([0.299, 0.587, 0.114], np.float32)

    if not negate:
        return luma(work)
    light = luma(background)
    return np.clip(light - luma(work), 0, None) * (255 / np.maximum(light, 1.0))


def stretch_contrast(item: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The item's gray levels scaled so that its brightest 1% reach 255, as most Fashion-MNIST items do; a picture
    where nothing stands out from the background stays as faint as it is."""
    top = float(np.percentile(item[mask], 99)) if mask.any() else 0.0
    return np.clip(item * (255 / top), 0, 255) if top > TRIM_LEVEL else item


def fit_to_frame(item: np.ndarray, mask: np.ndarray, min_aspect: float = 0.0) -> np.ndarray:
    """The item with its longest side resized to 28 (after stretching it to at least min_aspect times as tall as
    wide), sharpened, centred on a black 28x28 square, as uint8; what lies outside the item's mask stays exactly
    0 (resampling and sharpening ring a little beyond edges)."""
    from PIL import Image, ImageFilter

    h, w = item.shape
    tall = max(h, min_aspect * w)
    side = max(tall, w)
    size = (max(1, round(w * IMAGE_SIDE / side)), max(1, round(tall * IMAGE_SIDE / side)))
    small = Image.fromarray(np.rint(np.clip(item, 0, 255)).astype(np.uint8), "L").resize(size, Image.Resampling.LANCZOS)
    small = small.filter(ImageFilter.UnsharpMask(radius=1, percent=50, threshold=2))
    covered = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.BOX)) > 0
    frame = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    top, left = (IMAGE_SIDE - size[1]) // 2, (IMAGE_SIDE - size[0]) // 2
    frame[top:top + size[1], left:left + size[0]] = np.where(covered, np.asarray(small), 0)
    return frame
