"""Soak test: a long `fit` measuring every step, for leaks and retracing.

A small dense classifier (32 -> 64 -> 10, ~2.8k parameters) trains on 2,048
random examples in batches of 32 (64 steps per epoch, the data iterator made
anew every epoch) with `FisherCallback(every_n_steps=1, log_dir=...)`: every
step is measured and written to TensorBoard. Every `--interval` steps it
prints the resident memory (RSS, after `gc.collect()`), the traces so far,
the event file's size and the time per step; at the end, the RSS growth after
the warm-up (target: under 5%), whether anything was traced after the
warm-up (target: nothing), and the event bytes per measured step. It exits
with status 1 when a target is missed.

Traces are counted two ways: the Python calls of the model's layers (Python
code runs only while a function is traced) and the tracing counts of the
`tf.function`s inside the train functions `fit` calls.

    python benchmarks/soak.py                 # 20,000 steps (several minutes)
    python benchmarks/soak.py --steps 2000    # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np

import keras_fim

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional
    psutil = None

LAYER_CALLS = {"count": 0}


def rss_bytes() -> int:
    if psutil is not None:
        return psutil.Process().memory_info().rss
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no psutil and no /proc/self/status: cannot read RSS")


class CountedDense(keras.layers.Dense):
    """A Dense layer that counts its Python calls (one per trace)."""

    def call(self, inputs):
        LAYER_CALLS["count"] += 1
        return super().call(inputs)


def tf_functions(function, seen=None) -> list:
    """The `tf.function`s reachable through `function`'s closure."""
    seen = set() if seen is None else seen
    found = []
    if id(function) in seen:
        return found
    seen.add(id(function))
    if hasattr(function, "experimental_get_tracing_count"):
        found.append(function)
        function = getattr(function, "python_function", function)
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value):
            found.extend(tf_functions(value, seen))
    return found


def event_bytes(log_dir: str) -> int:
    total = 0
    for root, _, files in os.walk(log_dir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class Monitor(keras.callbacks.Callback):
    """Samples RSS, traces, event bytes and step time every `interval` steps."""

    def __init__(self, interval, warmup, log_dir):
        super().__init__()
        self.interval, self.warmup, self.log_dir = interval, warmup, log_dir
        self.step = 0
        self.functions = {}  # id -> tf.function, over the whole run
        self.rows = []
        self._clock = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        for function in tf_functions(self.model.train_function):
            self.functions[id(function)] = function
        if self.step % self.interval == 0 or self.step == self.warmup:
            self.sample()

    def tracing_count(self) -> int:
        return sum(f.experimental_get_tracing_count() for f in self.functions.values())

    def sample(self):
        now = time.perf_counter()
        previous = self.rows[-1]["step"] if self.rows else 0
        ms = 1000 * (now - self._clock) / max(self.step - previous, 1)
        gc.collect()
        self.rows.append(
            {
                "step": self.step,
                "rss": rss_bytes(),
                "layer_calls": LAYER_CALLS["count"],
                "tf_traces": self.tracing_count(),
                "functions": len(self.functions),
                "events": event_bytes(self.log_dir),
                "ms": ms,
            }
        )
        row = self.rows[-1]
        print(
            f"{row['step']:>7} {row['rss'] / 2**20:>9.1f} "
            f"{row['layer_calls']:>12} {row['tf_traces']:>9} {row['functions']:>9} "
            f"{row['events'] / 2**20:>10.2f} {row['ms']:>8.2f}",
            flush=True,
        )
        self._clock = time.perf_counter()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000, help="training steps")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default: steps/10)"
    )
    parser.add_argument(
        "--interval", type=int, default=None, help="steps between samples"
    )
    parser.add_argument(
        "--log-dir", default=None, help="keep the event files here (default: temp)"
    )
    args = parser.parse_args(argv)
    steps = args.steps
    warmup = args.warmup if args.warmup is not None else max(steps // 10, 1)
    interval = args.interval or max(steps // 20, 1)
    if not 0 < warmup < steps:
        parser.error("--warmup must be between 0 and --steps")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="keras-fim-soak-")

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch_size, examples = 32, 2048
    x = rng.normal(size=(examples, 32)).astype("float32")
    y = rng.integers(0, 10, examples)
    inputs = keras.Input((32,))
    hidden = CountedDense(64, activation="relu")(inputs)
    model = keras.Model(inputs, CountedDense(10)(hidden))
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    steps_per_epoch = examples // batch_size
    epochs = math.ceil(steps / steps_per_epoch)
    monitor = Monitor(interval, warmup, log_dir)

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if monitor.step >= steps:
                self.model.stop_training = True

    print(
        f"keras-fim soak: {steps} steps ({epochs} epochs of {steps_per_epoch}), "
        f"batch {batch_size}, {model.count_params()} parameters, measuring every "
        f"step, warm-up {warmup} steps, events in {log_dir}"
    )
    print(
        f"{'step':>7} {'RSS MiB':>9} {'layer calls':>12} {'tf traces':>9} "
        f"{'functions':>9} {'events MiB':>10} {'ms/step':>8}",
        flush=True,
    )
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[
            keras_fim.FisherCallback(log_dir=log_dir, every_n_steps=1),
            monitor,
            Stop(),
        ],
    )
    seconds = time.perf_counter() - start
    if monitor.rows[-1]["step"] != monitor.step:
        monitor.sample()

    rows = {row["step"]: row for row in monitor.rows}
    base, last = rows[warmup], monitor.rows[-1]
    after = [row for row in monitor.rows if row["step"] >= warmup]
    growth = last["rss"] / base["rss"] - 1
    peak = max(row["rss"] for row in after) / base["rss"] - 1
    # Least-squares slope of RSS over the steps after the warm-up.
    slope = (
        np.polyfit([r["step"] for r in after], [r["rss"] for r in after], 1)[0]
        if len(after) > 1
        else 0.0
    )
    retraced = (
        last["layer_calls"] - base["layer_calls"],
        last["tf_traces"] - base["tf_traces"],
        last["functions"] - base["functions"],
    )
    measured = int(model.fisher_state.measurements)
    size = event_bytes(log_dir)
    print()
    print(f"steps trained           {monitor.step} in {seconds:.0f} s")
    print(f"measured steps          {measured}")
    print(f"RSS after warm-up       {base['rss'] / 2**20:.1f} MiB (step {warmup})")
    print(f"RSS at the end          {last['rss'] / 2**20:.1f} MiB")
    print(f"RSS growth after warm-up {100 * growth:+.2f}% (peak {100 * peak:+.2f}%)")
    print(f"RSS trend after warm-up  {slope * 1000 / 1024:+.1f} KiB per 1,000 steps")
    print(
        f"traces                  {last['layer_calls']} layer calls, "
        f"{last['tf_traces']} tf.function traces in {last['functions']} functions; "
        f"after warm-up: +{retraced[0]} calls, +{retraced[1]} traces, "
        f"+{retraced[2]} functions"
    )
    print(
        f"event files             {size / 2**20:.2f} MiB, "
        f"{size / max(measured, 1):.0f} bytes per measured step"
    )
    ok_memory = growth < 0.05
    ok_traces = retraced == (0, 0, 0)
    print(
        f"targets                 RSS growth < 5%: {'yes' if ok_memory else 'NO'}; "
        f"no retracing: {'yes' if ok_traces else 'NO'}"
    )
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if ok_memory and ok_traces else 1


if __name__ == "__main__":
    raise SystemExit(main())
