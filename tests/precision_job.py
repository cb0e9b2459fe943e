"""Measures three networks' Fisher spectra in one dtype: a separate process.

python tests/precision_job.py FOLDER float32   # trains, saves, measures
python tests/precision_job.py FOLDER float64   # loads the weights, measures

The float32 run trains each network for two epochs on the bundled digits and
saves its weights and the measured examples to FOLDER; the float64 run
rebuilds the same networks under a float64 dtype policy, loads those
weights and measures the same batches. Each prints one JSON line:
``{network: {batch: {c_k, rank, eigenvalues, zero_threshold}}}``.

The networks: the paper-style ResNet-8 with BatchNormalization, an MLP, and
a transformer block (multi-head attention, LayerNormalization, a dense
feed-forward) reading each 8x8 digit as 8 steps of 8 features.
"""

import json
import os
import sys

NETWORKS = ("resnet_bn", "mlp", "transformer")
BATCH_SIZES = (16, 64, 256)


def build(network: str, dtype: str):
    import keras

    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)  # Keras caches the first policy
    keras.utils.set_random_seed(1)
    from keras_fim import models

    if network == "resnet_bn":
        model = models.cifar_resnet((8, 8, 1), num_classes=10, depth=8)
    elif network == "mlp":
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="tanh"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    else:
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Dense(16)(keras.layers.Reshape((8, 8))(inputs))
        attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x)
        x = keras.layers.LayerNormalization()(x + attended)
        forward = keras.layers.Dense(16)(keras.layers.Dense(32, activation="gelu")(x))
        x = keras.layers.LayerNormalization()(x + forward)
        x = keras.layers.GlobalAveragePooling1D()(x)
        outputs = keras.layers.Dense(10, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
    return models.compile_like_the_paper(model, learning_rate=0.1)


def main(folder: str, dtype: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    import keras_fim
    from keras_fim.datasets import load_digits

    batch_file = os.path.join(folder, "batch.npz")
    if dtype == "float32":
        (x, y), _ = load_digits()
        np.savez(batch_file, x=x[: max(BATCH_SIZES)], y=y[: max(BATCH_SIZES)])
    with np.load(batch_file) as batch:
        x_all, y_all = batch["x"].astype(dtype), batch["y"]
    results = {}
    for network in NETWORKS:
        model = build(network, dtype)
        weights_file = os.path.join(folder, f"{network}.npz")
        if dtype == "float32":
            (x, y), _ = load_digits()
            model.fit(x, y, batch_size=32, epochs=2, verbose=0)
            np.savez(weights_file, *model.get_weights())
        else:
            with np.load(weights_file) as saved:
                model.set_weights(
                    [saved[f"arr_{i}"].astype(dtype) for i in range(len(saved))]
                )
        results[network] = {}
        for size in BATCH_SIZES:
            m = keras_fim.measure(model, x_all[:size], y_all[:size])
            results[network][size] = {
                "c_k": float(m.condition_number),
                "rank": int(m.rank),
                "eigenvalues": m.eigenvalues.numpy().tolist(),
                "zero_threshold": float(m.zero_threshold),
            }
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
