"""Distributed runs for tests/test_distribute.py, in processes of their own.

python tests/distribute_job.py mirrored OUT.json
    Two logical CPU devices (configured before TensorFlow starts), one
    `MirroredStrategy` over them: every scenario runs under the strategy and
    on one device, and OUT.json gets what the test compares.
python tests/distribute_job.py sampling OUT.json
    `DynamicSampling` under a `MirroredStrategy` over two logical CPU
    devices and on one device, in memory and streamed (without op
    determinism, which a finite stream refuses).
python tests/distribute_job.py worker OUT.json [LOG_DIR]
    One worker of a `MultiWorkerMirroredStrategy` (TF_CONFIG set by the
    test), or, without TF_CONFIG, the same runs on one device; the first
    run writes TensorBoard events to LOG_DIR (only the chief does).
"""

import json
import os
import sys

SCENARIO_DATA = 48


def _setup(devices: int, deterministic: bool = True):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _data(n, seed=0, shape=(6,)):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 3, n)


def _quotas(sizes, max_examples):
    """`keras_fim.engine.distribute.quotas` in numpy: the shards taken in
    turn, one example at a time."""
    quota, left = [0] * len(sizes), max_examples
    for position in range(max(sizes)):
        for replica, size in enumerate(sizes):
            if position < size and left > 0:
                quota[replica] += 1
                left -= 1
    return quota


def measured_first(x, y, batch_size, replicas, max_examples):
    """`x`, `y` reordered within each global batch (of `batch_size`, split
    evenly over `replicas`) so that the examples the replicas measure with
    `max_examples` come first, in replica order: one device then measures
    the same examples, in the order the replicas gather them."""
    import numpy as np

    order = []
    for start in range(0, len(x), batch_size):
        shard = batch_size // replicas
        quota = _quotas([shard] * replicas, max_examples)
        first = [
            start + r * shard + i for r in range(replicas) for i in range(quota[r])
        ]
        rest = [i for i in range(start, start + batch_size) if i not in first]
        order += first + rest
    return x[np.array(order)], y[np.array(order)]


def _mlp(strategy, steps_per_execution=1, optimizer=None):
    import keras

    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(h)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=optimizer() if optimizer else keras.optimizers.SGD(0.1),
            loss="sparse_categorical_crossentropy",
            steps_per_execution=steps_per_execution,
        )
    return model


def _bn_cnn(strategy):
    import keras

    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5, 5, 2))
        h = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        outputs = keras.layers.Dense(3, activation="softmax")(h)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
        )
    return model


def _state(model) -> dict:
    state = model.fisher_state
    return {
        v.name: float(v.numpy())
        for v in (
            state.step,
            state.measurements,
            state.skipped,
            state.condition_sum,
            state.condition_ema,
            state.energy_sum,
            state.trace_sigma_ema,
            state.true_gradient_sq_ema,
        )
    }


def _weights_diff(a, b) -> float:
    import numpy as np

    return float(
        max(
            np.abs(u - v).max()
            for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
        )
    )


def _fit(
    strategy, options, n, batch_size, epochs=1, log_dir=None, model=None, data=None
):
    import keras_fim

    x, y = data if data is not None else _data(n)
    model = model or _mlp(strategy)
    callback = keras_fim.FisherCallback(log_dir=log_dir, **options)
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )
    return model, history.history


