"""--predict: classify the user's own images with a trained model, print the top classes (or JSON), flag the
answers the network is unsure of, and draw what the network saw.

Needs Keras, Pillow and (for photos) OpenCV and SciPy; reading each image is fashion_cnn.photos's work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import CLASS_NAMES, EXIT_FAILURE, Settings
from fashion_cnn.model_file import load_trained_model
from fashion_cnn.outputs import atomic_path, check_writable
from fashion_cnn.photos import NetworkInput, read_all, require_opencv
from fashion_cnn.tta import class_probabilities

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}

# A photo unlike what the network learned spreads its probability over classes, or gets another class when read
# stretched (read_photos). Of the scores measured on the tuning part of real-clothes-dev (top probability,
# margin, entropy, a PCA residual of the 28x28 input, the features' Mahalanobis distance from the training
# classes, the two readings' agreement), 1 - the class's probability split right from wrong answers best, taken
# from the less sure of the two readings where the stretched one was kept; the cut was set there
# (docs/RESULTS.md).
SURE_AS_PHOTOGRAPHED = 0.6  # a wide photo read at least this sure as photographed keeps that reading
UNSURE_ABOVE = 0.54         # unsure when the class has less than 1 - this (in either reading)
UNSURE_NOTE = "unsure: looks unlike the data set's product photos"


@dataclasses.dataclass(frozen=True)
class ModelClasses:
    """What a saved model's outputs mean: Fashion-MNIST's classes, or the folders of the photos it was adapted to
    (--finetune), with the unsure cut chosen on its held-out photos."""

    names: tuple[str, ...] = CLASS_NAMES
    unsure_above: float = UNSURE_ABOVE
    adapted: bool = False

    @classmethod
    def of(cls, notes: dict[str, Any]) -> ModelClasses:
        """The classes a model's notes (fashion_cnn.model_file) name."""
        if "class_names" not in notes:
            return cls()
        return cls(tuple(notes["class_names"]), float(notes.get("unsure_above", UNSURE_ABOVE)), adapted=True)

    @property
    def unsure_note(self) -> str:
        """What an unsure answer's line says."""
        return "unsure: looks unlike the photos it was taught" if self.adapted else UNSURE_NOTE


FASHION_MNIST = ModelClasses()  # what a model trained by ConvolutionalNN.py answers in


