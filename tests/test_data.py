"""Reading and checking the data: the IDX reader, the shape checks, the split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import FILES, REAL_DATA, call_main, run_cli, write_idx_gz
from fashion_cnn import common, data_files


def load_data(cfg: cnn.Config) -> cnn.Dataset:
    return cnn.split_data(cnn.load_arrays(cfg)[0], cfg, cfg.seed)


def test_check_arrays_accepts_fashion_mnist_shapes_and_labels_up_to_9() -> None:
    shapes = [np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.uint8), np.zeros((10000, 28, 28), np.uint8)]
    assert cnn.check_arrays(*shapes, np.full(10000, 9, np.uint8)) is None  # Ankle boot, the last class
    with pytest.raises(common.UserError, match="test labels go up to 10"):
        cnn.check_arrays(*shapes, np.full(10000, 10, np.uint8))


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
    with pytest.raises(common.UserError, match=message):
        cnn.check_arrays(*arrays)


def test_split_is_stratified_seeded_and_keeps_uint8(data_dir: Path) -> None:
    cfg = cnn.Config(data_dir=data_dir, val_split=0.2, seeds=(3,))
    arrays = cnn.load_arrays(cfg)[0]
    a, b, other = cnn.split_data(arrays, cfg, 3), cnn.split_data(arrays, cfg, 3), cnn.split_data(arrays, cfg, 4)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (48000, 12000, 10000)
    assert a.x_train.dtype == np.uint8 and a.x_train.shape[1:] == (28, 28, 1)
    assert np.bincount(a.y_val).tolist() == [1200] * 10
    np.testing.assert_array_equal(a.y_val, b.y_val)
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
    ("not_gzip", "neither gzip nor an IDX file"),
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
    ran = call_main("--data-dir", folder, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras")
    assert ran.returncode == 1
    assert message in ran.stderr and len(ran.stderr.splitlines()) == 1
    assert not (tmp_path / "m.keras").exists()


def test_cli_reports_missing_data_folder(tmp_path: Path) -> None:
    proc = run_cli("--data-dir", tmp_path / "nowhere", "--plots-dir", tmp_path / "p",
                   "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1
    assert "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not (REAL_DATA / FILES["train_images"]).exists(), reason="real Fashion-MNIST not present")
def test_real_data_loads_with_known_labels() -> None:
    (x_train, y_train, x_test, y_test), _ = data_files.read_data_dir(REAL_DATA)
    cnn.check_arrays(x_train, y_train, x_test, y_test)
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_test).tolist() == [1000] * 10
