"""Writes a SPEC.npz for `run_peers.py` from the real Keras models.

Run with the project's venv (TensorFlow / Keras / keras-fim):

    .venv/bin/python benchmarks/peers/make_spec.py --arch resnet --batch 32 \
        --out /tmp/spec.npz [--reference]

SPEC.npz keys (the contract `run_peers.py` reads):

    arch                 str: "mlp" | "resnet" | "resnet_bn"
    x                    float32, the batch (NHWC images, or (B, 28, 28[, 1]) /
                         (B, 784) for the MLP: the peers flatten it)
    y                    int64 (B,), the sparse labels
    n_trainable          int, the number of trainable variables
    w0 .. w{n-1}         float32, model.trainable_variables in order, Keras
                         layouts (Conv2D (kh, kw, cin, cout), Dense (in, out))
    trainable_names      str (n,), their variable paths (informational)
    n_non_trainable      int
    nt0 .. nt{m-1}       float32, model.non_trainable_variables in order (the
                         BatchNormalization moving_mean / moving_variance)
    non_trainable_names  str (m,)
    bn_epsilon           float, BatchNormalization epsilon (Keras: 1e-3)
    blocks_per_stage     int (resnets), widths int (3,) (resnets)
    reference_eigenvalues  float64, optional (--reference): eigenvalues of
                         keras_fim.fisher_gram(model, x, y), descending

The MLP is keras.Sequential([Input((28, 28, 1)), Flatten(), Dense(512, relu),
Dense(512, relu), Dense(10, softmax)]); the resnets are
keras_fim.models.cifar_resnet((32, 32, 3), 10, batch_norm=False / True).
Every model ends with a softmax and is compiled with
loss="sparse_categorical_crossentropy", so l_i = -log p_i[y_i].
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def build_model(arch: str, blocks_per_stage: int = 1):
    import keras

    from keras_fim.models import cifar_resnet

    if arch == "mlp":
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    elif arch in ("resnet", "resnet_bn"):
        model = cifar_resnet(
            (32, 32, 3),
            10,
            blocks_per_stage=blocks_per_stage,
            batch_norm=arch == "resnet_bn",
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def make_batch(arch: str, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = (28, 28, 1) if arch == "mlp" else (32, 32, 3)
    x = rng.uniform(0.0, 1.0, size=(batch, *shape)).astype("float32")
    y = rng.integers(0, 10, size=batch).astype("int64")
    return x, y


def spec_arrays(model, arch, x, y, blocks_per_stage=1, reference=False):
    arrays = {
        "arch": np.array(arch),
        "x": np.asarray(x, "float32"),
        "y": np.asarray(y, "int64"),
        "n_trainable": np.array(len(model.trainable_variables)),
        "trainable_names": np.array([v.path for v in model.trainable_variables]),
        "n_non_trainable": np.array(len(model.non_trainable_variables)),
        "non_trainable_names": np.array(
            [v.path for v in model.non_trainable_variables] or [""]
        )[: len(model.non_trainable_variables)],
        "bn_epsilon": np.array(1e-3),
    }
    for i, v in enumerate(model.trainable_variables):
        arrays[f"w{i}"] = np.asarray(v.numpy(), "float32")
    for i, v in enumerate(model.non_trainable_variables):
        arrays[f"nt{i}"] = np.asarray(v.numpy(), "float32")
    if arch != "mlp":
        arrays["blocks_per_stage"] = np.array(blocks_per_stage)
        arrays["widths"] = np.array([16, 32, 64])
    if reference:
        import keras_fim

        gram = keras_fim.fisher_gram(model, x, y).numpy().astype("float64")
        eig = np.linalg.eigvalsh(0.5 * (gram + gram.T))[::-1]
        arrays["reference_eigenvalues"] = eig.copy()
    return arrays


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=["mlp", "resnet", "resnet_bn"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks-per-stage", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--reference",
        action="store_true",
        help="also store keras_fim.fisher_gram eigenvalues (BN: training-mode "
        "contributions, not comparable to the peers)",
    )
    a = p.parse_args()
    import keras

    keras.utils.set_random_seed(a.seed)
    model = build_model(a.arch, a.blocks_per_stage)
    x, y = make_batch(a.arch, a.batch, a.seed)
    arrays = spec_arrays(model, a.arch, x, y, a.blocks_per_stage, a.reference)
    np.savez(a.out, **arrays)
    print(f"wrote {a.out}: {a.arch}, batch {a.batch}, {model.count_params()} params")


if __name__ == "__main__":
    main()
