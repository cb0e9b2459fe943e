"""Per-example gradients -> Gram -> eigenvalues, keras-fim against its peers.

Side by side in one run, on the same networks, weights and batches: the MLP
784-512-512-10 and the CIFAR-shaped ResNet-style network (~78k parameters)
with and without BatchNormalization, at batch 32 and 128. For each it times

* `plain step`: one Keras training step (forward, backward, SGD update);
* `keras-fim fast`: one measurement with the Gram engine
  (`keras_fim.fisher_gram`, then the eigenvalues), in a `tf.function`;
* `keras-fim XLA`: the same, compiled with XLA (``jit_compile=True``);
* `keras-fim naive`: all per-example gradients materialised
  (`per_example_gradients`), then ``J J^T`` and the eigenvalues;
* `fit: plain step` and `fit: measured`: the functions `fit` runs, Keras's
  own and FisherCallback's measuring one (the training pass reused): what a
  measured step of `fit` costs;
* the peers, in their own environment (`benchmarks/peers/setup.sh`):
  torch.func ``vmap(grad)``, BackPACK ``BatchGrad``, JAX ``vmap(grad)``.

It prints medians, ratios to the plain step and to the fastest peer, the
peak memory of each measurement above the memory before it, and the largest
relative difference of the top-5 eigenvalues from keras-fim's fast engine.

    python benchmarks/engines.py            # full run (~10 min on 2 cores)
    python benchmarks/engines.py --quick    # a smoke run, no peers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import rss

rss.use_fixed_mmap_threshold()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_fim  # noqa: E402
from keras_fim.engine import gram_from_gradients, per_example_gradients  # noqa: E402
from keras_fim.measurements import spectrum_from_gram  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
from fit_functions import fit_functions  # noqa: E402
from make_spec import build_model, make_batch, spec_arrays  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn()` after a warm-up, and the peak MB above the
    memory before the first timed call."""
    fn()
    fn()
    before = rss.reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if isinstance(out, (list, tuple)):
            out = out[0]
        np.asarray(out)  # wait for the result
        times.append(time.perf_counter() - start)
    return statistics.median(times), rss.peak_above(before) / 2**20


def engines(model, x, y):
    """The TF-side engines as callables of no argument."""
    x, y = tf.constant(x), tf.constant(y)

    @tf.function(reduce_retracing=True)
    def plain():
        return model.train_step((x, y))["loss"]

    @tf.function(reduce_retracing=True)
    def fast():
        return spectrum_from_gram(keras_fim.fisher_gram(model, x, y)).eigenvalues

    @tf.function(jit_compile=True)
    def fast_xla():
        return spectrum_from_gram(keras_fim.fisher_gram(model, x, y)).eigenvalues

    @tf.function(reduce_retracing=True)
    def naive():
        grads = per_example_gradients(model, x, y)
        return spectrum_from_gram(gram_from_gradients(grads)).eigenvalues

    # The functions `fit` runs: Keras's own, and FisherCallback's measuring one.
    fit_plain, fit_measured = fit_functions(model)
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    return {
        "plain step": plain,
        "keras-fim fast": fast,
        "keras-fim XLA": fast_xla,
        "keras-fim naive": naive,
        "fit: plain step": lambda: fit_plain(iterator)["loss"],
        "fit: measured": lambda: fit_measured(iterator)["loss"],
    }


def peers(spec_path: str, repeats: int) -> dict:
    if not os.path.exists(PEERS_PYTHON):
        return {"_error": "not installed: run benchmarks/peers/setup.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peers.json")
        command = [
            PEERS_PYTHON,
            os.path.join(ROOT, "benchmarks", "peers", "run_peers.py"),
            spec_path,
            "--repeats",
            str(repeats),
            "--out",
            out,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            return {"_error": result.stderr.strip().splitlines()[-1:]}
        with open(out) as f:
            return json.load(f)


def _or_nan(value) -> float:
    return float("nan") if value is None else value


def top_error(eigenvalues, reference) -> float:
    a = np.sort(np.asarray(eigenvalues, np.float64))[::-1][:5]
    b = np.sort(np.asarray(reference, np.float64))[::-1][:5]
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, MLP, no peers")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--archs", default="mlp,resnet,resnet_bn")
    parser.add_argument("--batch-sizes", default="32,128")
    args = parser.parse_args(argv)
    archs = ["mlp"] if args.quick else args.archs.split(",")
    batch_sizes = [32] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    print(
        f"{'network':<10}{'batch':>6}  {'engine':<16}{'ms':>9}{'x step':>8}"
        f"{'x peer':>8}{'peak MB':>9}  {'top-5 rel. diff':>15}"
    )
    for arch in archs:
        for batch in batch_sizes:
            keras.utils.set_random_seed(0)
            model = build_model(arch)
            model.compile(
                optimizer=keras.optimizers.SGD(0.01),
                loss="sparse_categorical_crossentropy",
            )
            x, y = make_batch(arch, batch, seed=0)
            rows = {}
            with tempfile.TemporaryDirectory() as tmp:
                spec = os.path.join(tmp, "spec.npz")
                np.savez(spec, **spec_arrays(model, arch, x, y))
                functions = engines(model, x, y)
                # Eigenvalues at the spec's weights, before any step moves them.
                reference = np.asarray(functions["keras-fim fast"]())
                naive_eigenvalues = np.asarray(functions["keras-fim naive"]())
                for name, fn in functions.items():
                    seconds, peak = timed(fn, repeats)
                    rows[name] = {"seconds": seconds, "peak_mb": peak}
                rows["keras-fim naive"]["eigenvalues"] = naive_eigenvalues
                peer_rows = {} if args.quick else peers(spec, repeats)
            step = rows["plain step"]["seconds"]
            fastest_peer = min(
                (
                    r["seconds"]
                    for k, r in peer_rows.items()
                    if not k.startswith("_") and r.get("seconds")
                ),
                default=None,
            )
            for name, r in {**rows, **peer_rows}.items():
                if name.startswith("_"):
                    if name == "_error":
                        print(f"{arch:<10}{batch:>6}  peers: {r}")
                    continue
                if r.get("error"):
                    print(f"{arch:<10}{batch:>6}  {name:<16}error: {r['error']}")
                    continue
                ms = r["seconds"] * 1e3
                vs_peer = r["seconds"] / fastest_peer if fastest_peer else float("nan")
                diff = ""
                if r.get("eigenvalues") is not None and name != "keras-fim fast":
                    if r.get("comparable", True):
                        # keras-fim reports eig(G) / |B|; the peers eig(G).
                        scale = batch if name in peer_rows else 1
                        diff = f"{top_error(np.asarray(r['eigenvalues']) / scale, reference):.1e}"
                    else:
                        diff = "BN: n/a"
                print(
                    f"{arch:<10}{batch:>6}  {name:<16}{ms:>9.1f}"
                    f"{r['seconds'] / step:>8.2f}{vs_peer:>8.2f}"
                    f"{_or_nan(r.get('peak_mb')):>9.0f}  {diff:>15}",
                    flush=True,
                )
            if peer_rows and "torch_func" in peer_rows:
                for name in ("torch_func", "jax"):
                    s = peer_rows[name].get("step_seconds")
                    if s:
                        print(f"{'':<16}  ({name} plain step {s * 1e3:.1f} ms)")
    print(
        "targets (issue 5): ResNet-style batch 128: keras-fim fast <= 1.5 x step "
        "and faster than the fastest peer; MLP batch 128: <= 5 x step and >= 10x "
        "faster than every peer"
    )


if __name__ == "__main__":
    main()
