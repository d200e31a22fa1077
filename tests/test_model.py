"""The model: its layers and size, its optimizer (the warmed-up weight average, the learning-rate schedule,
dropout seeds) and the saved file any Keras reads."""

from __future__ import annotations

import numpy as np
import pytest

import ConvolutionalNN as cnn
from fashion_cnn import backends


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_dropout_seeds_are_drawn_as_keras_draws_them_so_tensorflow_keeps_its_masks() -> None:
    keras = backends.import_keras()
    cnn.random.seed(11)
    unseeded = [keras.layers.Dropout(0.3), keras.layers.Dropout(0.0), keras.layers.Dropout(0.2)]
    cnn.random.seed(11)
    seeded = [cnn.seeded_dropout(0.3, "a"), cnn.seeded_dropout(0.0, "b"), cnn.seeded_dropout(0.2, "c")]
    for plain, ours in ((unseeded[0], seeded[0]), (unseeded[2], seeded[2])):
        assert ours.seed is not None  # PyTorch then follows the layer's seed state, not torch's global one
        assert list(keras.ops.convert_to_numpy(ours.seed_generator.state)) == list(
            keras.ops.convert_to_numpy(plain.seed_generator.state))
    assert seeded[1].seed is None and not hasattr(seeded[1], "seed_generator")


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_network_layer_stack() -> None:
    model = cnn.build_model(cnn.Config(), 0.001, steps_per_epoch=10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Rescaling", "Conv2D", "MaxPooling2D", "Dropout", "Conv2D", "MaxPooling2D", "Dropout",
                     "Flatten", "Dense", "Dropout", "Dense"]
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert all(c.filters == 128 and c.kernel_size == (3, 3) for c in convs)
    assert tuple(model.compute_output_shape((None, 28, 28, 1))) == (None, 10)
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    probs = np.asarray(model.predict(np.zeros((2, 28, 28, 1), np.uint8), verbose=0))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_the_average_warms_up_then_keeps_its_momentum() -> None:
    """One update from an average of 0 towards a weight of 1 leaves 1 - momentum."""
    import keras

    optimizer = backends.on_keras(cnn.WarmedUpEMAAdam, "optimizers.Adam")(0.0, use_ema=True, ema_momentum=0.99)
    weight = keras.Variable(np.ones(1, np.float32))
    optimizer.build([weight])

    def momentum_at(step: int) -> float:
        optimizer._model_variables_moving_average[0].assign([0.0])
        optimizer.iterations.assign(step)
        optimizer._update_model_variables_moving_average([weight])
        return 1 - float(optimizer._model_variables_moving_average[0].numpy()[0])

    assert momentum_at(0) == pytest.approx(0.1)
    assert momentum_at(10) == pytest.approx(11 / 20)
    assert momentum_at(500) == pytest.approx(501 / 510)
    assert momentum_at(2000) == pytest.approx(0.99), "past step 890 the plain momentum again"


@pytest.mark.slow  # imports TensorFlow: 10 s or more on these CPUs
def test_warm_up_raises_the_learning_rate_from_0_then_the_cosine_decays_it() -> None:
    cfg = cnn.parse_args(["--warmup-epochs", "1", "--epochs", "4", "--filters", "4", "--dense-units", "8"])
    schedule = cnn.build_model(cfg, 0.001, steps_per_epoch=100).optimizer._learning_rate
    at = [float(schedule(step)) for step in (0, 50, 100, 250, 400)]
    assert at == pytest.approx([0, 0.0005, 0.001, 0.0005, 0], abs=1e-7)
    flat = cnn.parse_args(["--warmup-epochs", "1", "--epochs", "4", "--schedule", "constant"])
    schedule = cnn.build_model(flat, 0.001, steps_per_epoch=100).optimizer._learning_rate
    assert [float(schedule(step)) for step in (50, 100, 399)] == pytest.approx([0.0005, 0.001, 0.001])
