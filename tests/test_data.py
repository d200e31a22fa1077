"""Reading and checking the data: the IDX reader, the shape checks, the split."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import FILES, REAL_DATA, idx_bytes, run_cli, write_idx_gz


def load_data(cfg: cnn.Config) -> cnn.Dataset:
    return cnn.split_data(cnn.load_arrays(cfg), cfg, cfg.seed)


def test_read_idx_returns_the_array_written(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx_gz(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(cnn.read_idx(tmp_path / "x.gz"), array)


@pytest.mark.parametrize(("content", "message"), [
    (b"plain text, not gzip", "as gzip"),
    (gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 20), "bad magic"),
    (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "truncated IDX header"),
    (gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5]), "header promises"),
    (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6], "as gzip"),
], ids=["not gzip", "bad magic", "truncated header", "truncated data", "truncated gzip"])  # stable ids for xdist
def test_read_idx_refuses_broken_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(content)
    with pytest.raises(cnn.UserError, match=message):
        cnn.read_idx(path)


def test_check_arrays_accepts_fashion_mnist_shapes() -> None:
    cnn.check_arrays(np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.uint8),
                     np.zeros((10000, 28, 28), np.uint8), np.full(10000, 9, np.uint8))


@pytest.mark.parametrize(("field", "bad", "message"), [
    (0, np.zeros((59999, 28, 28), np.uint8), "training images have shape"),
    (0, np.zeros((60000, 28, 28), np.float32), "training images have shape"),
    (1, np.zeros(60000, np.int64), "training labels"),
    (2, np.zeros((10000, 32, 32), np.uint8), "test images have shape"),
    (3, np.full(10000, 10, np.uint8), "labels go up to 10"),
])
def test_check_arrays_refuses_wrong_data(field: int, bad: np.ndarray, message: str) -> None:
    arrays = [np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.uint8),
              np.zeros((10000, 28, 28), np.uint8), np.zeros(10000, np.uint8)]
    arrays[field] = bad
    with pytest.raises(cnn.UserError, match=message):
        cnn.check_arrays(*arrays)


def test_split_is_stratified_seeded_and_keeps_uint8(data_dir: Path) -> None:
    cfg = cnn.Config(data_dir=data_dir, val_split=0.2, seeds=(3,))
    a, b = load_data(cfg), load_data(cfg)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (48000, 12000, 10000)
    assert a.x_train.dtype == np.uint8 and a.x_train.shape[1:] == (28, 28, 1)
    assert np.bincount(a.y_val).tolist() == [1200] * 10
    np.testing.assert_array_equal(a.y_val, b.y_val)
    other = load_data(cnn.Config(data_dir=data_dir, seeds=(4,)))
    assert not np.array_equal(a.y_val, other.y_val)


def test_limit_takes_the_first_training_images(data_dir: Path) -> None:
    data = load_data(cnn.Config(data_dir=data_dir, limit=500, val_split=0.2))
    assert len(data.y_train) + len(data.y_val) == 500
    assert len(data.y_test) == 10000


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(("damage", "message"), [
    ("remove", "missing data file"),
    ("not_gzip", "as gzip"),
    ("wrong_shape", "training images have shape"),
])
def test_cli_reports_bad_data_in_one_line(tmp_path: Path, data_dir: Path, damage: str, message: str) -> None:
    folder = copy_dataset(data_dir, tmp_path / "data")
    target = folder / FILES["train_images"]
    if damage == "remove":
        target.unlink()
    elif damage == "not_gzip":
        target.write_text("this is not gzip")
    else:
        write_idx_gz(target, np.zeros((100, 28, 28), np.uint8))
    proc = run_cli("--data-dir", folder, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.keras").exists()


def test_cli_reports_missing_data_folder(tmp_path: Path) -> None:
    proc = run_cli("--data-dir", tmp_path / "nowhere", "--plots-dir", tmp_path / "p",
                   "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1
    assert "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not (REAL_DATA / FILES["train_images"]).exists(), reason="real Fashion-MNIST not present")
def test_real_data_loads_with_known_labels() -> None:
    x_train, y_train, x_test, y_test = cnn.read_idx_folder(REAL_DATA)
    cnn.check_arrays(x_train, y_train, x_test, y_test)
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_test).tolist() == [1000] * 10
