"""--tensorboard DIR: Keras's TensorBoard callback writing each run's curves under DIR/<start time>/<run>/, each
epoch once, kept across --resume.

Needs the tensorboard package (and TensorFlow, whose summary writer the callback uses).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

from fashion_cnn.backends import on_keras
from fashion_cnn.common import Settings
from fashion_cnn.journal import resume_root
from fashion_cnn.outputs import write_text


def with_tensorboard_group(cfg: Settings) -> Settings:
    """cfg with --tensorboard narrowed to this call's own folder, DIR/<start time>, so that calls never mix their
    curves; --resume goes on in the interrupted call's folder, whose name the resume journal keeps."""
    if cfg.tensorboard is None:
        return cfg
    root, journal = cfg.tensorboard.resolve(), resume_root(cfg) / "tensorboard.txt"
    saved = Path(journal.read_text(encoding="utf-8")) if cfg.resume and journal.exists() else None
    if saved is not None and saved.parent == root:
        return dataclasses.replace(cfg, tensorboard=saved)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = itertools.chain([stamp], (f"{stamp}-{n}" for n in itertools.count(2)))
    group = next(root / name for name in names if not (root / name).exists())
    if not cfg.ray:
        write_text(journal, str(group))
    return dataclasses.replace(cfg, tensorboard=group)


def run_log_name(cfg: Settings, lr: float, seed: int) -> str:
    """A run's TensorBoard folder, named by what tells it from the call's other runs: its rate, its seed, or both."""
    parts = [f"lr={lr:g}"] if cfg.is_study or not cfg.several_seeds else []
    return ",".join([*parts, *([f"seed={seed}"] if cfg.several_seeds else [])])


def epoch_log(cfg: Settings, lr: float, seed: int) -> Any:
    """The TensorBoard callback of one run, writing into its own folder of the call's group."""
    return on_keras(EpochLog, "callbacks.TensorBoard")(cfg.tensorboard / run_log_name(cfg, lr, seed))


class EpochLog:
    """Keras's TensorBoard callback (on_keras joins them) writing into folder, each epoch once (an epoch that a
    resumed run trains again is not logged twice) and on disk when it ends (a killed run keeps its curves)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(log_dir=str(folder), write_graph=False, profile_batch=0)
        self.logged, self.epoch = logged_epochs(folder / "train"), 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        super().on_epoch_begin(epoch, logs)

    def on_test_end(self, logs: dict | None = None) -> None:
        super().on_test_end({} if self.epoch in self.logged else logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch not in self.logged:
            super().on_epoch_end(epoch, logs)
            for writer in self._writers.values():
                writer.flush()


def logged_epochs(folder: Path) -> set[int]:
    """The epochs (0-based) whose loss the TensorBoard event files in folder hold."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    return {e.step for e in events.Tensors("epoch_loss")} if "epoch_loss" in events.Tags()["tensors"] else set()
