"""Training one run as a user drives it: every output written, one line an epoch in a log, reloading, the same
seed giving the same run, failures that leave earlier outputs alone, and the epoch streams (batch order, dropout,
shifts, flips, erasing)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import FILES, TINY, TRAINED, call_main, run_cli

OUTPUTS = ["accuracy.png", "loss.png", "confusion_matrix.png", "predictions.png", "architecture.png",
           "history.csv", "metrics.json"]


@pytest.mark.slow
def test_a_run_writes_every_output(trained: dict) -> None:
    plots: Path = trained["plots"]
    for name in OUTPUTS:
        assert (plots / name).stat().st_size > 0, name
        assert (plots / name).stat().st_mode & 0o044, f"{name} should be readable by others like any output"
    assert not list(plots.glob(".*tmp*")), "no temporary files may be left behind"
    for png in OUTPUTS[:5]:
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((plots / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert set(metrics["per_class_test_accuracy"]) == set(cnn.CLASS_NAMES)
    assert metrics["config"]["filters"] == 4 and metrics["seed"] == 0
    assert len(metrics["history"]["val_loss"]) == 2 == metrics["epochs_completed"]
    assert metrics["versions"]["keras"].startswith("3")
    assert metrics["training_seconds"] > 0 and metrics["interrupted"] is False
    rows = list(csv.DictReader((plots / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["val_loss"]) == pytest.approx(metrics["history"]["val_loss"][1], abs=1e-5)
    out = trained["proc"].stdout
    assert "Test accuracy:" in out and "Ankle boot" in out and "T-shirt/top" in out


@pytest.mark.slow
def test_output_to_a_log_file_has_one_line_per_epoch_not_progress_bars(trained: dict) -> None:
    out = trained["proc"].stdout
    assert "\u2501" not in out and "\r" not in out, "progress bars belong on a terminal, not in a log"
    assert len([line for line in out.splitlines() if "val_loss" in line]) == 2


@pytest.mark.slow
def test_saved_model_reloads_to_the_same_accuracy(trained: dict, test_arrays) -> None:
    import keras

    metrics = json.loads((trained["plots"] / "metrics.json").read_text())
    model = keras.models.load_model(trained["model"])
    x, y = test_arrays
    accuracy = np.mean(model.predict(x[..., None], batch_size=512, verbose=0).argmax(axis=1) == y)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert metrics["test_accuracy"] > 0.5, "the tiny network should learn the synthetic bars"


@pytest.mark.slow
def test_same_seed_gives_the_same_validation_curve(tmp_path: Path, data_dir: Path, trained: dict) -> None:
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path, "--model-path", tmp_path / "again.keras",
                   *TRAINED)  # the flags of the `trained` run, seed 0 by default
    assert ran.returncode == 0, ran.stderr
    again, first = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path, trained["plots"]))
    assert again["history"] == first["history"]
    assert again["test_accuracy"] == first["test_accuracy"]


@pytest.mark.slow
def test_keras_datasets_path_uses_a_prefilled_cache_and_keeps_stderr_empty(tmp_path: Path, data_dir: Path) -> None:
    cache = tmp_path / "keras_home" / "datasets" / "fashion-mnist"
    cache.mkdir(parents=True)
    for name in FILES.values():
        shutil.copy(data_dir / name, cache / name)
    # oneDNN on (TensorFlow's default on CPUs with AVX512-VNNI, AVX512-BF16 or AMX) adds start-up log lines
    proc = run_cli("--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras", *TINY,
                   env={"KERAS_HOME": str(tmp_path / "keras_home"), "TF_ENABLE_ONEDNN_OPTS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "a run that works prints nothing on stderr"
    assert "Data: 512 training, 128 validation, 10000 test images" in proc.stdout
    assert (tmp_path / "p" / "metrics.json").exists()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_failed_run_leaves_earlier_outputs_untouched(tmp_path: Path, data_dir: Path) -> None:
    plots, model = tmp_path / "plots", tmp_path / "models" / "m.keras"
    for path, content in ((plots / "metrics.json", "{}"), (plots / "history.csv", "epoch\n"), (model, "PK")):
        path.parent.mkdir(exist_ok=True)
        path.write_text(content)  # an earlier run's outputs
    before = digest(plots), digest(model.parent)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    # The model folder cannot be created: the run must fail before touching the plots.
    proc = run_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", blocker / "m.keras", *TINY)
    assert proc.returncode == 1
    assert "cannot write to" in proc.stderr and "Traceback" not in proc.stderr
    # Broken data: the run must fail without touching the model or plots.
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = run_cli("--data-dir", bad, "--plots-dir", plots, "--model-path", model, *TINY)
    assert proc.returncode == 1
    assert (digest(plots), digest(model.parent)) == before


@pytest.mark.slow
def test_a_full_disk_leaves_the_earlier_outputs_as_they_were(tmp_path: Path, trained: dict, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plots, model = tmp_path / "plots", tmp_path / "m.keras"
    shutil.copytree(trained["plots"], plots)
    shutil.copy(trained["model"], model)
    before = digest(plots), model.read_bytes()
    real_fsync = os.fsync

    def fsync_on_a_full_disk(fd: int) -> None:  # the disk fills up while metrics.json, the last output, is written
        if "metrics.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("simulates the full disk through /proc/self/fd")
    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    flags = ["--data-dir", data_dir, "--plots-dir", plots, "--model-path", model, *TINY, "--seed", "5"]
    ran = call_main(*flags)
    assert ran.returncode == 1
    assert ran.stderr.startswith(f"error: cannot write {plots / 'metrics.json'} (No space left on device); "
                                 "none of this run's outputs were written")
    assert len(ran.stderr.strip().splitlines()) == 1
    assert (digest(plots), model.read_bytes()) == before, "no new file may stand beside the old ones"
    # With space again, --resume writes the finished run's outputs without training it again.
    monkeypatch.setattr(os, "fsync", real_fsync)
    resumed = call_main(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Already finished" in resumed.stdout and "Epoch 1/1" not in resumed.stdout
    assert json.loads((plots / "metrics.json").read_text())["seed"] == 5
    assert sorted(digest(plots)) == sorted(before[0]) and model.read_bytes() != before[1]


@pytest.mark.slow
def test_the_weight_average_of_a_short_run_is_as_accurate_as_the_raw_weights(tmp_path: Path, data_dir: Path) -> None:
    """64 steps: without a warm-up the average would still be mostly the initial weights (58% against 89% here)."""
    def validation_accuracy(ema: str) -> float:
        plots = tmp_path / f"ema{ema}"
        ran = call_main("--data-dir", data_dir, "--plots-dir", plots, "--model-path", tmp_path / f"ema{ema}.keras",
                        *TINY, "--limit", "2560", "--ema", ema, "--no-tta")
        assert ran.returncode == 0, ran.stderr
        return json.loads((plots / "metrics.json").read_text())["validation_accuracy"]

    raw = validation_accuracy("0")
    assert raw > 0.5, "the raw weights learn something in 64 steps"
    assert validation_accuracy("0.99") >= raw - 0.01, "the average is within a point of the raw weights, or better"


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_every_epoch_gets_its_own_batch_order_and_dropout_masks() -> None:
    """fit(shuffle=True) with a seed set gives the same order every epoch; the epoch streams must not."""
    import keras

    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "0", "--batch-size", "16"])
    cnn.seed_everything(0)
    model = cnn.build_model(cfg, 0.01, 10)
    index = np.arange(64, dtype=np.uint8)
    images = np.broadcast_to(index[:, None, None, None], (64, 28, 28, 1)).copy()  # image k is all k
    batches, start_epoch = cnn.epoch_streams(cfg, images, index % 10, 0, model)
    dropout = [layer.seed_generator for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

    def epoch(number: int) -> tuple[list[int], list[list[int]]]:
        start_epoch(number)
        order = [int(v) for x, _ in batches for v in x.numpy()[:, 0, 0, 0]]
        return order, [g.state.numpy().tolist() for g in dropout]

    first, second = epoch(0), epoch(1)
    assert sorted(first[0]) == index.tolist(), "each epoch sees every image once"
    assert first[0] != second[0], "same batch order in consecutive epochs"
    assert all(a != b for a, b in zip(first[1], second[1], strict=True)), "same dropout masks in consecutive epochs"
    assert epoch(0) == first and epoch(1) == second, "an epoch's order and masks depend on (seed, epoch) alone"


def augmentation_of_each_image(images: np.ndarray, seed: int, epoch: int) -> dict[int, tuple[bool, int, int]]:
    """For one epoch of --shift 2 --flip batches: image index -> (mirrored, pixels moved down, pixels moved right)."""
    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "2", "--flip", "--batch-size", "16"])
    model = cnn.build_model(cfg, 0.01, 10)
    batches, start_epoch = cnn.epoch_streams(cfg, images, np.zeros(len(images), np.uint8), seed, model)
    start_epoch(epoch)
    copies = {moved(images[k, :, ::-1] if flipped else images[k], dy, dx).tobytes(): (k, flipped, dy, dx)
              for k in range(len(images)) for flipped in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)}
    found = [copies.get(image.tobytes()) for x, _ in batches for image in x.numpy()]
    assert None not in found, "every training image is a source image, flipped or not, moved by at most 2 px"
    assert sorted(k for k, *_ in found) == list(range(len(images))), "each image once an epoch"
    return {k: (flipped, dy, dx) for k, flipped, dy, dx in found}


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_random_erasing_puts_one_noise_rectangle_in_the_chosen_share_of_images_keyed_by_seed_and_epoch() -> None:
    """--erase 0.5: about half the images of an epoch get a rectangle of 2-40% of the image, the rest are untouched."""
    images = np.zeros((400, 28, 28, 1), np.uint8)
    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8", "--shift", "0", "--erase", "0.5",
                          "--batch-size", "100"])
    model = cnn.build_model(cfg, 0.01, 10)
    batches, start_epoch = cnn.epoch_streams(cfg, images, np.zeros(len(images), np.uint8), 0, model)

    def erased(epoch: int) -> np.ndarray:
        start_epoch(epoch)
        return np.concatenate([x.numpy() for x, _ in batches])[..., 0] != 0  # noise is 0 in 1 pixel of 256

    first = erased(0)
    hit = first.reshape(len(images), -1).any(axis=1)
    assert 150 < hit.sum() < 250
    for mask in first[hit]:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.mean() > 0.9, "the noise fills one rectangle"
        assert 0.015 <= box.size / mask.size <= 0.41
    assert (erased(0) == first).all() and (erased(1) != first).any(), "a function of (seed, epoch)"


def moved(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image moved dy pixels down and dx right, zero-filled."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_augmented_batches_are_shifted_and_flipped_copies_keyed_by_seed_and_epoch() -> None:
    images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)  # no 0: the fill shows
    first = augmentation_of_each_image(images, seed=0, epoch=0)
    assert 16 < sum(flipped for flipped, _, _ in first.values()) < 48, "about half the images are mirrored"
    assert len({move[1:] for move in first.values()}) > 15, "shifts take many of the 25 values"
    assert augmentation_of_each_image(images, seed=0, epoch=0) == first, "(seed, epoch) decides it all"
    for other in (augmentation_of_each_image(images, seed=0, epoch=1), augmentation_of_each_image(images, 1, 0)):
        assert sum(other[k] != first[k] for k in first) > 48, "an image gets a new augmentation each epoch and seed"
