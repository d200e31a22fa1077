"""Shared fixtures: synthetic Fashion-MNIST-shaped IDX files and a CLI runner.

The data is made here, never downloaded: 60,000 + 10,000 28x28 uint8 images
whose class is a bright shape (a bar, a disc, a ring, a cross...) on a noisy dark
background, so a tiny network learns it in an epoch or two. Like a Fashion-MNIST
item, each shape's longest side spans the frame and it is centred, so the class
survives what --predict does to a photo: crop to the item, fit it to 28 pixels. Full-size files keep the program's shape
checks honest (writing them takes about a second); a tiny network (--filters 4) and
--limit keep the runs fast. Tests that train or import TensorFlow are marked slow;
`-m "not slow"` runs the rest in under 20 s on 2 cores.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from fashion_cnn import data_files

# A shell that starts the tests in the background (`cmd &`, no job control) makes them ignore SIGINT, and the
# programs they start would inherit that: the tests of Ctrl-C need it to act as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# JAX keeps what it compiles between runs (fashion_cnn.backends); the tests' runs share one cache of their own,
# removed by the process that made it
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fashion_cnn_tests_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "ConvolutionalNN.py"
REAL_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
FILES = data_files.IDX_FILES  # the four files, by what they hold
# A small, fast network and run for CLI tests.
TINY = ["--filters", "4", "--dense-units", "16", "--limit", "640", "--batch-size", "32", "--epochs", "1",
        "--lr", "0.01"]
# The shared trained model: enough images that it learns the synthetic classes (validation accuracy 1.0).
TRAINED = [*TINY, "--limit", "3200", "--epochs", "2"]
# On the synthetic data, lr 3 is dead from the first epoch (9-12% validation accuracy, loss 2.47, 2.34, 2.35), and
# lr 0.0001 is a slow starter: 9-12% accuracy for five epochs, but its loss falls (2.292, 2.283, 2.277...).
DEAD_AND_SLOW = [*TINY, "--epochs", "4", "--schedule", "constant", "--lr", "3", "0.0001"]
STUDY = [*TINY, "--epochs", "3", "--lr", "3", "0.01", "0.003", "--seeds", "0", "1"]  # lr 3 stalls at chance


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a gzipped IDX file (stored, not compressed: five times faster to write, and gzip all the same)."""
    path.write_bytes(gzip.compress(idx_bytes(array), compresslevel=0))


def write_kaggle_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images and labels as Kaggle's Fashion-MNIST CSV does: a header, then label and 784 pixels a row."""
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    rows = np.column_stack([labels, images.reshape(len(images), -1)])
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")


def synthetic_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of shape class `label` (SHAPES) on noise."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), count // 10)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
    for label in range(10):
        images[labels == label] = np.where(SHAPES[label], 220, images[labels == label])
    return images, labels


def shapes() -> np.ndarray:
    """The ten class shapes as (10, 28, 28) masks: each spans the frame along its longest side, centred, and
    leaves most of the border dark (a light border reads as a light background to be inverted)."""
    r, c = np.mgrid[0:28, 0:28]
    radius = np.hypot(r - 13.5, c - 13.5)
    vertical, horizontal = (c >= 10) & (c <= 17), (r >= 10) & (r <= 17)
    return np.stack([
        vertical,                                            # 0 a vertical bar
        horizontal,                                          # 1 a horizontal bar
        radius <= 14,                                        # 2 a disc
        (radius <= 14) & (radius >= 8),                      # 3 a ring
        vertical | horizontal,                               # 4 a cross
        (np.abs(r - c) <= 3) | (np.abs(r + c - 27) <= 3),    # 5 an X
        np.abs(c - 13.5) <= (r + 1) / 2,                     # 6 a triangle, apex up
        ((c >= 3) & (c <= 9)) | ((c >= 18) & (c <= 24)),     # 7 two vertical bars
        np.abs(r - 13.5) + np.abs(c - 13.5) <= 14,           # 8 a diamond
        (r <= 7) | vertical,                                 # 9 a T
    ])


