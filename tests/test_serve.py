"""--serve: what the page does, without a browser: the answers --predict gives, teaching as --finetune teaches,
the messages for what it cannot use, one teach at a time, and the flags. tests/test_page_browser.py drives the
page itself in Chromium."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import ConvolutionalNN as cnn
from conftest import call_main, class_image, run_cli
from fashion_cnn import common, serve
from test_finetune import FOLDERS, digest, draw_photos, finetune_flags


def no_progress(share: float, text: str) -> None:
    """The page's progress bar, here unseen."""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, trained: dict) -> serve.Page:
    """The page's logic over a copy of the trained model, as --serve makes it."""
    work = tmp_path_factory.mktemp("page")
    base = work / "models" / "base.keras"
    base.parent.mkdir()
    shutil.copy(trained["model"], base)
    cfg = cnn.parse_args(["--serve", "--model-path", str(base), "--plots-dir", str(work / "plots"), "--epochs", "15",
                          "--seed", "1"])
    (work / "space").mkdir()
    return serve.Page(cfg, work / "space")


def photo_of(label: int, path: Path, seed: int = 5) -> Path:
    Image.fromarray(class_image(label, seed=seed)).resize((112, 112)).save(path)
    return path


@pytest.mark.slow
def test_a_photo_gets_the_answer_predict_prints(page: serve.Page, tmp_path: Path) -> None:
    photos = [photo_of(label, tmp_path / f"shape{label}.png") for label in (0, 4)]
    gallery, answers = page.classify([str(p) for p in photos], str(page.cfg.model_path))
    printed = run_cli("--predict", *photos, "--json", "--model-path", page.cfg.model_path, "--plots-dir", tmp_path)
    assert printed.returncode == 0, printed.stderr
    for result, line, (picture, words) in zip(json.loads(printed.stdout), answers.splitlines(), gallery, strict=True):
        assert f"{result['class']} {result['probability']:.1%}" in line and f"{result['class']} " in words
        assert Image.open(picture).size[0] > 280, "the picture of what the network saw"


