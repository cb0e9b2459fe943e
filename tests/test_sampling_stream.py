"""`DynamicSampling` on a stream: the tf.data pipeline runs afresh every pass,
is rebatched into exactly the planned sizes, and an endless one needs an
epoch length. The mode is chosen sensibly, and can be forced."""

import os
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fim
from keras_fim.schedules import Geometric

N = 103


class Recorder(keras.Model):
    """Records the ids (column 0 of x) of every batch it trains, compiled."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def train_step(self, data):
        x = data[0]
        tf.py_function(
            lambda ids: self.seen.append(ids.numpy().astype(int).tolist()),
            [x[:, 0]],
            [],
        )
        return super().train_step(data)


def recorder(steps_per_execution=1):
    inputs = keras.Input((2,))
    model = Recorder(inputs, keras.layers.Dense(1)(inputs))
    model.compile(
        optimizer=keras.optimizers.SGD(0.001),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model


def id_pipeline(n=N, known_length=False):
    """Examples (id, 0) -> 0 through a map; a filter hides the length."""
    ids = np.arange(n, dtype=np.float32)
    data = tf.data.Dataset.from_tensor_slices(ids)

    @tf.autograph.experimental.do_not_convert
    def example(i):
        return tf.stack([i, 0.0]), tf.zeros([1])

    data = data.map(example)
    if not known_length:
        data = data.filter(tf.autograph.experimental.do_not_convert(lambda x, y: True))
    return data


def per_epoch(seen, sizes_per_epoch):
    out, start = [], 0
    for sizes in sizes_per_epoch:
        out.append([i for batch in seen[start : start + len(sizes)] for i in batch])
        start += len(sizes)
    assert start == len(seen)
    return out


def fit(model, sampling, epochs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: shuffle=True on a dataset
        model.fit(sampling.dataset, epochs=epochs, callbacks=[sampling], verbose=0)


@pytest.mark.parametrize("known_length", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_every_example_exactly_once_per_epoch_while_the_batch_grows(
    known_length, drop_remainder, steps_per_execution
):
    model = recorder(steps_per_execution)
    sampling = keras_fim.DynamicSampling(
        id_pipeline(known_length=known_length),
        # A maximum: with drop_remainder, twice it is prefetched, to see a
        # whole execution ahead.
        Geometric(8, 2, maximum=32),
        drop_remainder=drop_remainder,
        mode="stream",
    )
    assert sampling.mode == "stream"
    assert sampling.num_examples == (N if known_length else None)
    fit(model, sampling, epochs=3)

    sizes = sampling.batch_sizes_per_epoch
    # Exactly the batch planned at each step: the sizes the model trained.
    assert [len(b) for b in model.seen] == [s for e in sizes for s in e]
    for epoch, (size, ids) in enumerate(
        zip([8, 16, 32], per_epoch(model.seen, sizes), strict=True)
    ):
        full, rest = divmod(N, size)
        expected = [size] * full + ([] if drop_remainder or not rest else [rest])
        assert sizes[epoch] == expected
        # The stream's own order, every example once (the rest dropped).
        assert ids == list(range(full * size if drop_remainder else N))
    state = model.sampling_state.read()
    # As in memory, the next epoch starts the next pass.
    assert state["data_pass"] == 2 and state["position"] == N
    assert state["examples_seen"] == sum(map(sum, sizes))


def test_the_next_pass_is_read_ahead_while_this_one_trains():
    """The iterator runs on into the next pass: its examples are made
    before the epoch ends (a fresh iterator per epoch would start them only
    when the next epoch asks for its first batch)."""
    made = []

    @tf.autograph.experimental.do_not_convert
    def counted(x, y):
        tf.py_function(lambda: made.append(1), [], [])
        return x, y

    ahead = []

    class Ahead(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            deadline = time.monotonic() + 10
            while len(made) <= N * (epoch + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            ahead.append(len(made) - N * (epoch + 1))

    model = recorder()
    sampling = keras_fim.DynamicSampling(
        id_pipeline().map(counted), 8, mode="stream", buffer_size=32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(sampling.dataset, epochs=2, callbacks=[sampling, Ahead()], verbose=0)
    assert ahead[0] > 0
    ids = per_epoch(model.seen, sampling.batch_sizes_per_epoch)
    assert ids == [list(range(N))] * 2


def test_passes_of_different_lengths_are_each_trained_once():
    """A pipeline whose passes differ in length (a generator, a filter):
    each epoch is its own pass, cut at that pass's end, even when the
    previous pass was longer than the batch planned next."""
    lengths = iter([40, 5, 40])

    def examples():
        for i in range(next(lengths)):
            yield np.array([i, 0.0], np.float32), np.zeros([1], np.float32)

    spec = (tf.TensorSpec([2], tf.float32), tf.TensorSpec([1], tf.float32))
    data = tf.data.Dataset.from_generator(examples, output_signature=spec)
    model = recorder()
    sampling = keras_fim.DynamicSampling(data, 8, mode="stream", buffer_size=8)
    fit(model, sampling, epochs=3)
    assert sampling.batch_sizes_per_epoch == [[8] * 5, [5], [8] * 5]
    ids = per_epoch(model.seen, sampling.batch_sizes_per_epoch)
    assert ids == [list(range(40)), list(range(5)), list(range(40))]


def test_a_stream_starts_afresh_where_the_state_stands():
    """A fit stopped mid-pass continues at its position in the next fit; a
    state set back (as BackupAndRestore does) is read from there."""
    model = recorder()
    sampling = keras_fim.DynamicSampling(id_pipeline(), 8, mode="stream")

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.stop_training = True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(sampling.dataset, epochs=3, callbacks=[sampling, Stop()], verbose=0)
    assert model.sampling_state.read()["position"] == 24
    fit(model, sampling, epochs=2)  # the rest of pass 0, then pass 1
    ids = [i for batch in model.seen for i in batch]
    assert ids == list(range(N)) * 2
    after_pass_0 = dict(model.sampling_state.read(), data_pass=0, position=N)
    model.sampling_state.write(after_pass_0)
    model.seen.clear()
    fit(model, sampling, epochs=1)  # pass 1 again
    assert [i for batch in model.seen for i in batch] == list(range(N))
    assert model.sampling_state.read()["data_pass"] == 1


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_a_fixed_size_cuts_one_group_per_batch(drop_remainder):
    """A fixed size: every batch is one prefetched group; the rest of a
    pass (a dropped remainder, its end) is dropped before the next pass,
    and an execution planned short ends there."""
    model = recorder(steps_per_execution=3)
    sampling = keras_fim.DynamicSampling(
        id_pipeline(),
        12,
        drop_remainder=drop_remainder,
        mode="stream",
        buffer_size=48,  # an execution ahead, with drop_remainder
    )
    fit(model, sampling, epochs=3)
    kept = 96 if drop_remainder else N
    sizes = [12] * 8 + ([] if drop_remainder else [7])
    assert sampling.batch_sizes_per_epoch == [sizes] * 3
    assert [len(b) for b in model.seen] == sizes * 3
    assert per_epoch(model.seen, [sizes] * 3) == [list(range(kept))] * 3


def flip_counts(mode, epochs=3):
    """Examples flipped per epoch by a random augmentation map."""
    data = tf.data.Dataset.from_tensor_slices(np.ones((256, 2), np.float32))

    # A generator's state runs on across iterations, as in plain `fit(ds)`
    # (a stateful op under a global seed would restart with each iteration).
    generator = tf.random.Generator.from_seed(1)

    @tf.autograph.experimental.do_not_convert
    def augment(x):
        flip = generator.uniform([]) < 0.5
        return tf.where(flip, -x, x), tf.zeros([1])

    flipped = []

    class NewEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            flipped.append(0)

    def add(n):
        flipped[-1] += int(n)

    @tf.autograph.experimental.do_not_convert
    def count(x, y):  # `preprocess`: runs on every batch trained
        n = tf.reduce_sum(tf.cast(x[:, 0] < 0, tf.int64))
        tf.py_function(add, [n], [])
        return x, y

    sampling = keras_fim.DynamicSampling(
        data.map(augment), 32, mode=mode, preprocess=count, shuffle=False
    )
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.fit(
            sampling.dataset,
            epochs=epochs,
            callbacks=[NewEpoch(), sampling],
            verbose=0,
        )
    return sampling, flipped


def test_random_augmentation_runs_afresh_every_epoch():
    sampling, flipped = flip_counts("auto")
    assert sampling.mode == "stream"  # the random op chose the stream
    assert len(flipped) == 3 and sum(flipped) > 0
    assert len(set(flipped)) > 1, flipped  # like fit(ds): not frozen


def test_materialising_a_random_pipeline_warns_and_freezes_it():
    with pytest.warns(UserWarning, match=r"random ops.*RandomUniform.*frozen"):
        sampling, flipped = flip_counts("in_memory")
    assert sampling.mode == "in_memory"
    assert len(set(flipped)) == 1, flipped


def test_an_endless_dataset_needs_an_epoch_length_at_once():
    endless = tf.data.Dataset.range(10).repeat()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"endless.*examples_per_epoch"):
        keras_fim.DynamicSampling(endless, 4)
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="examples_per_epoch"):
        keras_fim.DynamicSampling(endless, 4, mode="in_memory", examples_per_epoch=8)


def test_a_huge_lazy_dataset_is_streamed_not_read():
    start = time.perf_counter()
    sampling = keras_fim.DynamicSampling(tf.data.Dataset.range(10**9), 4)
    assert sampling.mode == "stream" and sampling.num_examples == 10**9
    assert time.perf_counter() - start < 5


def test_an_endless_stream_runs_in_epochs_that_continue_it():
    ids = tf.data.Dataset.range(10**12).map(
        tf.autograph.experimental.do_not_convert(
            lambda i: (tf.stack([tf.cast(i, tf.float32), 0.0]), tf.zeros([1]))
        )
    )
    endless = ids.repeat()
    model = recorder()
    sampling = keras_fim.DynamicSampling(
        endless, Geometric(4, 2), examples_per_epoch=10
    )
    fit(model, sampling, epochs=3)
    assert sampling.batch_sizes_per_epoch == [[4, 4, 2], [8, 2], [10]]
    assert [i for b in model.seen for i in b] == list(range(30))
    fit(model, sampling, epochs=1)  # a later fit continues the stream too
    assert [i for b in model.seen for i in b] == list(range(40))


def test_an_endless_stream_at_a_fixed_size():
    ids = tf.data.Dataset.range(10**12).map(
        tf.autograph.experimental.do_not_convert(
            lambda i: (tf.stack([tf.cast(i, tf.float32), 0.0]), tf.zeros([1]))
        )
    )
    model = recorder()
    sampling = keras_fim.DynamicSampling(ids.repeat(), 5, examples_per_epoch=10)
    fit(model, sampling, epochs=2)
    fit(model, sampling, epochs=1)
    assert sampling.batch_sizes_per_epoch == [[5, 5]] * 3
    assert [i for b in model.seen for i in b] == list(range(30))


def test_drop_remainder_on_a_stream_needs_a_known_largest_batch():
    with pytest.raises(ValueError, match=r"largest batch.*buffer_size"):
        keras_fim.DynamicSampling(
            id_pipeline(), Geometric(8, 2), drop_remainder=True, mode="stream"
        )
    keras_fim.DynamicSampling(
        id_pipeline(), Geometric(8, 2), drop_remainder=True, buffer_size=64
    )


def test_the_mode_is_chosen_and_checked():
    x = np.zeros((10, 2), np.float32)
    small = tf.data.Dataset.from_tensor_slices(x)
    assert keras_fim.DynamicSampling(x, 2).mode == "in_memory"
    assert keras_fim.DynamicSampling(small, 2).mode == "in_memory"
    assert keras_fim.DynamicSampling(small.batch(3), 2).mode == "in_memory"
    assert keras_fim.DynamicSampling(small.shuffle(10), 2).mode == "stream"
    assert keras_fim.DynamicSampling(small.filter(lambda x: True), 2).mode == "stream"
    assert keras_fim.DynamicSampling(small, 2, mode="stream").mode == "stream"
    with pytest.raises(ValueError, match=r"mode.*'streaming'"):
        keras_fim.DynamicSampling(small, 2, mode="streaming")
    with pytest.raises(ValueError, match=r"Only a tf\.data\.Dataset can be streamed"):
        keras_fim.DynamicSampling(x, 2, mode="stream")
    with pytest.raises(ValueError, match="examples_per_epoch"):
        keras_fim.DynamicSampling(small, 2, examples_per_epoch=0)


# -- edge cases: op determinism, empty data, a pass shorter than a batch -----------


DETERMINISM = """
import numpy as np, tensorflow as tf, keras, keras_fim
tf.config.experimental.enable_op_determinism()
data = tf.data.Dataset.from_tensor_slices(np.zeros((20, 2), "float32"))
data = data.map(lambda x: (x, x[:1])).filter(lambda x, y: True)
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
sampling = keras_fim.DynamicSampling(data, schedule=4, mode="stream")
try:
    model.fit(sampling.dataset, callbacks=[sampling], verbose=0)
