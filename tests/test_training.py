"""Training one run as a user drives it: every output written, one line an epoch in a log, reloading, the same
seed giving the same run, failures that leave earlier outputs alone, and the epoch streams (batch order, dropout,
shifts, flips, erasing)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FILES, TINY, TRAINED, call_main, run_cli
from fashion_cnn import backends, common

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
    assert set(metrics["per_class_test_accuracy"]) == set(common.CLASS_NAMES)
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


@pytest.mark.slow
def test_no_callback_makes_each_training_step_wait_for_its_results(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On JAX and PyTorch Keras hands the callbacks each step's logs in a thread of their own, unless one of them
    has a batch-end hook (TerminateOnNaN has) and is not marked async_safe: then every step waits for the device
    and its logs are copied to the host. (TensorFlow's backend always waits: there steps_per_execution is what
    spares the steps.) Ctrl-C and a NaN loss still stop the run: test_journal.py, test_study.py."""
    keras = backends.import_keras()
    given = []
    original = keras.callbacks.CallbackList.__init__

    def recorded(self: object, callbacks: list | None = None, *args: object, **kwargs: object) -> None:
        given.append(list(callbacks or []))
        original(self, callbacks, *args, **kwargs)

    def waits(callback: object) -> bool:
        hooks = (callback.on_batch_end, callback.on_train_batch_end)
        return not getattr(callback, "async_safe", False) and not all(getattr(h, "_is_default", False) for h in hooks)

    monkeypatch.setattr(keras.callbacks.CallbackList, "__init__", recorded)
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras", *TINY)
    assert ran.returncode == 0, ran.stderr
    fits = [callbacks for callbacks in given if any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks)]
    assert len(fits) == 1 and [type(c).__name__ for c in fits[0] if waits(c)] == []
