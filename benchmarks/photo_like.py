#!/usr/bin/env python3
"""How trained models read photo-like images: test images rendered as JPEG "photos", classified by --predict.

Validation accuracy chooses the default run; this shows what a user's photos may see. Each of the first
--count test images becomes a 560x420 RGB JPEG: the item scaled to 420x420 (bicubic), dark on a light,
slightly noisy, warm background (like a product photo), JPEG quality 85. The folder then goes through
`ConvolutionalNN.py --predict DIR --json` once per model, exactly as a user would run it:

    python3 benchmarks/photo_like.py --data-dir ../shared/data/fashion-mnist runs/ablation/*/model.keras

Prints, per model, the share of photos classified as their test label (and per class with --per-class).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "ConvolutionalNN.py"
sys.path.insert(0, str(SCRIPT.parent))
from ConvolutionalNN import CLASS_NAMES, IDX_FILES, read_idx  # the script is the library

CANVAS = (560, 420)  # width, height of each photo
BACKGROUND = np.array([244, 240, 232], dtype=np.float32)  # warm off-white


def render_photo(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28x28 Fashion-MNIST image as a product-style photo: dark item on a light, noisy background."""
    side = CANVAS[1]
    item = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
    canvas = np.broadcast_to(BACKGROUND, (side, CANVAS[0], 3)).copy()
    left = (CANVAS[0] - side) // 2
    region = canvas[:, left:left + side]
    canvas[:, left:left + side] = region * (1 - item[..., None]) + 40 * item[..., None]
    canvas += rng.normal(0, 4, canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def write_photos(data_dir: Path, count: int, folder: Path) -> np.ndarray:
    """Render the first `count` test images into folder as NNNNN.jpg; return their labels."""
    images = read_idx(data_dir / IDX_FILES["test_images"])[:count]
    labels = read_idx(data_dir / IDX_FILES["test_labels"])[:count]
    rng = np.random.default_rng(0)
    for number, image in enumerate(images):
        render_photo(image, rng).save(folder / f"{number:05d}.jpg", quality=85)
    return labels


def classify(model: Path, folder: Path) -> dict[str, str]:
    """Run the CLI's --predict on the folder with this model; file name -> predicted class."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--predict", str(folder), "--json", "--model-path",
                           str(model)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: --predict with {model} failed: {done.stderr.strip()}")
    return {Path(r["file"]).name: r["class"] for r in json.loads(done.stdout)}


def main() -> int:
    """Render the photos once, classify them with every model, print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="trained .keras models")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--count", type=int, default=1000, help="test images to render")
    parser.add_argument("--per-class", action="store_true", help="also print each class's accuracy")
    args = parser.parse_args()
    if not (args.data_dir / IDX_FILES["test_images"]).is_file():
        sys.exit(f"error: no Fashion-MNIST test files in {args.data_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        labels = write_photos(args.data_dir, args.count, Path(tmp))
        for model in args.models:
            predicted = classify(model, Path(tmp))
            hits = np.array([predicted[f"{n:05d}.jpg"] == CLASS_NAMES[label] for n, label in enumerate(labels)])
            print(f"{model}: {hits.mean():.1%} of {len(labels)} photo-like test images")
            if args.per_class:
                for k, name in enumerate(CLASS_NAMES):
                    print(f"    {name:<12} {hits[labels == k].mean():.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
