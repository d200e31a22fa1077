"""Stopping a run with Ctrl-C or SIGTERM keeps what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SCRIPT, TINY


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
