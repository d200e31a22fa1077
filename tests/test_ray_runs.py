"""Scaling out: a local Ray instance and its retries, MirroredStrategy on two logical CPUs, the precision."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import ConvolutionalNN as cnn
from conftest import STUDY, TINY, run_cli
from fashion_cnn import common, ray_runs


def test_unreachable_ray_cluster_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = run_cli("--ray", f"127.0.0.1:{port}", "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras",
                   timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


RUN_KEYS = ("best_val_loss", "best_val_accuracy", "final_val_loss", "epochs_completed")


@pytest.fixture(scope="module")
def local_ray() -> object:
    """A local Ray instance started by the test, on 127.0.0.1 only, shared by the tests of this module."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: bind to loopback
        import ray

        ray.init(num_cpus=2, include_dashboard=False)
        yield ray
        ray.shutdown()


@pytest.mark.slow
def test_study_on_local_ray_gives_the_sequential_table(tmp_path: Path, data_dir: Path, sequential_study: dict,
                                                       local_ray: object, capsys: pytest.CaptureFixture) -> None:
    plots = tmp_path / "plots"
    code = cnn.main(["--data-dir", str(data_dir), "--plots-dir", str(plots), "--model-path", str(tmp_path / "m.keras"),
                     *STUDY, "--ray"])
    assert code == 0
    assert "Ray: 6 runs on 1 node(s) with 2 CPUs" in capsys.readouterr().out
    study, sequential = json.loads((plots / "lr_study.json").read_text()), sequential_study["study"]
    assert [r["lr"] for r in study["rates"]] == [r["lr"] for r in sequential["rates"]]
    assert study["recommended_lr"] == sequential["recommended_lr"]
    for ray_row, seq_row in zip(study["rates"], sequential["rates"]):
        assert ray_row.keys() == seq_row.keys()
        for ray_run, seq_run in zip(ray_row["runs"], seq_row["runs"]):
            assert ray_run["seed"] == seq_run["seed"] and ray_run["failed"] is None
            assert ray_run["stopped_after_epoch"] == seq_run["stopped_after_epoch"], "a Ray task stops a dead rate"
            for key in RUN_KEYS:  # same seeds, same splits: the same runs, up to thread-count rounding
                assert ray_run[key] == pytest.approx(seq_run[key], abs=0.02)
    metrics = json.loads((plots / "metrics.json").read_text())
    assert [s["seed"] for s in metrics["seeds"]] == [0, 1] and metrics["test_accuracy_std"] is not None


@pytest.mark.slow
def test_ray_retries_a_failing_run_then_reports_it_and_writes_the_rest(tmp_path: Path, data_dir: Path,
                                                                       local_ray: object) -> None:
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def flaky(cfg: cnn.Config, lr: float, seed: int, train_one: ray_runs.TrainOne) -> dict:
        if lr == 0.003:
            (attempts / str(len(list(attempts.iterdir())))).touch()
            raise RuntimeError("node lost its disk")
        return ray_runs.ray_task(cfg, lr, seed, train_one)

    cfg = cnn.parse_args(["--data-dir", str(data_dir), "--plots-dir", str(tmp_path / "plots"),
                          "--model-path", str(tmp_path / "m.keras"), *TINY, "--lr", "0.01", "0.003", "--ray"])
    arrays, _ = cnn.load_arrays(cfg)
    results = ray_runs.train_on_ray(cfg, cnn.train_on_node, cnn.build_model, task=flaky)
    assert len(list(attempts.iterdir())) == 1 + ray_runs.RAY_RETRIES
    assert results[0].ended == common.COMPLETED and results[0].model is not None
    assert results[1].ended == common.FAILED and "node lost its disk" in results[1].failure
    assert cnn.report(cfg, lambda seed: cnn.split_data(arrays, cfg, seed), results) == common.EXIT_FAILURE
    study = json.loads((tmp_path / "plots" / "lr_study.json").read_text())
    assert [r["failed_runs"] for r in study["rates"]] == [0, 1]
    assert study["recommended_lr"] == 0.01 and (tmp_path / "m.keras").exists()
