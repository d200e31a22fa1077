"""Settings and errors: the flags, --help, the defaults, and the one-line refusals before any training."""

from __future__ import annotations

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
