"""The training CLI as a user drives it: flags, outputs, reloading, seeds, failures."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import ConvolutionalNN as cnn
from conftest import FILES, TINY, TRAINED, call_main, run_cli

OUTPUTS = ["accuracy.png", "loss.png", "confusion_matrix.png", "predictions.png", "architecture.png",
           "history.csv", "metrics.json"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "not a whole number"),
    (["--lr", "-0.1"], "above 0"),
    (["--lr", "nan"], "above 0"),
    (["--val-split", "1"], "between 0 and 1"),
    (["--val-split", "0"], "between 0 and 1"),
    (["--limit", "10"], "smaller than one batch"),
    (["--batch-size", "0"], "between 1 and 2147483647"),
    (["--model-path", "model.h5"], "must end in .keras"),
    (["--padding", "valid", "--kernel-size", "13"], "leaves no pixels"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--json"], "only applies to --predict"),
    (["--seed", "-1"], "between 0 and 4294967295"),
    (["--epochs", "9" * 400], "between 1 and 2147483647"),  # too big for a float, let alone a run
    (["--dropout", "1e400"], "at least 0 and below 1"),
    (["--seeds", "1", "1"], "--seed lists a value twice"),
    (["--lr", "0.01", "0.01"], "--lr lists a value twice"),
    (["--precision", "int8"], "invalid choice"),
    (["--ray", "--distribute", "mirrored"], "do not combine"),
    (["--ray", "--resume"], "--resume applies to training runs on this machine"),
    (["--ray", "headnode"], "give HOST:PORT, auto, or no value"),
    (["--predict", "x.png", "--no-tta"], "uses the test-time augmentation the model was trained with"),
    (["--predict", "x.png", "--flip"], "uses the test-time augmentation the model was trained with"),
    (["--shift", "14"], "between 0 and 13"),
    (["--ema", "1"], "at least 0 and below 1"),
    (["--label-smoothing", "-0.1"], "at least 0 and below 1"),
    (["--erase", "1.5"], "at least 0 and below 1"),
    (["--warmup-epochs", "3", "--epochs", "3"], "leaves nothing of --epochs 3"),
    (["--warmup-epochs", "-1"], "at least 0"),
])
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str) -> None:
    ran = call_main(*flags)
    assert ran.returncode == 2 and ran.stdout == ""
    assert message in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1


def test_a_bad_flag_on_the_command_line_is_one_line_without_a_traceback() -> None:
    proc = run_cli("--epochs", "0", "--lr", "0.01")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "ConvolutionalNN.py: error: argument --epochs: 0 must be between 1 and 2147483647 (see --help)\n"


def test_help_lists_every_flag_with_defaults() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--epochs", "--lr", "--batch-size", "--val-split", "--seed", "--data-dir", "--plots-dir",
                 "--model-path", "--limit", "--predict", "--json", "--seeds", "--precision", "--distribute",
                 "--ray", "--ema", "--label-smoothing", "--shift", "--flip", "--tta", "--weight-decay",
                 "--conv-dropout", "--erase", "--warmup-epochs"):
        assert flag in proc.stdout
    assert "default: 20" in proc.stdout and "0.001" in proc.stdout


def test_default_config_matches_the_documented_network() -> None:
    cfg = cnn.parse_args([])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.val_split, cfg.filters, cfg.kernel_size) == \
        (0.001, 20, 64, 0.2, 128, 3)


@pytest.mark.keras
def test_network_layer_stack() -> None:
    model = cnn.build_model(cnn.Config(), 0.001, steps_per_epoch=10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Rescaling", "Conv2D", "MaxPooling2D", "Dropout", "Conv2D", "MaxPooling2D", "Dropout",
                     "Flatten", "Dense", "Dropout", "Dense"]
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert all(c.filters == 128 and c.kernel_size == (3, 3) for c in convs)
    assert tuple(model.compute_output_shape((None, 28, 28, 1))) == (None, 10)
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    probs = np.asarray(model.predict(np.zeros((2, 28, 28, 1), np.uint8), verbose=0))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_a_run_writes_every_output(trained: dict) -> None:
    plots: Path = trained["plots"]
    for name in OUTPUTS:
        assert (plots / name).stat().st_size > 0, name
        assert (plots / name).stat().st_mode & 0o044, f"{name} should be readable by others like any output"
    assert not list(plots.glob(".*tmp*")), "no temporary files may be left behind"
    for png in OUTPUTS[:5]:
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((plots / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert set(metrics["per_class_test_accuracy"]) == set(cnn.CLASS_NAMES)
    assert metrics["config"]["filters"] == 4 and metrics["seed"] == 0
    assert len(metrics["history"]["val_loss"]) == 2 == metrics["epochs_completed"]
    assert metrics["versions"]["keras"].startswith("3")
    assert metrics["training_seconds"] > 0 and metrics["interrupted"] is False
    rows = list(csv.DictReader((plots / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["val_loss"]) == pytest.approx(metrics["history"]["val_loss"][1], abs=1e-5)
    out = trained["proc"].stdout
    assert "Test accuracy:" in out and "Ankle boot" in out and "T-shirt/top" in out


@pytest.mark.slow
def test_output_to_a_log_file_has_one_line_per_epoch_not_progress_bars(trained: dict) -> None:
    out = trained["proc"].stdout
    assert "\u2501" not in out and "\r" not in out, "progress bars belong on a terminal, not in a log"
    assert len([line for line in out.splitlines() if "val_loss" in line]) == 2


@pytest.mark.slow
def test_saved_model_reloads_to_the_same_accuracy(trained: dict, test_arrays) -> None:
    import keras

    metrics = json.loads((trained["plots"] / "metrics.json").read_text())
    model = keras.models.load_model(trained["model"])
    x, y = test_arrays
    accuracy = np.mean(model.predict(x[..., None], batch_size=512, verbose=0).argmax(axis=1) == y)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert metrics["test_accuracy"] > 0.5, "the tiny network should learn the synthetic bars"


@pytest.mark.slow
def test_same_seed_gives_the_same_validation_curve(tmp_path: Path, data_dir: Path, trained: dict) -> None:
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path, "--model-path", tmp_path / "again.keras",
                   *TRAINED)  # the flags of the `trained` run, seed 0 by default
    assert ran.returncode == 0, ran.stderr
    again, first = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path, trained["plots"]))
    assert again["history"] == first["history"]
    assert again["test_accuracy"] == first["test_accuracy"]


@pytest.mark.slow
def test_keras_datasets_path_uses_a_prefilled_cache_and_keeps_stderr_empty(tmp_path: Path, data_dir: Path) -> None:
    cache = tmp_path / "keras_home" / "datasets" / "fashion-mnist"
    cache.mkdir(parents=True)
    for name in FILES.values():
        shutil.copy(data_dir / name, cache / name)
    # oneDNN on (TensorFlow's default on CPUs with AVX512-VNNI, AVX512-BF16 or AMX) adds start-up log lines
    proc = run_cli("--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras", *TINY,
                   env={"KERAS_HOME": str(tmp_path / "keras_home"), "TF_ENABLE_ONEDNN_OPTS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "a run that works prints nothing on stderr"
    assert "Data: 512 training, 128 validation, 10000 test images" in proc.stdout
    assert (tmp_path / "p" / "metrics.json").exists()


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


@pytest.mark.parametrize(("line", "level", "noise"), [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", 3, True),
    ("I0000 00:00:1795926651.110019    2377 port.cc:153] oneDNN custom operations are on. You may see\n", 3, True),
    ("I0000 00:00:1795926651.110019    2377 port.cc:153] oneDNN custom operations are on.\n", 0, False),
    ("W0000 00:00:1795926651.110019    2377 cpu_feature_guard.cc:227] This TensorFlow binary\n", 2, True),
    ("W0000 00:00:1795926651.110019    2377 cpu_feature_guard.cc:227] This TensorFlow binary\n", 1, False),
    ("E0000 00:00:1795926651.110019    2377 cuda_dnn.cc:8310] Unable to register cuDNN factory\n", 3, True),
    ("F0000 00:00:1795926651.110019    2377 platform.cc:10] Check failed: the CPU lacks AVX\n", 3, False),
    ("2024-01-11 05:40:05.061907: I tensorflow/core/platform/cpu_feature_guard.cc:182] This TensorFlow\n", 3, True),
    ("ImportError: libcudart.so.12: cannot open shared object file\n", 3, False),
])
def test_only_tensorflow_startup_lines_below_the_log_level_are_dropped(line: str, level: int, noise: bool) -> None:
    assert cnn.is_startup_noise(line, level) is noise


def test_unreachable_ray_cluster_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = run_cli("--ray", f"127.0.0.1:{port}", "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras",
                   timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_weight_average_of_a_short_run_is_as_accurate_as_the_raw_weights(tmp_path: Path, data_dir: Path) -> None:
    """64 steps: without a warm-up the average would still be mostly the initial weights (58% against 89% here)."""
    def validation_accuracy(ema: str) -> float:
        plots = tmp_path / f"ema{ema}"
        ran = call_main("--data-dir", data_dir, "--plots-dir", plots, "--model-path", tmp_path / f"ema{ema}.keras",
                        *TINY, "--limit", "2560", "--ema", ema, "--no-tta")
        assert ran.returncode == 0, ran.stderr
        return json.loads((plots / "metrics.json").read_text())["validation_accuracy"]

    raw = validation_accuracy("0")
    assert raw > 0.5, "the raw weights learn something in 64 steps"
    assert validation_accuracy("0.99") >= raw - 0.01, "the average is within a point of the raw weights, or better"


@pytest.mark.keras
def test_the_average_warms_up_then_keeps_its_momentum() -> None:
    """One update from an average of 0 towards a weight of 1 leaves 1 - momentum."""
    import keras

    optimizer = cnn.warmed_up_ema_adam()(0.0, use_ema=True, ema_momentum=0.99)
    weight = keras.Variable(np.ones(1, np.float32))
    optimizer.build([weight])

    def momentum_at(step: int) -> float:
        optimizer._model_variables_moving_average[0].assign([0.0])
        optimizer.iterations.assign(step)
        optimizer._update_model_variables_moving_average([weight])
        return 1 - float(optimizer._model_variables_moving_average[0].numpy()[0])

    assert momentum_at(0) == pytest.approx(0.1)
    assert momentum_at(10) == pytest.approx(11 / 20)
    assert momentum_at(500) == pytest.approx(501 / 510)
    assert momentum_at(2000) == pytest.approx(0.99), "past step 890 the plain momentum again"


@pytest.mark.slow
def test_the_saved_model_loads_in_plain_keras(trained: dict) -> None:
    import keras

    model = keras.models.load_model(trained["model"])
    assert type(model.optimizer) is keras.optimizers.Adam


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
    need = cnn.training_memory(default)
    assert sum(need.values()) < 1e9, "the default network trains in well under a gigabyte"
    assert need["weights and gradients"] == 8 * cnn.parameter_count(default)
    cnn.check_memory(default, available=2 * 10**9)
    with pytest.raises(cnn.UserError, match=r"^this network needs about .* has 0.1 GB available"):
        cnn.check_memory(default, available=10**8)


@pytest.mark.keras
@pytest.mark.parametrize("flags", [[], ["--filters", "7", "--dense-units", "5", "--kernel-size", "5", "--padding",
                                        "valid"]])
def test_the_parameter_count_is_the_one_keras_builds(flags: list[str]) -> None:
    cfg = cnn.parse_args(flags)
    assert cnn.parameter_count(cfg) == cnn.build_model(cfg, 0.001, steps_per_epoch=1).count_params()
