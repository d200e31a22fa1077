"""--serve: a page on this computer where people show the network their photos and teach it theirs, in the browser,
as Google's Teachable Machine lets them. Classify: drop photos, get each one's top classes, the unsure flag and
the picture of what the network saw, the same answers as --predict (fashion_cnn.predict.classify_files). Teach:
name classes, drop photos into each (or a .zip of a folder with a class per subfolder), and it learns them by
--finetune's recipe (fashion_cnn.finetune.adapt), with its held-out figures and curves; the adapted model is saved
beside the base model and offered for download.

The page is made with Gradio (requirements-serve.txt), imported here alone; nothing on it comes from the internet
or goes there (no analytics, the system's fonts). Uploads are kept in a folder of their own, bounded in size and
number, and removed when the server stops; the page serves no other file of the machine.

Needs Gradio and what --predict and --finetune need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fashion_cnn.common import Settings, UserError
from fashion_cnn.finetune import (
    Adapted,
    Photos,
    adapt,
    class_folders,
    finetuned_path,
    read_class_photos,
    save_adapted,
)
from fashion_cnn.model_file import load_trained_model
from fashion_cnn.outputs import check_writable
from fashion_cnn.photos import require_opencv
from fashion_cnn.predict import IMAGE_SUFFIXES, ModelClasses, answer_text, classify_files

INSTALL = "pip install -r requirements-serve.txt"
MAX_FILE_MB = 50            # one uploaded file (Gradio refuses a larger one in the browser)
MAX_DROP = 100              # photos classified at once
MAX_TEACH = 2000            # photos taught at once
CLASS_SLOTS = 4             # classes named on the page; a folder or .zip can hold more
PHOTO_SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))


def require_gradio() -> None:
    """One line saying how to install Gradio, where it is missing."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"--serve needs Gradio, which is not installed: {INSTALL}")