def predict(cfg: Settings) -> int:
    """Classify each image (averaging over test-time copies if the model was trained with --tta); print top-3
    classes (or JSON) and draw what the network saw under --plots-dir; exit 1 if any file failed."""
    require_opencv("--predict")  # once, not once a file
    model, notes = load_trained_model(cfg.model_path)
    check_writable(cfg.plots_dir / "predict")
    results, errors = classify_files(model, notes, image_files(cfg.predict), cfg.plots_dir / "predict")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if cfg.json_output:
        print(json.dumps(results, indent=2))
    else:
        print_classifications(results, cfg.plots_dir / "predict", ModelClasses.of(notes).unsure_note)
    if errors:
        print(f"{len(errors)} of {len(errors) + len(results)} files could not be classified.", file=sys.stderr)
        return EXIT_FAILURE
    if not results:
        print("error: no images to classify.", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def classify_files(model: Any, notes: dict[str, Any], files: Sequence[Path], pictures: Path
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """Read each file as the network must see it (fashion_cnn.photos), classify it with the model and its notes
    (the test-time augmentation it was trained with, an adapted model's classes), and draw what the network saw
    into the folder pictures; the results of the files read, in order (each with "seen": its picture), and a
    message for each file that could not be read. --predict and the page (fashion_cnn.serve) both answer so."""
    tta, classes = notes.get("test_time_augmentation"), ModelClasses.of(notes)
    decoded, errors = [], []
    for path, seen in read_all(files):
        if isinstance(seen, str):
            errors.append(seen)
        else:
            decoded.append((path, seen))
    results = []
    if decoded:
        probabilities, read = read_photos(model, [seen for _, seen in decoded], tta, classes)
        paths = picture_paths([path for path, _ in decoded], pictures)
        for (path, _), seen, probs, picture in zip(decoded, read, probabilities, paths, strict=True):
            results.append(classification(path, probs, seen, classes) | {"seen": str(picture)})
            draw_what_the_network_saw(seen, results[-1], picture, classes.unsure_note)
    return results, errors


def print_classifications(results: list[dict[str, Any]], pictures: Path, unsure_note: str = UNSURE_NOTE) -> None:
    """One line per image: its file and answer_text."""
    for r in results:
        print(f"{r['file']}: {answer_text(r, unsure_note)}")
    if results:
        print(f"What the network saw: {pictures}/")


def answer_text(r: dict[str, Any], unsure_note: str = UNSURE_NOTE) -> str:
    """An image's answer: its class and probability, what was done to read it, and the next two classes."""
    note = " (inverted: light background)" if r["inverted"] else ""
    if r["mirrored"]:
        note += " (read mirrored: a shoe pointing the other way)"
    if r["stretched"]:
        note += f" (read stretched: wider than the data set's garments; as photographed: {r['as_photographed']})"
    if not r["item_found"]:
        note += " (no item stood out from the background: the whole picture was used)"
    others = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top3"][1:])
    unsure = f" ({unsure_note})" if r["unsure"] else ""
    return f"{r['class']} {r['probability']:.1%}{unsure}{note}  [next: {others}]"


# Fashion-MNIST's shoes all point left, while its other classes look much the same mirrored.
FOOTWEAR = tuple(CLASS_NAMES.index(name) for name in ("Sandal", "Sneaker", "Ankle boot"))


def read_photos(model: Any, inputs: list[NetworkInput], tta: dict[str, bool] | None,
                classes: ModelClasses = FASHION_MNIST) -> tuple[np.ndarray, list[NetworkInput]]:
    """The class probabilities of each input, and the inputs as read. A 28x28 image is read as it is, exactly as
    the test evaluation reads it. A photo is read as photographed and mirrored: the mirrored reading is kept when
    it is a shoe and more confident (a shoe pointing right; averaging both readings, or keeping the more
    confident of any class, loses 1-2 points on the others). Unless that reading is a shoe, a photo of a wide
    item is read again stretched to a garment's proportions (NetworkInput.garment), and that reading is kept
    where the first was less than SURE_AS_PHOTOGRAPHED; the first then goes to the unsure score too. A model
    adapted to the user's photos (classes.adapted) learned them as photographed, mirrored too: one reading.
    """
    batch = np.stack([seen.pixels for seen in inputs])[..., np.newaxis]
    probabilities = class_probabilities(model, batch, tta)
    if classes.adapted:
        return probabilities, list(inputs)
    photos = [i for i, seen in enumerate(inputs) if seen.photo]
    read = list(inputs)
    if photos:
        mirrored = class_probabilities(model, batch[photos, :, ::-1], tta)
        for i, flipped in zip(photos, mirrored, strict=True):
            if flipped.argmax() in FOOTWEAR and flipped.max() > probabilities[i].max():
                probabilities[i] = flipped
                read[i] = dataclasses.replace(inputs[i], pixels=inputs[i].pixels[:, ::-1], mirrored=True)
    unsure_wide = [i for i in photos if inputs[i].garment is not None and probabilities[i].argmax() not in FOOTWEAR
                   and probabilities[i].max() < SURE_AS_PHOTOGRAPHED]
    if unsure_wide:
        stretched = class_probabilities(model, np.stack([inputs[i].garment for i in unsure_wide])[..., np.newaxis],
                                        tta)
        for i, probs in zip(unsure_wide, stretched, strict=True):
            as_photographed = probabilities[i].copy()
            read[i] = dataclasses.replace(inputs[i], pixels=inputs[i].garment, stretched=True,
                                          as_photographed=CLASS_NAMES[as_photographed.argmax()],
                                          other_reading=as_photographed)
            probabilities[i] = probs
    return probabilities, read


def classification(path: Path, probs: np.ndarray, seen: NetworkInput, classes: ModelClasses = FASHION_MNIST
                   ) -> dict[str, Any]:
    """One image's result: the top class, its probability, the top 3, whether the network is unsure (and the
    score that says so), whether the image was inverted, mirrored or stretched, and where the item was found."""
    top = np.argsort(probs)[::-1][:3]
    score = unsure_score(probs, seen.other_reading)
    return {"file": str(path), "class": classes.names[top[0]], "probability": float(probs[top[0]]),
            "top3": [{"class": classes.names[k], "probability": float(probs[k])} for k in top],
            "unsure": bool(score > classes.unsure_above), "unsure_score": round(float(score), 4),
            "inverted": seen.inverted, "mirrored": seen.mirrored, "stretched": seen.stretched,
            "as_photographed": seen.as_photographed, "item_found": seen.item_found,
            "crop_box": list(seen.box) if seen.box else None}


def unsure_score(probs: np.ndarray, other_reading: np.ndarray | None = None) -> float:
    """How unsure the network is of an image: 1 - the top class's probability, or its probability as
    photographed where a photo's stretched reading was kept (read_photos) and that is lower."""
    top = int(probs.argmax())
    return 1.0 - float(min(probs[top], other_reading[top] if other_reading is not None else 1.0))


def picture_paths(files: list[Path], folder: Path) -> list[Path]:
    """Where each file's picture of what the network saw goes: folder/STEM.png, numbered where stems repeat."""
    uses: dict[str, int] = {}
    paths = []
    for f in files:
        uses[f.stem] = uses.get(f.stem, 0) + 1
        paths.append(folder / (f"{f.stem}.png" if uses[f.stem] == 1 else f"{f.stem}-{uses[f.stem]}.png"))
    return paths


def draw_what_the_network_saw(seen: NetworkInput, result: dict[str, Any], path: Path, unsure_note: str = UNSURE_NOTE
                              ) -> None:
    """One PNG: the picture with the item's crop box, the 28x28 input the network got, and its top classes."""
    from PIL import Image, ImageDraw, ImageFont

    height, font = 280, ImageFont.load_default(size=16)
    title = "the picture" + (", and the item's crop" if seen.box else " (no item found: all of it was used)")
    photo = seen.preview.convert("RGB")
    factor = height / photo.height
    photo = photo.resize((max(1, round(photo.width * factor)), height), Image.Resampling.LANCZOS)
    panel = max(photo.width, math.ceil(font.getlength(title)) + 12)  # a narrow portrait photo keeps its title
    canvas = Image.new("RGB", (panel + height + 300, height + 40), "white")
    inset = (panel - photo.width) // 2
    canvas.paste(photo, (inset, 40))
    draw = ImageDraw.Draw(canvas)
    if seen.box:
        left, top, right, bottom = (v * factor * seen.preview_scale for v in seen.box)
        draw.rectangle([left + inset, top + 40, right + inset - 1, bottom + 39], outline=(220, 30, 30), width=2)
    canvas.paste(Image.fromarray(seen.pixels).resize((height, height), Image.Resampling.NEAREST), (panel, 40))
    draw.text((4, 10), title, fill="black", font=font)
    draw.text((panel + 4, 10), "what the network saw" + (", stretched" if seen.stretched else ""), fill="black",
              font=font)
    for i, top in enumerate(result["top3"]):
        draw.text((panel + height + 16, 60 + 30 * i), f"{top['class']}: {top['probability']:.1%}",
                  fill="black", font=font)
    if result.get("unsure"):
        note = unsure_note.replace(": ", ":\n").replace(" the data", "\nthe data").replace(" the photos",
                                                                                         "\nthe photos")
        draw.multiline_text((panel + height + 16, 160), note, fill=(200, 30, 30), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The given files, with folders expanded to the images directly inside them."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                print(f"warning: no images in folder {p}", file=sys.stderr)
            files += found
        else:
            files.append(p)
    return files
