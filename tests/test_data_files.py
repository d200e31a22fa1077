"""Fashion-MNIST from a folder: the IDX files, gzipped or not, torchvision's layout, Kaggle's CSV, and broken files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from conftest import FILES, idx_bytes, run_cli, write_idx_gz, write_kaggle_csv
from fashion_cnn import common, data_files


def test_read_idx_returns_the_array_written(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx_gz(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(data_files.read_idx(tmp_path / "x.gz"), array)


def test_read_idx_reads_an_uncompressed_file_whatever_its_name(tmp_path: Path) -> None:
    array = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    (tmp_path / "x.gz").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(data_files.read_idx(tmp_path / "x.gz"), array)


@pytest.mark.parametrize(("content", "message"), [
    (b"plain text, not gzip", "neither gzip nor an IDX file"),
    (gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 20), "bad magic"),
    (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "truncated IDX header"),
    (gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5]), "header promises"),
    (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6], "as gzip"),
], ids=["not gzip", "bad magic", "truncated header", "truncated data", "truncated gzip"])  # stable ids for xdist
def test_read_idx_refuses_broken_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=message):
        data_files.read_idx(path)


SMALL = {"train_images": np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8),
         "train_labels": np.arange(30, dtype=np.uint8) % 10,
         "test_images": np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8),
         "test_labels": np.arange(10, dtype=np.uint8)[::-1].copy()}


def write_form(folder: Path, form: str, arrays: dict[str, np.ndarray] = SMALL) -> Path:
    """Write arrays into folder in one form: gz, uncompressed, torchvision (root/FashionMNIST/raw, both IDX kinds)
    or kaggle; return the folder a user would pass to --data-dir."""
    raw = folder / "FashionMNIST" / "raw" if form == "torchvision" else folder
    raw.mkdir(parents=True, exist_ok=True)
    if form == "kaggle":
        write_kaggle_csv(raw / "fashion-mnist_train.csv", arrays["train_images"], arrays["train_labels"])
        write_kaggle_csv(raw / "fashion-mnist_test.csv", arrays["test_images"], arrays["test_labels"])
        return folder
    for key, name in FILES.items():
        if form in ("gz", "torchvision"):
            write_idx_gz(raw / name, arrays[key])
        if form in ("uncompressed", "torchvision"):
            (raw / name.removesuffix(".gz")).write_bytes(idx_bytes(arrays[key]))
    return folder


@pytest.mark.parametrize(("form", "passed", "named"), [
    ("gz", ".", "gzipped IDX files"),
    ("uncompressed", ".", "uncompressed IDX files"),
    ("torchvision", ".", "torchvision's layout"),
    ("torchvision", "FashionMNIST", "torchvision's layout"),
    ("torchvision", "FashionMNIST/raw", "gzipped and uncompressed IDX files"),
    ("kaggle", ".", "Kaggle's CSV files"),
])
def test_every_form_of_the_data_reads_as_the_same_arrays(tmp_path: Path, form: str, passed: str, named: str) -> None:
    arrays, source = data_files.read_data_dir(write_form(tmp_path, form) / passed)
    for got, key in zip(arrays, FILES, strict=True):
        np.testing.assert_array_equal(got, SMALL[key])
        assert got.dtype == np.uint8
    assert named in source


def test_kaggle_csv_with_pixel_columns_in_another_order_reads_by_their_names(tmp_path: Path) -> None:
    images, labels = SMALL["test_images"][:3], SMALL["test_labels"][:3]
    order = np.random.default_rng(2).permutation(784)
    header = ",".join([*(f"pixel{i + 1}" for i in order), "label"])
    rows = np.column_stack([images.reshape(3, -1)[:, order], labels])
    np.savetxt(tmp_path / "t.csv", rows, fmt="%d", delimiter=",", header=header, comments="")
    got_images, got_labels = data_files.read_kaggle_csv(tmp_path / "t.csv")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def break_form(folder: Path, damage: str) -> None:
    """Damage a written form of SMALL the way a broken download or a wrong file would."""
    train_csv, test_csv = folder / "fashion-mnist_train.csv", folder / "fashion-mnist_test.csv"
    lines = train_csv.read_text().splitlines() if train_csv.exists() else []
    if damage == "no label column":
        train_csv.write_text("\n".join([lines[0].replace("label", "class"), *lines[1:]]) + "\n")
    elif damage == "a row of 783 pixels":
        lines[5] = lines[5].rsplit(",", 1)[0]
        train_csv.write_text("\n".join(lines) + "\n")
    elif damage == "a value above 255":
        lines[3] = lines[3].rsplit(",", 1)[0] + ",256"
        train_csv.write_text("\n".join(lines) + "\n")
    elif damage == "a word for a pixel":
        lines[2] = lines[2].replace(",", ",dark,", 1).rsplit(",", 1)[0]
        train_csv.write_text("\n".join(lines) + "\n")
    elif damage == "not text":
        train_csv.write_bytes(gzip.compress(train_csv.read_bytes()))
    elif damage == "test file missing":
        test_csv.unlink()
    elif damage == "cut short":
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "forms disagree":
        path = folder / "train-labels-idx1-ubyte"
        path.write_bytes(idx_bytes(SMALL["train_labels"][::-1]))
    elif damage == "one IDX file missing":
        (folder / "t10k-labels-idx1-ubyte").unlink()


@pytest.mark.parametrize(("form", "damage", "message"), [
    ("kaggle", "no label column", "fashion-mnist_train.csv has no 'label' column"),
    ("kaggle", "a row of 783 pixels", "line 6 of .*fashion-mnist_train.csv has 784 values; expected 785"),
    ("kaggle", "a value above 255", "line 4 of .*fashion-mnist_train.csv has a value outside 0..255"),
    ("kaggle", "a word for a pixel", "line 3 of .*fashion-mnist_train.csv holds 'dark', not a whole number"),
    ("kaggle", "not text", "fashion-mnist_train.csv is not a text CSV file"),
    ("kaggle", "test file missing", "missing data file .*fashion-mnist_test.csv"),
    ("uncompressed", "cut short", "train-images-idx3-ubyte holds 23420 bytes of data, but its header promises"),
    ("uncompressed", "one IDX file missing", "missing data file .*t10k-labels-idx1-ubyte"),
    ("torchvision", "forms disagree", "train-labels-idx1-ubyte.gz and .*train-labels-idx1-ubyte disagree"),
])
def test_a_broken_form_names_the_file_and_what_is_wrong(tmp_path: Path, form: str, damage: str, message: str) -> None:
    passed = write_form(tmp_path / "data", form)
    break_form(passed / "FashionMNIST" / "raw" if form == "torchvision" else passed, damage)
    with pytest.raises(common.UserError, match=message):
        data_files.read_data_dir(passed)


def test_idx_and_csv_files_that_disagree_are_refused(tmp_path: Path) -> None:
    write_form(tmp_path, "gz")
    other = {**SMALL, "test_labels": np.zeros(10, np.uint8)}
    write_form(tmp_path, "kaggle", other)
    with pytest.raises(common.UserError, match="the IDX files and Kaggle's CSV files in .* disagree"):
        data_files.read_data_dir(tmp_path)


def test_cli_names_a_broken_csv_in_one_line_before_training(tmp_path: Path) -> None:
    passed = write_form(tmp_path / "data", "kaggle")
    break_form(passed, "a row of 783 pixels")
    proc = run_cli("--data-dir", passed, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    said = f"error: line 6 of {passed / 'fashion-mnist_train.csv'} has 784 values; expected 785 (a label and 784 pixels)"
    assert proc.stderr.strip().splitlines() == [said]
    assert not (tmp_path / "m.keras").exists() and "Epoch" not in proc.stdout


def test_cli_says_what_a_folder_without_the_data_should_hold(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not the data")
    proc = run_cli("--data-dir", tmp_path / "data", "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds no Fashion-MNIST files" in proc.stderr and "Kaggle" in proc.stderr


