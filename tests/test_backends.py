"""--backend and KERAS_BACKEND: which Keras backend trains and predicts, one-line refusals, portable models."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest

import ConvolutionalNN as cnn
from conftest import TINY, call_main, class_image, run_cli
from fashion_cnn import backends, common

HAS_JAX = importlib.util.find_spec("jax") is not None


# PyTorch is not in requirements-dev.txt (its wheel here is the CUDA build, 5 GB installed): its tests run by hand
# in an environment that has it (docs/RESULTS.md).
OTHER_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(b) is None,
                                                           reason=f"{b} is not installed"))
                  for b in ("jax", "torch")]


@pytest.mark.parametrize(("flag", "variable", "chosen"), [
    (None, None, "tensorflow"),
    (None, "jax", "jax"),
    ("tensorflow", "jax", "tensorflow"),
    ("torch", "tensorflow", "torch"),
])
def test_the_flag_wins_over_keras_backend_which_wins_over_tensorflow(
        monkeypatch: pytest.MonkeyPatch, flag: str | None, variable: str | None, chosen: str) -> None:
    if variable is None:
        monkeypatch.delenv("KERAS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("KERAS_BACKEND", variable)
    assert cnn.parse_args(["--backend", flag] if flag else []).backend == chosen


def test_an_unknown_keras_backend_is_a_one_line_usage_error(tmp_path: Path) -> None:
    proc = run_cli("--epochs", "1", env={"KERAS_BACKEND": "numpy"})
    assert proc.returncode == common.EXIT_USAGE
    said = ("ConvolutionalNN.py: error: KERAS_BACKEND=numpy is not a backend this script runs on; use tensorflow, "
            "jax, torch (see --help)")
    assert proc.stderr.strip().splitlines() == [said]


def test_a_missing_backend_package_is_one_line_before_the_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    ran = call_main("--backend", "torch", "--data-dir", tmp_path / "nowhere", "--plots-dir", tmp_path / "p",
                    "--model-path", tmp_path / "m.keras")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.startswith("error: the torch backend needs torch, which is not installed: pip install torch")
    assert len(ran.stderr.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_mirrored_on_torch_is_refused_in_one_line_before_anything_is_written(tmp_path: Path) -> None:
    ran = call_main("--backend", "torch", "--distribute", "mirrored", "--plots-dir", tmp_path / "p",
                    "--model-path", tmp_path / "m.keras")
    assert ran.returncode == 1 and ran.stdout == ""
    said = ("error: --distribute mirrored needs --backend tensorflow (MirroredStrategy) or jax (DataParallel); "
            "torch has no such strategy here")
    assert ran.stderr.strip().splitlines() == [said]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_a_model_trained_on_another_backend_writes_every_output_and_predicts_the_same_on_tensorflow(
        tmp_path: Path, data_dir: Path, backend: str) -> None:
    # float32: in bfloat16 (auto on AVX512-BF16 and AMX CPUs) each backend rounds its own way, about 1e-3
    trained = run_cli("--data-dir", data_dir, "--plots-dir", tmp_path / "plots", "--model-path",
                      tmp_path / "m.keras", *TINY, "--limit", "1600", "--precision", "float32",
                      env={"KERAS_BACKEND": backend})
    assert trained.returncode == 0, trained.stderr
    assert f"Backend: {backend};" in trained.stdout and "Traceback" not in trained.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy.png", "architecture.png", "confusion_matrix.png", "history.csv", "loss.png", "metrics.json",
        "predictions.png"]
    metrics = json.loads((tmp_path / "plots" / "metrics.json").read_text())
    assert metrics["config"]["backend"] == backend and metrics["test_accuracy"] > 0.3
    assert metrics["versions"][backend] == importlib.metadata.version(backend), "the backend's version is recorded"
    from PIL import Image
    for label in range(10):
        Image.fromarray(class_image(label, seed=7)).save(tmp_path / f"{label}.png")
    classes = {}
    for reader in (backend, "tensorflow"):
        proc = run_cli("--predict", *sorted(tmp_path.glob("*.png")), "--model-path", tmp_path / "m.keras",
                       "--plots-dir", tmp_path / reader, "--json", "--backend", reader)
        assert proc.returncode == 0, proc.stderr
        classes[reader] = [(r["class"], round(r["probability"], 5)) for r in json.loads(proc.stdout)]
    assert classes[backend] == classes["tensorflow"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAX, reason="JAX is not installed (requirements-dev.txt installs it)")
def test_mirrored_on_jax_is_data_parallel_over_two_cpu_devices_and_matches_one_device(
        tmp_path: Path, data_dir: Path) -> None:
    runs = {}
    for name, env in (("one", {}), ("two", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})):
        flags = ["--distribute", "mirrored"] if name == "two" else []
        proc = run_cli("--data-dir", data_dir, "--plots-dir", tmp_path / name, "--model-path", tmp_path / f"{name}.keras",
                       *TINY, "--backend", "jax", "--precision", "float32", *flags, env=env)  # bfloat16: to 3e-5
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "DataParallel: 2 replica(s) on cpu:0, cpu:1" in proc.stdout
    # One global random state draws the same dropout masks for both replicas' halves: the same run, to rounding.
    assert runs["two"]["history"]["val_loss"] == pytest.approx(runs["one"]["history"]["val_loss"], rel=1e-5)
    assert runs["two"]["test_accuracy"] == pytest.approx(runs["one"]["test_accuracy"], abs=0.005)


@pytest.mark.parametrize(("line", "level", "noise"), [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", 3, True),
    ("I0000 00:00:1795926651.110019    2377 port.cc:153] oneDNN custom operations are on. You may see\n", 3, True),
    ("I0000 00:00:1795926651.110019    2377 port.cc:153] oneDNN custom operations are on.\n", 0, False),
    ("W0000 00:00:1795926651.110019    2377 cpu_feature_guard.cc:227] This TensorFlow binary\n", 2, True),
    ("W0000 00:00:1795926651.110019    2377 cpu_feature_guard.cc:227] This TensorFlow binary\n", 1, False),
    ("E0000 00:00:1795926651.110019    2377 cuda_dnn.cc:8310] Unable to register cuDNN factory\n", 3, True),
    ("F0000 00:00:1795926651.110019    2377 platform.cc:10] Check failed: the CPU lacks AVX\n", 3, False),
    ("2024-01-11 05:40:05.061907: I tensorflow/core/platform/cpu_feature_guard.cc:182] This TensorFlow\n", 3, True),
    ("ImportError: libcudart.so.12: cannot open shared object file\n", 3, False),
])
def test_only_tensorflow_startup_lines_below_the_log_level_are_dropped(line: str, level: int, noise: bool) -> None:
    assert backends.is_startup_noise(line, level) is noise


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
@pytest.mark.parametrize("before", [None, "--xla_dump_to=/tmp/x"])
def test_jax_is_asked_for_deterministic_gpu_ops_and_other_xla_flags_are_kept(monkeypatch: pytest.MonkeyPatch,
                                                                           before: str | None) -> None:
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with contextlib.suppress(common.UserError):  # Keras may be loaded on TensorFlow in this process already
        backends.use_backend("jax")
    assert os.environ["XLA_FLAGS"].split() == [*([before] if before else []), backends.DETERMINISTIC_XLA]


@pytest.mark.parametrize(("installed", "chosen", "note"), [
    ({"tensorflow", "jax", "torch"}, "tensorflow", ""),
    ({"jax", "torch"}, "jax", " (TensorFlow is not installed; jax is)"),
    ({"torch"}, "torch", " (TensorFlow is not installed; torch is)"),
    (set(), "tensorflow", ""),  # nothing: use_backend then says what to install
])
def test_without_tensorflow_the_default_backend_is_one_that_is_installed_and_says_so(
        monkeypatch: pytest.MonkeyPatch, installed: set[str], chosen: str, note: str) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name in ("tensorflow", "jax", "torch"):
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(backends, "fallback_note", "")
    assert cnn.parse_args([]).backend == chosen
    assert backends.fallback_note == note


def test_jax_keeps_what_it_compiled_for_the_next_run_where_the_user_keeps_nothing_else(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "KERAS_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with contextlib.suppress(common.UserError):  # Keras may be loaded on TensorFlow in this process already
        backends.use_backend("jax")
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "fashion_cnn" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    with contextlib.suppress(common.UserError):
        backends.use_backend("jax")
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine"), "the user's own cache is kept"
