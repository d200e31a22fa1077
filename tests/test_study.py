"""The learning-rate study (its table, figure and stall stop) and repeated seeds (their mean and spread)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DEAD_AND_SLOW, TINY, call_main
from fashion_cnn import common, study


@pytest.mark.slow
def test_seeds_give_each_test_accuracy_and_their_mean_and_std(sequential_study: dict) -> None:
    stdout, study, metrics = sequential_study["stdout"], sequential_study["study"], sequential_study["metrics"]
    assert "Run 6 of 6: Learning-rate study: rate 3 of 3: lr=0.003, seed 1 (2 of 2)" in stdout
    stopped = [run["stopped_after_epoch"] for row in study["rates"] for run in row["runs"]]
    assert stopped == [2, 2, None, None, None, None], "each seed of the dead rate is stopped, the others train on"
    assert study["rates"][0]["stopped"] == "stopped after epoch 2: stalled at chance level"
    assert study["selected_by"] == "lowest mean best validation loss"
    means = {r["lr"]: np.mean([run["best_val_loss"] for run in r["runs"]]) for r in study["rates"]}
    assert study["recommended_lr"] == min(means, key=means.get)
    for row in study["rates"]:
        assert row["seeds"] == [0, 1] and row["best_val_loss"] == pytest.approx(means[row["lr"]])
        assert row["best_val_loss_std"] == pytest.approx(np.std([r["best_val_loss"] for r in row["runs"]], ddof=1))
    accuracies = [s["test_accuracy"] for s in metrics["seeds"]]
    losses = [s["test_loss"] for s in metrics["seeds"]]  # both seeds may reach 100% on the synthetic shapes
    assert [s["seed"] for s in metrics["seeds"]] == [0, 1] and losses[0] != losses[1], "each seed is its own run"
    assert metrics["test_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert metrics["test_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    best_by_val = max(metrics["seeds"], key=lambda s: s["best_val_accuracy"])
    assert metrics["saved_seed"] == best_by_val["seed"] == metrics["seed"]
    assert metrics["test_accuracy"] == best_by_val["test_accuracy"]
    assert f"Test accuracy over 2 seed(s): {np.mean(accuracies):.2%} ± " in stdout


@pytest.mark.slow
def test_study_over_three_rates_marks_divergence_and_recommends_by_val_loss(tmp_path: Path, data_dir: Path) -> None:
    plots, model = tmp_path / "plots", tmp_path / "m.keras"
    ran = call_main("--data-dir", data_dir, "--plots-dir", plots, "--model-path", model, *TINY,
                   "--epochs", "2", "--schedule", "constant", "--lr", "1e12", "0.01", "0.001")
    assert ran.returncode == 0, ran.stderr
    assert "rate 1 of 3: lr=1e+12" in ran.stdout and "rate 3 of 3: lr=0.001" in ran.stdout
    study = json.loads((plots / "lr_study.json").read_text())
    rows = {r["lr"]: r for r in study["rates"]}
    assert list(rows) == [1e12, 0.01, 0.001]
    assert rows[1e12]["diverged"] is True
    assert not rows[0.01]["diverged"] and not rows[0.001]["diverged"]
    healthy = [rows[0.01], rows[0.001]]
    best = min(healthy, key=lambda r: r["best_val_loss"])
    assert study["recommended_lr"] == best["lr"]
    assert all(r["epochs_completed"] == 2 and r["training_seconds"] > 0 for r in healthy)
    table = ran.stdout[ran.stdout.index("best val loss"):]
    assert "diverged" in table and "recommended" in table
    assert f"Recommended learning rate: {best['lr']:g}" in ran.stdout
    assert (plots / "lr_study.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((plots / "metrics.json").read_text())
    assert metrics["learning_rate"] == best["lr"]
    assert model.exists() and (plots / "confusion_matrix.png").exists()


@pytest.mark.slow
def test_a_single_diverging_run_says_to_lower_the_rate(tmp_path: Path, data_dir: Path) -> None:
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras",
                   *TINY, "--lr", "1e12", "--schedule", "constant")
    assert ran.returncode == 3
    assert "smaller --lr" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1


def test_a_rate_stuck_at_chance_is_called_stalled_not_healthy(tmp_path: Path) -> None:
    """Like lr 0.1 on the real data: no NaN, yet validation accuracy stays at 10% for every epoch."""
    def run(lr: float, val_acc: list[float], val_loss: list[float]) -> common.TrainResult:
        history = {"loss": val_loss, "val_loss": val_loss, "accuracy": val_acc, "val_accuracy": val_acc}
        return common.TrainResult(None, lr, 0, history, best_epoch=int(np.argmin(val_loss)) + 1, best_value=None,
                               seconds=1.0)

    by_rate = {0.1: [run(0.1, [0.1, 0.1, 0.1], [2.3055, 2.3030, 2.3026])],
               0.001: [run(0.001, [0.80, 0.86, 0.89], [0.55, 0.38, 0.30])]}
    rows = [study.rate_row(lr, results) for lr, results in by_rate.items()]
    assert [r["stalled_at_chance"] for r in rows] == [True, False]
    assert [r["diverged"] for r in rows] == [False, False]
    table = study.format_study_table(rows, study.recommend(rows)).splitlines()
    assert table[1].split()[0] == "0.1" and table[1].endswith("stalled at chance level")
    assert table[2].split()[0] == "0.001" and table[2].endswith("recommended")
    study.plot_study(by_rate, rows, tmp_path / "lr_study.png")
    assert (tmp_path / "lr_study.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_study_stops_a_rate_stalled_at_chance_and_lets_a_slow_starter_learn(tmp_path: Path, data_dir: Path) -> None:
    plots = tmp_path / "plots"
    ran = call_main("--data-dir", data_dir, "--plots-dir", plots, "--model-path", tmp_path / "m.keras", *DEAD_AND_SLOW)
    assert ran.returncode == 0, ran.stderr
    study = json.loads((plots / "lr_study.json").read_text())
    dead, slow = study["rates"]
    assert dead["stopped"] == "stopped after epoch 2: stalled at chance level"
    assert dead["epochs_completed"] == 2 and len(dead["runs"][0]["history"]["val_accuracy"]) == 2
    assert dead["runs"][0]["stopped_after_epoch"] == 2 and dead["runs"][0]["stopped_because"] == common.STALLED
    assert slow["stopped"] is None and slow["epochs_completed"] == 4
    assert slow["runs"][0]["stopped_after_epoch"] is None and slow["runs"][0]["stopped_because"] is None
    assert study["recommended_lr"] == 0.0001
    table = ran.stdout[ran.stdout.index("best val loss"):].splitlines()
    assert table[1].split()[0] == "3" and table[1].endswith("stopped after epoch 2: stalled at chance level")
    assert table[2].split()[0] == "0.0001" and table[2].endswith("recommended")
    assert ran.stdout.count("Epoch 3/4") == ran.stdout.count("Epoch 4/4") == 1, "only the slow starter goes on"


@pytest.mark.slow
def test_a_single_run_at_chance_trains_every_epoch(tmp_path: Path, data_dir: Path) -> None:
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path / "p", "--model-path", tmp_path / "m.keras",
                    *TINY, "--epochs", "4", "--schedule", "constant", "--lr", "3")
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["epochs_completed"] == 4


def test_the_study_figure_fits_the_rates_that_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lr 0.1's first-epoch loss of 34 must not set the loss axis, nor its 10% the accuracy axis."""
    def run(lr: float, val_acc: list[float], val_loss: list[float], loss: list[float],
            ended: str = common.COMPLETED) -> common.TrainResult:
        history = {"loss": loss, "val_loss": val_loss, "accuracy": val_acc, "val_accuracy": val_acc}
        return common.TrainResult(None, lr, 0, history, best_epoch=1, best_value=None, seconds=1.0, ended=ended)

    by_rate = {0.1: [run(0.1, [0.1, 0.1, 0.1], [2.3028, 2.3028, 2.3027], [34.2, 2.31, 2.31], common.STALLED)],
               0.01: [run(0.01, [0.88, 0.90, 0.91, 0.92], [0.76, 0.70, 0.68, 0.66], [0.9, 0.72, 0.69, 0.66])],
               0.001: [run(0.001, [0.86, 0.90, 0.92, 0.93], [0.82, 0.71, 0.66, 0.63], [1.1, 0.8, 0.7, 0.62])]}
    import matplotlib.pyplot as plt

    saved = {}
    monkeypatch.setattr(study, "save_figure", lambda fig, path: saved.setdefault("fig", fig))
    study.plot_study(by_rate, [study.rate_row(lr, runs) for lr, runs in by_rate.items()], tmp_path / "lr_study.png")
    loss_ax, acc_ax = saved["fig"].axes
    assert loss_ax.get_ylim()[1] < 1.2 and loss_ax.get_ylim()[0] > 0.5
    assert acc_ax.get_ylim()[0] > 0.8 and acc_ax.get_ylim()[1] < 0.95
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert labels[0] == "lr 0.1 (stopped after epoch 3: stalled at chance level)"
    dead_line = acc_ax.lines[0]
    assert len(dead_line.get_xdata()) == 3, "the stopped rate's curve ends where it stopped"
    assert min(dead_line.get_ydata()) == pytest.approx(acc_ax.get_ylim()[0]), "held at the axis' edge"
    plt.close(saved["fig"])
