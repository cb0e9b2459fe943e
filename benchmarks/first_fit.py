"""A first `fit`, as a user's new process meets it: plain against measured.

For each keras.applications network (``weights=None``, 32x32x3 inputs, 10
classes, SGD), each row is a fresh Python process that builds and compiles the
network, then times one ``model.fit(x, y, batch_size=32, epochs=1)`` over
`--steps` batches (everything the first call pays: tracing, graph
optimisation, calibration where asked, the steps):

* ``plain``: no callback;
* ``every step``: `FisherCallback(every_n_steps=1)`, so only the measuring
  train function is traced;
* ``default``: `FisherCallback()` (every 50 steps): the first step is
  measured, the others not (one function serves both on one device
  without XLA: the measurement is a condition inside it);

on a new machine: the default path choice (``"auto"``) and an empty
calibration store (`keras_fim.engine.calibration_store`), so the cost model
plans every kernel and nothing is timed. With `--calibration`, each measured
row also runs twice more on one new store: ``calibrating``
(``KERAS_FIM_PATH_CHOICE=calibrate``, the store still empty: the candidates
are timed, what asking for calibration costs once) and ``calibrated`` (the
default again, the store holding those timings: any later process on this
machine).

This machine's speed drifts by a fifth from minute to minute, so a row's
ratio to plain is taken within one round: each of `--repeats` rounds runs
every row once (in an order that rotates from round to round), each measured
process is divided by that round's plain one, and the table gives the median
of those ratios with their range, beside the median seconds.

    python benchmarks/first_fit.py                      # three networks (~8 min)
    python benchmarks/first_fit.py --models MobileNetV2 --repeats 3
    python benchmarks/first_fit.py --calibration        # and the calibration rows
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras, numpy as np
import keras_fim
name, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.utils.set_random_seed(0)
model = getattr(keras.applications, name)(
    weights=None, input_shape=(32, 32, 3), classes=10
)
model.compile(optimizer=keras.optimizers.SGD(0.01),
              loss="sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x = rng.normal(size=(32 * steps, 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, 32 * steps)
callbacks = {
    "plain": [],
    "every step": [keras_fim.FisherCallback(every_n_steps=1)],
    "default": [keras_fim.FisherCallback()],
}[mode]
start = time.perf_counter()
model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def run(name, mode, steps, cache, choice="auto"):
    env = dict(os.environ, KERAS_FIM_CALIBRATION_CACHE=cache)
    env["KERAS_FIM_PATH_CHOICE"] = choice
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, mode, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def rounds(name, steps, repeats, calibration):
    """``{row: [seconds per round]}``. Each row is one process, or (asking
    for calibration, then a process after it) two sharing one new store;
    the rows run in an order that rotates from round to round."""
    rows = [("plain", [("plain", None)])]
    for mode in ("every step", "default"):
        rows.append((mode, [(f"{mode}, new machine", "auto")]))
        if calibration:
            rows.append(
                (
                    mode,
                    [
                        (f"{mode}, calibrating", "calibrate"),
                        (f"{mode}, calibrated", "auto"),
                    ],
                )
            )
    seconds = collections.defaultdict(list)
    for round_ in range(repeats):
        order = rows[round_ % len(rows) :] + rows[: round_ % len(rows)]
        for mode, processes in order:
            with tempfile.TemporaryDirectory() as folder:
                store = os.path.join(folder, "calibrations.json")
                for label, choice in processes:
                    cache = store if choice else "off"
                    seconds[label].append(
                        run(name, mode, steps, cache, choice or "auto")
                    )
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="also time asking for calibration, and a process after it",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    import machine

    print(machine.describe())
    print(
        f"{args.repeats} rounds; seconds: the median; x plain: the median of each "
        "round's ratio to that round's plain fit, and their range"
    )
    print(f"{'model':<15}{'fit':<26}{'s':>7}{'x plain':>9}{'range':>13}")
    for name in args.models.split(","):
        seconds = rounds(name, args.steps, args.repeats, args.calibration)
        plain = seconds["plain"]
        for row, times in seconds.items():
            ratios = [t / p for t, p in zip(times, plain, strict=True)]
            print(
                f"{name:<15}{row:<26}{statistics.median(times):>7.1f}"
                f"{statistics.median(ratios):>9.2f}"
                f"{min(ratios):>7.2f}-{max(ratios):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
