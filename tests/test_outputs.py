"""Outputs written as one set: a run that fails, or a disk that fills, leaves the earlier outputs as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY, call_main, run_cli


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_failed_run_leaves_earlier_outputs_untouched(tmp_path: Path, data_dir: Path) -> None:
    plots, model = tmp_path / "plots", tmp_path / "models" / "m.keras"
    for path, content in ((plots / "metrics.json", "{}"), (plots / "history.csv", "epoch\n"), (model, "PK")):
        path.parent.mkdir(exist_ok=True)
        path.write_text(content)  # an earlier run's outputs
    before = digest(plots), digest(model.parent)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    # The model folder cannot be created: the run must fail before touching the plots.
    proc = run_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", blocker / "m.keras", *TINY)
    assert proc.returncode == 1
    assert "cannot write to" in proc.stderr and "Traceback" not in proc.stderr
    # Broken data: the run must fail without touching the model or plots.
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = run_cli("--data-dir", bad, "--plots-dir", plots, "--model-path", model, *TINY)
    assert proc.returncode == 1
    assert (digest(plots), digest(model.parent)) == before


@pytest.mark.slow
def test_a_full_disk_leaves_the_earlier_outputs_as_they_were(tmp_path: Path, trained: dict, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plots, model = tmp_path / "plots", tmp_path / "m.keras"
    shutil.copytree(trained["plots"], plots)
    shutil.copy(trained["model"], model)
    before = digest(plots), model.read_bytes()
    real_fsync = os.fsync

    def fsync_on_a_full_disk(fd: int) -> None:  # the disk fills up while metrics.json, the last output, is written
        if "metrics.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("simulates the full disk through /proc/self/fd")
    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    flags = ["--data-dir", data_dir, "--plots-dir", plots, "--model-path", model, *TINY, "--seed", "5"]
    ran = call_main(*flags)
    assert ran.returncode == 1
    assert ran.stderr.startswith(f"error: cannot write {plots / 'metrics.json'} (No space left on device); "
                                 "none of this run's outputs were written")
    assert len(ran.stderr.strip().splitlines()) == 1
    assert (digest(plots), model.read_bytes()) == before, "no new file may stand beside the old ones"
    # With space again, --resume writes the finished run's outputs without training it again.
    monkeypatch.setattr(os, "fsync", real_fsync)
    resumed = call_main(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Already finished" in resumed.stdout and "Epoch 1/1" not in resumed.stdout
    assert json.loads((plots / "metrics.json").read_text())["seed"] == 5
    assert sorted(digest(plots)) == sorted(before[0]) and model.read_bytes() != before[1]
