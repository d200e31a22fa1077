"""A study on a real two-node Ray cluster, started on this machine with `ray start`.

`ray stop --force` at the end stops every Ray process on the machine, so this
module runs before any test that keeps a Ray instance of its own (test_scaling).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import TINY, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str]) -> None:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_study_on_a_two_node_cluster(tmp_path: Path, data_dir: Path) -> None:
    token = tmp_path / "ray_token"
    token.write_text(os.urandom(32).hex())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # a real cluster, even if a local instance set it to 0
    port = free_port()
    try:
        ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                "--include-dashboard=false", "--disable-usage-stats", env=env)
        ray_cli("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                "--disable-usage-stats", env=env)
        plots = tmp_path / "plots"
        proc = run_cli("--data-dir", data_dir, "--plots-dir", plots, "--model-path", tmp_path / "m.keras", *TINY,
                       "--lr", "0.01", "0.003", "--precision", "bfloat16", "--ray", f"127.0.0.1:{port}", env=env)
    finally:
        subprocess.run([shutil.which("ray") or "ray", "stop", "--force"], env=env, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Ray: 2 runs on 2 node(s) with 2 CPUs" in proc.stdout
    study = json.loads((plots / "lr_study.json").read_text())
    assert [r["lr"] for r in study["rates"]] == [0.01, 0.003] and study["recommended_lr"] in (0.01, 0.003)
    assert json.loads((plots / "metrics.json").read_text())["precision"] == "bfloat16"
