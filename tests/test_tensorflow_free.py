"""JAX without TensorFlow: training, resuming, predicting and the one-line refusals, in a Python where TensorFlow
cannot be imported (tests/without_tensorflow), as in an install from requirements-jax.txt. A stray
`import tensorflow` on these paths fails them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, class_image, run_cli
from test_journal import LEVERS, stop_in_epoch

WITHOUT_TENSORFLOW = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "without_tensorflow"),
                                                                  os.environ.get("PYTHONPATH")])),
                      "KERAS_BACKEND": None}  # as a user's shell: the tests' own processes may have set it
# float32: exact comparisons; 3 epochs of 20 steps with every lever that keys draws by (seed, epoch); no --backend:
# without TensorFlow the script goes to JAX by itself
JAX_RUN = [*TINY, "--precision", "float32", "--epochs", "3", "--limit", "800", *LEVERS]
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def run_without_tensorflow(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=WITHOUT_TENSORFLOW)


def jax_flags(folder: Path, data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--plots-dir", str(folder / "plots"), "--model-path", str(folder / "m.keras"),
            *JAX_RUN]


def test_the_tests_python_cannot_import_tensorflow() -> None:
    code = "import importlib.util, sys; assert importlib.util.find_spec('tensorflow') is None\nimport tensorflow"
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": WITHOUT_TENSORFLOW["PYTHONPATH"]},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'tensorflow'" in proc.stderr


def test_tensorboard_without_tensorflow_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run_without_tensorflow("--backend", "jax", "--tensorboard", tmp_path / "tb", "--plots-dir", tmp_path / "p",
                                  "--model-path", tmp_path / "m.keras")
    assert proc.returncode == 1
    said = ("error: --tensorboard needs TensorFlow (Keras's TensorBoard callback writes through tf.summary), which is "
            "not installed: use --backend tensorflow (pip install -r requirements.txt)")
    assert proc.stderr.strip().splitlines() == [said]


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """A 3-epoch JAX run without TensorFlow: its folder, output and metrics."""
    folder = tmp_path_factory.mktemp("jax")
    proc = run_without_tensorflow(*jax_flags(folder, data_dir))
    assert proc.returncode == 0, proc.stderr
    return {"folder": folder, "proc": proc, "metrics": json.loads((folder / "plots" / "metrics.json").read_text())}


@needs_jax
@pytest.mark.slow
def test_jax_trains_tests_and_writes_every_output_without_tensorflow(jax_run: dict) -> None:
    metrics, folder = jax_run["metrics"], jax_run["folder"]
    assert "Backend: jax (TensorFlow is not installed; jax is); precision: float32" in jax_run["proc"].stdout
    assert metrics["test_accuracy"] > 0.6 and metrics["epochs_completed"] == 3  # chance: 0.1; every lever on
    assert "jax" in metrics["versions"] and "tensorflow" not in metrics["versions"]
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [
        "accuracy.png", "architecture.png", "confusion_matrix.png", "history.csv", "loss.png", "metrics.json",
        "predictions.png"]


@needs_jax
@pytest.mark.slow
def test_an_interrupted_jax_run_resumes_to_exactly_the_same_end(tmp_path: Path, data_dir: Path, jax_run: dict) -> None:
    flags = jax_flags(tmp_path, data_dir)
    stopped = stop_in_epoch(flags, 2, signal.SIGINT, total=3, env=WITHOUT_TENSORFLOW)
    # An epoch of this small network is one compiled call: the signal stops the run before the call it comes
    # during, or (come while it starts) after it, at the end of epoch 2.
    done = re.search(r"Interrupted after (\d) of 3 epochs", stopped.stderr)
    assert stopped.returncode == 130 and done and done[1] in ("1", "2"), stopped.stderr
    resumed = run_without_tensorflow(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming after epoch {done[1]} of 3" in resumed.stdout
    metrics = json.loads((tmp_path / "plots" / "metrics.json").read_text())
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(metrics["history"][key], jax_run["metrics"]["history"][key], rtol=1e-5,
                                   err_msg=key)
    assert metrics["test_accuracy"] == pytest.approx(jax_run["metrics"]["test_accuracy"], abs=1e-6)


@needs_jax
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="compares with TensorFlow's install")
@pytest.mark.slow
def test_its_model_gives_the_same_classes_without_tensorflow_and_on_tensorflow(tmp_path: Path, jax_run: dict
                                                                               ) -> None:
    for label in (0, 3, 7):
        Image.fromarray(class_image(label, seed=5)).resize((112, 112)).save(tmp_path / f"shape{label}.png")
    flags = ["--predict", tmp_path, "--json", "--model-path", jax_run["folder"] / "m.keras", "--plots-dir",
             tmp_path / "seen"]
    on_jax = run_without_tensorflow(*flags, "--backend", "jax")
    on_tensorflow = run_cli(*flags, "--backend", "tensorflow")
    assert on_jax.returncode == 0 and on_tensorflow.returncode == 0, on_jax.stderr + on_tensorflow.stderr
    classes = [[r["class"] for r in json.loads(p.stdout)] for p in (on_jax, on_tensorflow)]
    assert classes[0] == classes[1] and len(classes[0]) == 3
