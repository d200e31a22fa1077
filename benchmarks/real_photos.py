#!/usr/bin/env python3
"""How --predict reads real photos of clothes: a folder of class folders through the CLI, as a user runs it.

Each class folder's photos go through `ConvolutionalNN.py --predict FILES --json` in one call; the script prints,
per folder, the share of photos given the right class and the right kind of garment (top, trouser, dress, shoe,
bag), what the wrong ones were taken for, and how the unsure flag splits the wrong answers from the right ones:

    python3 benchmarks/real_photos.py ../shared/data/real-clothes-dev models/fashion_cnn.keras --split held-out

The split is fixed: in each folder, in file-name order, the first TUNE_COUNT photos are for tuning (`--split
tune`) and the rest are held out for the figure reported (`--split held-out`). A folder is named either as in
real-clothes-dev (FOLDER_CLASSES) or by a Fashion-MNIST class name ("Sneaker", "ankle-boot", ...).

`--finetune` instead adapts the model to the tuning photos with `ConvolutionalNN.py --finetune` (its defaults),
and the same network from random weights with the same recipe, and prints, per folder, the share of the held-out
photos given their own folder's name by each, beside the model as it is (zero-shot: the right Fashion-MNIST
class), and how long each --finetune call took:

    python3 benchmarks/real_photos.py ../shared/data/real-clothes-dev models/fashion_cnn.keras --finetune

`--fashion-mnist DIR` also writes the 10,000 test images of the IDX files in DIR as 28x28 PNGs, classifies them
the same way, and prints their accuracy and the share flagged unsure. `--keep DIR` keeps what the network saw.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "ConvolutionalNN.py"
sys.path.insert(0, str(SCRIPT.parent))
from fashion_cnn.common import CLASS_NAMES
from fashion_cnn.data_files import IDX_FILES, read_idx
from fashion_cnn.predict import IMAGE_SUFFIXES

TUNE_COUNT = 30  # photos a folder tuned on; the rest are the held-out figure
# real-clothes-dev's folders and the Fashion-MNIST classes that are right for each (its SOURCE.md)
FOLDER_CLASSES = {
    "dress": ("Dress",), "longsleeve": ("Pullover", "T-shirt/top"), "outwear": ("Coat",), "pants": ("Trouser",),
    "shirt": ("Shirt",), "shoes": ("Sandal", "Sneaker", "Ankle boot"), "t-shirt": ("T-shirt/top",),
}
KINDS = {"T-shirt/top": "top", "Pullover": "top", "Coat": "top", "Shirt": "top", "Trouser": "trouser",
         "Dress": "dress", "Sandal": "shoe", "Sneaker": "shoe", "Ankle boot": "shoe", "Bag": "bag"}


def right_classes(folder: str) -> tuple[str, ...]:
    """The classes that are right for a folder's photos, by its name."""
    if folder.lower() in FOLDER_CLASSES:
        return FOLDER_CLASSES[folder.lower()]
    plain = {name.lower().replace("/", "-").replace(" ", "-"): name for name in CLASS_NAMES}
    name = plain.get(folder.lower().replace("_", "-").replace(" ", "-"))
    if name is None:
        raise SystemExit(f"error: folder {folder!r} names no Fashion-MNIST class; use one of "
                         f"{', '.join(FOLDER_CLASSES)} or a class name")
    return (name,)


def photos_of(root: Path, split: str) -> dict[str, list[Path]]:
    """Each class folder's photos of the split, in file-name order."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f"error: {root} has no class folders")
    chosen = {"tune": slice(0, TUNE_COUNT), "held-out": slice(TUNE_COUNT, None), "all": slice(None)}[split]
    return {f.name: sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[chosen] for f in folders}


def classify(model: Path, files: list[Path], plots: Path) -> dict[str, dict]:
    """--predict --json on the files, as a user would run it: results by file path."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--predict", *map(str, files), "--json", "--model-path",
                           str(model), "--plots-dir", str(plots)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: --predict failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return {r["file"]: r for r in json.loads(done.stdout)}


def share(count: int, total: int) -> str:
    """count/total as a percentage, or a dash when there is nothing to count."""
    return f"{100 * count / total:.0f}%" if total else "-"


def folder_row(folder: str, results: list[dict]) -> dict:
    """One folder's counts: right class, right kind, unsure among the wrong and the right (class), the mistakes."""
    classes = right_classes(folder)
    kinds = {KINDS[c] for c in classes}
    right = [r["class"] in classes for r in results]
    unsure = [bool(r.get("unsure")) for r in results]
    mistakes = collections.Counter(r["class"] for r, ok in zip(results, right, strict=True) if not ok)
    return {"folder": folder, "photos": len(results), "class": sum(right),
            "kind": sum(KINDS[r["class"]] in kinds for r in results),
            "wrong": len(results) - sum(right),
            "unsure_wrong": sum(u and not ok for u, ok in zip(unsure, right, strict=True)),
            "unsure_right": sum(u and ok for u, ok in zip(unsure, right, strict=True)),
            "mistakes": ", ".join(f"{name} {n}" for name, n in mistakes.most_common(3))}


