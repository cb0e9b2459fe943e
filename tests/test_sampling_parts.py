"""The other parts of dynamic sampling on their own, without `fit`: the
learning-rate gain on numbers and tensors, the pipeline of planned batches,
and the sampling/* TensorBoard tags.

Expected values are worked out by hand from the formulas of docs/sampling.md.
"""

import numpy as np
import pytest
import tensorflow as tf
from fim_reference import read_scalars

from keras_fim import summaries
from keras_fim.sampling import LEARNING_RATE_SCALINGS, learning_rate_gain
from keras_fim.sampling.dataset import (
    DECLARED_CARDINALITY,
    FIRST_BATCH,
    InMemoryExamples,
    StreamedExamples,
    materialize,
)

# -- the learning-rate gain ---------------------------------------------------------


@pytest.mark.parametrize(
    "scaling, batch, reference, noise, gain",
    [
        ("none", 64, 16, None, 1.0),
        ("none", 3, 0, None, 1.0),
        ("linear", 64, 16, None, 4.0),
        ("linear", 8, 32, None, 0.25),
        ("linear", 8, 0, None, 8.0),  # B0 = 0 (before the first step) counts as 1
        ("sqrt", 64, 16, None, 2.0),
        ("sqrt", 8, 32, None, 0.5),
        ("adascale", 64, 16, 32.0, 2.0),  # (1 + 2) / (1 + 0.5)
        ("adascale", 64, 16, 0.0, 1.0),  # no noise: a bigger batch does not help
        ("adascale", 16, 16, 500.0, 1.0),  # B = B0
        ("adascale", 48, 16, 16.0, 1.5),  # (1 + 1) / (1 + 1/3)
    ],
)
def test_gain_on_numbers(scaling, batch, reference, noise, gain):
    value = learning_rate_gain(scaling, batch, reference, noise)
    assert value.dtype == tf.float64
    assert float(value) == pytest.approx(gain, rel=1e-15)


@pytest.mark.parametrize("noise", [float("nan"), float("inf"), -float("inf")])
def test_adascale_gain_is_one_while_the_noise_scale_is_undefined(noise):
    assert float(learning_rate_gain("adascale", 64, 16, noise)) == 1.0


def test_adascale_gain_lies_between_one_and_linear():
    for noise in (1e-3, 0.5, 7.0, 100.0, 1e4, 1e9):
        gain = float(learning_rate_gain("adascale", 128, 16, noise))
        assert 1.0 < gain < 8.0
    assert float(learning_rate_gain("adascale", 128, 16, 1e12)) == pytest.approx(8.0)


def test_gain_on_tensors_inside_a_compiled_function():
    reference = tf.Variable(16, dtype=tf.int64)
    noise = tf.Variable(float("nan"), dtype=tf.float64)

    @tf.function(jit_compile=True)
    def gains(batch):
        return [
            learning_rate_gain(s, batch, reference, noise)
            for s in LEARNING_RATE_SCALINGS
        ]

    batch = tf.constant(36, tf.int64)
    assert [float(g) for g in gains(batch)] == [1.0, 2.25, 1.5, 1.0]
    noise.assign(12.0)  # (1 + 12/16) / (1 + 12/36) = 1.75 / (4/3)
    assert float(gains(batch)[3]) == pytest.approx(1.3125, rel=1e-15)


def test_unknown_scaling_raises_value_error():
    with pytest.raises(ValueError, match="scaling"):
        learning_rate_gain("cubic", 8, 4)


# -- the pipeline ------------------------------------------------------------------


def test_the_dataset_yields_the_planned_rows_of_the_order_then_ends():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)  # row i: 2i, 2i + 1
    y = np.arange(10) * 10
    examples = InMemoryExamples((x, y))
    assert examples.num_examples == 10
    assert int(examples.dataset.cardinality()) == DECLARED_CARDINALITY
    examples.set_order(np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))
    examples.set_batches([(1, 2), (3, 4)])
    examples.open(True)  # as an epoch begins
    iterator = iter(examples.dataset)
    first, second = next(iterator), next(iterator)
    assert first[1].numpy().tolist() == [80, 70]
    assert first[0].numpy().tolist() == [[16.0, 17.0], [14.0, 15.0]]
    assert second[1].numpy().tolist() == [60, 50, 40, 30]
    with pytest.raises(StopIteration):
        next(iterator)  # nothing more planned


def test_preprocess_runs_on_every_planned_batch():
    x = {"a": np.arange(6, dtype=np.float32)}
    examples = InMemoryExamples(x, preprocess=lambda x: {"a": x["a"] * 2})
    examples.set_batches([(0, 3), (3, 3)])
    examples.open(True)
    batches = [b["a"].numpy().tolist() for b in examples.dataset]
    assert batches == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_read_before_the_first_epoch_gets_copies_of_the_first_example(streamed):
    """What Keras's symbolic build reads under a strategy, before any
    callback runs: `FIRST_BATCH` copies of the first example (a size the
    replicas split evenly), leaving the plan and the stream's counters."""
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10) * 10
    if streamed:
        examples = StreamedExamples(tf.data.Dataset.from_tensor_slices((x, y)), False)
    else:
        examples = InMemoryExamples((x, y))
    # Two reads: list() would ask the declared length.
    iterator = iter(examples.dataset)
    closed = [next(iterator)]
    with pytest.raises(StopIteration):
        next(iterator)
    assert closed[0][1].numpy().tolist() == [0] * FIRST_BATCH
    assert closed[0][0].shape == (FIRST_BATCH, 2)
    if streamed:  # the iterator and the cut untouched
        assert examples._made.numpy().tolist() == [0, 0]
        assert int(examples._slot.numpy()) == 0
    else:  # the plan untouched
        assert int(examples._slot.numpy()) == 0
    examples.set_batches([(0, 4)])
    examples.open(True)
    assert next(iter(examples.dataset))[1].numpy().tolist() == [0, 10, 20, 30]


def test_materialize_unbatches_a_batched_dataset_and_casts_arrays():
    data = tf.data.Dataset.from_tensor_slices(np.arange(7)).batch(3)
    assert materialize(data, None).tolist() == list(range(7))
    arrays = materialize((np.zeros((4, 2), np.float64), np.arange(1, 5)), None)
    assert arrays[0].dtype == np.float32 and arrays[1].tolist() == [1, 2, 3, 4]


# -- TensorBoard -------------------------------------------------------------------


def test_sampling_tags_are_written_under_sampling(tmp_path):
    writer = summaries.create_writer(str(tmp_path))
    try:
        summaries.write_sampling_step(
            writer, tf.constant(3, tf.int64), tf.constant(32, tf.int64), 0.1, 2.0
        )
        summaries.write_sampling_decision(writer, 3, 1.5, 1.0)
        writer.flush()
    finally:
        writer.close()
    scalars, _ = read_scalars(str(tmp_path), prefix="sampling/")
    assert scalars == {
        "sampling/batch_size": [(3, 32.0)],
        "sampling/learning_rate": [(3, pytest.approx(0.1))],
        "sampling/learning_rate_gain": [(3, 2.0)],
        "sampling/signal": [(3, 1.5)],
        "sampling/threshold": [(3, 1.0)],
    }
    written = {tag.split("/", 1)[1] for tag in scalars}
    assert written == set(
        summaries.SAMPLING_SCALARS + summaries.SAMPLING_DECISION_SCALARS
    )
