"""--finetune DIR: a trained model adapted to a folder of labelled photos (here drawn shapes), the messy folders
users have, and what --predict then says."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import call_main, class_image, run_cli
from test_journal import start_cli, wait_for_line

FOLDERS = {"bar": 0, "disc": 2, "cross": 4}  # class folder -> the synthetic shape drawn in its photos


def draw_photos(folder: Path, count: int = 8, side: int = 56) -> Path:
    """Class folders of drawn photos: each shape of FOLDERS, larger than 28 pixels, so read as photos are."""
    for name, label in FOLDERS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            image = Image.fromarray(class_image(label, seed=100 * label + k)).resize((side, side))
            image.save(folder / name / f"{name}{k}.png")
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finetune_flags(teach: Path, base: Path, plots: Path, *extra: str) -> list[str]:
    return ["--finetune", str(teach), "--model-path", str(base), "--plots-dir", str(plots), "--epochs", "15",
            "--seed", "1", *extra]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory, trained: dict) -> dict:
    """The trained model adapted to a messy folder of drawn photos: class folders, a file beside them, a folder
    inside one, a text file and a broken image in another."""
    work = tmp_path_factory.mktemp("finetune")
    teach = draw_photos(work / "teach")
    (teach / "notes.txt").write_text("not a class")
    (teach / "bar" / "old").mkdir()
    (teach / "disc" / "readme.md").write_text("not a photo")
    (teach / "cross" / "broken.jpg").write_bytes(b"not a jpeg")
    base = work / "models" / "base.keras"
    base.parent.mkdir()
    shutil.copy(trained["model"], base)
    before = digest(base)
    proc = run_cli(*finetune_flags(teach, base, work / "plots"))
    assert proc.returncode == 0, proc.stderr
    return {"work": work, "teach": teach, "base": base, "before": before, "proc": proc,
            "model": base.with_name("base_teach.keras"), "out": work / "plots" / "finetune-teach"}


@pytest.mark.slow
def test_finetune_writes_the_adapted_model_beside_the_base_and_leaves_the_base_as_it_was(adapted: dict) -> None:
    assert adapted["model"].is_file() and digest(adapted["base"]) == adapted["before"]
    assert sorted(p.name for p in adapted["out"].iterdir()) == [
        "accuracy.png", "confusion_matrix.png", "history.csv", "loss.png", "metrics.json"]
    metrics = json.loads((adapted["out"] / "metrics.json").read_text())
    assert metrics["classes"] == ["bar", "cross", "disc"] and metrics["photos"] == 24
    assert metrics["held_out_photos"] == 3 and metrics["epochs"] == 15, "one a class of 8 (15% of 8, rounded)"
    assert set(metrics["per_class_held_out_accuracy"]) == set(FOLDERS)
    assert "Reading photos: 25 of 25" in adapted["proc"].stdout
    assert "Held-out photos: 3; right class:" in adapted["proc"].stdout


@pytest.mark.slow
def test_a_messy_folder_is_read_with_what_was_passed_over_counted(adapted: dict) -> None:
    proc = adapted["proc"]
    assert ("ignored: 1 files beside the class folders, 1 folders inside class folders, 1 files that are not "
            "images; 1 could not be read") in proc.stdout
    [line] = [line for line in proc.stderr.splitlines() if "broken.jpg" in line]
    assert line.startswith("error: ") and line.endswith("(skipped)")


@pytest.mark.slow
def test_predict_with_the_adapted_model_names_the_folders(adapted: dict, tmp_path: Path) -> None:
    for name, label in FOLDERS.items():
        Image.fromarray(class_image(label, seed=999)).resize((56, 56)).save(tmp_path / f"new-{name}.png")
    proc = run_cli("--predict", tmp_path, "--json", "--model-path", adapted["model"], "--plots-dir", tmp_path / "seen")
    assert proc.returncode == 0, proc.stderr
    results = {Path(r["file"]).stem: r for r in json.loads(proc.stdout)}
    assert {r["class"] for r in results.values()} <= set(FOLDERS)
    assert sum(results[f"new-{name}"]["class"] == name for name in FOLDERS) >= 2
    assert all(len(r["top3"]) == 3 and not r["mirrored"] and not r["stretched"] for r in results.values())
    text = run_cli("--predict", tmp_path / "new-disc.png", "--model-path", adapted["model"], "--plots-dir",
                   tmp_path / "seen")
    assert text.returncode == 0 and text.stdout.split(": ")[1].split(" ")[0] in FOLDERS


@pytest.mark.slow
def test_the_adapted_model_loads_in_plain_keras_with_its_class_names(adapted: dict) -> None:
    import keras

    from fashion_cnn.model_file import load_trained_model

    model = keras.models.load_model(adapted["model"])
    assert model.output_shape == (None, len(FOLDERS))
    _, notes = load_trained_model(adapted["model"])
    assert notes["class_names"] == ["bar", "cross", "disc"] and 0 <= notes["unsure_above"] <= 1


@pytest.mark.slow
def test_the_same_seed_gives_the_same_adapted_model(adapted: dict, tmp_path: Path) -> None:
    again = run_cli(*finetune_flags(adapted["teach"], adapted["base"], tmp_path / "plots"),
                    "--finetuned-path", tmp_path / "again.keras")
    assert again.returncode == 0, again.stderr
    first, second = (json.loads((d / "metrics.json").read_text())
                     for d in (adapted["out"], tmp_path / "plots" / "finetune-teach"))
    assert second["history"] == first["history"] and second["held_out_accuracy"] == first["held_out_accuracy"]


@pytest.mark.slow
def test_ctrl_c_while_adapting_leaves_nothing_half_written(tmp_path: Path, trained: dict) -> None:
    teach = draw_photos(tmp_path / "teach")
    base = tmp_path / "base.keras"
    shutil.copy(trained["model"], base)
    proc = start_cli(*finetune_flags(teach, base, tmp_path / "plots", "--epochs", "400"))
    wait_for_line(proc, "Epoch 2/400")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Interrupted; nothing was written and earlier outputs are untouched." in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.keras", "plots", "teach"]
    assert list((tmp_path / "plots").iterdir()) == [], "no curves, no metrics, no model"


@pytest.mark.slow
def test_ctrl_c_while_reading_the_photos_stops_at_once_and_writes_nothing(tmp_path: Path, trained: dict) -> None:
    """Large photos are read in a thread for each core; Ctrl-C there stops the call, with nothing written."""
    teach = draw_photos(tmp_path / "teach", count=24, side=400)
    base = tmp_path / "base.keras"
    shutil.copy(trained["model"], base)
    proc = start_cli(*finetune_flags(teach, base, tmp_path / "plots"))
    wait_for_line(proc, "Reading photos: ")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted; earlier outputs are untouched." in stderr
    assert "Traceback" not in stderr and "Reading photos: 72 of 72" not in stdout, "stopped before the end"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.keras", "plots", "teach"]
    assert list((tmp_path / "plots").iterdir()) == [], "no curves, no metrics, no model"


@pytest.mark.parametrize(("make", "said"), [
    (lambda d: d, "no such folder; put each class's photos in a folder of its own inside it"),
    (lambda d: d.mkdir() or d, "holds no class folders"),
    (lambda d: (d / "only").mkdir(parents=True) or d, "holds one class folder (only); the network needs two or more"),
    (lambda d: draw_photos(d, count=3), ("each class needs at least 5 readable photos; too few in bar (3), "
                                         "cross (3), disc (3): add photos there, or remove the folder")),
])
def test_a_folder_it_cannot_learn_from_is_one_line_before_anything_is_written(tmp_path: Path, make: object,
                                                                              said: str) -> None:
    teach = make(tmp_path / "teach")
    ran = call_main("--finetune", teach, "--model-path", tmp_path / "m.keras", "--plots-dir", tmp_path / "plots")
    assert ran.returncode == 1 and said in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and not (tmp_path / "plots").exists()


def test_without_a_base_model_or_with_a_broken_one_it_says_how_to_get_one(tmp_path: Path) -> None:
    teach = draw_photos(tmp_path / "teach", count=5)
    ran = call_main("--finetune", teach, "--model-path", tmp_path / "m.keras", "--plots-dir", tmp_path / "plots")
    assert ran.returncode == 1 and "no trained model at" in ran.stderr and "train one first" in ran.stderr
    (tmp_path / "m.keras").write_bytes(b"not a model")
    ran = call_main("--finetune", teach, "--model-path", tmp_path / "m.keras", "--plots-dir", tmp_path / "plots")
    assert ran.returncode == 1 and "is not a readable Keras model file" in ran.stderr
    assert not (tmp_path / "plots").exists() and not (tmp_path / "m_teach.keras").exists()


def test_without_opencv_it_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "cv2" else find_spec(name))
    ran = call_main("--finetune", draw_photos(tmp_path / "teach", count=5), "--model-path", tmp_path / "m.keras")
    assert ran.returncode == 1 and ran.stderr == ("error: --finetune needs OpenCV to find the item in a photo: "
                                                  "pip install -r requirements.txt\n")


def test_the_adapted_model_never_replaces_the_base(tmp_path: Path) -> None:
    teach = draw_photos(tmp_path / "teach", count=5)
    ran = call_main("--finetune", teach, "--model-path", tmp_path / "m.keras", "--finetuned-path", tmp_path / "m.keras")
    assert ran.returncode == 1 and "is the base model; the adapted model never replaces it" in ran.stderr


@pytest.mark.parametrize(("flags", "said"), [
    (["--finetune", "d", "--predict", "x.jpg"], "--finetune and --predict are two calls"),
    (["--finetuned-path", "a.keras"], "--finetuned-path only applies to --finetune"),
    (["--finetune", "d", "--finetuned-path", "a.h5"], "--finetuned-path a.h5 must end in .keras"),
    (["--finetune", "d", "--lr", "0.1", "0.01"], "--finetune trains one adapted model here; drop several --lr"),
])
def test_flags_that_do_not_go_with_finetune_are_usage_errors(flags: list[str], said: str) -> None:
    ran = call_main(*flags)
    assert ran.returncode == 2 and said in ran.stderr


def test_the_recipe_applies_unless_a_flag_gives_another_value() -> None:
    import ConvolutionalNN as cnn
    from fashion_cnn import finetune

    plain = finetune.recipe(cnn.parse_args(["--finetune", "d"]))
    assert (plain.epochs, plain.lr, plain.batch_size) == (20, 0.002, 16) and plain.shift == 2 and plain.flip
    given = finetune.recipe(cnn.parse_args(["--finetune", "d", "--epochs", "7", "--lr", "0.01", "--batch-size", "4"]))
    assert (given.epochs, given.lr, given.batch_size) == (7, 0.01, 4)


def test_each_class_holds_out_its_share_and_at_least_one_photo() -> None:
    from fashion_cnn import finetune

    labels = np.repeat([0, 1, 2], [5, 20, 40])
    held = finetune.held_out(labels, seed=0)
    assert [int(held[labels == k].sum()) for k in range(3)] == [1, 3, 6]
    assert (finetune.held_out(labels, seed=0) == held).all() and (finetune.held_out(labels, seed=1) != held).any()


@pytest.mark.slow
def test_the_new_last_layer_starts_out_naming_the_photos_classes(trained: dict) -> None:
    """Imprinted, the adapted network names the classes of its photos before any training; a random new layer
    would name a third of them."""
    from fashion_cnn import finetune
    from fashion_cnn.backends import import_keras
    from fashion_cnn.model_file import load_trained_model

    keras = import_keras()
    base, _ = load_trained_model(trained["model"])
    model = finetune.adapted_network(keras, base, len(FOLDERS))
    labels = np.repeat(np.arange(len(FOLDERS)), 6)
    images = np.stack([class_image(list(FOLDERS.values())[k], seed=50 + i) for i, k in enumerate(labels)])[..., None]
    weights, biases = finetune.imprinted_head(keras, model, images, labels, len(FOLDERS))
    assert np.allclose(np.linalg.norm(weights, axis=0), finetune.IMPRINT_LENGTH) and not biases.any()
    model.layers[-1].set_weights([weights, biases])
    new = np.stack([class_image(list(FOLDERS.values())[k], seed=900 + i) for i, k in enumerate(labels)])[..., None]
    assert (model.predict(new, verbose=0).argmax(axis=1) == labels).mean() >= 0.9
