"""How far a mixed-precision measurement is from float32's.

For an MLP and a small CNN with BatchNorm, each over 4 seeds, one batch of
32 is measured twice with the same weights: as a float32 model, and under
``mixed_float16`` / ``mixed_bfloat16``, both by a separate pass
(`keras_fim.measure`) and from the training step's own pass
(`keras_fim.engine.ProbedPass`). It prints the worst relative difference to
float32 of the largest eigenvalue, of every eigenvalue at least 1% of the
largest, of the trace (the L_K term) and of ``c_k``: the table of
docs/distribute.md, whose tolerances tests/test_mixed_precision.py asserts.

    python benchmarks/mixed_precision.py        # ~1 min on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from machine import describe

import keras_fim
from keras_fim.engine import ProbedPass, grams_from_calls, sum_blocks
from keras_fim.measurements import spectrum_from_gram

POLICIES = ("mixed_float16", "mixed_bfloat16")
QUANTITIES = (
    "largest eigenvalue",
    "every eigenvalue >= 1% of the largest",
    "trace, ||J||_F (the L_K term)",
    "c_k",
)


def build(kind: str) -> keras.Model:
    if kind == "mlp":
        inputs = keras.Input((16,))
        h = keras.layers.Dense(64, activation="relu")(inputs)
        h = keras.layers.Dense(32, activation="tanh")(h)
    else:
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(10)(h)
    outputs = keras.layers.Activation("softmax", dtype="float32")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def probed(model, x, y):
    @tf.function
    def step(x, y):
        probe = ProbedPass(model, x)
        with probe:
            model.train_step((x, y))
        record = probe.recorded()
        return sum_blocks(
            grams_from_calls(record.units, record.calls, record.examples)[0]
        )

    return spectrum_from_gram(step(tf.constant(x), tf.constant(y)))


def measurements(kind, weights, x, y):
    """Both paths' measurements, a fresh model for each (the step trains)."""
    model = build(kind)
    model.set_weights(weights)
    separate = keras_fim.measure(model, x, y)
    model = build(kind)
    model.set_weights(weights)
    return separate, probed(model, x, y)


def differences(measured, reference) -> list[float]:
    e, ref = measured.eigenvalues.numpy(), reference.eigenvalues.numpy()
    large = ref >= 1e-2 * ref[0]
    return [
        abs(e[0] / ref[0] - 1),
        float(np.max(np.abs(e[large] / ref[large] - 1))),
        abs(float(measured.trace) / float(reference.trace) - 1),
        abs(float(measured.condition_number) / float(reference.condition_number) - 1),
    ]


def main() -> None:
    print(describe())
    worst = {policy: [0.0] * len(QUANTITIES) for policy in POLICIES}
    for kind in ("mlp", "cnn_batchnorm"):
        for seed in range(4):
            rng = np.random.default_rng(seed)
            shape = (32, 16) if kind == "mlp" else (32, 8, 8, 3)
            x = rng.normal(size=shape).astype("float32")
            y = rng.integers(0, 10, 32)
            keras.config.set_dtype_policy("float32")
            keras.utils.set_random_seed(seed)
            weights = build(kind).get_weights()
            references = measurements(kind, weights, x, y)
            for policy in POLICIES:
                keras.config.set_dtype_policy(policy)
                for measured, reference in zip(
                    measurements(kind, weights, x, y), references, strict=True
                ):
                    worst[policy] = [
                        max(a, b)
                        for a, b in zip(
                            worst[policy], differences(measured, reference), strict=True
                        )
                    ]
    keras.config.set_dtype_policy("float32")
    print("worst relative difference to float32 (2 models x 4 seeds x 2 paths)")
    print(f"{'':40s} " + " ".join(f"{p:>15s}" for p in POLICIES))
    for i, quantity in enumerate(QUANTITIES):
        print(f"{quantity:40s} " + " ".join(f"{worst[p][i]:15.1e}" for p in POLICIES))


if __name__ == "__main__":
    main()