def mirrored(out: str) -> None:
    _setup(2)
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_fim

    mirrored = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    one = tf.distribute.get_strategy()
    results = {}

    # Even batches, both ways of getting the contributions, max_examples
    # (13 of 10 + 10: 7 and 6, compared with one device measuring those 13),
    # two epochs. The first run also
    # writes TensorBoard events (one point per measured step, written by the
    # first replica only, with the global batch size).
    log_dir = tempfile.mkdtemp()
    for name, options in {
        "probed": {"every_n_steps": 2, "per_layer": True},
        "separate_max13": {
            "every_n_steps": 1,
            "reuse_training_pass": False,
            "max_examples": 13,
        },
    }.items():
        a, history_a = _fit(
            mirrored,
            options,
            40,
            20,
            epochs=2,
            log_dir=log_dir if name == "probed" else None,
        )
        data = None
        if "max_examples" in options:
            data = measured_first(*_data(40), 20, 2, options["max_examples"])
        b, history_b = _fit(one, options, 40, 20, epochs=2, data=data)
        results[name] = {
            "mirrored": _state(a),
            "one": _state(b),
            "weights": _weights_diff(a, b),
            "history": [history_a["C_K_bar"], history_b["C_K_bar"]],
        }
        if name == "probed":
            measured = a

    # A plain Keras run under the strategy: weights identical with keras-fim.
    x, y = _data(40)
    plain = _mlp(mirrored)
    plain.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
    results["weights_vs_plain_keras"] = _weights_diff(plain, measured)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reference import read_scalars

    scalars, _ = read_scalars(log_dir)
    layers, _ = read_scalars(log_dir, prefix="fisher_layers/")
    results["tensorboard"] = {
        tag: scalars[tag] for tag in ("fisher/batch_size", "fisher/C_K_bar")
    }
    results["tensorboard"]["layer_tags"] = sorted(layers)

    # Uneven shards (7 = 4 + 3) and an empty one (1 = 1 + 0) as the last
    # batch: measured on the weights before the update, which are still equal
    # (Keras's own update of an uneven batch differs under the strategy).
    for name, n in {"uneven": 47, "empty_shard": 41}.items():
        options = {"every_n_steps": 1}
        a, _ = _fit(mirrored, options, n, 20)
        b, _ = _fit(one, options, n, 20)
        results[name] = {"mirrored": _state(a), "one": _state(b)}

    # Several steps per execution: Keras 3.15's own multi-step function fails
    # under a strategy, so the step runs in a loop of our own here, with the
    # measurement decided in the graph (`measured` a tensor): collectives and
    # mirrored writes at every step, the record gated.
    for reuse in (True, False):
        options = {"every_n_steps": 3, "reuse_training_pass": reuse, "max_examples": 5}
        model = _mlp(mirrored)
        with mirrored.scope():
            model._symbolic_build(data_batch=(tf.constant(x[:8]), tf.constant(y[:8])))
        callback = keras_fim.FisherCallback(**options)
        callback.set_model(model)
        callback._steps_per_execution, callback._writer = 3, None
        callback._train_functions()  # builds its MeasuredStep
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

        @tf.function
        def step(batch, model=model, callback=callback):
            return mirrored.run(
                lambda d: callback._train_step(model.train_step, d, True), args=(batch,)
            )

        for batch in mirrored.experimental_distribute_dataset(data):
            step(batch)
        reference, _ = _fit(one, options, 40, 8, data=measured_first(x, y, 8, 2, 5))
        results[f"in_graph_{reuse}"] = {
            "mirrored": _state(model),
            "one": _state(reference),
            "weights": _weights_diff(model, reference),
        }

    # BatchNormalization: each replica normalises its own shard. The measured
    # contributions are those of each shard's own batch pass, gathered.
    xb, yb = _data(16, seed=1, shape=(5, 5, 2))
    model = _bn_cnn(mirrored)
    weights = model.get_weights()
    model.fit(
        xb,
        yb,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[keras_fim.FisherCallback(every_n_steps=1)],
    )
    twin = _bn_cnn(one)
    twin.set_weights(weights)
    rows = []
    for shard in (slice(0, 8), slice(8, 16)):
        grads = keras_fim.per_example_gradients(twin, xb[shard], yb[shard])
        rows.append(np.concatenate([g.numpy().reshape(8, -1) for g in grads], 1))
    jac = np.concatenate(rows).astype(np.float64)
    results["batchnorm"] = {"mirrored": _state(model), "jacobian": jac.tolist()}

    # mixed_float16 under the strategy: the loss scale covers R replicas.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        plain = _mlp(mirrored)
        plain.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
        a, _ = _fit(mirrored, {"every_n_steps": 1}, 40, 20, epochs=2)
        b, _ = _fit(one, {"every_n_steps": 1}, 40, 20, epochs=2)
        results["mixed_float16"] = {
            "mirrored": _state(a),
            "one": _state(b),
            "weights_vs_plain_keras": _weights_diff(plain, a),
        }
    finally:
        keras.config.set_dtype_policy("float32")

    with open(out, "w") as f:
        json.dump(results, f)


