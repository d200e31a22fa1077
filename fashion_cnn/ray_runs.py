"""--ray: the runs of a call (rates x seeds) as Ray tasks on a local Ray instance or a cluster; each node reads the
data itself, and a task that fails after its retries is reported as failed while the rest are reported as usual.

Needs Ray (pip install ray). The package's code travels with each task (cloudpickle, by value): nodes need the
libraries of requirements.txt and the data, not this program's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import socket
import sys
from collections.abc import Callable
from typing import Any

from fashion_cnn.backends import backend_name, import_tensorflow, use_backend
from fashion_cnn.common import (
    BEST_MONITOR,
    DIVERGED,
    FAILED,
    Settings,
    TrainResult,
    UserError,
    first_line,
    how_it_ended,
)

RAY_RETRIES = 2  # Ray runs a task again this often if it raises or its worker or node is lost
TrainOne = Callable[[Settings, float, int], tuple[TrainResult, int]]  # (cfg, lr, seed) -> the run, its steps per epoch
BuildModel = Callable[[Settings, float, int], Any]  # (cfg, lr, steps per epoch) -> the network, compiled


def connect_ray(address: str, *shipped: Callable[..., Any]) -> tuple[Any, bool]:
    """Ray, connected to a new local instance ("local", on 127.0.0.1 only) or to the cluster at address.

    Also says whether this call connected (and so should disconnect): a caller that
    ran ray.init() itself, in a notebook or a test, keeps its own connection. The package's code and the modules
    of the `shipped` functions travel with each task (ship_code).
    """
    if address == "local":
        # A one-machine instance: Ray then listens on 127.0.0.1 only, not on every network interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray; install it with: pip install ray") from None
    ship_code(ray, *shipped)
    if ray.is_initialized():
        return ray, False
    import logging

    # Ray 2.52+ announces on stderr that it turned its token authentication on; that is the safe default, not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled for this Ray cluster"))
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ["TF_CPP_MIN_LOG_LEVEL"]}})
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({first_line(e)})") from None
    return ray, True


def ship_code(ray: Any, *functions: Callable[..., Any]) -> None:
    """Make cloudpickle send this package's code, and the modules of functions, with each task by value, so that
    cluster nodes need the libraries but not these files. The script run as __main__ always travels by value."""
    modules = {__name__.partition(".")[0], *(f.__module__ for f in functions)} - {"__main__"}
    for name in sorted(modules):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])


def ray_address_parts(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address, or None if it is not one."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else None


def check_ray_reachable(address: str) -> None:
    """Fail at once if nothing answers at a HOST:PORT cluster address (ray.init would retry for minutes)."""
    parts = ray_address_parts(address)
    if parts is None:
        return
    try:
        with socket.create_connection(parts, timeout=10):
            pass
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); "
                        "start one with 'ray start --head', or check the address") from None


def use_task_cpus() -> None:
    """Let TensorFlow (or PyTorch) use only the CPUs Ray gave this task, so parallel tasks don't fight over cores;
    JAX sizes its thread pool when it starts."""
    import ray

    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    backend = backend_name()
    if backend == "torch":
        import torch

        torch.set_num_threads(cpus)
    if backend != "tensorflow":
        return
    tf = import_tensorflow()
    with contextlib.suppress(RuntimeError):  # a reused worker process has set them already
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)


def ray_task(cfg: Settings, lr: float, seed: int, train_one: TrainOne) -> dict[str, Any]:
    """One run as a Ray task on whichever node Ray picks: train_one reads the data there and trains; what comes back
    is the run's figures and its best weights."""
    use_backend(cfg.backend)
    use_task_cpus()
    r, steps_per_epoch = train_one(cfg, lr, seed)
    return {"history": r.history, "best_epoch": r.best_epoch, "best_value": r.best_value, "seconds": r.seconds,
            "precision": r.precision, "node": platform.node(), "steps_per_epoch": steps_per_epoch,
            "weights": r.model.get_weights() if r.best_epoch is not None else None}


def result_from_task(cfg: Settings, lr: float, seed: int, out: dict[str, Any], build_model: BuildModel
                     ) -> TrainResult:
    """Rebuild a run's model here from the weights its Ray task sent back."""
    model = None
    if out["weights"] is not None:
        model = build_model(cfg, lr, out["steps_per_epoch"])
        model.set_weights(out["weights"])
    return TrainResult(model, lr, seed, out["history"], best_epoch=out["best_epoch"], best_value=out["best_value"],
                       seconds=out["seconds"], precision=out["precision"],
                       ended=how_it_ended(out["history"], cfg.epochs))


def train_on_ray(cfg: Settings, train_one: TrainOne, build_model: BuildModel, task: Any = ray_task
                 ) -> list[TrainResult]:
    """Run every (rate, seed) as a Ray task that calls train_one; a task that still fails after its retries is
    reported as failed."""
    ray, connected = connect_ray(cfg.ray or "local", train_one, build_model)
    try:
        shipped = dataclasses.replace(cfg, data_dir=cfg.data_dir.resolve() if cfg.data_dir else None)
        if cfg.tensorboard:
            from fashion_cnn.tensorboard_logs import with_tensorboard_group

            shipped = with_tensorboard_group(shipped)
        resources = ray.cluster_resources()
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RAY_RETRIES, retry_exceptions=True)(task)
        pending = {remote.remote(shipped, lr, seed, train_one): (lr, seed) for lr, seed in cfg.runs}
        print(f"Ray: {len(pending)} runs on {len(ray.nodes())} node(s) with {resources.get('CPU', 0):g} CPUs and "
              f"{resources.get('GPU', 0):g} GPUs; one CPU{' and one GPU' if gpus else ''} per run", flush=True)
        done: dict[tuple[float, int], TrainResult] = {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            lr, seed = pending.pop(ref)
            try:
                done[lr, seed] = result_from_task(cfg, lr, seed, ray.get(ref), build_model)
                status = DIVERGED if done[lr, seed].ended == DIVERGED else \
                    f"best {BEST_MONITOR} {done[lr, seed].best_value}"
            except ray.exceptions.RayError as e:
                reason = first_line(getattr(e, "cause", None) or e)
                done[lr, seed] = TrainResult(None, lr, seed, {}, best_epoch=None, best_value=None, seconds=0.0,
                                             ended=FAILED, failure=reason)
                status = f"FAILED after {RAY_RETRIES} retries: {reason}"
            print(f"Ray: run lr={lr:g}, seed {seed} finished ({len(done)} of {len(cfg.runs)}): {status}", flush=True)
    finally:
        if connected:
            ray.shutdown()
    return [done[run] for run in cfg.runs]
