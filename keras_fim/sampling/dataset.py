"""The examples of `DynamicSampling` and the batches made of them, in one of
two modes.

* In memory (`InMemoryExamples`): the examples are held in `tf.Variable`s
  and the pipeline yields, at each step, the rows of the pass's permutation
  that the callback planned for that step.
* Streamed (`StreamedExamples`): the user's pipeline runs afresh every pass
  and its examples are prefetched off the training step's critical path, by
  one iterator that runs on from pass to pass; only the rebatching
  (stacking the examples already made) is synchronous.
  It cuts the stream into batches of the sizes the callback planned for the
  step, read from small variables when the batch is asked for.

In both, the sizes (and rows) of the next batches are handed over before
every execution of the train function, and nothing after the point where
they are read is prefetched, so the batch trained is always the batch
planned: with prefetch a size change would reach the model a
timing-dependent number of steps later, and a resumed run could not repeat
it. The dataset declares a large cardinality, which keeps Keras from fixing
the number of steps per epoch after the first one.

`choose_mode` picks the mode: in memory for arrays and for small, finite,
deterministic datasets; streamed for the rest.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_fim._keras_compat import (
    dataset_op_names,
    op_determinism_enabled,
    restart_iterator,
    variant_tensor,
)

# What the dataset tells Keras its cardinality is: any number larger than the
# steps of one epoch keeps Keras from learning a fixed epoch length.
DECLARED_CARDINALITY = 2**62

MODES = ("auto", "in_memory", "stream")

# The largest dataset `mode="auto"` reads into memory.
IN_MEMORY_LIMIT_BYTES = 2**29

# How long `StreamedExamples.examples_left` waits for a stream that makes no
# progress before it says so.
STALL_SECONDS = 60.0

# Op types that draw random numbers, or shuffle, in a pipeline's graph.
RANDOM_OP = re.compile(
    r"Random|Shuffle|Multinomial|TruncatedNormal|Rng|SampleDistorted|Categorical"
)


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


# The batch a read before the first epoch gets: copies of the first example,
# as many as any replica count up to 6, and 8, 10, 12, 15, 16, ... divides
# (Keras averages the replicas' shards of it, which must be equal).
FIRST_BATCH = 240


def gated(dataset: tf.data.Dataset, first: tf.data.Dataset, is_open) -> tf.data.Dataset:
    """`dataset` while the variable `is_open` is true when an iteration
    starts, else `first` (`FIRST_BATCH` copies of the first example). Under
    a `tf.distribute` strategy Keras's symbolic build reads a batch before
    any callback runs; that read gets `first` and leaves the plan, the
    stream's counters and its position alone."""

    @tf.autograph.experimental.do_not_convert
    def opened(_):
        return is_open.read_value()

    @tf.autograph.experimental.do_not_convert
    def closed(_):
        return tf.logical_not(is_open.read_value())

    start = tf.data.Dataset.from_tensors(0)
    return (
        start.filter(opened)
        .flat_map(lambda _: dataset)
        .concatenate(start.filter(closed).flat_map(lambda _: first))
    )


def is_batched(dataset: tf.data.Dataset, batched: bool | None) -> bool:
    """`batched`, or, for `None`, a guess from the element spec: a `.batch()`
    without drop_remainder leaves the leading dimension unknown; any other
    dataset is taken as unbatched. `ValueError` unless every leaf is dense."""
    leaves = keras.tree.flatten(dataset.element_spec)
    for leaf in leaves:
        if not isinstance(leaf, tf.TensorSpec):
            raise ValueError(
                "`data` must hold dense tensors only; "
                f"received an element with {type(leaf).__name__} {leaf}."
            )
    if batched is None:
        return all(leaf.shape.rank and leaf.shape[0] is None for leaf in leaves)
    return batched


def random_ops(dataset: tf.data.Dataset) -> list[str]:
    """The op types in `dataset`'s pipeline that draw random numbers or
    shuffle (a random augmentation `map`, `shuffle`)."""
    return sorted(op for op in dataset_op_names(dataset) if RANDOM_OP.search(op))


def _example_bytes(dataset: tf.data.Dataset, batched: bool) -> int | None:
    """Bytes of one example, from the element spec (`None` if unknown)."""
    total = 0
    for leaf in keras.tree.flatten(dataset.element_spec):
        dims = leaf.shape.as_list()[1 if batched else 0 :]
        if any(d is None for d in dims):
            return None
        total += int(np.prod(dims, dtype=np.int64)) * leaf.dtype.size
    return total


