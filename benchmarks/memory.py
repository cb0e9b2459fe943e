"""Peak memory of one Fisher measurement, by batch size and model size.

For each model and batch size it builds the measurement (`fisher_gram`, then
the eigenvalues) in a `tf.function`, runs it once, then resets the kernel's
peak-RSS mark and runs it again: the reported peak is the memory one
measurement takes above what the process held before it (model, data,
compiled function). Beside it: what materialising every per-example gradient
would take (``B x P x 4`` bytes, the naive engine's ``J``), the seconds per
measurement, and how the layers were formed (ghost / materialised / rule, and
how many materialised kernels were split to fit the budget; materialised
ones with the method that formed them: the cost model's, or the calibrated
one where this machine holds calibrations or ``KERAS_FIM_PATH_CHOICE=calibrate``).

    python benchmarks/memory.py                      # ResNet-8 and ResNet-50
    python benchmarks/memory.py --models resnet50 --batch-sizes 256
    python benchmarks/memory.py --memory-budget 268435456   # 256 MiB

ResNet-50 is `keras.applications.ResNet50(weights=None)` on 32x32x3 inputs
with 10 classes (23.6M parameters): the parameter count of the ImageNet
model, at a resolution this 2-core machine trains at.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import rss

rss.use_fixed_mmap_threshold()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_fim.engine import grams_from_calls, record_pass, sum_blocks  # noqa: E402
from keras_fim.measurements import spectrum_from_gram  # noqa: E402
from keras_fim.models import cifar_resnet  # noqa: E402


def build(name: str) -> keras.Model:
    if name == "resnet8":
        model = cifar_resnet((32, 32, 3), 10)
    elif name == "resnet50":
        model = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=10
        )
    else:
        raise ValueError(f"unknown model {name!r}")
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def measure_once(model, batch: int, budget):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))
    plans = []

    @tf.function
    def measurement():
        record = record_pass(model, x, y)
        blocks, unit_plans = grams_from_calls(
            record.units, record.calls, record.examples, budget
        )
        plans[:] = unit_plans
        return spectrum_from_gram(sum_blocks(blocks)).eigenvalues

    start = time.perf_counter()
    measurement().numpy()
    first = time.perf_counter() - start
    before = rss.reset_peak()
    start = time.perf_counter()
    measurement().numpy()
    seconds = time.perf_counter() - start
    peak = rss.peak_above(before)
    return peak, seconds, first, plans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8,resnet50")
    parser.add_argument("--batch-sizes", default="32,128,256")
    parser.add_argument(
        "--memory-budget", type=float, default=None, help="bytes (default 1 GiB)"
    )
    args = parser.parse_args(argv)
    print(
        f"{'model':<10}{'params':>11}{'batch':>6}{'peak MiB':>10}{'J MiB':>9}"
        f"{'s/meas.':>9}{'1st s':>7}  paths (layers; split kernels)"
    )
    for name in args.models.split(","):
        model = build(name)
        params = model.count_params()
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            peak, seconds, first, plans = measure_once(model, batch, args.memory_budget)
            paths = collections.Counter(
                p.path + (f"/{p.method}" if p.method not in ("", "ghost") else "")
                for p in plans
            )
            split = sum(p.chunks > 1 for p in plans)
            naive = batch * params * 4 / 2**20
            print(
                f"{name:<10}{params:>11,}{batch:>6}{peak / 2**20:>10.0f}{naive:>9.0f}"
                f"{seconds:>9.2f}{first:>7.1f}  "
                + ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
                + f"; {split} split",
                flush=True,
            )


if __name__ == "__main__":
    main()
