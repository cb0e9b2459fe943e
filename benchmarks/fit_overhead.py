"""Overhead of FisherCallback on `fit`, side by side in one run.

The CIFAR-shaped ResNet-style network of the peer tables (conv 16 -> three
stages 16/32/64 with one residual block each -> pooling -> dense 10, ~78k
parameters), with and without BatchNormalization, at batch 32 and 128, on
random CIFAR-shaped data. For each configuration it times epochs of plain
`fit`, `fit` measuring every 50 steps and `fit` measuring every step,
in interleaved rounds, and prints the median time per step and the median
per-round ratio to plain `fit`. Then the first step of a second `fit` of the
same model (with the same `FisherCallback`), against plain Keras's: the
cost of tracing again, if anything is traced again.

With ``--xla`` it times instead, with ``compile(jit_compile=True)``, the
plain step and the step measured at every step of an MLP 784-512-512-10 and
of the ResNet-style network without BatchNorm, at batch 128 (issue 15 item
5: the eigen-solve runs outside XLA).

    python benchmarks/fit_overhead.py            # full run (~12 min, 2 cores)
    python benchmarks/fit_overhead.py --quick    # a smoke run
    python benchmarks/fit_overhead.py --xla      # the XLA rows (~3 min)
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

import keras_fim
from keras_fim.models import cifar_resnet


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def seconds_per_step(
    batch_norm, batch_size, every, steps, repeats, data, jit_compile=False, net=None
):
    """Median seconds per step over `repeats` timed epochs (after a warm-up)."""
    keras.utils.set_random_seed(0)
    if net == "mlp":
        model = mlp()
    else:
        model = cifar_resnet((32, 32, 3), 10, batch_norm=batch_norm)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    x, y = data
    timer = EpochTimer()
    callbacks = [timer]
    if every is not None:
        callbacks.append(keras_fim.FisherCallback(every_n_steps=every))
    n = steps * batch_size
    model.fit(
        x[:n],
        y[:n],
        batch_size=batch_size,
        epochs=1 + repeats,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
    )
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return statistics.median(timer.seconds[1:]) / steps, trainable


class FirstStep(keras.callbacks.Callback):
    """Seconds of the first step of each fit (train function included)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.seconds.append(time.perf_counter() - self._start)


def second_fit_first_step(measured, batch_size, data):
    """Seconds of the first step of the second of two fits (ResNet-style
    with BatchNorm; measured: every 2 steps, so that the step is measured)."""
    keras.utils.set_random_seed(0)
    model = cifar_resnet((32, 32, 3), 10, batch_norm=True)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    x, y = data
    timer = FirstStep()
    callbacks = [timer]
    if measured:
        callbacks.append(keras_fim.FisherCallback(every_n_steps=2))
    for _ in range(2):
        model.fit(
            x[: 4 * batch_size],
            y[: 4 * batch_size],
            batch_size=batch_size,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )
    return timer.seconds[1]


def xla_rows(quick):
    """The plain and the measured (every step) step with jit_compile=True,
    interleaved as `main`'s rows, batch 128."""
    steps, rounds = (4, 1) if quick else (30, 3)
    rng = np.random.default_rng(0)
    n = 128 * steps
    images = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    flat = rng.normal(size=(n, 784)).astype("float32")
    labels = rng.integers(0, 10, n)
    print(f"{'network (XLA)':<16}{'plain ms':>10}{'every1 ms':>11}{'every1/plain':>14}")
    for net, x in (("mlp", flat), ("resnet8", images)):
        times = {"plain": [], "every1": []}
        for _ in range(rounds):
            for name, every in (("plain", None), ("every1", 1)):
                t, _ = seconds_per_step(
                    False, 128, every, steps, 1, (x, labels), True, net
                )
                times[name].append(t)
        ratio = statistics.median(
            a / b for a, b in zip(times["every1"], times["plain"], strict=True)
        )
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        label = "MLP 784-512-512" if net == "mlp" else net
        print(
            f"{label:<16}{ms['plain']:>10.1f}{ms['every1']:>11.1f}{ratio:>14.3f}",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--xla", action="store_true", help="the jit_compile rows")
    args = parser.parse_args(argv)
    if args.xla:
        xla_rows(args.quick)
        return
    steps = {32: 100, 128: 50} if not args.quick else {32: 10, 128: 4}
    rounds = 1 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    data = (
        rng.normal(size=(128 * 100, 32, 32, 3)).astype("float32"),
        rng.integers(0, 10, 128 * 100),
    )
    print(
        f"{'network':<12}{'batch':>6}{'params':>8}{'plain ms':>10}{'every50 ms':>12}"
        f"{'every1 ms':>11}{'every50/plain':>15}{'every1/plain':>14}"
    )
    for batch_norm in (False, True):
        for batch_size in (32, 128):
            s = steps[batch_size]
            times = {"plain": [], "every50": [], "every1": []}
            # Rounds interleave the three variants: this machine's speed
            # drifts, so each ratio compares runs made side by side.
            for _ in range(rounds):
                for name, every in (("plain", None), ("every50", 50), ("every1", 1)):
                    t, params = seconds_per_step(
                        batch_norm, batch_size, every, s, 1, data
                    )
                    times[name].append(t)
            ratio = {
                name: statistics.median(
                    a / b for a, b in zip(times[name], times["plain"], strict=True)
                )
                for name in times
            }
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            label = "resnet8+BN" if batch_norm else "resnet8"
            print(
                f"{label:<12}{batch_size:>6}{params:>8}{ms['plain']:>10.1f}"
                f"{ms['every50']:>12.1f}{ms['every1']:>11.1f}"
                f"{ratio['every50']:>15.3f}{ratio['every1']:>14.3f}",
                flush=True,
            )
    print(
        "targets (issue 5): every1/plain <= 1.6, every50/plain <= 1.02 (ResNet-style, batch 128)"
    )
    plain = second_fit_first_step(False, 32, data)
    measured = second_fit_first_step(True, 32, data)
    print(
        f"second fit, first step (resnet8+BN, batch 32): plain {plain:.2f} s, "
        f"measured {measured:.2f} s (target, issue 15: measured adds under 1 s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
