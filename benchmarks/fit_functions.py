"""The two train functions `fit` runs with a `FisherCallback`, for timing."""

from __future__ import annotations

import keras

import keras_fim


def fit_functions(model: keras.Model) -> tuple:
    """``(plain, measured)``: Keras's own train function of the compiled
    `model`, and `FisherCallback`'s measuring one (built as at a measured
    batch of `fit`, every step measured); each takes an iterator."""
    model.make_train_function(force=True)
    plain = model.train_function
    fisher = keras_fim.FisherCallback(every_n_steps=1)
    fisher.set_model(model)
    fisher.on_train_begin()
    fisher.on_train_batch_begin(0)
    measured = model.train_function
    fisher.on_train_end()
    return plain, measured