def _sampling_data(mode, x, y):
    """`(x, y)` as `DynamicSampling` gets it in `mode`: arrays, a stream
    of known length (a map), or one of unknown length (a filter too)."""
    import tensorflow as tf

    if mode == "in_memory":
        return (x, y)
    data = tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (a * 1.0, b))
    if mode == "stream_unknown":
        data = data.filter(lambda a, b: True)
    return data


def _counting_mlp(strategy, n):
    """`_mlp` counting the examples it trains on (their ids are
    ``round(100 x[:, 0])``) in `model.counts`: each replica counts its
    shard, the counts are summed over the replicas (an all-reduce) and
    written once. (A Keras variable of `aggregation="sum"` incremented by
    each replica counted 16,567 for 141 examples here.)"""
    import keras
    import tensorflow as tf

    class Counting(keras.Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts = self.add_weight(
                shape=(n,),
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
                name="counts",
            )

        def train_step(self, data):
            x, _ = data
            ids = tf.cast(tf.round(x[:, 0] * 100), tf.int32)
            ones = tf.ones_like(ids, tf.float32)
            counts = tf.scatter_nd(ids[:, None], ones, [n])
            replicas = tf.distribute.get_replica_context()
            self.counts.assign_add(replicas.all_reduce("sum", counts))
            return super().train_step(data)

    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(3, activation="softmax")(inputs)
        model = Counting(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
        )
    return model


def sampling(out: str) -> None:
    _setup(2, deterministic=False)
    import tempfile

    import numpy as np
    import tensorflow as tf

    import keras_fim

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reference import read_scalars

    strategies = {
        "mirrored": tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]),
        "one": tf.distribute.get_strategy(),
    }
    results = {}
    modes = ("in_memory", "stream_known", "stream_unknown")
    # Uneven: 47 examples in 8s then 15s then one batch of all 47; the last
    # batch of a pass 7 (4 + 3) or 2 (1 + 1) examples, and 47 = 24 + 23.
    x, y = _data(47)
    x[:, 0] = np.arange(47) / 100  # the ids the model counts
    for mode in modes:
        for where, strategy in strategies.items():
            model = _counting_mlp(strategy, 47)
            log_dir = tempfile.mkdtemp()
            sampling = keras_fim.DynamicSampling(
                _sampling_data(mode, x, y),
                keras_fim.schedules.Staged([8, 15, 47]),
                mode="in_memory" if mode == "in_memory" else "stream",
                learning_rate_scaling="linear",
                log_dir=log_dir,
            )
            model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
            scalars, _ = read_scalars(log_dir, prefix="sampling/")
            results[f"uneven_{mode}_{where}"] = {
                "sizes": sampling.batch_sizes_per_epoch,
                "counts": model.counts.numpy().tolist(),
                "state": model.sampling_state.read(),
                "iterations": int(model.optimizer.iterations.numpy()),
                "batch_size": scalars["sampling/batch_size"],
                "learning_rate": scalars["sampling/learning_rate"],
            }

    # A last batch of one example: one replica's shard is empty (1 = 1 + 0).
    x, y = _data(17)
    x[:, 0] = np.arange(17) / 100
    for mode in ("in_memory", "stream_unknown"):
        model = _counting_mlp(strategies["mirrored"], 17)
        sampling = keras_fim.DynamicSampling(
            _sampling_data(mode, x, y),
            8,
            mode="in_memory" if mode == "in_memory" else "stream",
        )
        model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
        results[f"empty_shard_{mode}"] = {
            "sizes": sampling.batch_sizes_per_epoch,
            "counts": model.counts.numpy().tolist(),
            "examples_seen": model.sampling_state.read()["examples_seen"],
        }

    # Even global batches (8 = 4 + 4, 16 = 8 + 8) with a FisherCallback and
    # AdaScale: the measurements are the global batch's, as on one device.
    x, y = _data(48)
    for mode in ("in_memory", "stream_unknown"):
        for where, strategy in strategies.items():
            model = _mlp(strategy)
            sampling = keras_fim.DynamicSampling(
                _sampling_data(mode, x, y),
                keras_fim.schedules.Staged([8, 16]),
                mode="in_memory" if mode == "in_memory" else "stream",
                learning_rate_scaling="adascale",
            )
            fisher = keras_fim.FisherCallback(every_n_steps=2)
            history = model.fit(
                sampling.dataset, epochs=2, callbacks=[sampling, fisher], verbose=0
            )
            results[f"fisher_{mode}_{where}"] = {
                "fisher": _state(model),
                "sampling": model.sampling_state.read(),
                "sizes": sampling.batch_sizes_per_epoch,
                "C_K_bar": history.history["C_K_bar"],
                "weights": [w.tolist() for w in model.get_weights()],
            }

    # A schedule that reads the measurements cannot be planned ahead.
    model = _mlp(strategies["mirrored"])
    sampling = keras_fim.DynamicSampling(
        (x, y), keras_fim.schedules.Automatic(8, 16, min_steps=2)
    )
    try:
        model.fit(
            sampling.dataset,
            callbacks=[sampling, keras_fim.FisherCallback()],
            verbose=0,
        )
    except ValueError as error:
        results["automatic_error"] = str(error)

    with open(out, "w") as f:
        json.dump(results, f)


