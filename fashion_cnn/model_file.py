"""The saved model: a .keras archive that plain keras.models.load_model reads on every backend, with the notes
--predict needs (the test-time augmentation it was trained with) inside it.

Needs Keras (fashion_cnn.backends).
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import Any

from fashion_cnn.backends import import_keras
from fashion_cnn.common import UserError, first_line
from fashion_cnn.outputs import atomic_path

MODEL_NOTES = "convolutionalnn.json"  # inside the saved .keras archive: what --predict needs beyond the model


def save_model(model: Any, path: Path, notes: dict[str, Any]) -> None:
    """The model as a .keras archive that plain keras.models.load_model reads (compiled with Keras's own Adam,
    not the training-only WarmedUpEMAAdam), plus the notes --predict needs."""
    keras = import_keras()
    trained_with = model.optimizer
    inner = getattr(trained_with, "inner_optimizer", trained_with)  # float16 wraps it in a LossScaleOptimizer
    strategy = getattr(model, "distribute_strategy", None)  # tf.distribute's: JAX and PyTorch have none
    if type(inner) is not keras.optimizers.Adam:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            adam = keras.optimizers.Adam.from_config({**inner.get_config(), "name": "adam"})
            adam.build(model.trainable_variables)  # else loading it warns that its variables are missing
            model.compile(optimizer=adam, loss=model.loss, metrics=["accuracy"])
    with atomic_path(path) as tmp:
        model.save(tmp)
        finish_archive(tmp, notes)


def finish_archive(path: Path, notes: dict[str, Any]) -> None:
    """Add the notes --predict needs to a saved .keras archive (Keras ignores the extra entry), and record its
    optimizer as every backend loads it: on PyTorch, Keras names its Adam by a module that imports torch."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, portable_config(data) if info.filename == "config.json" else data)
        archive.writestr(MODEL_NOTES, json.dumps(notes))


def portable_config(data: bytes) -> bytes:
    """A saved model's config.json with a backend's own optimizer class named by keras.optimizers, as TensorFlow
    and JAX save it (the same class, config and variables)."""
    config = json.loads(data)
    optimizer = config.get("compile_config", {}).get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("module", "")).startswith("keras.src.backend."):
        optimizer.update(module="keras.optimizers", registered_name=None)
    return json.dumps(config).encode()


def load_trained_model(path: Path) -> tuple[Any, dict[str, Any]]:
    """Load the saved model and its notes (the test-time augmentation it was trained for; an adapted model's class
    names and unsure cut: fashion_cnn.finetune), or explain how to get one."""
    if not path.is_file():
        raise UserError(f"no trained model at {path}; train one first with: python3 ConvolutionalNN.py "
                        f"--model-path {path}")
    retrain = f"train one with: python3 ConvolutionalNN.py --model-path {path}"
    if not zipfile.is_zipfile(path):  # Keras would report a damaged archive as "File not found"
        raise UserError(f"{path} is not a readable Keras model file (not a .keras archive); {retrain}")
    keras = import_keras()
    try:
        model = keras.models.load_model(path)
        with zipfile.ZipFile(path) as archive:
            notes = json.loads(archive.read(MODEL_NOTES)) if MODEL_NOTES in archive.namelist() else {}
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a corrupt archive
        raise UserError(f"{path} is not a readable Keras model file ({first_line(e)}); {retrain}") from None
    return model, notes
