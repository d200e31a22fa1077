"""Fashion-MNIST from a folder (--data-dir): the four IDX files, gzipped or not, torchvision's layout of them,
or Kaggle's two CSV files; two forms in one folder must agree.

Needs NumPy. Every problem with the files is one UserError that names the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from fashion_cnn.common import IMAGE_SIDE, Arrays, UserError

GZIP_MAGIC = b"\x1f\x8b"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
KAGGLE_FILES = {"train": "fashion-mnist_train.csv", "test": "fashion-mnist_test.csv"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the format Fashion-MNIST ships in), gzipped or not, as uint8."""
    try:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} as gzip ({e}); re-download the original Fashion-MNIST file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is neither gzip nor an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path} has a truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data, but its header promises shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_kaggle_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels from one of Kaggle's CSV files: a header naming `label` and pixel1 ...
    pixel784, then one image a row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = [name.strip().strip('"') for name in f.readline().split(",")]
            if "label" not in header:
                raise UserError(f"{path} has no 'label' column in its first line (Kaggle's: label,pixel1,...)")
            if len(header) != 1 + IMAGE_SIDE**2:
                raise UserError(f"{path} has {len(header) - 1} pixel columns; Kaggle's Fashion-MNIST CSV has 784")
            with warnings.catch_warnings():  # an empty file warns as well as giving no rows
                warnings.simplefilter("ignore")
                rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2, comments=None)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text CSV file") from None
    except ValueError:
        raise UserError(first_bad_row(path, len(header))) from None
    if not rows.size:
        raise UserError(f"{path} has a header but no images")
    if rows.min() < 0 or rows.max() > 255:
        line = 2 + int(np.flatnonzero(((rows < 0) | (rows > 255)).any(axis=1))[0])
        raise UserError(f"line {line} of {path} has a value outside 0..255")
    label = header.index("label")
    return rows[:, pixel_columns(header, label)].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE), \
        rows[:, label].astype(np.uint8)


def pixel_columns(header: list[str], label: int) -> list[int]:
    """The CSV columns of the pixels in image order: by number if they are named pixel1..pixel784, else as given."""
    pixels = [i for i in range(len(header)) if i != label]
    numbers = [int(header[i][5:]) if re.fullmatch(r"pixel\d+", header[i]) else 0 for i in pixels]
    if sorted(numbers) != list(range(1, 1 + IMAGE_SIDE**2)):
        return pixels
    return [i for _, i in sorted(zip(numbers, pixels, strict=True))]


def first_bad_row(path: Path, columns: int) -> str:
    """Say which line of a CSV file np.loadtxt could not read as `columns` whole numbers, and why."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line == 1 or not row:
                continue
            if len(row) != columns:
                return f"line {line} of {path} has {len(row)} values; expected {columns} (a label and 784 pixels)"
            bad = next((v for v in row if not v.strip().isdigit()), None)
            if bad is not None:
                return f"line {line} of {path} holds {bad!r}, not a whole number from 0 to 255"
    return f"cannot read {path} as CSV numbers"


def data_folder(data_dir: Path) -> Path:
    """The folder under --data-dir that holds the files: itself, or torchvision's raw/ below it or its parent."""
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; point it at the Fashion-MNIST files")
    for folder in (data_dir, data_dir / "raw", data_dir / "FashionMNIST" / "raw"):
        if any((folder / name).exists() for name in (*KAGGLE_FILES.values(), *IDX_FILES.values())) or any(
                (folder / name).with_suffix("").exists() for name in IDX_FILES.values()):
            return folder
    raise UserError(f"--data-dir {data_dir} holds no Fashion-MNIST files: give the folder of the four IDX files "
                    f"({', '.join(IDX_FILES.values())}, gzipped or not), torchvision's root folder, or Kaggle's "
                    f"{' and '.join(KAGGLE_FILES.values())}")


def read_idx_form(folder: Path) -> tuple[Arrays, str] | None:
    """The four arrays from the IDX files in folder (.gz, uncompressed, or both, which must agree); None if there
    are none."""
    copies = {name: [p for p in (folder / name, (folder / name).with_suffix("")) if p.exists()]
              for name in IDX_FILES.values()}
    if not any(copies.values()):
        return None
    missing = [name for name, found in copies.items() if not found]
    if missing:
        raise UserError(f"missing data file {folder / missing[0]} (or {Path(missing[0]).stem}); the folder needs "
                        f"{', '.join(IDX_FILES.values())}, gzipped or not")
    arrays = []
    for found in copies.values():
        values = [read_idx(p) for p in found]
        if len(values) == 2 and not np.array_equal(*values):
            raise UserError(f"{found[0]} and {found[1]} disagree; remove the one that is not the original")
        arrays.append(values[0])
    kinds = {"gzipped" if p.suffix == ".gz" else "uncompressed" for found in copies.values() for p in found}
    return tuple(arrays), " and ".join(sorted(kinds)) + " IDX files"


def read_csv_form(folder: Path) -> tuple[Arrays, str] | None:
    """The four arrays from Kaggle's two CSV files in folder; None if neither is there."""
    paths = [folder / name for name in KAGGLE_FILES.values()]
    if not any(p.exists() for p in paths):
        return None
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UserError(f"missing data file {missing[0]}; Kaggle's copy is the two files "
                        f"{' and '.join(KAGGLE_FILES.values())}")
    (x_train, y_train), (x_test, y_test) = (read_kaggle_csv(p) for p in paths)
    return (x_train, y_train, x_test, y_test), "Kaggle's CSV files"


def read_data_dir(data_dir: Path) -> tuple[Arrays, str]:
    """The four arrays from --data-dir in whichever form it holds them, and where and in what form they were read.
    Two forms in one folder must hold the same images and labels."""
    folder = data_folder(data_dir)
    forms = [form for form in (read_idx_form(folder), read_csv_form(folder)) if form is not None]
    if len(forms) == 2 and not all(np.array_equal(a, b) for a, b in zip(forms[0][0], forms[1][0], strict=True)):
        raise UserError(f"the IDX files and Kaggle's CSV files in {folder} disagree; keep one form")
    where = f"torchvision's layout, {folder}" if folder != data_dir else str(folder)
    return forms[0][0], f"{' and '.join(form for _, form in forms)} in {where}"
