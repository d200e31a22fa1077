"""Stopping a run with Ctrl-C or SIGTERM keeps what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import SCRIPT, TINY, run_cli


def start_cli(*args: str | os.PathLike) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 240) -> str:
    """Read stdout until a line containing text appears; return what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {text!r}; output was:\n{''.join(seen)}")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_in_second_epoch_saves_the_first(tmp_path: Path, data_dir: Path, signum: int, code: int) -> None:
    plots, model = tmp_path / "plots", tmp_path / "m.keras"
    proc = start_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", model,
                     *TINY, "--limit", "6400", "--epochs", "5")
    wait_for_line(proc, "Epoch 2/5")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert "Interrupted after 1 of 5 epochs" in stderr
    metrics = json.loads((plots / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert metrics["epochs_completed"] == 1 and metrics["best_epoch"] == 1
    assert len(metrics["history"]["val_loss"]) == 1
    assert model.exists() and (plots / "loss.png").exists()


def test_signal_before_any_epoch_writes_nothing(tmp_path: Path, data_dir: Path) -> None:
    plots, model = tmp_path / "plots", tmp_path / "m.keras"
    proc = start_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", model,
                     *TINY, "--limit", "6400", "--epochs", "5")
    wait_for_line(proc, "Epoch 1/5")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert not model.exists() and not (plots / "metrics.json").exists()


def interrupted_run(tmp_path: Path, data_dir: Path, at_epoch: int, signum: int) -> list[str]:
    """Start a 4-epoch run, send signum once epoch at_epoch has begun; return the flags used."""
    flags = ["--data-dir", str(data_dir), "--plots-dir", str(tmp_path / "plots"),
             "--model-path", str(tmp_path / "m.keras"), *TINY, "--limit", "6400", "--epochs", "4"]
    proc = start_cli(*flags)
    wait_for_line(proc, f"Epoch {at_epoch}/4")
    if signum == signal.SIGKILL:
        time.sleep(0.5)  # be inside the epoch, not at its start
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGKILL)
    return flags


@pytest.mark.parametrize(("signum", "at_epoch"), [(signal.SIGINT, 2), (signal.SIGKILL, 3)])
def test_resume_finishes_the_run_without_gaps(tmp_path: Path, data_dir: Path, signum: int, at_epoch: int) -> None:
    flags = interrupted_run(tmp_path, data_dir, at_epoch, signum)
    proc = run_cli(*flags, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"Resuming after epoch {at_epoch - 1} of 4" in proc.stdout
    assert f"Epoch {at_epoch}/4" in proc.stdout and "Epoch 1/4" not in proc.stdout
    metrics = json.loads((tmp_path / "plots" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 4 and metrics["interrupted"] is False
    assert all(len(v) == 4 and None not in v for v in metrics["history"].values())
    assert metrics["test_accuracy"] > 0.5
    assert not (tmp_path / ".m.resume").exists(), "a finished run leaves no resume state"
    again = run_cli(*flags, "--resume")
    assert again.returncode == 1 and "nothing to resume" in again.stderr


def test_resume_with_other_settings_is_refused(tmp_path: Path, data_dir: Path) -> None:
    flags = interrupted_run(tmp_path, data_dir, 2, signal.SIGINT)
    # With oneDNN on (the default on CPUs with AVX512-VNNI, AVX512-BF16 or AMX) TensorFlow logs while it loads.
    proc = run_cli(*flags, "--filters", "8", "--lr", "0.003", "--resume", env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert proc.returncode == 1
    assert "filters was 4, now 8" in proc.stderr and "lr was 0.01, now 0.003" in proc.stderr
    assert proc.stderr.startswith("error: cannot resume") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_interrupted_study_resumes_without_retraining_finished_runs(tmp_path: Path, data_dir: Path) -> None:
    flags = ["--data-dir", str(data_dir), "--plots-dir", str(tmp_path / "plots"),
             "--model-path", str(tmp_path / "m.keras"), *TINY, "--epochs", "2", "--lr", "0.01", "0.003"]
    proc = start_cli(*flags)
    wait_for_line(proc, "Run 2 of 2")
    wait_for_line(proc, "Epoch 2/2")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "run the same command with --resume" in stderr
    resumed = run_cli(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    first, second = resumed.stdout.split("Run 2 of 2")
    assert "Already finished" in first and "Epoch 1/2" not in first
    assert "Resuming after epoch 1 of 2" in second and "Epoch 1/2" not in second
    study = json.loads((tmp_path / "plots" / "lr_study.json").read_text())
    assert [r["epochs_completed"] for r in study["rates"]] == [2, 2]
    assert not (tmp_path / ".m.resume").exists()


def test_every_epoch_gets_its_own_batch_order_and_dropout_masks() -> None:
    """fit(shuffle=True) with a seed set gives the same order every epoch; the epoch streams must not."""
    import keras

    cfg = cnn.parse_args(["--filters", "4", "--dense-units", "8"])
    cnn.seed_everything(0)
    model = cnn.build_model(cfg, 0.01, 10)
    labels = np.arange(64, dtype=np.uint8)
    batches, streams = cnn.epoch_streams(np.zeros((64, 28, 28, 1), np.uint8), labels, 16, 0, model)
    dropout = [layer.seed_generator for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

    def epoch(number: int) -> tuple[list[int], list[list[int]]]:
        streams.on_epoch_begin(number)
        order = [int(v) for _, y in batches for v in y.numpy()]
        return order, [g.state.numpy().tolist() for g in dropout]

    first, second = epoch(0), epoch(1)
    assert sorted(first[0]) == labels.tolist(), "each epoch sees every image once"
    assert first[0] != second[0], "same batch order in consecutive epochs"
    assert all(a != b for a, b in zip(first[1], second[1], strict=True)), "same dropout masks in consecutive epochs"
    assert epoch(0) == first and epoch(1) == second, "an epoch's order and masks depend on (seed, epoch) alone"


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path, data_dir: Path) -> None:
    """Interrupted in epoch 3 and resumed, a run sees the batches and masks it would have seen anyway."""
    interrupted = interrupted_run(tmp_path / "a", data_dir, 3, signal.SIGINT)
    assert run_cli(*interrupted, "--resume").returncode == 0
    straight = run_cli("--data-dir", data_dir, "--plots-dir", tmp_path / "b" / "plots",
                       "--model-path", tmp_path / "b" / "m.keras", *TINY, "--limit", "6400", "--epochs", "4")
    assert straight.returncode == 0, straight.stderr
    resumed, uninterrupted = (json.loads((tmp_path / run / "plots" / "metrics.json").read_text())
                              for run in ("a", "b"))
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(resumed["history"][key], uninterrupted["history"][key], rtol=1e-5, err_msg=key)
    assert resumed["test_accuracy"] == pytest.approx(uninterrupted["test_accuracy"], abs=1e-6)
