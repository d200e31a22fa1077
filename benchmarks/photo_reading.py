#!/usr/bin/env python3
"""How fast photos are read as the network sees them (fashion_cnn.photos.read_all, what --predict and --finetune
do first): one after another, against a thread for each core, taking turns, and the median of each:

    python3 benchmarks/photo_reading.py ../shared/data/real-clothes-dev --repeats 3

A folder stands for the images in it and in its folders (real-clothes-dev's class folders). Each repeat reads
every photo both ways, the order of the two alternating, and checks that both read the same pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SCRIPT_DIR))
from fashion_cnn.photos import read_all, usable_cores
from fashion_cnn.predict import IMAGE_SUFFIXES

WAYS = {"one thread": 10**9, "every core": 1}  # photos a thread must have before another is started


def photo_files(folder: Path) -> list[Path]:
    """The image files in folder and in its folders, in path order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def timed_reading(files: list[Path], per_thread: int) -> tuple[float, list]:
    """Seconds to read every file, and the pixels read (None for an unreadable file)."""
    started = time.perf_counter()
    read = [None if isinstance(seen, str) else seen.pixels for _, seen in read_all(files, per_thread)]
    return time.perf_counter() - started, read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of photos (or of folders of photos)")
    parser.add_argument("--repeats", type=int, default=3, help="times each way reads every photo")
    args = parser.parse_args()
    files = photo_files(args.folder)
    if not files:
        print(f"error: no images in {args.folder}", file=sys.stderr)
        return 1
    print(f"{len(files)} photos in {args.folder}; {usable_cores()} cores")
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        order = list(WAYS) if repeat % 2 == 0 else list(WAYS)[::-1]
        pixels = {}
        for way in order:
            took, pixels[way] = timed_reading(files, WAYS[way])
            seconds[way].append(took)
            print(f"  repeat {repeat + 1}, {way}: {took:.1f} s", flush=True)
        if any((a is None) != (b is None) or (a is not None and (a != b).any()) for a, b in zip(*pixels.values())):
            print("error: the two ways read different pixels", file=sys.stderr)
            return 1
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    print("| way | median s | photos/s | vs one thread |\n| --- | --- | --- | --- |")
    for way, median in medians.items():
        print(f"| {way} | {median:.1f} | {len(files) / median:.1f} | {medians['one thread'] / median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