def print_table(rows: list[dict]) -> None:
    """The per-folder table and its total line, in Markdown."""
    total = {key: sum(r[key] for r in rows) for key in ("photos", "class", "kind", "wrong", "unsure_wrong",
                                                        "unsure_right")}
    print("| folder | photos | right kind | right class | unsure: of the wrong | of the right | mistaken for |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in [*rows, {**total, "folder": "**all**", "mistakes": ""}]:
        print(f"| {r['folder']} | {r['photos']} | {share(r['kind'], r['photos'])} | {share(r['class'], r['photos'])} "
              f"| {share(r['unsure_wrong'], r['wrong'])} | {share(r['unsure_right'], r['class'])} | {r['mistakes']} |")


def fashion_mnist_check(model: Path, data_dir: Path, work: Path) -> None:
    """The test images as 28x28 PNGs through --predict: accuracy and the share flagged unsure."""
    images, labels = read_idx(data_dir / IDX_FILES["test_images"]), read_idx(data_dir / IDX_FILES["test_labels"])
    folder = work / "fashion-mnist-test"
    folder.mkdir()
    files = []
    for i, image in enumerate(images):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(image).save(files[-1])
    results = classify(model, [folder], work / "seen-test")
    predicted = np.array([CLASS_NAMES.index(results[str(f)]["class"]) for f in files])
    unsure = np.array([bool(results[str(f)].get("unsure")) for f in files])
    print(f"Fashion-MNIST test images as 28x28 PNGs: {np.mean(predicted == labels):.2%} right, "
          f"{unsure.mean():.2%} flagged unsure ({unsure.sum()} of {len(files)})")


def finetune_comparison(root: Path, base: Path, work: Path) -> None:
    """Adapt base, and a network of random weights, to the tuning photos; the held-out photos' right-folder shares."""
    teach = work / "teach"
    for folder, files in photos_of(root, "tune").items():
        (teach / folder).mkdir(parents=True)
        for f in files:
            (teach / folder / f.name).symlink_to(f.resolve())
    random_base = untrained_model(work / "random.keras")
    models, seconds = {"zero-shot": base}, {}
    for name, start in (("fine-tuned", base), ("from random weights", random_base)):
        models[name], begun = work / f"{name.replace(' ', '-')}.keras", time.perf_counter()
        done = subprocess.run([sys.executable, str(SCRIPT), "--finetune", str(teach), "--model-path", str(start),
                               "--finetuned-path", str(models[name]), "--plots-dir", str(work / name)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: --finetune failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        seconds[name] = time.perf_counter() - begun
    held = photos_of(root, "held-out")
    every = [f for fs in held.values() for f in fs]
    right = {name: right_folders(held, classify(model, every, work / f"seen-{name}"), name == "zero-shot")
             for name, model in models.items()}
    print(f"{root}: trained on the first {TUNE_COUNT} photos a folder, right folder on the rest:")
    print("| folder | photos | " + " | ".join(right) + " |\n| --- | --- |" + " --- |" * len(right))
    for folder, files in held.items():
        print(f"| {folder} | {len(files)} | " + " | ".join(share(r[folder], len(files)) for r in right.values()) + " |")
    print(f"| **all** | {len(every)} | " + " | ".join(share(sum(r.values()), len(every)) for r in right.values())
          + " |")
    print("; ".join(f"--finetune {name}: {s:.0f} s (reading the photos and training)" for name, s in seconds.items()))


def right_folders(held: dict[str, list[Path]], results: dict[str, dict], zero_shot: bool) -> dict[str, int]:
    """Per folder, how many of its photos got its own name (zero-shot: one of its Fashion-MNIST classes)."""
    def right(folder: str, r: dict) -> bool:
        return r["class"] in right_classes(folder) if zero_shot else r["class"] == folder

    return {folder: sum(right(folder, results[str(f)]) for f in files) for folder, files in held.items()}


def untrained_model(path: Path) -> Path:
    """The default network with random weights drawn from seed 0 (the same each run), saved as --finetune reads a
    base model."""
    import ConvolutionalNN as cnn
    from fashion_cnn.backends import use_backend
    from fashion_cnn.model_file import save_model
    from fashion_cnn.streams import seed_everything
    from fashion_cnn.tta import test_time_augmentation

    cfg = cnn.parse_args([])
    use_backend(cfg.backend)
    seed_everything(cfg.seed)
    save_model(cnn.build_model(cfg, cfg.lr, 1), path, {"test_time_augmentation": test_time_augmentation(cfg)})
    return path


def main() -> int:
    """Classify the chosen split's photos and print the table (and the Fashion-MNIST check)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="a folder of class folders, like real-clothes-dev")
    parser.add_argument("model", type=Path, help="a trained .keras model")
    parser.add_argument("--split", choices=("tune", "held-out", "all"), default="tune",
                        help=f"the first {TUNE_COUNT} photos a folder (tune), the rest (held-out), or all")
    parser.add_argument("--fashion-mnist", type=Path, metavar="DIR", help="also check the 10,000 test images there")
    parser.add_argument("--keep", type=Path, help="keep what the network saw in this new folder")
    parser.add_argument("--finetune", action="store_true", help="compare the model adapted to the tuning photos "
                        "(and a network of random weights adapted alike) with it on the held-out photos")
    args = parser.parse_args()
    if args.finetune:
        with tempfile.TemporaryDirectory() as tmp:
            finetune_comparison(args.photos, args.model, Path(tmp))
        return 0
    by_folder = photos_of(args.photos, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        plots = args.keep or Path(tmp) / "seen"
        results = classify(args.model, [f for files in by_folder.values() for f in files], plots)
        rows = [folder_row(name, [results[str(f)] for f in files]) for name, files in by_folder.items() if files]
        print(f"{args.photos}, split {args.split}, model {args.model}:")
        print_table(rows)
        if args.fashion_mnist:
            fashion_mnist_check(args.model, args.fashion_mnist, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
