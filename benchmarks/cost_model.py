"""How close the cost model's path choices come to timing them on this machine.

For the ResNet-style network (with and without BatchNorm) and each
keras.applications network (``weights=None``, 32x32x3, 10 classes), it plans
the Gram blocks of a recorded pass twice, as `fit` plans them (the batch size
left open, so for `PLANNING_BATCH_SIZE` examples): by calibration (every
candidate timed, `path_choice("calibrate")`, nothing kept on disk) and by the
cost model (`path_choice("cost")`, the default on a machine that holds no
calibration). Per network it prints the units with more than one candidate,
how many the cost model plans as calibration does, and the seconds of the
chosen blocks summed over those units by the calibration's own timings; then,
over all networks, how often each way of forming a convolution's or a
depthwise convolution's block was the fastest and its worst ratio to the
fastest. docs/performance.md ("Paths") quotes it.

    python benchmarks/cost_model.py
    python benchmarks/cost_model.py --models MobileNetV2
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_FIM_CALIBRATION_CACHE"] = "off"  # time everything, keep nothing

import keras
import machine
import tensorflow as tf

from keras_fim.engine import grams_from_calls, record_pass
from keras_fim.engine.gram import clear_calibrations, path_choice
from keras_fim.models import cifar_resnet

NETWORKS = {
    "ResNet-style": lambda: cifar_resnet((32, 32, 3), 10, batch_norm=False),
    "ResNet-style BN": lambda: cifar_resnet((32, 32, 3), 10, batch_norm=True),
    **{
        name: lambda name=name: getattr(keras.applications, name)(
            weights=None, input_shape=(32, 32, 3), classes=10
        )
        for name in ("MobileNetV2", "EfficientNetB0", "ResNet50")
    },
}


def plans(model, choice) -> dict:
    """``{layer name: Plan}`` of the blocks planned under `choice`."""
    planned = []

    def grams(x, y):
        record = record_pass(model, x, y)
        with path_choice(choice):
            blocks, unit_plans = grams_from_calls(
                record.units, record.calls, record.examples
            )
        planned[:] = unit_plans
        return tf.add_n(list(blocks.values()))

    signature = [tf.TensorSpec([None, 32, 32, 3]), tf.TensorSpec([None], tf.int64)]
    tf.function(grams, input_signature=signature).get_concrete_function()
    return {plan.layer: plan for plan in planned}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(NETWORKS))
    args = parser.parse_args(argv)
    print(machine.describe())
    print(
        f"{'network':<17}{'timed':>6}{'same':>6}{'calibrated s':>14}"
        f"{'cost model s':>14}{'ratio':>7}"
    )
    methods = collections.defaultdict(lambda: [0, 0, 1.0])  # fastest, of, worst
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = NETWORKS[name]()
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        clear_calibrations()
        timed = {k: p for k, p in plans(model, "calibrate").items() if p.timings}
        by_cost = plans(model, "cost")
        same = calibrated = cost = 0.0
        for layer, plan in timed.items():
            seconds = plan.timings
            chosen = by_cost[layer].method
            same += chosen == plan.method
            calibrated += seconds[plan.method]
            cost += seconds[chosen]
            kind = type(model.get_layer(layer)).__name__
            materialised = {m: s for m, s in seconds.items() if m != "ghost"}
            fastest = min(materialised.values(), default=0.0)
            for method, s in materialised.items():
                entry = methods[(kind, method)]
                entry[0] += s == fastest
                entry[1] += 1
                entry[2] = max(entry[2], s / fastest)
        print(
            f"{name:<17}{len(timed):>6}{int(same):>6}{calibrated:>14.2f}"
            f"{cost:>14.2f}{cost / calibrated:>7.2f}",
            flush=True,
        )
    print("\nmaterialising: fastest of the methods in / units timed, worst x fastest")
    for (kind, method), (wins, count, worst) in sorted(methods.items()):
        print(f"{kind:<20}{method:<10}{wins:>4} / {count:<4}{worst:>8.2f}")


if __name__ == "__main__":
    main()
