"""The learning-rate study (several --lr) and repeated seeds (several --seed): the banner of each run, the
study's table, figure and recommendation (by validation loss, never the test set), and the mean and spread of the
test accuracy over seeds.

Needs NumPy and matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_cnn.common import BEST_MONITOR, DIVERGED, FAILED, STALLED, Settings, TrainResult, epochs_done, stalled
from fashion_cnn.outputs import pyplot, save_figure, write_json

STUDY_FIELDS = ("best_val_loss", "best_val_loss_epoch", "best_val_accuracy", "final_val_loss", "final_val_accuracy")


def run_banner(cfg: Settings, number: int, lr: float, seed: int) -> str:
    """The progress line printed before each run of a study or of several seeds."""
    rate = f"Learning-rate study: rate {cfg.lrs.index(lr) + 1} of {len(cfg.lrs)}: lr={lr:g}" if cfg.is_study else \
        f"lr={lr:g}"
    seeds = f", seed {seed} ({cfg.seeds.index(seed) + 1} of {len(cfg.seeds)})" if cfg.several_seeds else ""
    return f"=== Run {number} of {len(cfg.runs)}: {rate}{seeds} ==="


def choose_rate(cfg: Settings, runs: list[TrainResult], config: dict[str, Any]) -> list[TrainResult] | None:
    """The runs of the study's rate to test, the one with the lowest best validation loss, after printing the
    study's table and writing lr_study.png and .json (config: the settings as recorded there); None if every rate
    diverged or failed."""
    by_rate = {lr: [r for r in runs if r.lr == lr] for lr in cfg.lrs}
    rows = [rate_row(lr, results) for lr, results in by_rate.items()]
    chosen = recommend(rows)
    print("\n" + format_study_table(rows, chosen))
    plot_study(by_rate, rows, cfg.plots_dir / "lr_study.png")
    mean = "mean " if cfg.several_seeds else ""
    write_json(cfg.plots_dir / "lr_study.json", {
        "rates": rows, "recommended_lr": chosen["lr"] if chosen else None,
        "selected_by": f"lowest {mean}best validation loss", "seeds": list(cfg.seeds), "config": config})
    if chosen is None:
        return None
    print(f"\nRecommended learning rate: {chosen['lr']:g} (lowest {mean}best validation loss "
          f"{chosen['best_val_loss']:.4f}); evaluating it on the test set.")
    return by_rate[chosen["lr"]]


def study_row(result: TrainResult) -> dict[str, Any]:
    """One run's summary: best and final validation figures, timing, divergence."""
    history = result.history
    val_loss = [v if math.isfinite(v) else math.inf for v in history.get("val_loss", [])]
    best = int(np.argmin(val_loss)) if val_loss and math.isfinite(min(val_loss)) else None
    return {
        "seed": result.seed,
        "best_val_loss": val_loss[best] if best is not None else None,
        "best_val_loss_epoch": best + 1 if best is not None else None,
        "best_val_accuracy": max(history["val_accuracy"]) if history.get("val_accuracy") else None,
        "final_val_loss": history["val_loss"][-1] if history.get("val_loss") else None,
        "final_val_accuracy": history["val_accuracy"][-1] if history.get("val_accuracy") else None,
        "epochs_completed": epochs_done(history),
        "stopped_after_epoch": epochs_done(history) if result.ended in (DIVERGED, STALLED) else None,
        "stopped_because": result.ended if result.ended in (DIVERGED, STALLED) else None,
        "training_seconds": round(result.seconds, 2),
        "diverged": result.ended == DIVERGED,
        "failed": result.failure,
        "history": history,
    }


def rate_row(lr: float, results: list[TrainResult]) -> dict[str, Any]:
    """One rate's summary over its seeds: the mean (and sample std) of each validation figure."""
    runs = [study_row(r) for r in results]
    ran = [r for r in runs if r["failed"] is None]
    row: dict[str, Any] = {"lr": lr, "seeds": [r["seed"] for r in runs]}
    for key in STUDY_FIELDS:
        row[key], row[f"{key}_std"] = mean_std([r[key] for r in ran if r[key] is not None])
    row["epochs_completed"] = max((r["epochs_completed"] for r in ran), default=0)
    row["training_seconds"] = round(sum(r["training_seconds"] for r in ran), 2)
    row["diverged"] = any(r["diverged"] for r in ran)
    row["stalled_at_chance"] = not row["diverged"] and bool(ran) and all(stalled(r["history"]) for r in ran)
    row["stopped"] = stop_note([r for r in ran if r["stopped_because"]], len(ran))
    row["failed_runs"] = len(runs) - len(ran)
    row["runs"] = runs
    return row


