"""Settings and errors: the flags, --help, the defaults, and the one-line refusals before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

import ConvolutionalNN as cnn
from conftest import call_main, run_cli


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
    assert proc.stderr == ("ConvolutionalNN.py: error: argument --epochs: 0 must be between 1 and 2147483647 "
                           "(see --help)\n")


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
