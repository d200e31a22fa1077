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
from PIL import Image

from conftest import DEAD_AND_SLOW, SCRIPT, TINY, call_main, cli_environment, run_cli
from fashion_cnn import common, tta

LEVERS = ["--ema", "0.9", "--label-smoothing", "0.1", "--shift", "2", "--flip", "--tta", "--erase", "0.5",
          "--warmup-epochs", "1"]  # all kept exact on resume


LONG = [*TINY, "--limit", "1600", "--epochs", "4", *LEVERS]  # 40 steps an epoch: time to land a signal inside one


def start_cli(*args: str | os.PathLike, env: dict[str, str | None] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=cli_environment(env), text=True,
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


def stop_in_epoch(flags: list[str], epoch: int, signum: int, total: int = 4, env: dict[str, str | None] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    """Start a run (with env added to the environment) and send signum once its epoch `epoch` has begun."""
    proc = start_cli(*flags, env=env)
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
    """The same 4-epoch run, uninterrupted: its metrics.json, and "model": its model file."""
    folder = tmp_path_factory.mktemp("straight")
    ran = call_main(*run_flags(folder, data_dir))
    assert ran.returncode == 0, ran.stderr
    return {**json.loads((folder / "plots" / "metrics.json").read_text()), "model": folder / "m.keras"}


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
    assert resumed["validation_accuracy_with_tta"] == pytest.approx(straight["validation_accuracy_with_tta"])
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


@pytest.mark.slow
def test_a_resumed_study_with_a_stopped_rate_ends_like_an_uninterrupted_one(tmp_path: Path, data_dir: Path) -> None:
    """Also when the kill came after the stalled rate's last epoch was saved but before its run was closed."""

    def flags(folder: Path) -> list[str]:
        return ["--data-dir", str(data_dir), "--plots-dir", str(folder / "plots"),
                "--model-path", str(folder / "m.keras"), *DEAD_AND_SLOW]

    straight = call_main(*flags(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    proc = start_cli(*flags(tmp_path / "run"))
    wait_for_line(proc, "Run 2 of 2")
    wait_for_line(proc, "Epoch 2/4")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    state_file = tmp_path / "run" / ".m.resume" / "lr3-seed0" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["finished"] and len(state["history"]["loss"]) == 2
    state_file.write_text(json.dumps({**state, "finished": False}))  # as if killed before the run was closed
    resumed = call_main(*flags(tmp_path / "run"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split("Run 2 of 2")[0].count("Epoch ") == 0, "the stopped rate trains no more"
    rows = {name: json.loads((tmp_path / name / "plots" / "lr_study.json").read_text())["rates"]
            for name in ("straight", "run")}
    for again, first in zip(rows["run"], rows["straight"], strict=True):
        assert again["stopped"] == first["stopped"] and again["epochs_completed"] == first["epochs_completed"]
        for key in ("loss", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(again["runs"][0]["history"][key], first["runs"][0]["history"][key],
                                       rtol=1e-5, err_msg=key)
    assert rows["run"][0]["stopped"] == "stopped after epoch 2: stalled at chance level"


@pytest.mark.slow
def test_predict_averages_over_the_copies_the_model_was_trained_with(tmp_path: Path, straight: dict) -> None:
    """Trained with --shift --flip --tta, the model's file says so, and --predict averages like the test did."""
    import keras

    image = np.zeros((28, 28), np.uint8)
    image[4:20, 2:9] = 255  # lopsided: its mirror and moves look different to the network
    Image.fromarray(image).save(tmp_path / "lopsided.png")
    ran = call_main("--predict", tmp_path / "lopsided.png", "--json", "--model-path", straight["model"])
    assert ran.returncode == 0, ran.stderr
    top = json.loads(ran.stdout)[0]["top3"][0]
    model = keras.models.load_model(straight["model"])
    views = tta.test_time_views(image[None, :, :, None], shift=True, flip=True)
    averaged = np.mean([model.predict(v, verbose=0)[0] for v in views], axis=0)
    assert top["class"] == common.CLASS_NAMES[averaged.argmax()]
    assert top["probability"] == pytest.approx(averaged.max(), abs=1e-5)
    assert top["probability"] != pytest.approx(model.predict(image[None, :, :, None], verbose=0)[0].max(), abs=1e-4)


def test_resume_with_nothing_to_resume_is_one_line_before_any_folder_is_made(tmp_path: Path) -> None:
    ran = call_main("--resume", "--data-dir", tmp_path / "nowhere", "--plots-dir", tmp_path / "plots",
                    "--model-path", tmp_path / "models" / "m.keras")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.startswith(f"error: nothing to resume at {tmp_path / 'models' / '.m.resume'}")
    assert not (tmp_path / "plots").exists() and not (tmp_path / "models").exists()