def stop_note(stopped: list[dict[str, Any]], runs: int) -> str | None:
    """The study's words for the runs of one rate that ended early: "stopped after epoch 3: stalled at chance
    level", with the seeds' epochs and a count when they differ or not every seed stopped."""
    if not stopped:
        return None
    epochs = "/".join(str(e) for e in sorted({r["stopped_after_epoch"] for r in stopped}))
    reasons = " / ".join(sorted({r["stopped_because"] for r in stopped}))
    seeds = f" ({len(stopped)} of {runs} seeds)" if len(stopped) < runs else ""
    return f"stopped after epoch {epochs}: {reasons}{seeds}"


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rate with the lowest (mean) best validation loss among those where no seed diverged."""
    usable = [r for r in rows if not r["diverged"] and r["best_val_loss"] is not None]
    return min(usable, key=lambda r: r["best_val_loss"]) if usable else None


def format_study_table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> str:
    """The study's table as printed at the end; with several seeds, cells are mean ± std."""
    def cell(r: dict[str, Any], key: str, spec: str) -> str:
        std = r.get(f"{key}_std")
        return or_dash(r[key], spec) + ("" if std is None else f" ± {std:{spec}}")

    lines = [(f"{'lr':>10} {'best val loss':>17} {'at epoch':>10} {'best val acc':>17} "
              f"{'final val loss':>17} {'final val acc':>17} {'seconds':>8}  status")]
    for r in rows:
        status = f"{'recommended' if r is chosen else ''} {rate_note(r)}"
        if r["failed_runs"]:
            status += f" ({r['failed_runs']} run(s) failed)"
        lines.append(f"{r['lr']:>10g} {cell(r, 'best_val_loss', '.4f'):>17} {cell(r, 'best_val_loss_epoch', 'g'):>10} "
                     f"{cell(r, 'best_val_accuracy', '.2%'):>17} {cell(r, 'final_val_loss', '.4f'):>17} "
                     f"{cell(r, 'final_val_accuracy', '.2%'):>17} {r['training_seconds']:>8.1f}  {status.strip()}")
    return "\n".join(lines)


def rate_note(row: dict[str, Any]) -> str:
    """What the study says of a rate that did not simply learn: stopped (when, why), diverged, stalled; or ''."""
    return row["stopped"] or ("diverged" if row["diverged"] else STALLED if row["stalled_at_chance"] else "")


def plot_study(by_rate: dict[float, list[TrainResult]], rows: list[dict[str, Any]], path: Path) -> None:
    """Validation loss (left, training loss dashed) and validation accuracy (right) per epoch for every rate, with
    the std over seeds as error bars.

    The axes fit the rates that learn: a dead rate's first-epoch loss (about 30 for lr 0.1) would squash the
    others' curves into one line. A rate that diverged or stalled is drawn dotted, held at the edge where it
    leaves the axes, and ends with an x where the study stopped it.
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 5))
    rates = [(ran, row) for row in rows if (ran := [r for r in by_rate[row["lr"]] if r.ended != FAILED])]
    for ax, keys in ((loss_ax, ("val_loss", "loss")), (acc_ax, ("val_accuracy",))):
        learning = [mean_curve(ran, key)[0] for ran, row in rates if not did_not_learn(row) for key in keys]
        limits = axis_limits(learning or [mean_curve(ran, keys[0])[0] for ran, _ in rates])
        for i, (ran, row) in enumerate(rates):
            draw_rate(ax, ran, row, keys, f"C{i}", limits)
        ax.set_ylim(*limits)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    seeds = max((len(ran) for ran, _ in rates), default=1)
    spread = f"; mean ± std over {seeds} seeds" if seeds > 1 else ""
    loss_ax.set(ylabel="loss (cross-entropy)", title=f"Loss (solid: validation, dashed: training{spread})")
    acc_ax.set(ylabel="validation accuracy", title="Validation accuracy (x: the study stopped the run there)")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if rates:
        acc_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Effect of the learning rate (dotted: rates that did not learn, held at the axes' edge)")
    save_figure(fig, path)


def did_not_learn(row: dict[str, Any]) -> bool:
    """Whether a study row's rate diverged or stalled at chance level."""
    return row["diverged"] or row["stalled_at_chance"]