def serve(cfg: Settings) -> int:
    """Load the model, start the page on --host:--port, say where, and serve until Ctrl-C; the exit code."""
    require_gradio()
    require_opencv("--serve")
    check_writable(cfg.model_path.parent, cfg.plots_dir)
    with workspace() as folder:
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "uploads")  # read when Gradio is imported
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        page = Page(cfg, folder)
        app = page.blocks()
        try:
            app.queue(default_concurrency_limit=2).launch(
                server_name=cfg.host, server_port=cfg.port, max_file_size=f"{MAX_FILE_MB}mb", prevent_thread_lock=True,
                quiet=True, footer_links=[], ssr_mode=False, theme=offline_theme())
        except OSError as e:
            raise UserError(f"cannot serve on {cfg.host}:{cfg.port} ({e}); give another --port") from None
        where = f"http://{cfg.host}:{cfg.port}/"
        public = "" if cfg.host in ("127.0.0.1", "localhost") else " (reachable from other computers: --host)"
        print(f"Serving the page on {where}{public}; Ctrl-C stops it.", flush=True)
        try:
            with stop_on_sigterm():
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            app.close()
            print("\nStopped; the uploaded photos were removed.", flush=True)
    return 0


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does, so that its uploads are removed either way."""
    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A folder of the server's own for uploads and what it draws, removed when it stops."""
    folder = Path(tempfile.mkdtemp(prefix="fashion_cnn_page_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclasses.dataclass
class LoadedModel:
    """A model the page classifies with, its notes, and a lock: one drop at a time per model."""

    path: Path
    model: Any
    notes: dict[str, Any]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Page:
    """What the page does, apart from how it looks: classify a drop of photos, teach classes of photos, and the
    models to choose from (the base model and those adapted from it)."""

    def __init__(self, cfg: Settings, folder: Path) -> None:
        self.cfg, self.folder = cfg, folder
        self.models: dict[str, LoadedModel] = {}
        self.teaching = threading.Lock()
        self.load(cfg.model_path)
        self.warm_up()

    # models ---------------------------------------------------------------------------------------------------

    def load(self, path: Path) -> LoadedModel:
        """The model at path, loaded once."""
        key = str(path)
        if key not in self.models:
            model, notes = load_trained_model(path)
            self.models[key] = LoadedModel(path, model, notes)
        return self.models[key]

    def model_choices(self) -> list[str]:
        """The base model, then the models adapted from it (named as --finetune and the page name them)."""
        base = self.cfg.model_path
        adapted = sorted(str(p) for p in base.parent.glob(f"{base.stem}_*.keras"))
        return [str(base), *adapted]

    def named_choices(self) -> list[tuple[str, str]]:
        """model_choices as the dropdown shows them: (file name, path)."""
        return [(Path(path).name, path) for path in self.model_choices()]

    def warm_up(self) -> None:
        """Classify a made-up photo once, so that the first real one is answered without compiling."""
        from PIL import Image

        sample = self.folder / "warm-up" / "sample.png"
        sample.parent.mkdir(parents=True)
        Image.new("RGB", (120, 160), "white").save(sample)
        loaded = self.load(self.cfg.model_path)
        classify_files(loaded.model, loaded.notes, [sample], self.folder / "warm-up")

    # classifying ----------------------------------------------------------------------------------------------

    def classify(self, files: Sequence[str] | None, choice: str) -> tuple[list[tuple[str, str]], str]:
        """A drop of photos classified with the chosen model: (picture of what the network saw, caption) for each
        one read, and the answers as text, with a line for each file that could not be read."""
        files = list(files or [])
        if not files:
            raise UserError("drop one or more photos first")
        if len(files) > MAX_DROP:
            raise UserError(f"{len(files)} files at once; classify at most {MAX_DROP} at a time")
        if choice not in self.model_choices():
            raise UserError(f"no such model: {choice}")
        loaded = self.load(Path(choice))
        pictures = self.folder / "seen" / uuid.uuid4().hex
        with loaded.lock:
            results, errors = classify_files(loaded.model, loaded.notes, [Path(f) for f in files], pictures)
        unsure = ModelClasses.of(loaded.notes).unsure_note
        gallery = [(r["seen"], caption(r)) for r in results]
        lines = [answer_line(r, unsure) for r in results] + [f"- could not read {error}" for error in errors]
        return gallery, "\n".join(lines)

    # teaching -------------------------------------------------------------------------------------------------

    def teach(self, named: Sequence[tuple[str, Sequence[str] | None]], archive: str | None, name: str,
              progress: Callable[[float, str], None]) -> dict[str, Any]:
        """Teach the base model the photos of each named class (named: (class name, its files)), or of a .zip of
        a folder with a class per subfolder (archive), by --finetune's recipe; save the adapted model as
        fashion_cnn_NAME.keras beside the base model with its outputs, and say what it achieved. One teach at a
        time, whichever tab asks. (A folder uploaded as such reaches the server without its subfolders: Gradio
        keeps only the files' names.)"""
        if not self.teaching.acquire(blocking=False):
            raise UserError("the network is already being taught (in this or another tab); wait until it is done")
        try:
            return self.teach_now(named, archive, name, progress)
        finally:
            self.teaching.release()

    def teach_now(self, named: Sequence[tuple[str, Sequence[str] | None]], archive: str | None, name: str,
                  progress: Callable[[float, str], None]) -> dict[str, Any]:
        """teach, once the lock is held."""
        name = model_name(name)
        classes = self.folder / "teach" / uuid.uuid4().hex / name
        gather_classes(named, archive, classes)
        cfg = dataclasses.replace(self.cfg, finetune=classes)
        target, out = finetuned_path(cfg), self.cfg.plots_dir / f"finetune-{name}"
        said = "the .zip" if archive else "the classes"
        class_files, ignored = class_folders(classes, named=said)

        def reading(done: int, total: int) -> None:
            progress(0.3 * done / total, f"Reading photos: {done} of {total}")

        photos = read_class_photos(class_files, ignored, classes, named=said, progress=reading)
        base, _ = load_trained_model(self.cfg.model_path)  # a copy of its own: teaching trains the layers it shares

        def epoch_done(done: int, epochs: int) -> None:
            progress(0.3 + 0.7 * done / epochs, f"Teaching: epoch {done} of {epochs}")

        progress(0.3, "Teaching: epoch 0")
        adapted = adapt(cfg, base, photos, on_epoch=epoch_done, handle_signals=False)
        save_adapted(adapted, photos, target, out, self.cfg.model_path)
        self.models.pop(str(target), None)  # taught again under the same name: load the new one
        return self.taught(adapted, photos, target, out)

    def taught(self, adapted: Adapted, photos: Photos, target: Path, out: Path) -> dict[str, Any]:
        """What the page shows after teaching: the figures as text, the pictures, the model to download."""
        shown = self.folder / "taught" / uuid.uuid4().hex
        shown.mkdir(parents=True)
        copies = {}
        for picture in ("accuracy.png", "loss.png", "confusion_matrix.png"):
            copies[picture] = str(shutil.copy(out / picture, shown / picture))  # the page serves its folder alone
        download = str(shutil.copy(target, shown / target.name))
        report = adapted.report
        per_class = "\n".join(f"| {c} | {a:.1%} |" for c, a in report["per_class_held_out_accuracy"].items())
        summary = (f"**Held-out photos: {report['held_out_photos']}; right class: {report['held_out_accuracy']:.1%}**"
                   f" ({len(photos.labels)} photos in {len(photos.classes)} classes, {adapted.seconds:.0f} s of "
                   f"teaching{'; ' + str(photos.unreadable) + ' could not be read' if photos.unreadable else ''})"
                   f"\n\n| class | right on its held-out photos |\n| --- | --- |\n{per_class}\n\n"
                   f"Saved as `{target}` (classify with it here, or: `python3 ConvolutionalNN.py --predict PHOTO "
                   f"--model-path {target}`); curves, confusion matrix and metrics in `{out}/`.")
        return {"summary": summary, "pictures": copies, "download": download, "model": str(target)}

    # the page -------------------------------------------------------------------------------------------------

    def blocks(self) -> Any:
        """The page: a Classify tab and a Teach tab, in Gradio's Blocks; a UserError shows as a message there."""
        import gradio as gr

        with gr.Blocks(title="Fashion-MNIST CNN", analytics_enabled=False) as app:
            gr.Markdown(INTRODUCTION)
            with gr.Tab("Classify"):
                model = gr.Dropdown(self.named_choices(), value=str(self.cfg.model_path),
                                    label="Model (taught ones name their own classes)")
                drop = gr.File(file_count="multiple", type="filepath", file_types=sorted(IMAGE_SUFFIXES), elem_id="drop",
                               label=f"Photos of clothes ({PHOTO_SUFFIXES}; up to {MAX_DROP} at once)")
                answers = gr.Markdown(elem_id="answers")
                seen = gr.Gallery(label="What the network saw", preview=True, selected_index=0, object_fit="contain",
                                  height=460, buttons=["download", "fullscreen"], elem_id="seen")  # one large, the rest
                # as thumbnails below: each is a wide picture (no "share": it posts to Hugging Face)
                classify = as_page_call(self.classify)
                drop.upload(classify, [drop, model], [seen, answers])
                model.change(lambda files, choice: classify(files, choice) if files else ([], ""), [drop, model],
                             [seen, answers])
            with gr.Tab("Teach"):
                gr.Markdown(TEACHING)
                slots = []
                for number in range(1, CLASS_SLOTS + 1):
                    with gr.Row():
                        slots.append(gr.Textbox(label=f"Class {number}", scale=1, elem_id=f"class-{number}"))
                        slots.append(gr.File(file_count="multiple", type="filepath", scale=3, height=110,
                                             file_types=sorted(IMAGE_SUFFIXES), label=f"Photos of class {number}",
                                             elem_id=f"photos-{number}"))
                archive = gr.File(file_types=[".zip"], type="filepath", elem_id="zip", height=110,
                                  label="... or a .zip of a folder with a class per subfolder, as --finetune takes it")
                name = gr.Textbox(value="my-photos", label="Name of the taught model", elem_id="name")
                start = gr.Button("Teach", variant="primary", elem_id="teach")
                summary = gr.Markdown(elem_id="taught")
                with gr.Row():
                    curves = [gr.Image(label=label, show_label=False, type="filepath",  # titled in the picture
                                       buttons=["download", "fullscreen"]) for label in
                              ("Accuracy per epoch", "Loss per epoch", "Held-out confusion matrix")]
                download = gr.File(label="The taught model, to download (.keras)", elem_id="download")

                def teach(*values: Any, progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - Gradio's way
                    *named, zipped, label = values
                    pairs = list(zip(named[::2], named[1::2], strict=True))
                    done = as_page_call(self.teach)(pairs, zipped, label, lambda share, text: progress(share, desc=text))
                    pictures = done["pictures"]
                    return (done["summary"], pictures["accuracy.png"], pictures["loss.png"],
                            pictures["confusion_matrix.png"], done["download"],
                            gr.Dropdown(choices=self.named_choices(), value=done["model"]))

                start.click(teach, [*slots, archive, name], [summary, *curves, download, model])
        return app


def offline_theme() -> Any:
    """Gradio's default look in the system's fonts: its own would come from Google Fonts."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def as_page_call(function: Callable[..., Any]) -> Callable[..., Any]:
    """function, its UserError shown on the page as a message (the server goes on serving)."""
    import gradio as gr

    def call(*args: Any) -> Any:
        try:
            return function(*args)
        except UserError as e:
            raise gr.Error(str(e)) from None

    return call


INTRODUCTION = """# Fashion-MNIST CNN: show it your photos, teach it yours
**Classify** reads each photo as `--predict` does: it finds the item, makes it look like the data set's 28×28
product photos, and names one of the ten classes (or your own, with a taught model). **Teach** gives the network
your own classes of photos, as `--finetune` does. Everything stays on this computer."""

TEACHING = """Name two or more classes and drop at least 5 photos into each (15% of each class is held out to say how
well it learned), or give a .zip of one folder with a photo folder per class. Teaching 50 photos a class takes a
few minutes on a laptop's CPU. The taught model is saved beside the base model, never over it."""


def caption(result: dict[str, Any]) -> str:
    """A picture's caption: the file, its class and probability, and the unsure flag."""
    unsure = " (unsure)" if result["unsure"] else ""
    return f"{Path(result['file']).name}: {result['class']} {result['probability']:.1%}{unsure}"


def answer_line(result: dict[str, Any], unsure_note: str) -> str:
    """One photo's answer in the words --predict prints it in."""
    return f"- **{Path(result['file']).name}**: {answer_text(result, unsure_note)}"


def model_name(text: str) -> str:
    """The name the taught model is saved under: letters, digits, - and _ of what the user typed."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", (text or "").strip()).strip("-")
    if not name:
        raise UserError("give the taught model a name (letters, digits, - or _)")
    return name[:60]


def gather_classes(named: Sequence[tuple[str, Sequence[str] | None]], archive: str | None, folder: Path) -> None:
    """Lay the photos out as --finetune takes them: folder/CLASS/photo, from the named classes or from a .zip of
    class folders (archive), not both."""
    given = [(label.strip(), list(files or [])) for label, files in named if (label or "").strip() or files]
    if given and archive:
        raise UserError("give the classes one way: named on the page, or as a .zip, not both")
    if archive:
        return unpack_zip(Path(archive), folder)
    if len(given) < 2:
        raise UserError("name two or more classes and drop photos into each (or give a .zip): the network learns "
                        "to tell classes apart")
    for label, files in given:
        if not label:
            raise UserError(f"give a name to the class of {len(files)} photos")
        if not files:
            raise UserError(f"class {label!r} has no photos; drop its photos into it, or clear its name")
    labels = [class_folder_name(label) for label, _ in given]
    if len(set(labels)) < len(labels):
        raise UserError("two classes have the same name; give each its own")
    check_count(sum(len(files) for _, files in given))
    for label, (_, files) in zip(labels, given, strict=True):
        for file in files:
            place(Path(file), folder / label)


def unpack_zip(archive: Path, folder: Path) -> None:
    """A .zip of class folders (at its top, or inside one top folder), its photos laid out as folder/CLASS/photo;
    what lies elsewhere in it is passed over."""
    if not zipfile.is_zipfile(archive):
        raise UserError(f"{archive.name} is not a readable .zip")
    try:
        with zipfile.ZipFile(archive) as opened:
            members = [m for m in opened.infolist() if not m.is_dir() and Path(m.filename).suffix.lower()
                       in IMAGE_SUFFIXES and not any(p.startswith((".", "__MACOSX")) for p in Path(m.filename).parts)]
            check_count(len(members))
            if sum(m.file_size for m in members) > MAX_TEACH * MAX_FILE_MB * 2**20:
                raise UserError(f"{archive.name} unpacks to more than the photos allowed at once")
            tops = {Path(m.filename).parts[0] for m in members}
            depth = 1 if len(tops) == 1 and all(len(Path(m.filename).parts) >= 3 for m in members) else 0
            for member in members:
                parts = Path(member.filename).parts[depth:]
                if len(parts) == 2 and member.file_size <= MAX_FILE_MB * 2**20:
                    target = folder / class_folder_name(parts[0]) / Path(parts[1]).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with opened.open(member) as source, open(target, "wb") as copy:
                        shutil.copyfileobj(source, copy)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive.name} is not a readable .zip ({e})") from None
    folder.mkdir(parents=True, exist_ok=True)


def class_folder_name(label: str) -> str:
    """A class name as a folder name: no path separators, no leading dot."""
    cleaned = re.sub(r"[/\\\x00]+", "-", label.strip()).lstrip(".")
    if not cleaned:
        raise UserError(f"{label!r} cannot name a class; use letters or digits")
    return cleaned[:80]


def place(file: Path, folder: Path) -> None:
    """An uploaded photo into its class folder, under its own name (numbered where a name repeats)."""
    folder.mkdir(parents=True, exist_ok=True)
    target, number = folder / file.name, 1
    while target.exists():
        number += 1
        target = folder / f"{file.stem}-{number}{file.suffix}"
    try:
        os.link(file, target)  # the upload itself, not a copy
    except OSError:
        shutil.copy(file, target)


def check_count(count: int) -> None:
    """Refuse more photos than one teach takes."""
    if count > MAX_TEACH:
        raise UserError(f"{count} photos at once; teach at most {MAX_TEACH}")
