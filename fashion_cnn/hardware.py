"""Precision, memory and devices: what this machine runs fast (--precision auto), whether the network fits in its
memory before training starts, and one run on every local GPU (--distribute mirrored).

Needs Keras (fashion_cnn.backends); reads /proc and cgroups on Linux, and says nothing where they are missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fashion_cnn.backends import backend_name, import_keras, import_tensorflow
from fashion_cnn.common import (
    CLASS_NAMES,
    EVALUATION_BATCH,
    IMAGE_SIDE,
    Settings,
    UserError,
    first_line,
    setting_defaults,
)

KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # oneDNN runs bfloat16 convolutions fast only with these


def conv_sides(kernel_size: int, padding: str) -> tuple[int, int]:
    """Output side of each of the two Conv2D layers (each is followed by 2x2 pooling)."""
    sides, side = [], IMAGE_SIDE
    for _ in range(2):
        side = side if padding == "same" else side - kernel_size + 1
        sides.append(side)
        side //= 2
    return sides[0], sides[1]


def parameter_count(cfg: Settings) -> int:
    """The network's number of weights, as build_model makes it."""
    k, f, d = cfg.kernel_size, cfg.filters, cfg.dense_units
    flat = (conv_sides(k, cfg.padding)[1] // 2) ** 2 * f
    return (k * k * f + f) + (k * k * f * f + f) + (flat * d + d) + (d * len(CLASS_NAMES) + len(CLASS_NAMES))


def training_flops_per_image(cfg: Settings) -> float:
    """Floating-point operations that training costs per image: the conv and dense layers' multiply-adds, x2 for
    FLOPs, x3 for the forward and backward passes."""
    side1, side2 = conv_sides(cfg.kernel_size, cfg.padding)
    k2 = cfg.kernel_size ** 2
    flat = (side2 // 2) ** 2 * cfg.filters
    macs = (side1**2 * cfg.filters * k2 + side2**2 * cfg.filters * cfg.filters * k2
            + flat * cfg.dense_units + cfg.dense_units * len(CLASS_NAMES))
    return 2 * 3 * macs


# A compiled call of the training function runs several steps without returning to Python, so that a step costs
# no round trip to the host (fashion_cnn.jax_steps on JAX; Keras's own loop on TensorFlow and PyTorch); Ctrl-C
# is noticed between calls. A call gets about CALL_SECONDS of arithmetic at a rate each kind of device sustains on
# this network (a 2-core Zen 3: 62 GFLOP/s in float32; an H200 in bfloat16 far more), and at most
# MAX_STEPS_PER_CALL steps. On JAX the steps of a call run as one loop (lax.scan), except on a CPU with larger
# convolutions: XLA's CPU backend computes a convolution inside a loop with plain loops instead of its library
# kernels, some 10% faster at 1 to 4 filters and 2 to 50 times slower from 8 up (benchmarks/throughput.py,
# docs/RESULTS.md), so there the steps are written out one after another, and every one more lengthens the compiling.
CALL_SECONDS = 1.0
SUSTAINED_GFLOPS = {"cpu": 50.0, "gpu": 20_000.0}
LOOP_ON_CPU_UP_TO_FILTERS = 4
MAX_STEPS_PER_CALL = {"loop": 250, "written out": 4, "gpu": 10_000}


def steps_in_a_loop(cfg: Settings, device: str) -> bool:
    """Whether JAX runs the steps of a call as one loop on `device` (cpu or gpu), or writes them out."""
    return device != "cpu" or cfg.filters <= LOOP_ON_CPU_UP_TO_FILTERS


def steps_per_execution(cfg: Settings, steps_per_epoch: int, device: str) -> int:
    """How many training steps one compiled call runs on `device` (cpu or gpu): about CALL_SECONDS of work, at
    least 1, at most an epoch. The same settings on the same kind of device give the same number. The number
    changes how often Keras returns to Python, not what the steps compute (but for the last bits of rounding,
    where XLA fuses steps written out one after another). One under TensorFlow's MirroredStrategy, whose replicas
    fail inside Keras's loop of steps (keras-team/keras#19246)."""
    if cfg.distribute == "mirrored" and backend_name() == "tensorflow":
        return 1
    step_flops = training_flops_per_image(cfg) * cfg.batch_size + 20 * parameter_count(cfg)  # + Adam, the average
    affordable = int(CALL_SECONDS * SUSTAINED_GFLOPS[device] * 1e9 // step_flops)
    most = MAX_STEPS_PER_CALL["gpu" if device != "cpu" else "loop" if steps_in_a_loop(cfg, device) else "written out"]
    return max(1, min(affordable, most, steps_per_epoch))


def training_memory(cfg: Settings) -> dict[str, int]:
    """Bytes that training the network needs, roughly, by what holds them (float32 throughout)."""
    weights = 4 * parameter_count(cfg)
    side1, side2 = conv_sides(cfg.kernel_size, cfg.padding)
    per_image = cfg.filters * (side1**2 + (side1 // 2) ** 2 + side2**2 + (side2 // 2) ** 2) + cfg.dense_units
    return {
        "weights and gradients": weights * 2,
        "optimizer state": weights * 2,  # Adam's two moments
        "the average": weights if cfg.ema else 0,
        "copies kept": weights * 2,  # the best epoch's weights and the last validated ones (RunKeeper)
        # a training batch's outputs, their gradients and dropout masks, or a validation batch's outputs
        "activations of one batch": 4 * per_image * max(cfg.batch_size * 3, EVALUATION_BATCH),
    }


def check_memory(cfg: Settings, available: int | None) -> None:
    """Refuse, before any training, a network that needs more memory than the machine has."""
    need = training_memory(cfg)
    if available is None or sum(need.values()) <= available:
        return
    sizes = {"filters": "--filters", "dense_units": "--dense-units", "batch_size": "--batch-size",
             "kernel_size": "--kernel-size"}
    defaults = setting_defaults(cfg)
    flags = [f"{flag} {getattr(cfg, key)}" for key, flag in sizes.items() if getattr(cfg, key) != defaults[key]]
    parts = ", ".join(f"{what} {gigabytes(size)}" for what, size in need.items() if size)
    raise UserError(f"{' '.join(flags) or 'this network'} needs about {gigabytes(sum(need.values()))} of memory to "
                    f"train ({parts}); this machine has {gigabytes(available)} available. Use smaller sizes")


def gigabytes(size: float) -> str:
    """A byte count for people: '1.2 GB', '0.004 GB'."""
    return f"{size / 1e9:,.{1 if size >= 1e8 else 3}f} GB"


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the system's available memory, within a container's limit;
    None where the OS does not say."""
    try:
        meminfo = Path("/proc/meminfo").read_text(encoding="ascii")
        free = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit, used = (cgroup / "memory.max").read_text().strip(), (cgroup / "memory.current").read_text()
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


@contextlib.contextmanager
def out_of_memory_as_error() -> Iterator[None]:
    """An out-of-memory error from NumPy or the backend as one line (nothing is written by a run that fails)."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory ({first_line(e)[:200]}); nothing was written. Use a smaller --filters, "
                        "--dense-units or --batch-size") from None


def is_out_of_memory(e: Exception) -> bool:
    """Whether e says that memory ran out: NumPy's MemoryError, TensorFlow's ResourceExhaustedError, PyTorch's
    OutOfMemoryError, or XLA's RESOURCE_EXHAUSTED on JAX (told by name: none of them needs importing)."""
    name = type(e).__name__
    return isinstance(e, MemoryError) or name in ("ResourceExhaustedError", "OutOfMemoryError") or (
        name in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(e))


def peak_memory_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kilobytes / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def compute_device() -> str:
    """What the backend computes on: gpu where it sees one, else cpu."""
    return "gpu" if gpu_capabilities() else "cpu"


def gpu_capabilities() -> list[tuple[int, int]]:
    """CUDA compute capability of each GPU the backend sees ((0, 0) where it does not say)."""
    backend = backend_name()
    if backend == "jax":
        import jax

        return [capability(getattr(d, "compute_capability", "")) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    tf = import_tensorflow()
    return [capability(tf.config.experimental.get_device_details(gpu).get("compute_capability"))
            for gpu in tf.config.list_physical_devices("GPU")]


def capability(value: Any) -> tuple[int, int]:
    """A compute capability as (major, minor), from TensorFlow's pair or JAX's "9.0"; (0, 0) if unknown."""
    try:
        major, minor = (int(v) for v in (value.split(".") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        return 0, 0
    return major, minor


def choose_precision(requested: str, gpus: list[tuple[int, int]], flags: set[str]) -> tuple[str, str]:
    """The precision to train in, and why; `auto` picks what this hardware runs fastest.

    Mixed precision keeps float32 weights and a float32 output layer either way.
    """
    if requested != "auto":
        return requested, "asked for with --precision"
    if gpus:
        if min(gpus) >= (8, 0):
            return "bfloat16", "auto: every GPU has bfloat16 tensor cores"
        if min(gpus) >= (7, 0):
            return "float16", "auto: every GPU has float16 tensor cores"
        return "float32", "auto: these GPUs have no fast half precision"
    found = sorted(flags.intersection(CPU_BF16_FLAGS))
    if found:
        return "bfloat16", f"auto: this CPU has {' and '.join(found)}"
    return "float32", "auto: this CPU has no AMX or AVX512-BF16, on which bfloat16 would be slower"


def set_precision(requested: str) -> tuple[str, str]:
    """Resolve --precision on this machine and make it Keras's global dtype policy."""
    keras = import_keras()

    precision, why = choose_precision(requested, gpu_capabilities(), cpu_flags())
    keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    return precision, why


def distribution_scope(distribute: str) -> contextlib.AbstractContextManager:
    """Where to build the model: with --distribute mirrored a MirroredStrategy's scope on TensorFlow (on JAX,
    Keras's DataParallel is set for the process instead), else nowhere special."""
    if distribute != "mirrored":
        return contextlib.nullcontext()
    keras = import_keras()
    if keras.backend.backend() == "jax":
        devices = keras.distribution.list_devices()  # the GPUs (or TPUs), else the CPU devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        print(f"DataParallel: {len(devices)} replica(s) on {', '.join(devices)}; --batch-size is split across them",
              flush=True)
        return contextlib.nullcontext()

    # Every GPU; without one, every logical CPU device (one, unless the caller split the CPU for testing).
    tf = import_tensorflow()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    devices = ", ".join(strategy.extended.worker_devices)
    print(f"MirroredStrategy: {strategy.num_replicas_in_sync} replica(s) on {devices}; "
          "--batch-size is split across them", flush=True)
    return strategy.scope()
