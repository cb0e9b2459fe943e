"""Subclass `keras_fim.FisherModel`: a model that measures itself while it trains.

A small convolutional network written as a subclassed Keras model. Measuring
needs no callback: `fit` measures every `every_n_steps`-th batch, the running
C_K bar and L_K live in `model.fisher_state` and are saved with the model.

    python examples/fisher_model_subclass.py --epochs 3 --log-dir logs/subclass
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras

import keras_fim
from keras_fim.datasets import load_digits


@keras.saving.register_keras_serializable(package="examples")
class DigitsNet(keras_fim.FisherModel):
    """conv - BN - ReLU - pool - dense, measured by `FisherModel`."""

    def __init__(self, filters: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.norm = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.classify = keras.layers.Dense(10, activation="softmax")

    def call(self, images, training=False):
        hidden = keras.activations.relu(self.norm(self.conv(images), training=training))
        return self.classify(self.pool(hidden))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every-n-steps", type=int, default=5)
    parser.add_argument("--log-dir", default="logs/subclass")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = load_digits()
    model = DigitsNet(every_n_steps=args.every_n_steps, log_dir=args.log_dir)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=args.epochs,
        verbose=0,
        validation_data=(x_test, y_test),
    )
    for epoch, (c, energy) in enumerate(
        zip(history.history["C_K_bar"], history.history["L_K"], strict=True)
    ):
        print(f"epoch {epoch + 1}: C_K_bar={c:.4g} L_K={energy:.4g}")

    # The options and the running measurements survive saving.
    path = os.path.join(tempfile.mkdtemp(), "digits_net.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    print(
        f"restored: every_n_steps={restored.fisher_options['every_n_steps']}, "
        f"C_K_bar={float(restored.fisher_state.condition_mean):.4g}, "
        f"measurements={int(restored.fisher_state.measurements)}"
    )


if __name__ == "__main__":
    main()
