"""Keras on the backend the user picks, imported once and quietly, and the program's Keras classes joined to
their bases.

Needs Keras and the backend's own package: TensorFlow, JAX or PyTorch. On JAX and PyTorch nothing imports
TensorFlow but what only TensorFlow has (--tensorboard). Every use of Keras or TensorFlow in the program goes
through import_keras() or import_tensorflow().
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from fashion_cnn.common import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ log is noise here; real failures raise in Python
# TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512-VNNI/BF16, AMX or AVX-VNNI; on an
# AVX2-only Zen 3 they make a whole epoch 1.3x faster than the default Eigen kernels (docs/RESULTS.md).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# JAX on a GPU: without it, reductions and cuDNN's choice of algorithm vary from run to run, so that the same seed
# did not give the same run there (93.72% and 93.78% from one command on an H200, docs/RESULTS.md).
DETERMINISTIC_XLA = "--xla_gpu_deterministic_ops=true"
BACKENDS = {  # Keras backend -> (the module it needs, how to install it)
    "tensorflow": ("tensorflow", "pip install -r requirements.txt"),
    "jax": ("jax", "pip install 'jax[cpu]' (an NVIDIA GPU: 'jax[cuda12]')"),
    "torch": ("torch", "pip install torch --index-url https://download.pytorch.org/whl/cpu (a GPU: pip install torch)"),
}
# C++ log lines that TensorFlow writes while it loads, before it applies TF_CPP_MIN_LOG_LEVEL: absl's banner and
# lines like "I0000 00:00:1795926651.110019 2377 port.cc:153] oneDNN custom operations are on. ..." (CPUs with
# AVX512-VNNI, AVX512-BF16, AMX or AVX-VNNI, where oneDNN is on by default).
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
NATIVE_LOG_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] "                          # absl
                             r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) \S+:\d+\] ")  # older TF
LOG_LEVELS = "IWEF"  # TF_CPP_MIN_LOG_LEVEL n hides the first n of these; FATAL is always shown


def is_startup_noise(line: str, min_level: int) -> bool:
    """True for a TensorFlow start-up log line that TF_CPP_MIN_LOG_LEVEL=min_level should have hidden."""
    if line.rstrip("\n") == ABSL_BANNER:
        return min_level >= 1
    match = NATIVE_LOG_LINE.match(line)
    return bool(match) and LOG_LEVELS.index(match.group(1) or match.group(2)) < min(min_level, 3)


@contextlib.contextmanager
def native_stderr_filtered(min_level: int) -> Iterator[None]:
    """Capture file descriptor 2 (where C++ writes) for the block, then pass on every line but start-up noise."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                                     if not is_startup_noise(line, min_level)))
            sys.stderr.flush()


DEFAULT_BACKEND = "tensorflow"
fallback_note = ""  # why this process runs on another backend than the one asked for by default, if it does


def default_backend() -> str:
    """The backend where neither --backend nor KERAS_BACKEND names one: TensorFlow; where it is not installed but
    JAX or PyTorch is (requirements-jax.txt), the first of those, noted for the run's backend line."""
    global fallback_note
    if importlib.util.find_spec(BACKENDS[DEFAULT_BACKEND][0]) is not None:
        return DEFAULT_BACKEND
    for backend, (module, _) in BACKENDS.items():
        if importlib.util.find_spec(module) is not None:
            fallback_note = f" (TensorFlow is not installed; {module} is)"
            return backend
    return DEFAULT_BACKEND  # none is installed: use_backend says what to install


def compilation_cache() -> str:
    """Where JAX keeps what it compiled, so that the next run with the same shapes does not compile again."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "fashion_cnn", "jax")


def use_backend(backend: str) -> None:
    """Make Keras load on `backend` (KERAS_BACKEND), or say in one line what to install or why it cannot be."""
    module, install = BACKENDS[backend]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"the {backend} backend needs {module}, which is not installed: {install}")
    flags = os.environ.get("XLA_FLAGS", "")
    if backend == "jax" and "xla_gpu_deterministic_ops" not in flags:  # read when JAX first uses a device
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA}".strip()
    if backend == "jax":  # read when JAX is imported; a cache the user set stays theirs
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", compilation_cache())
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise UserError(f"Keras is already loaded on {sys.modules['keras'].backend.backend()} in this process; "
                        f"start a new one for --backend {backend}")
    os.environ["KERAS_BACKEND"] = backend


def import_keras() -> Any:
    """Keras (on the backend use_backend chose), imported once with TensorFlow's start-up log lines kept off stderr
    (Keras imports TensorFlow when it is the backend, and only then).

    Every use of Keras or TensorFlow in the program goes through here or import_tensorflow, so that no path
    (training, the study, --predict, Ray tasks) prints them.
    """
    if "keras" not in sys.modules:
        with quiet_native_start():
            import keras  # noqa: F401
    return sys.modules["keras"]


def import_tensorflow() -> Any:
    """TensorFlow, imported once and quietly: the tensorflow backend's own module; on JAX and PyTorch only what
    TensorFlow alone has asks for it (--tensorboard)."""
    import_keras()
    if "tensorflow" not in sys.modules:
        with quiet_native_start():
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]


def backend_name() -> str:
    """The Keras backend this process runs on: tensorflow, jax or torch."""
    return import_keras().backend.backend()


def quiet_native_start() -> contextlib.AbstractContextManager:
    """native_stderr_filtered at the level TF_CPP_MIN_LOG_LEVEL sets."""
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    return native_stderr_filtered(level)


def on_keras(mixin: type, base: str) -> type:
    """mixin joined to a Keras class such as "callbacks.Callback": the program imports Keras only when it trains
    or predicts, so its Keras subclasses are written as mixins and joined to their base here. Made anew on each
    call (not cached): Ray ships the program's functions to its workers by value, a cache wrapper by name."""
    return type(mixin.__name__, (mixin, functools.reduce(getattr, base.split("."), import_keras())), {})


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    import matplotlib
    import sklearn

    keras = import_keras()
    backend = BACKENDS[keras.backend.backend()][0]  # the module Keras runs on: tensorflow, jax or torch
    return {"python": platform.python_version(), "keras": keras.__version__, backend: sys.modules[backend].__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__}
