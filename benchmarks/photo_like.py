#!/usr/bin/env python3
"""How --predict reads photos of clothes: real Fashion-MNIST images rendered as photos of several kinds.

Each of --count images per kind (validation images for tuning, test images for the figure reported) becomes an
RGB JPEG of one of the kinds below, and the same images are also written as 28x28 PNGs. Both folders go through
`ConvolutionalNN.py --predict DIR --json` as a user would run it; the script prints the accuracy per kind, on
all photos, and on the arrays:

    python3 benchmarks/photo_like.py --data-dir ../shared/data/fashion-mnist --split test models/fashion_cnn.keras

--keep DIR keeps the rendered pictures (and what the network saw) for a look. --orientation also measures, in
this process, four ways to read a photo whose item may point the other way (ORIENTATIONS; --predict uses the
last) on the photos and on all 10,000 test arrays.

Kinds (each photo draws its own colours, sizes and positions from a seeded generator):
  studio   light grey, even background; a coloured item filling most of a portrait frame
  phone    off-white with a lighting gradient, vignette, noise and a soft shadow; rotated a few degrees
  far      like phone, but the item fills a quarter to 40% of the frame, off-centre
  dark     a light item on a dark grey table
  mirror   studio, mirrored left-right (a shoe pointing the other way)
  shop     white, with a price banner along an edge, colour swatches beside the item and a label in a corner
  colour   a saturated backdrop (blue, green, pink...) and an item of another colour
  dim      a dim, warm, grainy picture with low contrast
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SCRIPT = Path(__file__).resolve().parent.parent / "ConvolutionalNN.py"
sys.path.insert(0, str(SCRIPT.parent))
from ConvolutionalNN import Config, split_data
from fashion_cnn.common import CLASS_NAMES
from fashion_cnn.data_files import IDX_FILES, read_idx
from fashion_cnn.model_file import load_trained_model
from fashion_cnn.photos import to_network_input
from fashion_cnn.predict import FOOTWEAR
from fashion_cnn.tta import class_probabilities

KINDS = ("studio", "phone", "far", "dark", "mirror", "shop", "colour", "dim")
CANVAS = (480, 640)  # width, height: a portrait phone or shop picture


def item_alpha(image: np.ndarray, side: int, angle: float = 0.0) -> np.ndarray:
    """The 28x28 image upscaled to side x side (bicubic) as coverage in [0, 1], optionally rotated."""
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    if angle:
        big = big.rotate(angle, resample=Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def place(alpha: np.ndarray, canvas_hw: tuple[int, int], top: int, left: int) -> np.ndarray:
    """The item's coverage on the whole canvas."""
    full = np.zeros(canvas_hw, np.float32)
    h, w = alpha.shape
    full[top:top + h, left:left + w] = alpha
    return full


