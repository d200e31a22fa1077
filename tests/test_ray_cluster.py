"""A study on a real two-node Ray cluster, started on this machine with `ray start`.

The cluster keeps its files in a folder of its own, and only the processes that name that
folder or its port (and their children) are stopped at the end: other Ray instances on the
machine live on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY, run_cli

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds its Ray processes in /proc")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str]) -> None:
    """The ray CLI of the Python running the tests, run as its module: no `ray` script on PATH or beside that
    Python is needed (a virtual environment not activated, or one made with --system-site-packages)."""
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def processes() -> dict[int, tuple[int, str]]:
    """Every process's parent and command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
        found[int(entry.name)] = (parent, cmdline)
    return found


def stop_ray_cluster(temp_dir: str, port: int, grace: float = 15) -> None:
    """Stop the processes of the cluster with this temp dir and GCS port, and their children (workers, agents)."""
    table = processes()
    gcs = re.compile(rf"--address=\S+:{port}\b")  # the head's client server names only the address
    ours = {pid for pid, (_, cmdline) in table.items()
            if (temp_dir in cmdline or gcs.search(cmdline)) and pid != os.getpid()}
    while grown := {pid for pid, (parent, _) in table.items() if parent in ours} - ours:
        ours |= grown
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ours):
            time.sleep(0.2)


def test_study_on_a_two_node_cluster(tmp_path: Path, data_dir: Path) -> None:
    token = tmp_path / "ray_token"
    token.write_text(os.urandom(32).hex())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # a real cluster, even if a local instance set it to 0
           "TF_ENABLE_ONEDNN_OPTS": "1"}  # TensorFlow's start-up lines in the tasks must not reach the driver's stderr
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir, env=env)
        ray_cli("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                "--disable-usage-stats", "--temp-dir", temp_dir, env=env)
        plots = tmp_path / "plots"
        proc = run_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", tmp_path / "m.keras", *TINY,
                       "--lr", "0.01", "0.003", "--precision", "bfloat16", "--ray", f"127.0.0.1:{port}", env=env)
    finally:
        stop_ray_cluster(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Ray: 2 runs on 2 node(s) with 2 CPUs" in proc.stdout
    study = json.loads((plots / "lr_study.json").read_text())
    assert [r["lr"] for r in study["rates"]] == [0.01, 0.003] and study["recommended_lr"] in (0.01, 0.003)
    assert json.loads((plots / "metrics.json").read_text())["precision"] == "bfloat16"
    left = [cmd for _, cmd in processes().values() if temp_dir in cmd or f":{port}" in cmd]
    assert not left, f"the cluster's processes must be gone: {left}"