SHAPES = shapes()


def write_dataset(folder: Path) -> dict[str, np.ndarray]:
    """Write the four synthetic IDX files into folder; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = synthetic_split(60_000, seed=1)
    x_test, y_test = synthetic_split(10_000, seed=2)
    arrays = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    for key, name in FILES.items():
        write_idx_gz(folder / name, arrays[key])
    return arrays


@pytest.fixture(autouse=True)
def run_in_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, so that default outputs (plots/, models/) never land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four synthetic Fashion-MNIST-shaped files."""
    folder = tmp_path_factory.mktemp("fashion")
    write_dataset(folder)
    return folder


@pytest.fixture(scope="session")
def test_arrays(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic test images and labels, as the program reads them."""
    x, y = synthetic_split(10_000, seed=2)
    return x, y


def cli_environment(env: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with env added (a variable given as None left out), output unbuffered."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return {key: value for key, value in merged.items() if value is not None}


def run_cli(*args: str | os.PathLike, cwd: Path | None = None, env: dict[str, str | None] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ConvolutionalNN.py as a user would, capturing its output (env: cli_environment)."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, cwd=cwd, env=cli_environment(env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, object]:
    """One tiny CLI training run shared by the tests that only read its outputs or use its model."""
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("--data-dir", data_dir, "--plots-dir", out / "plots", "--model-path", out / "model.keras",
                   *TRAINED)
    assert proc.returncode == 0, proc.stderr
    return {"dir": out, "plots": out / "plots", "model": out / "model.keras", "proc": proc}


@pytest.fixture(scope="session")
def sequential_study(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """A 3 rates x 2 seeds study trained here, one run after another."""
    plots = tmp_path_factory.mktemp("seq") / "plots"
    ran = call_main("--data-dir", data_dir, "--plots-dir", plots, "--model-path", plots.parent / "m.keras", *STUDY)
    assert ran.returncode == 0, ran.stderr
    read = (lambda name: json.loads((plots / name).read_text()))
    return {"stdout": ran.stdout, "study": read("lr_study.json"), "metrics": read("metrics.json")}


@dataclasses.dataclass
class Ran:
    """What an in-process call of main() returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def call_main(*args: str | os.PathLike) -> Ran:
    """Call ConvolutionalNN.main in this process (TensorFlow is imported once) and capture what it prints; a usage
    error's SystemExit becomes its exit status, as `sys.exit(main())` makes it for the shell."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cnn.main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def class_image(label: int, seed: int = 0) -> np.ndarray:
    """A new 28x28 image of the synthetic class `label`, drawn like the training data."""
    image = np.random.default_rng(seed).integers(0, 40, size=(28, 28), dtype=np.uint8)
    return np.where(SHAPES[label], 220, image).astype(np.uint8)


# Tests that share an expensive module or session fixture run on one worker, so that it is made once; the others
# are spread over the workers one by one. The signals and cluster modules are about half the full suite's time on
# 2 cores.
SIGNALS_AND_CLUSTER = "signals and Ray cluster"
XDIST_GROUPS = {"test_journal": SIGNALS_AND_CLUSTER, "test_ray_cluster": SIGNALS_AND_CLUSTER}
SHARED_FIXTURES = {"trained": "the trained model", "sequential_study": "the study of 3 rates x 2 seeds",
                   "local_ray": "the study of 3 rates x 2 seeds"}


def xdist_group_of(item: pytest.Item) -> str | None:
    """The group a test runs in, or None: it needs nothing made once for several tests."""
    module = item.module.__name__ if item.module else ""
    if module in XDIST_GROUPS:
        return XDIST_GROUPS[module]
    return next((group for name, group in SHARED_FIXTURES.items() if name in item.fixturenames), None)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist's loadgroup (pyproject.toml), run each group on one worker (xdist_group_of)."""
    for item in items:
        group = xdist_group_of(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
