"""Precision, the memory check and devices: --precision auto, a network too big to train, --distribute mirrored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ConvolutionalNN as cnn
from conftest import REPO, SIGNALS_AND_CLUSTER, TRAINED, call_main
from fashion_cnn import common, hardware

TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import ConvolutionalNN
sys.exit(ConvolutionalNN.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.xdist_group(SIGNALS_AND_CLUSTER)  # no module fixtures: it evens out the two groups' times
def test_mirrored_on_two_logical_cpus_matches_a_single_device_run(tmp_path: Path, data_dir: Path) -> None:
    # 160 steps: on fewer (TINY's 40) the two runs are still in the early phase where the replicas' own dropout
    # masks move the loss by 15-30%, too much to compare.
    common = ["--data-dir", str(data_dir), *TRAINED]
    single_plots, mirrored_plots = tmp_path / "single", tmp_path / "mirrored"
    assert call_main(*common, "--plots-dir", single_plots, "--model-path", tmp_path / "s.keras").returncode == 0
    mirrored = subprocess.run([sys.executable, "-c", TWO_CPUS, *common, "--distribute", "mirrored",
                               "--plots-dir", str(mirrored_plots), "--model-path", str(tmp_path / "m.keras")],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=300, check=False)
    assert mirrored.returncode == 0, mirrored.stderr
    assert "MirroredStrategy: 2 replica(s)" in mirrored.stdout
    assert sorted(p.name for p in mirrored_plots.iterdir()) == sorted(p.name for p in single_plots.iterdir())
    result, single = (json.loads((d / "metrics.json").read_text()) for d in (mirrored_plots, single_plots))
    # Each replica draws its own dropout masks, so the two runs agree closely rather than exactly.
    assert result["history"]["val_loss"] == pytest.approx(single["history"]["val_loss"], rel=0.15)
    assert result["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.1)


@pytest.mark.parametrize(("gpus", "flags", "expected"), [
    ([], {"fpu", "avx2"}, "float32"),
    ([], {"avx512f", "avx512_bf16"}, "bfloat16"),
    ([], {"amx_bf16", "amx_tile"}, "bfloat16"),
    ([(9, 0)], set(), "bfloat16"),
    ([(7, 5), (8, 0)], set(), "float16"),
    ([(6, 1)], {"amx_bf16"}, "float32"),
])
def test_auto_precision_picks_what_the_hardware_runs_fast(gpus: list, flags: set, expected: str) -> None:
    precision, why = hardware.choose_precision("auto", gpus, flags)
    assert precision == expected and why.startswith("auto:")
    assert hardware.choose_precision("float16", gpus, flags) == ("float16", "asked for with --precision")


@pytest.mark.parametrize(("flags", "named"), [
    (["--filters", "60000"], "--filters 60000"),
    (["--dense-units", "3000000", "--filters", "64"], "--filters 64 --dense-units 3000000"),
    (["--batch-size", "1000000"], "--batch-size 1000000"),
])
def test_a_network_too_big_for_the_memory_is_refused_in_one_line_before_training(
        tmp_path: Path, data_dir: Path, flags: list[str], named: str) -> None:
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras",
                    "--epochs", "1", *flags)
    assert ran.returncode == 1
    line = ran.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {named} needs about "), line
    for part in ("weights and gradients", "optimizer state", "the average", "activations of one batch",
                 "available"):
        assert part in line
    assert "Epoch" not in ran.stdout and not (tmp_path / "m.keras").exists()
    assert not (tmp_path / "p" / "metrics.json").exists()


def test_the_memory_check_passes_the_default_network_and_names_what_it_counts() -> None:
    default = cnn.parse_args([])
    need = hardware.training_memory(default)
    assert sum(need.values()) < 1e9, "the default network trains in well under a gigabyte"
    assert need["weights and gradients"] == 8 * hardware.parameter_count(default)
    hardware.check_memory(default, available=2 * 10**9)
    with pytest.raises(common.UserError, match=r"^this network needs about .* has 0.1 GB available"):
        hardware.check_memory(default, available=10**8)


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
@pytest.mark.parametrize("flags", [[], ["--filters", "7", "--dense-units", "5", "--kernel-size", "5", "--padding",
                                        "valid"]])
def test_the_parameter_count_is_the_one_keras_builds(flags: list[str]) -> None:
    cfg = cnn.parse_args(flags)
    assert hardware.parameter_count(cfg) == cnn.build_model(cfg, 0.001, steps_per_epoch=1).count_params()


@pytest.mark.parametrize(("flags", "device", "steps", "loop"), [
    ([], "cpu", 4, False),                                     # 12 GFLOP a step: a few steps, written out
    (["--filters", "1", "--dense-units", "1"], "cpu", 250, True),  # next to no arithmetic: many, in one loop
    ([], "gpu", 750, True),                                    # the whole epoch in one call
    (["--limit", "6400", "--filters", "1"], "gpu", 80, True),  # never more than an epoch
    (["--filters", "1024"], "cpu", 1, False),                  # never fewer than one
])
def test_a_call_runs_about_a_second_of_steps_at_least_one_at_most_an_epoch(
        flags: list[str], device: str, steps: int, loop: bool) -> None:
    cfg = cnn.parse_args(flags)
    steps_per_epoch = -(-int((cfg.limit or 60_000) * (1 - cfg.val_split)) // cfg.batch_size)
    assert hardware.steps_per_execution(cfg, steps_per_epoch, device) == steps
    assert hardware.steps_in_a_loop(cfg, device) is loop


def test_mirrored_on_tensorflow_runs_one_step_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cnn.parse_args(["--distribute", "mirrored", "--filters", "1", "--dense-units", "1"])
    monkeypatch.setattr(hardware, "backend_name", lambda: "tensorflow")
    assert hardware.steps_per_execution(cfg, 750, "cpu") == 1  # keras-team/keras#19246
    monkeypatch.setattr(hardware, "backend_name", lambda: "jax")
    assert hardware.steps_per_execution(cfg, 750, "cpu") == 250