def draw_rate(ax: Any, runs: list[TrainResult], row: dict[str, Any], keys: tuple[str, ...], color: str,
              limits: tuple[float, float]) -> None:
    """One rate's mean curve of keys[0] (and, dashed, of keys[1:]) on ax; a rate that did not learn dotted and
    clipped to limits, with an x at the epoch where it was stopped."""
    dead, note = did_not_learn(row), rate_note(row)
    mean, std = mean_curve(runs, keys[0])
    shown = np.clip(mean, *limits) if dead else mean
    epochs = np.arange(1, len(mean) + 1)
    ax.errorbar(epochs, shown, yerr=std if len(runs) > 1 and not dead else None, fmt=":" if dead else "-o",
                color=color, markersize=3, capsize=3, label=f"lr {row['lr']:g}" + (f" ({note})" if note else ""))
    for key in () if dead else keys[1:]:
        ax.plot(epochs, mean_curve(runs, key)[0][:len(epochs)], "--", color=color)
    if row["stopped"] and len(shown):
        ax.plot(epochs[-1], shown[-1], "x", color=color, markersize=11, markeredgewidth=2)


def axis_limits(curves: list[np.ndarray]) -> tuple[float, float]:
    """Limits that hold every finite value of these curves, with a margin of 5% of their range."""
    values = np.concatenate([c[np.isfinite(c)] for c in curves] or [np.zeros(0)])
    if not len(values):
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def mean_curve(results: list[TrainResult], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean and sample std of history[key] over runs of unequal length (std 0 for one run)."""
    import warnings

    curves = [r.history.get(key, []) for r in results]
    grid = np.full((len(curves), max((len(c) for c in curves), default=0)), np.nan)
    for i, c in enumerate(curves):
        grid[i, :len(c)] = np.where(np.isfinite(c), c, np.nan)
    counts = np.sum(~np.isnan(grid), axis=0)
    with warnings.catch_warnings():  # all-NaN columns (epochs after every seed diverged) simply stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(grid, axis=0), np.where(counts > 1, np.nanstd(grid, axis=0, ddof=1), 0.0)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); a single value is its own mean, with no spread."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    return float(np.mean(values)), float(np.std(values, ddof=1))


def report_seeds(runs: list[TrainResult], evals: dict[int, Any], best: TrainResult) -> dict[str, Any]:
    """Print each seed's test results and their mean ± std; return them for metrics.json."""
    rows = [seed_row(r, evals.get(r.seed)) for r in runs]
    (acc_mean, acc_std), (loss_mean, loss_std) = (mean_std([getattr(ev, k) for ev in evals.values()])
                                                  for k in ("accuracy", "loss"))
    summary = {"seeds": rows, "test_accuracy_mean": acc_mean, "test_accuracy_std": acc_std,
               "test_loss_mean": loss_mean, "test_loss_std": loss_std,
               "std_is": "sample standard deviation (ddof=1) over seeds",
               "saved_seed": best.seed, "saved_seed_selected_by": BEST_MONITOR}
    spread = f" ± {summary['test_accuracy_std']:.2%} (mean ± sample std)" if len(evals) > 1 else ""
    print(f"\nTest results of lr={best.lr:g} per seed:\n{format_seed_table(rows)}")
    print(f"Test accuracy over {len(evals)} seed(s): {summary['test_accuracy_mean']:.2%}{spread}")
    print(f"\nSeed {best.seed} has the best validation accuracy; its model and plots are saved. Its test results:")
    return summary


def seed_row(result: TrainResult, ev: Any) -> dict[str, Any]:
    """One seed's figures: the kept epoch, its validation accuracy and its test results."""
    return {"seed": result.seed, "best_epoch": result.best_epoch, "best_val_accuracy": result.best_value,
            "test_loss": ev.loss if ev else None, "test_accuracy": ev.accuracy if ev else None,
            "training_seconds": round(result.seconds, 2), "diverged": result.ended == DIVERGED,
            "failed": result.failure}


def format_seed_table(rows: list[dict[str, Any]]) -> str:
    """Per-seed test results as printed."""
    lines = [f"{'seed':>10} {'kept epoch':>10} {'val acc':>8} {'test loss':>9} {'test acc':>8} {'seconds':>8}  status"]
    for r in rows:
        status = "failed: " + r["failed"] if r["failed"] else ("diverged" if r["diverged"] else "")
        lines.append(f"{r['seed']:>10} {or_dash(r['best_epoch'], 'd'):>10} {or_dash(r['best_val_accuracy'], '.2%'):>8} "
                     f"{or_dash(r['test_loss'], '.4f'):>9} {or_dash(r['test_accuracy'], '.2%'):>8} "
                     f"{r['training_seconds']:>8.1f}  {status}")
    return "\n".join(lines)


def or_dash(value: Any, spec: str) -> str:
    """A table cell: the value formatted, or '-' when there is none."""
    return "-" if value is None else format(value, spec)