def choose_mode(
    data,
    mode: str,
    batched: bool | None,
    examples_per_epoch: int | None,
) -> str:
    """``"in_memory"`` or ``"stream"`` for `data`, `mode` being one of
    `MODES`.

    ``"auto"`` reads into memory arrays, and datasets that are finite (known
    cardinality), deterministic (no random op) and at most
    `IN_MEMORY_LIMIT_BYTES`; it streams the rest and whenever
    `examples_per_epoch` is given. Forcing ``"in_memory"`` on a dataset with
    a random op warns: the randomness would be drawn once and frozen.

    Raises:
        ValueError: an infinite dataset without `examples_per_epoch`, or
            `examples_per_epoch` with arrays or ``"in_memory"``.
    """
    if not isinstance(data, tf.data.Dataset):
        if mode == "stream" or examples_per_epoch is not None:
            raise ValueError(
                "Only a tf.data.Dataset can be streamed (`mode='stream'`, "
                "`examples_per_epoch`); arrays are held in memory. Received: "
                f"data of type {type(data).__name__}, mode={mode!r}, "
                f"examples_per_epoch={examples_per_epoch!r}"
            )
        return "in_memory"
    batched = is_batched(data, batched)
    cardinality = int(data.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY and examples_per_epoch is None:
        raise ValueError(
            "`data` is an endless dataset (infinite cardinality, e.g. "
            "`.repeat()`): it cannot be read into memory, and an epoch of it "
            "needs a length. Pass `examples_per_epoch=<examples per epoch>`. "
            "Received: examples_per_epoch=None"
        )
    if examples_per_epoch is not None:
        if mode == "in_memory":
            raise ValueError(
                "`examples_per_epoch` cuts a stream into epochs; it cannot be "
                "used with mode='in_memory'. Received: "
                f"examples_per_epoch={examples_per_epoch!r}, mode='in_memory'"
            )
        return "stream"
    if mode == "stream":
        return "stream"
    randomness = random_ops(data)
    if mode == "in_memory":
        if randomness:
            warnings.warn(
                "`data` holds random ops "
                f"({', '.join(randomness)}), and mode='in_memory' reads it "
                "once: the randomness (augmentation, shuffle) is drawn once "
                "and frozen for the whole run. Use mode='stream' to run the "
                "pipeline afresh every pass.",
                stacklevel=3,
            )
        return "in_memory"
    if randomness or cardinality < 0:
        return "stream"
    return _by_size(data, batched)


def _by_size(dataset: tf.data.Dataset, batched: bool) -> str:
    """In memory when the examples fit in `IN_MEMORY_LIMIT_BYTES`."""
    per_example = _example_bytes(dataset, batched)
    count = int(dataset.cardinality())
    if batched:
        # The size of a batch: the first batch's leading dimension.
        first = next(iter(dataset.take(1)), None)
        if first is None:
            return "in_memory"  # empty: materialize says so
        count *= int(keras.tree.flatten(first)[0].shape[0])
    if per_example is None or per_example * count > IN_MEMORY_LIMIT_BYTES:
        return "stream"
    return "in_memory"


def materialize(data, batched: bool | None):
    """The examples of `data` as a structure of numpy arrays."""
    if isinstance(data, tf.data.Dataset):
        if is_batched(data, batched):
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


def make_examples(
    mode: str,
    data,
    batched: bool | None,
    preprocess: Callable | None = None,
    examples_per_epoch: int | None = None,
    buffer_size: int | None = None,
    granularity: int = 1,
    single_group: bool = False,
):
    """The examples of `data` in `mode` (``"in_memory"`` or ``"stream"``,
    from `choose_mode`): an `InMemoryExamples` or a `StreamedExamples`."""
    if mode == "in_memory":
        return InMemoryExamples(materialize(data, batched), preprocess)
    return StreamedExamples(
        data,
        batched,
        examples_per_epoch,
        preprocess,
        buffer_size,
        granularity,
        single_group,
    )


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
            self._open = tf.Variable(False, trainable=False)
        self._preprocess = preprocess
        self.dataset = self._make_dataset()

    def set_order(self, order: np.ndarray) -> None:
        """Sets the order of the examples (a pass's permutation)."""
        self._order.assign(order.astype(np.int64))

    def set_batches(self, batches, restart: bool = True) -> None:
        """Plans the next batches: ``(start, size)`` pairs, in the order;
        without `restart`, `batches` extends the batches planned last (the
        plan of a whole pass, read ahead under a strategy)."""
        self._starts.assign(np.array([start for start, _ in batches], np.int64))
        self._sizes.assign(np.array([size for _, size in batches], np.int64))
        if restart:
            self._slot.assign(0)
        self._pulled = True

    def open(self, is_open: bool) -> None:
        """Opens the dataset (an epoch begins) or closes it (`gated`)."""
        self._open.assign(is_open)

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

        @tf.autograph.experimental.do_not_convert
        def first(_):
            return keras.tree.map_structure(
                lambda v: tf.repeat(v[:1], FIRST_BATCH, axis=0), self._examples
            )

        dataset = gated(
            tf.data.Dataset.range(DECLARED_CARDINALITY).take_while(planned).map(gather),
            tf.data.Dataset.from_tensors(0).map(first),
            self._open,
        )
        if self._preprocess is not None:
            dataset = dataset.map(self._preprocess)
        options = tf.data.Options()
        # No prefetch anywhere: the batch trained must be the batch planned.
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
        options.deterministic = True
        return DeclaredCardinality(dataset.with_options(options), DECLARED_CARDINALITY)


def _options(autotune: bool) -> tf.data.Options:
    options = tf.data.Options()
    # No prefetch after the point where the planned sizes are read: the
    # batch trained must be the batch planned.
    options.autotune.enabled = autotune
    options.experimental_optimization.inject_prefetch = False
    options.deterministic = True
    return options


def _single(structure):
    """A map function's arguments as the element they came from."""
    return structure[0] if len(structure) == 1 else structure


def _no_examples(spec):
    """A group of no examples with `spec`'s structure (unknown sizes 0)."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([0] + [d or 0 for d in s.shape.as_list()[1:]], s.dtype),
        spec,
    )


class StreamedExamples:
    """The user's pipeline, run afresh every pass and cut into the planned
    batches.

    The examples of `dataset` (unbatched first if `batched`) are grouped
    `granularity` at a time and prefetched (all the pipeline's work: reads,
    maps, augmentation), by one iterator that runs on from pass to pass: the
    next pass is started and prefetched while this one is trained, as plain
    `fit` on ``ds.batch(B).prefetch(AUTOTUNE)`` does. Every group is tagged
    with its pass. When Keras asks for a batch, `dataset` reads the planned
    size (set with `set_batches`) and takes that many examples' groups from
    the iterator; only that cutting runs on the training step's path.

    A finite dataset: every pass is a fresh iteration of `dataset`, followed
    by a marker of its end. Where a pass ends is known before a batch is
    asked for: the prefetching side counts the examples it has made and
    records each pass's length as its data ends, and `examples_left` waits
    for as many as a decision needs. (Letting the data run out inside the
    train function would not do: TensorFlow runs the step's updates that do
    not depend on the data, `optimizer.iterations` among them, before the
    end surfaces.) The iterator continues from epoch to epoch (and `fit` to
    `fit`) while each epoch starts the pass after the last one's; any other
    start (a resumed run, a fit that stopped mid-pass) starts it afresh at
    `begin_pass`'s position (skipping the examples before it).

    With `examples_per_epoch`, the data is repeated (every repetition a
    fresh iteration) into one stream, read by one iterator for the life of
    this object, and a pass is `examples_per_epoch` examples of it.

    Args:
        data: a `tf.data.Dataset` of dense tensors.
        batched: whether `data` is batched (`None`: guessed).
        examples_per_epoch: Integer or `None`, the examples in one pass of
            an endless stream.
        preprocess: a function applied to every batch, or `None`.
        buffer_size: Integer, the examples prefetched, at least the largest
            batch when `drop_remainder` has to look that far ahead; `None`
            lets tf.data tune it. Defaults to `None`.
        granularity: Integer >= 1 that every planned size is a multiple of
            (but a pass's last batch): the examples are grouped that many at
            a time, and a batch is cut from whole groups, with no per-example
            work. Defaults to `1`.
        single_group: Boolean, whether every planned size is `granularity`
            (a fixed size): a batch is then one group. Defaults to `False`.
    """

    def __init__(
        self,
        data: tf.data.Dataset,
        batched: bool | None,
        examples_per_epoch: int | None = None,
        preprocess: Callable | None = None,
        buffer_size: int | None = None,
        granularity: int = 1,
        single_group: bool = False,
    ):
        elements = data.unbatch() if is_batched(data, batched) else data
        self._granularity = granularity
        self._single_group = single_group
        self._elements = elements
        self._group_spec = elements.batch(granularity).element_spec
        self.endless = examples_per_epoch is not None
        cardinality = int(elements.cardinality())
        # Examples in a pass when known in advance.
        self.num_examples = (
            examples_per_epoch
            if self.endless
            else (cardinality if cardinality >= 0 else None)
        )
        if self.num_examples == 0:
            raise ValueError(
                "`data` must hold at least one example; the dataset is empty "
                "(cardinality 0)."
            )
        # In groups of `granularity` examples.
        self._buffer_size = (
            tf.data.AUTOTUNE if buffer_size is None else -(-buffer_size // granularity)
        )
        self._started = False
        self._pulled = False
        self._planned_sizes = [1]  # what `_sizes` holds
        # The data pass the iterator's pass 0 is, and the pass read now
        # (`None`: not started).
        self._first_pass = 0
        self._data_pass: int | None = None
        self._made_seen = (0, 0)  # the last reading of `_made`
        with tf.init_scope(), tf.device("/cpu:0"):
            self._sizes = tf.Variable(
                tf.ones([1], tf.int64), shape=[None], trainable=False
            )
            self._slot = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._start = tf.Variable(0, dtype=tf.int64, trainable=False)
            # The iterator's pass to read, counted from its start, and the
            # last one whose end marker was read.
            self._pass = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._ended = tf.Variable(-1, dtype=tf.int64, trainable=False)
            # The prefetching side: [passes ended, examples made of the
            # next], and the length of every pass ended.
            self._made = tf.Variable(tf.zeros([2], tf.int64), trainable=False)
            self._lengths = tf.Variable(
                tf.zeros([0], tf.int64), shape=[None], trainable=False
            )
            self._open = tf.Variable(False, trainable=False)
            make = self._endless_groups if self.endless else self._pass_groups
            groups = make().prefetch(self._buffer_size)
            self._iterator = iter(groups.with_options(_options(autotune=True)))
            # Gated around the cut, not at the source: a read before the
            # first epoch leaves the iterator, its pass and the plan alone.
            first = elements.take(1).cache().repeat(FIRST_BATCH)
            dataset = gated(self._batches(), first.batch(FIRST_BATCH), self._open)
        if preprocess is not None:
            dataset = dataset.map(preprocess)
        dataset = dataset.with_options(_options(autotune=False))
        self.dataset = DeclaredCardinality(dataset, DECLARED_CARDINALITY)

    def _pass_groups(self) -> tf.data.Dataset:
        """The groups of pass after pass, each tagged ``(pass, is_end)``,
        each pass's end marked by a group of no examples."""

        @tf.autograph.experimental.do_not_convert
        def one_pass(index):
            @tf.autograph.experimental.do_not_convert
            def counted(*group):
                made = tf.shape(tf.nest.flatten(group)[0], out_type=tf.int64)[0]
                with tf.control_dependencies(
                    [self._made.assign_add(tf.stack([tf.constant(0, tf.int64), made]))]
                ):
                    group = tf.nest.map_structure(tf.identity, _single(group))
                return index, False, group

            @tf.autograph.experimental.do_not_convert
            def end(_):
                made = self._made.read_value()[1]
                with tf.control_dependencies(
                    [self._lengths.assign(tf.concat([self._lengths, [made]], 0))]
                ):
                    ended = self._made.assign(tf.stack([index + 1, 0]))
                with tf.control_dependencies([ended]):
                    return index, True, _no_examples(self._group_spec)

            # The first pass of the iterator starts where `begin_pass` said.
            start = tf.where(index == 0, self._start.read_value(), 0)
            groups = self._elements.skip(start).batch(self._granularity).map(counted)
            return groups.concatenate(tf.data.Dataset.from_tensors(index).map(end))

        return tf.data.Dataset.range(DECLARED_CARDINALITY).flat_map(one_pass)

    def _endless_groups(self) -> tf.data.Dataset:
        """The repeated stream's groups, all tagged ``(0, False)``."""

        @tf.autograph.experimental.do_not_convert
        def tagged(*group):
            return tf.constant(0, tf.int64), False, _single(group)

        @tf.autograph.experimental.do_not_convert
        def from_start(_):
            start = self._start.read_value()
            examples = self._elements.repeat().skip(start)
            return examples.batch(self._granularity).map(tagged)

        return tf.data.Dataset.from_tensors(0).flat_map(from_start)

    def _batches(self) -> tf.data.Dataset:
        """The planned batches, each cut from the iterator's groups of the
        pass read now when it is asked for; a batch past the plan, or past
        the end of the pass, ends the iteration (it is never trained)."""
        specs = tf.nest.flatten(self._group_spec)
        granularity = self._granularity

        def empty():
            return tf.nest.flatten(_no_examples(self._group_spec))

        def pull():
            """The next group, or the pass's end (a group of none); and
            whether it is short: the pass's last, which its end follows."""
            _, is_end, group = self._iterator.get_next()
            leaves = tf.nest.flatten(group)
            short = tf.logical_and(
                tf.logical_not(is_end), tf.shape(leaves[0])[0] < granularity
            )
            return is_end, short, leaves

        def end_after(short, is_end):
            # The end after a short group is read with it, so that the
            # pass's length is known when the batch is trained.
            return tf.cond(short, lambda: pull()[0], lambda: is_end)

        def one_group(groups):
            # A fixed size: one pull, without the loop (whose function
            # costs ~20 ms to set up at every epoch's iterator, ~0.1 ms a
            # batch more).
            def taken():
                is_end, short, leaves = pull()
                return tf.logical_not(is_end), end_after(short, is_end), leaves

            return tf.cond(groups > 0, taken, lambda: (False, False, empty()))

        def some_groups(groups):
            def more(taken, ended, pulls, parts):
                return tf.logical_and(taken < groups, tf.logical_not(ended))

            def next_group(taken, ended, pulls, parts):
                is_end, short, leaves = pull()
                parts = [
                    p.write(pulls, leaf) for p, leaf in zip(parts, leaves, strict=True)
                ]
                ended = end_after(short, is_end)
                return taken + tf.cast(~is_end, tf.int64), ended, pulls + 1, parts

            parts = [
                tf.TensorArray(
                    s.dtype,
                    size=0,
                    dynamic_size=True,
                    infer_shape=False,
                    element_shape=s.shape,
                )
                for s in specs
            ]
            taken, ended, _, parts = tf.while_loop(
                more, next_group, (tf.constant(0, tf.int64), False, 0, parts)
            )
            leaves = tf.cond(taken > 0, lambda: [p.concat() for p in parts], empty)
            return taken > 0, ended, leaves

        @tf.autograph.experimental.do_not_convert
        def cut(_):
            slot = self._slot.assign_add(1) - 1
            planned = slot < tf.shape(self._sizes, out_type=tf.int64)[0]
            wanted = self._pass.read_value()
            size = self._sizes[tf.minimum(slot, tf.size(self._sizes, tf.int64) - 1)]
            groups = tf.where(
                tf.logical_and(planned, self._ended.read_value() < wanted),
                (size + granularity - 1) // granularity,
                0,
            )
            cut_groups = one_group if self._single_group else some_groups
            some, ended, leaves = cut_groups(groups)
            with tf.control_dependencies(
                [self._ended.assign(tf.where(ended, wanted, self._ended))]
            ):
                leaves = [tf.identity(leaf) for leaf in leaves]
            return some, tf.nest.pack_sequence_as(self._group_spec, leaves)

        @tf.autograph.experimental.do_not_convert
        def has_examples(some, _):
            return some

        @tf.autograph.experimental.do_not_convert
        def examples(_, batch):
            return batch

        return (
            tf.data.Dataset.range(DECLARED_CARDINALITY)
            .map(cut)
            .take_while(has_examples)
            .map(examples)
        )

    def set_batches(self, batches, restart: bool = True) -> None:
        """Plans the next batches: ``(start, size)`` pairs (the sizes count);
        without `restart`, `batches` extends the batches planned last (the
        plan of a whole pass, read ahead under a strategy)."""
        sizes = [size for _, size in batches]
        if sizes != self._planned_sizes:  # one write less per step otherwise
            self._sizes.assign(np.array(sizes, np.int64))
            self._planned_sizes = sizes
        if restart:
            self._slot.assign(0)
        self._pulled = True

    def open(self, is_open: bool) -> None:
        """Opens the dataset (an epoch begins) or closes it (`gated`)."""
        self._open.assign(is_open)

    def begin_pass(
        self, data_pass: int, position: int, examples_seen: int, need: int
    ) -> bool:
        """Gets ready for an epoch starting `position` examples into pass
        `data_pass`, `examples_seen` into the stream; `False` when, resuming,
        that pass turns out to be over (a finite one with fewer than `need`
        examples left after `position`)."""
        if self.endless:
            if not self._started:
                # A resumed (or later) run: the stream continues where the
                # model's sampling state stands, its start read and dropped.
                self._start.assign(examples_seen)
                self._started = True
            return True
        if self._data_pass is not None and (data_pass, position) == (
            self._data_pass + 1,
            0,
        ):
            # The pass after the last: the iterator has it (prefetched),
            # after what is left of the last one (a dropped remainder, its
            # end), which is read and dropped here.
            last = self._data_pass - self._first_pass
            while int(self._ended.numpy()) < last:
                index, is_end, _ = self._iterator.get_next()
                if is_end:
                    self._ended.assign(index)
            self._pass.assign(data_pass - self._first_pass)
        else:
            # First: the old iterator's prefetching (which writes `_made`)
            # stops with it. The new one starts at its first request.
            restart_iterator(self._iterator)
            self._start.assign(position)
            self._pass.assign(0)
            self._ended.assign(-1)
            self._made.assign([0, position])
            self._lengths.assign(tf.zeros([0], tf.int64))
            self._first_pass = data_pass
            self._made_seen = (0, position)
            self._pulled = False
        self._data_pass = data_pass
        if position == 0:
            return True
        # Resumed mid-pass (or where a pass ended but the state was saved
        # before the next pass began): look at what is left.
        rest = self._elements.skip(position).take(need)
        return sum(1 for _ in rest) >= need

    def check_read_ahead(self) -> None:
        """`ValueError` unless tf.data reads ahead, which a finite stream
        needs to learn where its pass ends (op determinism turns it off)."""
        if not self.endless and op_determinism_enabled():
            raise ValueError(
                "A finite stream learns where its pass ends from tf.data's "
                "read-ahead, which tf.config.experimental.enable_op_determinism() "
                "turns off. Pass examples_per_epoch=<examples per epoch> (the "
                "planner then ends the passes) or mode='in_memory'. Received: "
                "mode='stream', examples_per_epoch=None"
            )

    def _progress(self) -> tuple[int, int]:
        """The prefetching side's ``(passes ended, examples made of the
        next)``, read now (and kept: it only grows until a restart)."""
        self._made_seen = tuple(int(v) for v in self._made.numpy())
        return self._made_seen

    def _index(self) -> int:
        """The pass read now, counted from the iterator's start."""
        return 0 if self._data_pass is None else self._data_pass - self._first_pass

    def _length(self, ended: int) -> int | None:
        """The length of the pass read now, if the first `ended` passes of
        the iterator have ended."""
        index = self._index()
        return int(self._lengths[index]) if ended > index else None

    def pass_length(self) -> int | None:
        """The finite pass's examples once the data has ended, else `None`."""
        return self._length(self._progress()[0])

    def examples_left(self, position: int, need: int) -> int | None:
        """The examples of the finite pass after `position` when fewer than
        `need` are left, else `None`; waits for the prefetching side to
        make `position + need` examples or reach the end. Before a restarted
        iterator's first batch (tf.data starts it at the first request) the
        pass is taken to hold a first example, and when more are needed (a
        whole batch, to drop it if short) they are counted in an iteration
        of their own."""
        if not self._pulled:
            if need == 1:
                return None
            left = sum(1 for _ in self._elements.skip(position).take(need))
            return left if left < need else None
        stalled_since, last = time.monotonic(), None
        # The last reading first (one device read less per step when it
        # already answers), then fresh ones.
        ended, made = self._made_seen
        while True:
            length = self._length(ended)
            if length is not None:
                left = length - position
                return left if left < need else None
            # `made` counts the pass after the `ended` ones: this pass's only
            # when the reading is of this pass (a stale one may be of the last).
            if ended == self._index() and made >= position + need:
                return None
            if made != last:
                stalled_since, last = time.monotonic(), made
            elif time.monotonic() - stalled_since > STALL_SECONDS:
                raise RuntimeError(
                    f"The stream made no example for {STALL_SECONDS} s while "
                    f"{need} were needed ahead of the training (it holds "
                    f"{made - position}): its prefetch buffer is too small, or "
                    "the pipeline is stuck. Pass a larger `buffer_size` (at "
                    "least the largest batch times steps_per_execution)."
                )
            time.sleep(1e-4)
            ended, made = self._progress()
