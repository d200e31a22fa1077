"""Stopping a run with Ctrl-C, SIGTERM or kill -9 keeps what was done, and --resume finishes it exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import SCRIPT, TINY, call_main, run_cli

LONG = [*TINY, "--limit", "1600", "--epochs", "4"]  # 40 steps an epoch: time to land a signal inside one


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


def run_flags(folder: Path, data_dir: Path, *extra: str) -> list[str]:
    """A run whose plots, model and resume state all live in folder."""
    return ["--data-dir", str(data_dir), "--plots-dir", str(folder / "plots"), "--model-path", str(folder / "m.keras"),
            *LONG, *extra]


def stop_in_epoch(flags: list[str], epoch: int, signum: int, total: int = 4) -> subprocess.CompletedProcess[str]:
    """Start a run and send signum once its epoch `epoch` has begun."""
    proc = start_cli(*flags)
    wait_for_line(proc, f"Epoch {epoch}/{total}")
    if signum == signal.SIGKILL:
        time.sleep(0.5)  # be inside the epoch, not at its start
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A 4-epoch run stopped with Ctrl-C (SIGINT) in its third epoch; tests work on copies of its folder."""
    folder = tmp_path_factory.mktemp("interrupted")
    return folder, stop_in_epoch(run_flags(folder, data_dir), 3, signal.SIGINT)


def copy_of(interrupted: tuple[Path, subprocess.CompletedProcess], to: Path) -> Path:
    shutil.copytree(interrupted[0], to)
    return to


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """The same 4-epoch run, uninterrupted."""
    folder = tmp_path_factory.mktemp("straight")
    ran = call_main(*run_flags(folder, data_dir))
    assert ran.returncode == 0, ran.stderr
    return json.loads((folder / "plots" / "metrics.json").read_text())


@pytest.mark.slow
def test_sigint_saves_the_finished_epochs(interrupted: tuple[Path, subprocess.CompletedProcess]) -> None:
    folder, proc = interrupted
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert "Interrupted after 2 of 4 epochs" in proc.stderr
    metrics = json.loads((folder / "plots" / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["test_accuracy"] is None
    assert metrics["epochs_completed"] == 2 and metrics["best_epoch"] in (1, 2)
    assert all(len(v) == 2 for v in metrics["history"].values())
    assert (folder / "m.keras").exists() and (folder / "plots" / "loss.png").exists()


@pytest.mark.slow
def test_sigterm_before_any_epoch_writes_nothing(tmp_path: Path, data_dir: Path) -> None:
    """SIGTERM goes through the same handler as Ctrl-C; stopped before an epoch finished, nothing is written."""
    proc = start_cli(*run_flags(tmp_path, data_dir))
    wait_for_line(proc, "Epoch 1/4")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert stderr.splitlines()[-1] == "No epoch finished; nothing was written and earlier outputs are untouched."
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "plots" / "metrics.json").exists()


@pytest.mark.slow
def test_resume_finishes_the_run_exactly_like_an_uninterrupted_one(
        tmp_path: Path, data_dir: Path, interrupted: tuple, straight: dict) -> None:
    """The resumed run sees the batches and dropout masks it would have seen anyway."""
    folder = copy_of(interrupted, tmp_path / "run")
    flags = run_flags(folder, data_dir)
    ran = call_main(*flags, "--resume")
    assert ran.returncode == 0, ran.stderr
    assert "Resuming after epoch 2 of 4" in ran.stdout
    assert "Epoch 3/4" in ran.stdout and "Epoch 1/4" not in ran.stdout
    resumed = json.loads((folder / "plots" / "metrics.json").read_text())
    assert resumed["epochs_completed"] == 4 and resumed["interrupted"] is False
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(resumed["history"][key], straight["history"][key], rtol=1e-5, err_msg=key)
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"], abs=1e-6)
    assert not (folder / ".m.resume").exists(), "a finished run leaves no resume state"
    again = run_cli(*flags, "--resume")
    assert again.returncode == 1 and "nothing to resume" in again.stderr


@pytest.mark.slow
def test_a_resume_killed_with_kill_9_resumes_again(tmp_path: Path, data_dir: Path, interrupted: tuple,
                                                   straight: dict) -> None:
    """kill -9 gives no chance to save anything: the next --resume restarts from the last finished epoch."""
    flags = run_flags(copy_of(interrupted, tmp_path / "run"), data_dir, "--resume")
    assert stop_in_epoch(flags, 3, signal.SIGKILL).returncode == -signal.SIGKILL
    ran = call_main(*flags)
    assert ran.returncode == 0, ran.stderr
    assert "Resuming after epoch 2 of 4" in ran.stdout and "Epoch 1/4" not in ran.stdout
    resumed = json.loads((tmp_path / "run" / "plots" / "metrics.json").read_text())
    np.testing.assert_allclose(resumed["history"]["val_loss"], straight["history"]["val_loss"], rtol=1e-5)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path: Path, data_dir: Path, interrupted: tuple) -> None:
    folder = copy_of(interrupted, tmp_path / "run")
    # With oneDNN on (the default on CPUs with AVX512-VNNI, AVX512-BF16 or AMX) TensorFlow logs while it loads.
    proc = run_cli(*run_flags(folder, data_dir, "--filters", "8", "--lr", "0.003", "--resume"),
                   env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert proc.returncode == 1
    assert "filters was 4, now 8" in proc.stderr and "lr was 0.01, now 0.003" in proc.stderr
    assert proc.stderr.startswith("error: cannot resume") and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.slow
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
    assert not list((tmp_path / "plots").iterdir()), "an interrupted study writes no outputs"
    resumed = call_main(*flags, "--resume")
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
    batches, start_epoch = cnn.epoch_streams(np.zeros((64, 28, 28, 1), np.uint8), labels, 16, 0, model)
    dropout = [layer.seed_generator for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

    def epoch(number: int) -> tuple[list[int], list[list[int]]]:
        start_epoch(number)
        order = [int(v) for _, y in batches for v in y.numpy()]
        return order, [g.state.numpy().tolist() for g in dropout]

    first, second = epoch(0), epoch(1)
    assert sorted(first[0]) == labels.tolist(), "each epoch sees every image once"
    assert first[0] != second[0], "same batch order in consecutive epochs"
    assert all(a != b for a, b in zip(first[1], second[1], strict=True)), "same dropout masks in consecutive epochs"
    assert epoch(0) == first and epoch(1) == second, "an epoch's order and masks depend on (seed, epoch) alone"
