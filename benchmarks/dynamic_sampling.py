"""Dynamic sampling vs fixed batches: wall time and test accuracy, side by side.

On the embedded digits data (1,347 training and 450 test images) with the
CIFAR-style ResNet-8 (BatchNorm), every configuration trains for the same
number of epochs with the same optimizer and the same per-epoch learning-rate
schedule (SGD momentum 0.9, rate 0.05, x0.1 at 50% and 75% of the epochs):

* ``fixed-16`` and ``fixed-256``: plain `model.fit(x, y, batch_size=...)`;
* ``staged``: `DynamicSampling` with the paper's schedule 16 -> 32 -> 64 ->
  128 -> 256 in five equal stages, learning rate unchanged by the growth;
* ``staged-sqrt``: the same, the learning rate scaled by sqrt(B / 16);
* ``automatic``: `DynamicSampling(schedule=Automatic(16, 256))` driven by a
  `FisherCallback` measuring every 10 steps (its cost included).

Configurations run interleaved, seed by seed, so that machine noise hits all
alike. It prints each one's mean and spread (standard deviation) over the
seeds, the wall time relative to ``fixed-16`` and the accuracy relative to
the best fixed batch. Target (issue 3): accuracy within 0.5 points of the
best fixed batch in at most 0.7x the wall time of ``fixed-16``.

    python benchmarks/dynamic_sampling.py             # 3 seeds, 30 epochs
    python benchmarks/dynamic_sampling.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras

import keras_fim
from keras_fim.datasets import load_digits
from keras_fim.models import cifar_resnet, compile_like_the_paper
from keras_fim.schedules import Automatic, Staged

CONFIGS = ("fixed-16", "fixed-256", "staged", "staged-sqrt", "automatic")


def learning_rate(epoch: int, epochs: int, base: float = 0.05) -> float:
    return (
        base
        * (0.1 if epoch >= epochs // 2 else 1.0)
        * (0.1 if epoch >= 3 * epochs // 4 else 1.0)
    )


def train(config: str, seed: int, epochs: int, data) -> tuple[float, float]:
    """Trains one configuration; returns (seconds, test accuracy in %)."""
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = cifar_resnet(x.shape[1:], 10, batch_norm=True)
    compile_like_the_paper(model, 0.05)
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda e: learning_rate(e, epochs))
    ]
    start = time.perf_counter()
    if config.startswith("fixed-"):
        batch = int(config.split("-")[1])
        model.fit(x, y, batch_size=batch, epochs=epochs, callbacks=callbacks, verbose=0)
    else:
        scaling = "sqrt" if config == "staged-sqrt" else "none"
        if config.startswith("staged"):
            schedule = Staged([16, 32, 64, 128, 256])
        else:
            schedule = Automatic(16, 256, min_steps=20)
            callbacks.append(keras_fim.FisherCallback(every_n_steps=10))
        sampling = keras_fim.DynamicSampling(
            (x, y), schedule=schedule, seed=seed, learning_rate_scaling=scaling
        )
        model.fit(
            sampling.dataset,
            epochs=epochs,
            callbacks=[*callbacks, sampling],
            verbose=0,
            shuffle=False,
        )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return seconds, 100.0 * accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1
    data = load_digits()
    results = {config: [] for config in CONFIGS}
    for seed in range(args.seeds):
        for config in CONFIGS:
            results[config].append(train(config, seed, args.epochs, data))
            seconds, accuracy = results[config][-1]
            print(
                f"seed {seed} {config:10s} {seconds:7.1f} s  accuracy {accuracy:5.1f}%",
                flush=True,
            )

    def mean_spread(values):
        return statistics.mean(values), (
            statistics.stdev(values) if len(values) > 1 else 0.0
        )

    summary = {
        config: (mean_spread([s for s, _ in runs]), mean_spread([a for _, a in runs]))
        for config, runs in results.items()
    }
    small_time = summary["fixed-16"][0][0]
    best_fixed = max(summary[c][1][0] for c in CONFIGS if c.startswith("fixed-"))
    print(
        f"\n{args.epochs} epochs, {args.seeds} seeds, digits, ResNet-8 + BN "
        "(mean +- standard deviation over seeds)"
    )
    print(
        f"{'config':10s} {'seconds':>15s} {'accuracy %':>14s} {'time/fixed-16':>14s} {'acc - best fixed':>17s}"
    )
    for config, ((time_mean, time_sd), (acc_mean, acc_sd)) in summary.items():
        print(
            f"{config:10s} {time_mean:8.1f} +-{time_sd:5.1f} {acc_mean:7.2f} +-{acc_sd:4.2f} "
            f"{time_mean / small_time:14.3f} {acc_mean - best_fixed:+17.2f}"
        )
    print("target: time/fixed-16 <= 0.7 with accuracy >= best fixed - 0.5")


if __name__ == "__main__":
    main()
