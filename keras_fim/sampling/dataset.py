"""The examples of `DynamicSampling`, in memory, and the batches gathered
from them.

The examples are held in `tf.Variable`s. The `tf.data` pipeline yields, at
each step, the rows of the pass's permutation that the callback planned for
that step (handed over through small variables before every execution of
the train function). It has no prefetch, so the batch trained is always the
batch planned: with prefetch a size change would reach the model a
timing-dependent number of steps later, and a resumed run could not repeat
it. The dataset declares a large cardinality, which keeps Keras from fixing
the number of steps per epoch after the first one.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_fim._keras_compat import variant_tensor

# What the dataset tells Keras its cardinality is: any number larger than the
# steps of one epoch keeps Keras from learning a fixed epoch length.
DECLARED_CARDINALITY = 2**62


class DeclaredCardinality(tf.data.Dataset):
    """`dataset`, reporting `cardinality` instead of "unknown"."""

    def __init__(self, dataset: tf.data.Dataset, cardinality: int):
        self._dataset = dataset
        self._declared = cardinality
        super().__init__(variant_tensor(dataset))

    def _inputs(self):
        return [self._dataset]

    @property
    def element_spec(self):
        return self._dataset.element_spec

    def cardinality(self):
        return tf.constant(self._declared, tf.int64)


def materialize(data, batched: bool | None):
    """The examples of `data` as a structure of numpy arrays."""
    if isinstance(data, tf.data.Dataset):
        leaves = keras.tree.flatten(data.element_spec)
        for leaf in leaves:
            if not isinstance(leaf, tf.TensorSpec):
                raise ValueError(
                    "`data` must hold dense tensors only; "
                    f"received an element with {type(leaf).__name__} {leaf}."
                )
        if batched is None:
            # A `.batch()` without drop_remainder leaves the leading
            # dimension unknown; any other dataset is taken as unbatched.
            batched = all(leaf.shape.rank and leaf.shape[0] is None for leaf in leaves)
        if batched:
            data = data.unbatch()
        chunks = list(data.batch(4096).as_numpy_iterator())
        if not chunks:
            raise ValueError(
                "`data` must hold at least one example; the dataset is empty."
            )
        return keras.tree.map_structure(
            lambda *parts: np.concatenate(parts, axis=0), *chunks
        )
    if isinstance(data, list):
        data = tuple(data)
    try:
        arrays = keras.tree.map_structure(np.asarray, data)
    except Exception as error:
        raise ValueError(
            "`data` must be a tf.data.Dataset or (nested tuples/dicts of) arrays. "
            f"Received: {type(data).__name__} ({error})"
        ) from error
    # As Keras's own array adapter: floating arrays in the float type.
    arrays = keras.tree.map_structure(
        lambda a: (
            a.astype(keras.config.floatx())
            if np.issubdtype(a.dtype, np.floating)
            else a
        ),
        arrays,
    )
    for array in keras.tree.flatten(arrays):
        if array.ndim == 0 or array.dtype == object:
            raise ValueError(
                "`data` must hold arrays with a leading example dimension. "
                f"Received an array of shape {array.shape} and dtype {array.dtype}."
            )
    return arrays


def count_examples(arrays) -> int:
    """The common leading dimension of `arrays`, or `ValueError`."""
    counts = {int(a.shape[0]) for a in keras.tree.flatten(arrays)}
    if len(counts) != 1:
        raise ValueError(
            "Every array in `data` must have the same number of examples "
            f"(leading dimension). Received: {sorted(counts)}"
        )
    count = counts.pop()
    if count == 0:
        raise ValueError(
            "`data` must hold at least one example. Received: arrays with a "
            "leading dimension of 0."
        )
    return count


class InMemoryExamples:
    """Examples held in `tf.Variable`s, and the dataset of the planned batches.

    `dataset` yields, for each batch planned with `set_batches`, the
    examples at rows ``start, ..., start + size - 1`` of the order set with
    `set_order`, then ends until the next `set_batches`.

    Args:
        arrays: a structure of numpy arrays with a common leading dimension
            (from `materialize`).
        preprocess: a function applied to every batch in the pipeline, or
            `None`. Defaults to `None`.
    """

    def __init__(self, arrays, preprocess: Callable | None = None):
        self.num_examples = count_examples(arrays)
        with tf.init_scope(), tf.device("/cpu:0"):
            self._examples = keras.tree.map_structure(
                lambda a: tf.Variable(a, trainable=False), arrays
            )
            self._order = tf.Variable(
                tf.range(self.num_examples, dtype=tf.int64), trainable=False
            )
            self._starts = tf.Variable(
                tf.zeros([0], tf.int64), shape=[None], trainable=False
            )
            self._sizes = tf.Variable(
                tf.zeros([0], tf.int64), shape=[None], trainable=False
            )
            self._slot = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._preprocess = preprocess
        self.dataset = self._make_dataset()

    def set_order(self, order: np.ndarray) -> None:
        """Sets the order of the examples (a pass's permutation)."""
        self._order.assign(order.astype(np.int64))

    def set_batches(self, batches) -> None:
        """Plans the next batches: ``(start, size)`` pairs, in the order."""
        self._starts.assign(np.array([start for start, _ in batches], np.int64))
        self._sizes.assign(np.array([size for _, size in batches], np.int64))
        self._slot.assign(0)

    def _make_dataset(self) -> tf.data.Dataset:
        # Plain tensor code: nothing for autograph to convert.
        @tf.autograph.experimental.do_not_convert
        def planned(_):
            return self._slot < tf.shape(self._sizes, out_type=tf.int64)[0]

        @tf.autograph.experimental.do_not_convert
        def gather(_):
            slot = self._slot.assign_add(1) - 1
            start, size = self._starts[slot], self._sizes[slot]
            indices = self._order[start : start + size]
            return keras.tree.map_structure(
                lambda v: tf.gather(v, indices), self._examples
            )

        dataset = (
            tf.data.Dataset.range(DECLARED_CARDINALITY).take_while(planned).map(gather)
        )
        if self._preprocess is not None:
            dataset = dataset.map(self._preprocess)
        options = tf.data.Options()
        # No prefetch anywhere: the batch trained must be the batch planned.
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
        options.deterministic = True
        return DeclaredCardinality(dataset.with_options(options), DECLARED_CARDINALITY)