def worker(out: str, log_dir: str | None = None) -> None:
    _setup(1)
    import keras
    import tensorflow as tf

    import keras_fim

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # Two Keras 3.15 bugs stop any `fit` under this strategy
        # (keras-team/keras#20585): the symbolic build reduces a nest of
        # per-replica values, and scalar logs are reduced along axis 0. The
        # first is avoided by building in cross-replica context, the second
        # by averaging the logs of this worker's replicas.
        from keras.src.backend.tensorflow import trainer

        trainer._collective_all_reduce_multi_worker = lambda strategy: False
    else:
        strategy = tf.distribute.get_strategy()
    distributed = "TF_CONFIG" in os.environ
    results = {}
    for name, options in {
        "probed": {"every_n_steps": 2},
        "separate_max9": {
            "every_n_steps": 1,
            "reuse_training_pass": False,
            "max_examples": 9,
        },
    }.items():
        x, y = _data(SCENARIO_DATA)
        if "max_examples" in options and not distributed:
            x, y = measured_first(x, y, 12, 2, options["max_examples"])
        model = _mlp(strategy)
        first = (tf.constant(x[:12]), tf.constant(y[:12]))
        with strategy.scope():
            model._symbolic_build(data_batch=first)
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
        callback = keras_fim.FisherCallback(
            **options, log_dir=log_dir if name == "probed" else None
        )
        history = model.fit(data, epochs=2, verbose=0, callbacks=[callback]).history
        results[name] = {
            "state": _state(model),
            "C_K_bar": history["C_K_bar"],
            "weights": [w.tolist() for w in model.get_weights()],
        }
    keras.backend.clear_session()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    {"mirrored": mirrored, "sampling": sampling, "worker": worker}[sys.argv[1]](
        *sys.argv[2:]
    )
