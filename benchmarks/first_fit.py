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

each measured row three times, in order, with one new calibration store
(`keras_fim.engine.calibration_store`) for the three:

* ``new machine``: the default path choice (``"auto"``) and an empty store:
  the cost model plans every kernel, nothing is timed;
* ``calibrating``: ``KERAS_FIM_PATH_CHOICE=calibrate`` and the store still
  empty: the candidates are timed (what asking for calibration costs once);
* ``calibrated``: the default again, the store holding those timings (any
  later process on this machine).

Each row runs `--repeats` times (in rounds, so that a drift in the machine's
load meets every row alike) and the fastest counts.

    python benchmarks/first_fit.py                      # three networks (~15 min)
    python benchmarks/first_fit.py --models MobileNetV2 --repeats 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = (("new machine", "auto"), ("calibrating", "calibrate"), ("calibrated", "auto"))

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    import machine

    print(machine.describe())
    print(f"fastest of {args.repeats} processes per row")
    print(f"{'model':<15}{'fit':<26}{'s':>7}{'x plain':>9}")
    for name in args.models.split(","):
        seconds = collections.defaultdict(list)
        for _ in range(args.repeats):  # rounds, so that load drifts alike
            seconds["plain"].append(run(name, "plain", args.steps, "off"))
            for mode in ("every step", "default"):
                with tempfile.TemporaryDirectory() as folder:
                    cache = os.path.join(folder, "calibrations.json")
                    for label, choice in ROWS:
                        seconds[f"{mode}, {label}"].append(
                            run(name, mode, args.steps, cache, choice)
                        )
        plain = min(seconds["plain"])
        for row, times in seconds.items():
            print(
                f"{name:<15}{row:<26}{min(times):>7.1f}{min(times) / plain:>9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
