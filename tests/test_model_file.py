"""The saved model: plain Keras loads it, on every backend."""

from __future__ import annotations

import json

import pytest

from fashion_cnn import model_file


def test_a_backend_specific_optimizer_is_saved_by_the_name_every_backend_loads() -> None:
    torch_saved = {"compile_config": {"optimizer": {"module": "keras.src.backend.torch.optimizers.torch_adam",
                                                    "class_name": "Adam", "registered_name": "Adam", "config": {}}}}
    fixed = json.loads(model_file.portable_config(json.dumps(torch_saved).encode()))
    assert fixed["compile_config"]["optimizer"] == {"module": "keras.optimizers", "class_name": "Adam",
                                                    "registered_name": None, "config": {}}
    tensorflow_saved = {"compile_config": {"optimizer": {"module": "keras.optimizers", "class_name": "Adam",
                                                         "registered_name": None, "config": {"a": 1}}}}
    assert json.loads(model_file.portable_config(json.dumps(tensorflow_saved).encode())) == tensorflow_saved


@pytest.mark.slow
def test_the_saved_model_loads_in_plain_keras(trained: dict) -> None:
    import keras

    model = keras.models.load_model(trained["model"])
    assert type(model.optimizer) is keras.optimizers.Adam
