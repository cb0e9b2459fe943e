"""Streaming `DynamicSampling` vs plain `fit`: throughput and peak memory.

Throughput, at a fixed batch size B, on a pipeline with a per-example
augmentation map (random flip and brightness of a 32x32x3 image, made from
its index: no data is read), training a small CNN:

* ``plain``: ``model.fit(ds.map(augment).batch(B).prefetch(AUTOTUNE))``;
* ``stream``: ``DynamicSampling(ds.map(augment), B, mode="stream")``: the
  examples prefetched, rebatched into the planned size at each step.

Runs alternate (plain, stream, plain, ...) so that machine noise hits both
alike; each run is one warm-up epoch then timed epochs, and the ratio of the
median epochs' throughputs is printed (target: stream at least 0.9x plain),
with where the time goes: each epoch's start (from its beginning to its
second step) and its median step.

Peak memory: an endless stream of generated examples, far more than this
machine's memory could hold if it were read into memory (the bytes it would
take are printed), trained for a few epochs of `examples_per_epoch` with a
growing batch; the peak RSS above the process's RSS before `fit` is printed.

    python benchmarks/streaming.py            # ~3 minutes on 2 cores
    python benchmarks/streaming.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
import warnings

import rss

rss.use_fixed_mmap_threshold()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from machine import describe  # noqa: E402

import keras_fim  # noqa: E402

SHAPE = (32, 32, 3)
EXAMPLE_BYTES = 32 * 32 * 3 * 4


@tf.autograph.experimental.do_not_convert
def make(i):
    """An image and a label from an index, deterministic."""
    seed = tf.stack([tf.cast(i, tf.int32), 0])
    image = tf.random.stateless_uniform(SHAPE, seed)
    return image, tf.cast(i % 10, tf.int32)


@tf.autograph.experimental.do_not_convert
def augment(image, label):
    """Per-example random flip and brightness (stateful: afresh each pass)."""
    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_brightness(image, 0.2)
    return image, label


def examples(n):
    return tf.data.Dataset.range(n).map(make, num_parallel_calls=tf.data.AUTOTUNE)


def model():
    net = keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    net.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return net


class EpochTimes(keras.callbacks.Callback):
    """Per epoch: its seconds, its start (from the epoch's beginning to its
    second step: the pipeline's start and the first step) and its median
    step (a batch-begin hook: Keras's dispatch of batch ends is unchanged)."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self._marks = [time.perf_counter()]

    def on_train_batch_begin(self, batch, logs=None):
        self._marks.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        marks = [*self._marks, time.perf_counter()]
        steps = [b - a for a, b in itertools.pairwise(marks[2:-1])]
        self.epochs.append(
            (marks[-1] - marks[0], marks[2] - marks[0], statistics.median(steps))
        )


def run(kind, n, batch, epochs):
    """``(examples/s, start s, median step s)`` of each timed epoch (the
    first is a warm-up)."""
    data = examples(n).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    net = model()
    timer = EpochTimes()
    callbacks = [timer]
    if kind == "plain":
        dataset = data.batch(batch).prefetch(tf.data.AUTOTUNE)
    else:
        sampling = keras_fim.DynamicSampling(data, batch, mode="stream")
        dataset, callbacks = sampling.dataset, [timer, sampling]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net.fit(dataset, epochs=epochs + 1, callbacks=callbacks, verbose=0)
    return [(n / total, start, step) for total, start, step in timer.epochs[1:]]


def peak_memory(examples_per_epoch, epochs):
    endless = examples(10**12).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    net = model()
    sampling = keras_fim.DynamicSampling(
        endless,
        keras_fim.schedules.Geometric(32, 2, maximum=256),
        examples_per_epoch=examples_per_epoch,
    )
    before = rss.reset_peak()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net.fit(sampling.dataset, epochs=epochs, callbacks=[sampling], verbose=0)
    return rss.peak_above(before), time.perf_counter() - start, sampling


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, batch, epochs, rounds = (512, 64, 1, 1) if args.quick else (4096, 64, 3, 5)

    print(describe())
    print(
        f"throughput: {n} examples/epoch, B={batch}, {epochs} timed epochs, {rounds} rounds"
    )
    speeds = {"plain": [], "stream": []}
    for _ in range(rounds):
        for kind in speeds:
            speeds[kind].append(run(kind, n, batch, epochs))

    def median(kind, field):
        return statistics.median(e[field] for r in speeds[kind] for e in r)

    plain, stream = median("plain", 0), median("stream", 0)
    print(
        f"{'':8} {'examples/s':>10} {'epoch start ms':>14} {'step ms':>8}"
        "   (medians of the epochs)   per run: examples/s"
    )
    for kind in speeds:
        runs = " ".join(
            f"{statistics.median(e[0] for e in r):.0f}" for r in speeds[kind]
        )
        print(
            f"{kind:8} {median(kind, 0):10.0f} {1e3 * median(kind, 1):14.1f} "
            f"{1e3 * median(kind, 2):8.2f}   {'':26} {runs}"
        )
    print(f"stream / plain = {stream / plain:.3f}  (target >= 0.9)")

    per_epoch, mem_epochs = (2048, 2) if args.quick else (8192, 3)
    peak, seconds, sampling = peak_memory(per_epoch, mem_epochs)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"endless stream of 10^12 examples ({10**12 * EXAMPLE_BYTES / 2**40:,.0f} TiB "
        f"if materialised; this machine has {total / 2**30:.1f} GiB): "
        f"{mem_epochs} epochs of {per_epoch} examples, batch sizes "
        f"{[sorted(set(e)) for e in sampling.batch_sizes_per_epoch]}, "
        f"{seconds:.1f} s, peak RSS above the start of fit: {peak / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
