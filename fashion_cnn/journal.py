"""Signals and the resume journal: Ctrl-C or SIGTERM stops a run after its batch, and what a run did so far
(history, best epoch and its weights) is saved after every epoch beside the model, so that --resume continues it.

Needs NumPy; the weights are written atomically (fashion_cnn.outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import Settings, UserError, epochs_done, first_line
from fashion_cnn.outputs import atomic_path, write_json


class TrainingInterrupted(Exception):
    """Raised inside fit() after the batch during which SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying; a second signal kills as usual."""
    received: list[int] = []

    def note(signum: int, _frame: Any) -> None:
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name} received: stopping after this batch "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_root(cfg: Settings) -> Path:
    """Where unfinished runs keep what --resume needs (beside the model)."""
    return cfg.model_path.with_name(f".{cfg.model_path.stem}.resume")


def run_folder(cfg: Settings, lr: float, seed: int) -> Path:
    """One run's resume folder: the root itself for a single run, a subfolder per run otherwise."""
    root = resume_root(cfg)
    return root if cfg.single_run else root / f"lr{lr:g}-seed{seed}"


def nothing_to_resume(folder: Path) -> UserError:
    """The error for --resume where no unfinished run is saved."""
    return UserError(f"nothing to resume at {folder}: no unfinished run with this --model-path; run without --resume")


def discard_unfinished_run(cfg: Settings) -> None:
    """Without --resume, discard the unfinished run of this --model-path, if there is one."""
    root = resume_root(cfg)
    if not cfg.resume and root.exists():
        print(f"Note: starting afresh; discarding the unfinished run saved in {root}")
        shutil.rmtree(root)


@dataclasses.dataclass
class RunState:
    """Progress of a run as saved after every epoch: enough to resume it."""

    identity: dict[str, Any]
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    best_epoch: int | None = None        # 1-based
    best_value: float | None = None      # BEST_MONITOR at best_epoch
    best_weights: list[np.ndarray] | None = None
    seconds: float = 0.0                 # training time of the finished epochs, across resumes
    finished: bool = False               # all epochs done (kept until the other runs of a study finish)

    def save(self, folder: Path) -> None:
        """Write the best weights, then the JSON that points at them, each atomically."""
        if self.best_weights is not None:
            with atomic_path(folder / "best_weights.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, *self.best_weights)
        meta = {"identity": self.identity, "history": self.history, "seconds": self.seconds,
                "best_epoch": self.best_epoch, "best_value": self.best_value, "finished": self.finished}
        write_json(folder / "state.json", meta)

    @classmethod
    def load(cls, folder: Path) -> RunState:
        """Read a saved state, or say there is nothing to resume."""
        try:
            meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            weights = None
            if meta["best_epoch"] is not None:
                with np.load(folder / "best_weights.npz") as npz:
                    weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except FileNotFoundError:
            raise nothing_to_resume(folder) from None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"the resume state in {folder} is damaged ({first_line(e)}); "
                            "run without --resume to start afresh") from None
        history = {k: [math.nan if v is None else v for v in vs] for k, vs in meta["history"].items()}
        return cls(meta["identity"], history, meta["best_epoch"], meta["best_value"], weights, meta["seconds"],
                   meta.get("finished", False))


def resume_state(cfg: Settings, identity: dict[str, Any], folder: Path) -> RunState:
    """A fresh state, or (with --resume) the one saved in folder after checking that nothing that matters changed.

    In a study resumed with --resume, a run that had not started yet starts afresh.
    """
    if not cfg.resume or (not cfg.single_run and not (folder / "state.json").exists()):
        return RunState(identity)
    state = RunState.load(folder)
    changed = [f"{k} was {state.identity.get(k)!r}, now {v!r}" for k, v in identity.items()
               if state.identity.get(k) != v]
    if changed:
        raise UserError(f"cannot resume with different settings ({'; '.join(changed)}); "
                        "use the original flags, or run without --resume to start afresh")
    print("Already finished; using the saved result" if state.finished
          else f"Resuming after epoch {epochs_done(state.history)} of {cfg.epochs} from {folder}")
    return state
