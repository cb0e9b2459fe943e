"""Measuring keras.applications networks: what a measurement costs next to a step.

Side by side in one run, for MobileNetV2, EfficientNetB0 and ResNet50
(``weights=None``, 32x32x3 inputs, 10 classes, BatchNorm in training mode) at
one batch size, it times

* `plain step`: Keras's training step (forward, backward, SGD update);
* `measure: before`: a measurement (the Gram blocks of a recorded pass, then
  the eigenvalues) with the rules and path choice keras-fim had before issue
  15 item 3 (depthwise convolutions by `per_example_rule`, paths by the cost
  model);
* `measure: cost`: today's rules, paths by the cost model;
* `measure: calibrated`: today's rules, paths by timing on this machine
  (``path_choice("calibrate")``; the first call includes the calibration);
* `measure: naive`: every per-example gradient materialised by the rules
  (`per_example_gradients`), then ``J J^T`` and the eigenvalues;
* `fit: plain step`, `fit: measured` and `fit: calibrated`: the functions
  `fit` runs, Keras's own and FisherCallback's measuring one (every_n_steps=1,
  the training pass reused), on batches whose size the graph leaves open, as
  in `fit`; the measuring one traced twice: with the default path choice on
  a new machine (``"auto"`` with an empty calibration store: the cost model,
  nothing timed) and with ``path_choice("calibrate")`` (its first call times
  the candidates). Each network starts with no calibration in memory and a
  new, empty on-disk store, so the first calls are those of a first `fit`
  on a new machine (`benchmarks/first_fit.py` times whole first fits in new
  processes).

It prints the median milliseconds, the ratio to the plain step, the seconds of
the first call (tracing, and calibrating where it does), and per layer class
the paths each choice took.

    python benchmarks/applications.py                  # batch 32, 5 repeats
    python benchmarks/applications.py --models MobileNetV2 --repeats 3
    python benchmarks/applications.py --fit-only       # the two fit rows
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import machine
import numpy as np
import tensorflow as tf
from fit_functions import fit_functions

from keras_fim.engine import (
    gram_from_gradients,
    grams_from_calls,
    per_example_gradients,
    record_pass,
    sum_blocks,
)
from keras_fim.engine.gram import clear_calibrations, path_choice
from keras_fim.engine.rules import LayerRule, builtin_registry, convolution_rule
from keras_fim.measurements import spectrum_from_gram


def before_registry():
    """The rules as they were before issue 15 item 3: depthwise and
    separable convolutions by the per-example rule."""
    registry = builtin_registry()
    for cls in (
        keras.layers.DepthwiseConv1D,
        keras.layers.DepthwiseConv2D,
        keras.layers.SeparableConv1D,
        keras.layers.SeparableConv2D,
    ):
        registry.register(cls, LayerRule(convolution_rule), overwrite=True)
    return registry


def measurement(model, x, y, plans, registry=None):
    @tf.function
    def measure():
        record = record_pass(model, x, y, registry=registry)
        blocks, unit_plans = grams_from_calls(
            record.units, record.calls, record.examples
        )
        plans[:] = unit_plans
        return spectrum_from_gram(sum_blocks(blocks)).eigenvalues

    return measure


def first_call(fn, choice):
    """Traces (and calibrates) `fn` under `choice`; seconds taken."""
    start = time.perf_counter()
    with path_choice(choice):
        np.asarray(fn())
    return time.perf_counter() - start


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def functions(model, x, y, plans, fit_only=False):
    """``{name: (fn, path choice at trace time)}``."""

    @tf.function
    def plain():
        return model.train_step((x, y))["loss"]

    @tf.function
    def naive():
        grads = per_example_gradients(model, x, y)
        return spectrum_from_gram(gram_from_gradients(grads)).eigenvalues

    fit_plain, fit_measured = fit_functions(model)
    _, fit_calibrated = fit_functions(model)
    # Batched as fit batches: the graph leaves the batch size open.
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(y)).repeat()
    iterator = iter(batches)
    fit = {
        "fit: plain step": (lambda: fit_plain(iterator)["loss"], "cost"),
        "fit: measured": (lambda: fit_measured(iterator)["loss"], "auto"),
        "fit: calibrated": (lambda: fit_calibrated(iterator)["loss"], "calibrate"),
    }
    if fit_only:
        return fit
    return {
        "plain step": (plain, "cost"),
        "measure: before": (
            measurement(model, x, y, plans["before"], before_registry()),
            "cost",
        ),
        "measure: cost": (measurement(model, x, y, plans["cost"]), "cost"),
        "measure: calibrated": (
            measurement(model, x, y, plans["calibrated"]),
            "calibrate",
        ),
        "measure: naive": (naive, "cost"),
        **fit,
    }


def path_table(model, plans):
    """``{(layer class, choice): Counter(path/method)}``."""
    classes = {layer.name: type(layer).__name__ for layer in model.layers}
    table = collections.defaultdict(collections.Counter)
    for choice, unit_plans in plans.items():
        for plan in unit_plans:
            label = plan.path + (f"/{plan.method}" if plan.method else "")
            table[(classes.get(plan.layer, "?"), choice)][label] += 1
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fit-only", action="store_true", help="the fit rows only")
    args = parser.parse_args(argv)
    print(machine.describe())
    print(f"{'model':<15}{'function':<22}{'ms':>9}{'x step':>8}{'1st s':>8}")
    tables = {}
    for name in args.models.split(","):
        # A new machine: no calibration in memory, a new, empty on-disk store.
        os.environ["KERAS_FIM_CALIBRATION_CACHE"] = os.path.join(
            tempfile.mkdtemp(prefix="keras-fim-benchmark-"), "calibrations.json"
        )
        clear_calibrations()
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(32, 32, 3), classes=10
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy"
        )
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=(args.batch_size, 32, 32, 3)).astype("float32"))
        y = tf.constant(rng.integers(0, 10, args.batch_size))
        plans = {"before": [], "cost": [], "calibrated": []}
        rows = {}
        chosen = functions(model, x, y, plans, args.fit_only)
        for label, (fn, choice) in chosen.items():
            first = first_call(fn, choice)
            rows[label] = (timed(fn, args.repeats), first)
        step = rows.get("plain step", (None,))[0]
        fit_step = rows["fit: plain step"][0]
        for label, (seconds, first) in rows.items():
            base = fit_step if label.startswith("fit") else step
            print(
                f"{name:<15}{label:<22}{seconds * 1e3:>9.1f}"
                f"{seconds / base:>8.2f}{first:>8.1f}",
                flush=True,
            )
        tables[name] = path_table(model, plans)
    print("\npaths per layer class (path/method: layers)")
    for name, table in tables.items():
        for (cls, choice), counts in sorted(table.items()):
            paths = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"{name:<15}{cls:<20}{choice:<12}{paths}")


if __name__ == "__main__":
    main()
