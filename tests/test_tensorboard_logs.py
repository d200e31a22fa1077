"""--tensorboard: Keras's TensorBoard logs, one folder per run, each epoch once even across --resume."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import ConvolutionalNN as cnn
from conftest import TINY, call_main
from fashion_cnn import backends, common, tensorboard_logs
from test_journal import run_flags, stop_in_epoch


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of folder, as (step, value) pairs, read by TensorBoard itself."""
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    return {tag: [(e.step, float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0])
                   if e.tensor_proto.tensor_content else e.tensor_proto.float_val[0]) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def only_call(logs: Path) -> Path:
    """The one call folder (DIR/<start time>) under a --tensorboard DIR."""
    [call] = list(logs.iterdir())
    return call


def test_runs_are_named_by_what_tells_them_apart() -> None:
    def names(*flags: str) -> list[str]:
        cfg = cnn.parse_args(list(flags))
        return [tensorboard_logs.run_log_name(cfg, lr, seed) for lr, seed in cfg.runs]

    assert names() == ["lr=0.001"]
    assert names("--lr", "0.01", "0.001") == ["lr=0.01", "lr=0.001"]
    assert names("--seeds", "0", "1") == ["seed=0", "seed=1"]
    assert names("--lr", "0.1", "0.01", "--seeds", "3", "4") == ["lr=0.1,seed=3", "lr=0.1,seed=4", "lr=0.01,seed=3",
                                                                 "lr=0.01,seed=4"]


def test_two_calls_in_the_same_second_get_folders_of_their_own(tmp_path: Path) -> None:
    cfg = cnn.parse_args(["--tensorboard", str(tmp_path / "logs"), "--model-path", str(tmp_path / "m.keras")])
    first = tensorboard_logs.with_tensorboard_group(cfg).tensorboard
    first.mkdir(parents=True)
    second = tensorboard_logs.with_tensorboard_group(cfg).tensorboard
    assert first.parent == second.parent == (tmp_path / "logs").resolve() and first != second


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_an_epoch_the_log_already_holds_is_not_written_again(tmp_path: Path) -> None:
    keras = backends.import_keras()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")

    def log_epochs(epochs: range) -> None:
        log = backends.on_keras(tensorboard_logs.EpochLog, "callbacks.TensorBoard")(tmp_path)
        log.set_model(model)
        log.on_train_begin()
        for epoch in epochs:
            log.on_epoch_begin(epoch)
            log.on_epoch_end(epoch, {"loss": 10.0 + epoch, "val_loss": 20.0 + epoch})
        log.on_train_end()

    log_epochs(range(2))
    log_epochs(range(1, 3))  # a resumed run that trains epoch 1 again, then 2
    train, validation = scalars(tmp_path / "train"), scalars(tmp_path / "validation")
    assert train["epoch_loss"] == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert validation["epoch_loss"] == [(0, 20.0), (1, 21.0), (2, 22.0)]
    assert [step for step, _ in train["epoch_learning_rate"]] == [0, 1, 2]


def test_tensorboard_without_its_package_is_one_line_before_the_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    ran = call_main("--data-dir", tmp_path / "nowhere", "--tensorboard", tmp_path / "logs",
                    "--model-path", tmp_path / "m.keras", "--plots-dir", tmp_path / "p")
    assert ran.returncode == 1
    assert ran.stderr.strip() == "error: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_tensorboard_with_predict_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cnn.main(["--predict", "shirt.jpg", "--tensorboard", "logs"])
    assert stop.value.code == common.EXIT_USAGE
    assert "--tensorboard applies to training, not to --predict" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_logs_each_rate_as_its_own_run(tmp_path: Path, data_dir: Path) -> None:
    logs = tmp_path / "logs"
    ran = call_main("--data-dir", data_dir, "--plots-dir", tmp_path / "plots", "--model-path", tmp_path / "m.keras",
                    *TINY, "--epochs", "2", "--lr", "0.01", "0.003", "--tensorboard", logs)
    assert ran.returncode == 0, ran.stderr
    call = only_call(logs)
    assert sorted(p.name for p in call.iterdir()) == ["lr=0.003", "lr=0.01"]
    for run in call.iterdir():
        train, validation = scalars(run / "train"), scalars(run / "validation")
        for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate"):
            assert [step for step, _ in train[tag]] == [0, 1], (run.name, tag)
        for tag in ("epoch_loss", "epoch_accuracy"):
            assert [step for step, _ in validation[tag]] == [0, 1], (run.name, tag)
        assert train["epoch_learning_rate"][0][1] < float(run.name.removeprefix("lr="))  # the cosine decay
    study = json.loads((tmp_path / "plots" / "lr_study.json").read_text())
    for rate in study["rates"]:
        logged = [value for _, value in scalars(call / f"lr={rate['lr']:g}" / "validation")["epoch_accuracy"]]
        assert logged == pytest.approx(rate["runs"][0]["history"]["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_a_resumed_run_continues_its_log_with_each_epoch_once(tmp_path: Path, data_dir: Path) -> None:
    logs = tmp_path / "logs"
    flags = run_flags(tmp_path, data_dir, "--tensorboard", "logs")  # relative, as users type it; cwd is tmp_path
    stopped = stop_in_epoch(flags, 3, signal.SIGINT)
    assert stopped.returncode == common.EXIT_SIGINT, stopped.stderr
    run = only_call(logs) / "lr=0.01"
    assert [step for step, _ in scalars(run / "train")["epoch_loss"]] == [0, 1]
    resumed = call_main(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert only_call(logs) / "lr=0.01" == run  # the same call folder, no second one
    history = json.loads((tmp_path / "plots" / "metrics.json").read_text())["history"]
    for kind, prefix in (("train", ""), ("validation", "val_")):
        logged = scalars(run / kind)
        for tag in ("epoch_loss", "epoch_accuracy"):
            assert [step for step, _ in logged[tag]] == [0, 1, 2, 3], (kind, tag)
            assert [v for _, v in logged[tag]] == pytest.approx(history[prefix + tag.removeprefix("epoch_")],
                                                                abs=1e-6)