def compose(background: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The item painted over the background with its coverage as alpha."""
    return background * (1 - coverage[..., None]) + colour * coverage[..., None]


def garment_colour(rng: np.random.Generator, light: bool = False) -> np.ndarray:
    """A plausible garment colour: dark or saturated (or, for light, pale)."""
    if light:
        return rng.uniform(190, 245, 3)
    base = rng.choice([[30, 30, 35], [40, 50, 110], [120, 25, 30], [30, 80, 40], [90, 60, 40], [80, 80, 85],
                       [150, 40, 90], [20, 20, 20]])
    return np.clip(np.array(base, np.float32) + rng.normal(0, 15, 3), 0, 255)


def lighting(hw: tuple[int, int], rng: np.random.Generator, vignette: float) -> np.ndarray:
    """A multiplicative light field: a gradient in a random direction times a vignette."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    y, x = y / h - 0.5, x / w - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0.05, 0.15) * (x * np.cos(angle) + y * np.sin(angle)) * 2
    return (gradient * (1 - vignette * (x * x + y * y) * 2))[..., None]


def render(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, ...]]:
    """One 28x28 Fashion-MNIST image as a photo of the given kind, and the item's box (left, top, right, bottom)."""
    w, h = CANVAS
    hw = (h, w)
    fill = {"far": rng.uniform(0.25, 0.4), "shop": rng.uniform(0.6, 0.75)}.get(kind, rng.uniform(0.75, 0.92))
    side = int(fill * min(w, h))
    side = min(side, w)
    if kind == "far":
        top, left = int(rng.uniform(0.05, 0.95) * (h - side)), int(rng.uniform(0.05, 0.95) * (w - side))
    else:
        top, left = (h - side) // 2 + int(rng.normal(0, 10)), (w - side) // 2 + int(rng.normal(0, 8))
        top, left = int(np.clip(top, 0, h - side)), int(np.clip(left, 0, w - side))
    angle = rng.uniform(-5, 5) if kind in ("phone", "far") else 0.0
    coverage = place(item_alpha(image, side, angle), hw, top, left)
    if kind == "mirror":
        coverage = coverage[:, ::-1]
    if kind == "dark":
        background = np.full((h, w, 3), rng.uniform(40, 75), np.float32) + rng.normal(0, 3, 3)
        photo = compose(background, coverage, garment_colour(rng, light=True))
    elif kind == "colour":
        backdrop = rng.choice([[70, 120, 200], [90, 170, 110], [230, 150, 170], [240, 200, 90], [150, 110, 190]])
        background = np.broadcast_to(np.array(backdrop, np.float32), (h, w, 3)).copy()
        photo = compose(background, coverage, garment_colour(rng))
    elif kind == "dim":
        background = np.broadcast_to(np.array([150, 130, 105], np.float32), (h, w, 3)) * lighting(hw, rng, 0.4)
        photo = compose(background, coverage, garment_colour(rng) * 0.5 + 50)
        photo += rng.normal(0, 9, photo.shape)
    elif kind in ("phone", "far"):
        background = np.broadcast_to(np.array([238, 234, 226], np.float32), (h, w, 3)).copy()
        shadow = np.asarray(Image.fromarray((coverage * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(side / 25)), np.float32) / 255
        shadow = np.roll(shadow, (int(side * 0.03), int(side * 0.03)), axis=(0, 1))
        background *= (1 - 0.25 * shadow)[..., None]
        photo = compose(background, coverage, garment_colour(rng)) * lighting(hw, rng, 0.3)
        photo += rng.normal(0, 5, photo.shape)
    else:  # studio, mirror, shop
        grey = 255.0 if kind == "shop" else rng.uniform(215, 240)
        photo = compose(np.full((h, w, 3), grey, np.float32), coverage, garment_colour(rng))
        photo += rng.normal(0, 2, photo.shape)
    picture = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    if kind == "shop":
        decorate_shop(picture, rng, (top, left, side))
    rows, cols = np.flatnonzero((coverage > 0.05).any(axis=1)), np.flatnonzero((coverage > 0.05).any(axis=0))
    return picture, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def decorate_shop(picture: Image.Image, rng: np.random.Generator, item: tuple[int, int, int]) -> None:
    """A marketplace listing: a price banner along the top or bottom, colour swatches down a side, a label."""
    draw = ImageDraw.Draw(picture)
    w, h = picture.size
    _, left, side = item
    band = int(h * rng.uniform(0.06, 0.09))
    red = tuple(int(v) for v in rng.choice([[200, 30, 40], [230, 120, 20], [20, 90, 180]]))
    y0 = 0 if rng.random() < 0.5 else h - band
    draw.rectangle([0, y0, w, y0 + band], fill=red)
    draw.text((w // 2 - 40, y0 + band // 3), f"SALE  -{rng.integers(10, 70)}%  ${rng.integers(9, 99)}.99",
              fill=(255, 255, 255))
    swatch = int(w * 0.05)
    x = (left + side + w) // 2 - swatch // 2 if rng.random() < 0.5 else left // 2 - swatch // 2  # beside the item
    for k in range(4):
        y = int(h * 0.2) + k * (swatch + 6)
        colour = tuple(int(v) for v in rng.uniform(20, 230, 3))
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(90, 90, 90))
    corner_y = band + 8 if y0 == 0 else 8
    draw.text((8, corner_y), "NEW IN", fill=(40, 40, 40))


def images_of(data_dir: Path, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of the test split, or of the default run's validation split (seed 0)."""
    if split == "test":
        images = read_idx(data_dir / IDX_FILES["test_images"])[:count]
        return images, read_idx(data_dir / IDX_FILES["test_labels"])[:count]
    arrays = tuple(read_idx(data_dir / IDX_FILES[key]) for key in
                   ("train_images", "train_labels", "test_images", "test_labels"))
    data = split_data(arrays, Config(), seed=0)
    return data.x_val[:count, :, :, 0], data.y_val[:count]


def write_pictures(images: np.ndarray, folder: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Every kind of photo of every image (kind_NNNNN.jpg) and each image as a 28x28 PNG (arrays/NNNNN.png);
    each photo's kind and item box."""
    rng = np.random.default_rng(0)
    kinds, boxes = {}, {}
    (folder / "arrays").mkdir()
    (folder / "photos").mkdir()
    for number, image in enumerate(images):
        Image.fromarray(image).save(folder / "arrays" / f"{number:05d}.png")
        for kind in KINDS:
            name = f"{kind}_{number:05d}.jpg"
            picture, boxes[name] = render(image, kind, rng)
            picture.save(folder / "photos" / name, quality=int(rng.integers(75, 95)))
            kinds[name] = kind
    return kinds, boxes


def overlap(a: tuple[int, ...] | None, b: tuple[int, ...]) -> float:
    """Intersection over union of two boxes (left, top, right, bottom); 0 for no box."""
    if a is None:
        return 0.0
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def classify(model: Path, folder: Path, plots: Path) -> dict[str, dict]:
    """Run the CLI's --predict on the folder with this model; file name -> its JSON result."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--predict", str(folder), "--json", "--model-path",
                           str(model), "--plots-dir", str(plots)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: --predict with {model} failed: {done.stderr.strip()}")
    return {Path(r["file"]).name: r for r in json.loads(done.stdout)}


def report(model: Path, folder: Path, kinds: dict[str, str], boxes: dict[str, tuple[int, ...]],
           labels: np.ndarray) -> None:
    """Print the accuracy per kind, on all photos and on the arrays, and how often the crop was the item's."""
    photos = classify(model, folder / "photos", folder / "seen")
    arrays = classify(model, folder / "arrays", folder / "seen-arrays")

    def right(name: str, result: dict) -> bool:
        return result["class"] == CLASS_NAMES[labels[int(Path(name).stem.split("_")[-1])]]

    print(f"{model}: {len(labels)} images per kind")
    print(f"  {'kind':<8} {'right':>7}  {'crop on the item (IoU >= 0.8)':>30}")
    for kind in KINDS:
        mine = [(n, r) for n, r in photos.items() if kinds[n] == kind]
        hits = np.mean([right(n, r) for n, r in mine])
        cropped = np.mean([overlap(r["crop_box"], boxes[n]) >= 0.8 for n, r in mine])
        print(f"  {kind:<8} {hits:>7.1%}  {cropped:>30.1%}")
    print(f"  {'photos':<8} {np.mean([right(n, r) for n, r in photos.items()]):>7.1%}")
    print(f"  {'arrays':<8} {np.mean([right(n, r) for n, r in arrays.items()]):>7.1%}  (the same images, 28x28)")


ORIENTATIONS = ("as it is", "more confident of both", "mean of both", "mirror if a more confident shoe (chosen)")


def orientation_accuracies(probs: np.ndarray, mirrored: np.ndarray, labels: np.ndarray) -> list[float]:
    """Accuracy of each of ORIENTATIONS, from the class probabilities of the images and of their mirrors."""
    confident = np.where((probs.max(axis=1) >= mirrored.max(axis=1))[:, None], probs, mirrored)
    shoe = np.isin(mirrored.argmax(axis=1), FOOTWEAR) & (mirrored.max(axis=1) > probs.max(axis=1))
    rules = (probs, confident, (probs + mirrored) / 2, np.where(shoe[:, None], mirrored, probs))
    return [float(np.mean(p.argmax(axis=1) == labels)) for p in rules]


def orientation_table(model_path: Path, folder: Path, kinds: dict[str, str], labels: np.ndarray,
                      data_dir: Path) -> None:
    """Print each orientation rule's accuracy per kind of photo and on the 10,000 test arrays."""
    model, notes = load_trained_model(model_path)
    tta = notes.get("test_time_augmentation")

    def both(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = images[..., None]
        return class_probabilities(model, batch, tta), class_probabilities(model, batch[:, :, ::-1], tta)

    names = sorted(kinds)
    seen = np.stack([to_network_input(folder / "photos" / n).pixels for n in names])
    truth = np.array([labels[int(Path(n).stem.split("_")[-1])] for n in names])
    probs, mirrored = both(seen)
    print(f"  orientation: {' | '.join(ORIENTATIONS)}")
    for kind in KINDS:
        mine = np.array([kinds[n] == kind for n in names])
        row = orientation_accuracies(probs[mine], mirrored[mine], truth[mine])
        print(f"  {kind:<8} " + " | ".join(f"{a:.1%}" for a in row))
    print(f"  {'photos':<8} " + " | ".join(f"{a:.1%}" for a in orientation_accuracies(probs, mirrored, truth)))
    x_test, y_test = read_idx(data_dir / IDX_FILES["test_images"]), read_idx(data_dir / IDX_FILES["test_labels"])
    row = orientation_accuracies(*both(x_test), y_test)
    print(f"  {'test set':<8} " + " | ".join(f"{a:.2%}" for a in row) + "  (all 10,000 test arrays)")


def main() -> int:
    """Render the pictures once, classify them with every model, print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="trained .keras models")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="render validation images (for tuning) or test images (the figure to report)")
    parser.add_argument("--count", type=int, default=200, help="images per kind")
    parser.add_argument("--keep", type=Path, help="keep the pictures in this new folder")
    parser.add_argument("--orientation", action="store_true", help="also compare the ways to read mirrored items")
    args = parser.parse_args()
    if not (args.data_dir / IDX_FILES["test_images"]).is_file():
        sys.exit(f"error: no Fashion-MNIST files in {args.data_dir}")
    images, labels = images_of(args.data_dir, args.split, args.count)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=args.keep is None)
        kinds, boxes = write_pictures(images, folder)
        for model in args.models:
            report(model, folder, kinds, boxes, labels)
            if args.orientation:
                orientation_table(model, folder, kinds, labels, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
