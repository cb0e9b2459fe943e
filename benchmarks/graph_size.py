"""How large the measuring graph is: what a first `fit` traces and optimises.

For each keras.applications network (``weights=None``, 32x32x3, 10 classes,
BatchNorm in training mode) it prints the units keras-fim measures, how many
kinds of unit they make (layer class, options, input and output shapes: the
units that share one block function, `SharedBlocks`), the graph operations
of Keras's training step, of the recorded pass, and of the Gram blocks on
top of it (paths by the cost model, so nothing is timed), and the seconds
their tracing took. Tracing and optimising cost about the same per
operation whatever it is, so the operation counts are what a first `fit`
pays for (docs/performance.md, "The first `fit`").

    python benchmarks/graph_size.py
    python benchmarks/graph_size.py --models MobileNetV2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import machine
import tensorflow as tf

from keras_fim.engine import grams_from_calls, record_pass
from keras_fim.engine.gram import path_choice


def kinds(model) -> tuple[int, int]:
    """``(units, kinds)``: layers with weights, and how many differ in class,
    options (but for the name) and shapes."""
    seen = []
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        seen.append((type(layer), repr(sorted(config.items())), str(layer.input.shape)))
    return len(seen), len(set(seen))


def traced_operations(fn, signature) -> tuple[int, float]:
    start = time.perf_counter()
    graph = tf.function(fn, input_signature=signature, autograph=False)
    concrete = graph.get_concrete_function()
    return len(concrete.graph.get_operations()), time.perf_counter() - start


def row(name, signature) -> str:
    """One network's line of the table."""
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    step_ops, step_s = traced_operations(
        lambda x, y: model.train_step((x, y))["loss"], signature
    )
    pass_ops, _ = traced_operations(
        lambda x, y: record_pass(model, x, y).examples, signature
    )

    def grams(x, y):
        record = record_pass(model, x, y)
        with path_choice("cost"):
            blocks, _ = grams_from_calls(record.units, record.calls, record.examples)
        return tf.add_n(list(blocks.values()))

    total_ops, total_s = traced_operations(grams, signature)
    units, distinct = kinds(model)
    return (
        f"{name:<15}{units:>6}{distinct:>6}{step_ops:>10}{pass_ops:>10}"
        f"{total_ops - pass_ops:>10}{step_s:>8.1f}{total_s:>13.1f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50")
    args = parser.parse_args(argv)
    print(machine.describe())
    print(
        f"{'model':<15}{'units':>6}{'kinds':>6}{'step ops':>10}{'pass ops':>10}"
        f"{'Gram ops':>10}{'step s':>8}{'pass+Gram s':>13}"
    )
    signature = [tf.TensorSpec([None, 32, 32, 3]), tf.TensorSpec([None], tf.int64)]
    for name in args.models.split(","):
        print(row(name, signature), flush=True)


if __name__ == "__main__":
    main()