except ValueError as error:
    print("ValueError:", error)
endless = keras_fim.DynamicSampling(data.repeat(), schedule=4, examples_per_epoch=20)
model.fit(endless.dataset, epochs=2, callbacks=[endless], verbose=0)
print("endless:", endless.batch_sizes_per_epoch)
"""


def test_op_determinism_refuses_a_finite_stream_naming_the_ways_out():
    """Determinism is global to a process: in one of its own. A finite
    stream learns its end from tf.data's read-ahead, which op determinism
    turns off; `examples_per_epoch` (the planner ends the passes) works."""
    result = subprocess.run(
        [sys.executable, "-c", DETERMINISM],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    error, endless = result.stdout.strip().splitlines()
    assert error.startswith("ValueError:") and "enable_op_determinism" in error
    assert "examples_per_epoch=" in error and "mode='in_memory'" in error
    assert endless == "endless: [[4, 4, 4, 4, 4], [4, 4, 4, 4, 4]]"


@pytest.mark.parametrize(
    "data, mode",
    [
        ((np.zeros((0, 2)), np.zeros((0, 1))), "auto"),
        (tf.data.Dataset.range(0), "auto"),
        (tf.data.Dataset.range(0), "in_memory"),
        (tf.data.Dataset.range(0), "stream"),
    ],
)
def test_an_empty_dataset_is_refused_when_built(data, mode):
    with pytest.raises(ValueError, match="at least one example"):
        keras_fim.DynamicSampling(data, schedule=4, mode=mode)


def test_an_empty_stream_of_unknown_length_stops_fit_at_its_first_epoch():
    """Its emptiness shows only when the pass runs: `fit` stops there."""
    empty = id_pipeline().filter(lambda x, y: False)
    sampling = keras_fim.DynamicSampling(empty, schedule=4)
    with pytest.raises(ValueError, match=r"held 0 examples: nothing to train"):
        fit(recorder(), sampling, epochs=3)
    assert sampling.batch_sizes_per_epoch == [[]]


@pytest.mark.parametrize("known_length", [False, True])
def test_drop_remainder_with_a_pass_shorter_than_one_batch(known_length):
    """5 examples and a batch of 8: with a known length the schedule is
    refused when built; a stream of unknown length trains nothing and
    stops `fit` at the end of its first epoch, saying why."""
    data = id_pipeline(5, known_length=known_length)
    if known_length:
        with pytest.raises(ValueError, match="at most the number of examples"):
            keras_fim.DynamicSampling(data, schedule=8, drop_remainder=True)
        return
    sampling = keras_fim.DynamicSampling(data, schedule=8, drop_remainder=True)
    model = recorder()
    with pytest.raises(
        ValueError, match=r"held 5 examples: fewer than the batch size \(8\)"
    ):
        fit(model, sampling, epochs=3)
    assert model.seen == [] and sampling.batch_sizes_per_epoch == [[]]
    assert model.sampling_state.read()["examples_seen"] == 0