@pytest.mark.slow
def test_a_broken_file_is_one_line_and_the_others_are_answered(page: serve.Page, tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    gallery, answers = page.classify([str(tmp_path / "broken.jpg"), str(photo_of(2, tmp_path / "disc.png"))],
                                     str(page.cfg.model_path))
    assert len(gallery) == 1 and answers.splitlines()[0].startswith("- **disc.png**: ")
    assert answers.splitlines()[1].startswith("- could not read ") and "broken.jpg" in answers.splitlines()[1]


@pytest.mark.parametrize(("files", "said"), [
    ([], "drop one or more photos first"),
    (["x.png"] * (serve.MAX_DROP + 1), f"classify at most {serve.MAX_DROP} at a time"),
])
def test_an_empty_or_too_large_drop_is_a_message(files: list[str], said: str) -> None:
    page = serve.Page.__new__(serve.Page)  # the checks come before any model is needed
    with pytest.raises(common.UserError, match=said):
        page.classify(files, "")


@pytest.mark.slow
def test_teaching_on_the_page_gives_the_model_and_figures_finetune_gives(page: serve.Page, tmp_path: Path) -> None:
    teach = draw_photos(tmp_path / "teach")
    before = digest(page.cfg.model_path)
    named = [(name, sorted(str(p) for p in (teach / name).iterdir())) for name in FOLDERS]
    shown = []
    done = page.teach(named, None, "teach", lambda share, text: shown.append((share, text)))
    target = page.cfg.model_path.with_name("base_teach.keras")
    assert done["model"] == str(target) and target.exists() and digest(page.cfg.model_path) == before
    assert shown[0][1].startswith("Reading photos: ") and shown[-1] == (1.0, "Teaching: epoch 15 of 15")
    on_page = json.loads((page.cfg.plots_dir / "finetune-teach" / "metrics.json").read_text())
    assert f"right class: {on_page['held_out_accuracy']:.1%}" in done["summary"]
    assert str(target) in page.model_choices() and Path(done["download"]).read_bytes() == target.read_bytes()
    cli = run_cli(*finetune_flags(teach, page.cfg.model_path, tmp_path / "plots"), "--finetuned-path",
                  tmp_path / "cli.keras")
    assert cli.returncode == 0, cli.stderr
    by_cli = json.loads((tmp_path / "plots" / "finetune-teach" / "metrics.json").read_text())
    assert on_page["confusion"] == by_cli["confusion"]
    for key in ("held_out_accuracy", "per_class_held_out_accuracy", "unsure_above"):
        assert on_page[key] == pytest.approx(by_cli[key], rel=1e-4), key
    assert on_page["history"].keys() == by_cli["history"].keys()
    for key, values in on_page["history"].items():
        assert values == pytest.approx(by_cli["history"][key], rel=1e-4), key
    _, answers = page.classify([str(photo_of(FOLDERS["disc"], tmp_path / "new.png"))], str(target))
    assert answers.startswith("- **new.png**: ") and answers.split(": ")[1].split(" ")[0] in FOLDERS


@pytest.mark.slow
def test_a_second_teach_while_one_runs_is_refused_and_writes_nothing(page: serve.Page, tmp_path: Path) -> None:
    teach = draw_photos(tmp_path / "teach")
    named = [(name, sorted(str(p) for p in (teach / name).iterdir())) for name in FOLDERS]
    with page.teaching, pytest.raises(common.UserError, match="already being taught .* wait until it is done"):
        page.teach(named, None, "second", no_progress)  # while another tab is teaching
    assert not page.cfg.model_path.with_name("base_second.keras").exists()


@pytest.mark.parametrize(("named", "said"), [
    ([("shirts", ["a.png"] * 6)], "name two or more classes"),
    ([("shirts", ["a.png"] * 6), ("", ["b.png"] * 6)], "give a name to the class of 6 photos"),
    ([("shirts", ["a.png"] * 6), ("shoes", [])], "class 'shoes' has no photos"),
    ([("shirts", ["a.png"] * 6), ("Shirts ", ["b.png"] * 6), ("shirts", ["c.png"])], "two classes have the same name"),
    ([("shirts", ["a.png"] * 3), ("shoes", ["b.png"] * 6)], r"^the classes: .* too few in shirts \(3\)"),
    ([], "name two or more classes"),
])
def test_classes_it_cannot_learn_from_are_one_message_before_anything_is_read(
        tmp_path: Path, named: list[tuple[str, list[str]]], said: str) -> None:
    for name in ("a.png", "b.png", "c.png"):
        photo_of(0, tmp_path / name)
    named = [(label, [str(tmp_path / f) for f in files]) for label, files in named]
    page = serve.Page.__new__(serve.Page)
    page.teaching, page.folder = threading.Lock(), tmp_path / "space"
    page.cfg = cnn.parse_args(["--serve", "--model-path", str(tmp_path / "m.keras")])
    with pytest.raises(common.UserError, match=said):
        page.teach(named, None, "mine", no_progress)
    assert not list(tmp_path.glob("*.keras"))


def test_a_zip_of_class_folders_is_laid_out_as_finetune_takes_it(tmp_path: Path) -> None:
    for top in ("", "my-clothes/"):
        archive = tmp_path / f"photos{len(top)}.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for name in ("shirt/a.jpg", "shirt/b.png", "shoes/c.jpg", "notes.txt", "shoes/deeper/d.jpg",
                         "__MACOSX/shirt/._a.jpg"):
                z.writestr(top + name, b"x")
        folder = tmp_path / f"out{len(top)}"
        serve.unpack_zip(archive, folder)
        laid_out = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert laid_out == ["shirt/a.jpg", "shirt/b.png", "shoes/c.jpg"], top


@pytest.mark.parametrize(("typed", "name"), [("my photos", "my-photos"), ("../../etc", "etc"), ("shoes_2", "shoes_2")])
def test_the_taught_model_is_named_within_the_models_folder(typed: str, name: str) -> None:
    assert serve.model_name(typed) == name


def test_a_nameless_taught_model_is_a_message() -> None:
    with pytest.raises(common.UserError, match="give the taught model a name"):
        serve.model_name(" / ")


def test_without_gradio_serve_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real_find_spec(name, *a))
    ran = call_main("--serve", "--model-path", tmp_path / "m.keras", "--plots-dir", tmp_path / "p")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.strip().splitlines() == [
        "error: --serve needs Gradio, which is not installed: pip install -r requirements-serve.txt"]


@pytest.mark.parametrize(("flags", "said"), [
    (["--port", "8000"], "--port: for the page of --serve only"),
    (["--serve", "--predict", "x.png"], "--serve classifies and teaches on a page; drop --predict"),
    (["--serve", "--port", "0"], "--port: 0 must be between 1 and 65535"),
])
def test_flags_that_do_not_go_with_serve_are_usage_errors(flags: list[str], said: str) -> None:
    ran = call_main(*flags)
    assert ran.returncode == common.EXIT_USAGE and said in ran.stderr
