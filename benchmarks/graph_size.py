"""How large the measuring graph is: what a first `fit` traces and optimises.

For each keras.applications network (``weights=None``, 32x32x3, 10 classes,
BatchNorm in training mode) it prints the units keras-fim measures, how many
kinds of unit they make (layer class, options, input and output shapes: the
units that share one block function, `SharedBlocks`), the graph operations
of Keras's training step, of the recorded pass, and of the Gram blocks on
top of it (paths by the cost model, so nothing is timed), the seconds
their tracing took, and the operations of the step `FisherCallback`
traces when every step is measured (Keras's step with the probes, the
Gram blocks and the measurement; with the functions it calls). Tracing and optimising cost about the same per
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

import keras_fim
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


def traced_operations(fn, signature, called=False) -> tuple[int, float]:
    """Operations of `fn` traced (with those of the functions it calls
    where `called`), and the seconds the tracing took."""
    start = time.perf_counter()
    graph = tf.function(fn, input_signature=signature, autograph=False)
    concrete = graph.get_concrete_function()
    seconds = time.perf_counter() - start
    operations = len(concrete.graph.get_operations())
    if called:
        library = concrete.graph.as_graph_def().library.function
        operations += sum(len(function.node_def) for function in library)
    return operations, seconds


def measured_step(model):
    """The train step `FisherCallback(every_n_steps=1)` runs, on ``(x, y)``."""
    fisher = keras_fim.FisherCallback(every_n_steps=1)
    fisher.set_model(model)
    fisher.on_train_begin()
    fisher.on_train_batch_begin(0)  # builds the measured step
    return lambda x, y: fisher._train_step(model.train_step, (x, y), True)["loss"]


def row(name, signature) -> str:
    """One network's line of the table."""
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    step_ops, step_s = traced_operations(
        lambda x, y: model.train_step((x, y))["loss"], signature, True
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
    with path_choice("cost"):
        measured_ops, _ = traced_operations(measured_step(model), signature, True)
    units, distinct = kinds(model)
    return (
        f"{name:<15}{units:>6}{distinct:>6}{step_ops:>10}{pass_ops:>10}"
        f"{total_ops - pass_ops:>10}{step_s:>8.1f}{total_s:>13.1f}{measured_ops:>14}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50")
    args = parser.parse_args(argv)
    print(machine.describe())
    print(
        f"{'model':<15}{'units':>6}{'kinds':>6}{'step ops':>10}{'pass ops':>10}"
        f"{'Gram ops':>10}{'step s':>8}{'pass+Gram s':>13}{'measured ops':>14}"
    )
    signature = [tf.TensorSpec([None, 32, 32, 3]), tf.TensorSpec([None], tf.int64)]
    for name in args.models.split(","):
        print(row(name, signature), flush=True)


if __name__ == "__main__":
    main()
