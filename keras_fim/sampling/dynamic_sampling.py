"""`DynamicSampling`: the callback, the lifecycle of dynamic sampling in `fit`.

The `driver.SamplingDriver` decides (the schedule, the plans, the counters);
the callback reads the counters and measurements from Keras, hands the plans
to the pipeline (`dataset`), wraps the train step for the learning-rate gain
(`learning_rate`) and `model.sampling_state`, writes TensorBoard through
`summaries`, and draws the progress bar (it is a `ProgbarLogger`, which
`fit` then does not add again). An epoch ends at the end of a pass on
`OutOfRangeError`, raised before the next pass's first step (Keras's own
signal for data that ran out: no phantom step is run).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_fim import summaries
from keras_fim._keras_compat import is_default_strategy, update_progress_bar
from keras_fim.sampling.dataset import MODES, choose_mode, make_examples
from keras_fim.sampling.driver import (
    SamplingDriver,
    checked_schedule,
    largest_size,
    single_size,
    size_granularity,
)
from keras_fim.sampling.learning_rate import (
    LEARNING_RATE_SCALINGS,
    learning_rate_gain,
    scaled_learning_rate,
)
from keras_fim.schedules import (
    Automatic,
    BatchSizeSchedule,
    SamplingContext,
    check_size,
)
from keras_fim.state import SamplingState, attach_state
from keras_fim.train_step import (
    add_step_wrapper,
    begin_fit,
    compile_train_function,
    end_fit,
    read_noise_scale,
    same_key,
    train_function_key,
)
from keras_fim.validation import check_bool, check_choice, check_int, check_log_dir

_RAN_OUT_WARNING = "Your input ran out of data"

# Under a strategy, the steps planned ahead of the one about to train: more
# than tf.distribute's input reads ahead (its rebatching and per-device
# buffers, about 3 batches).
LOOK_AHEAD = 16


class DynamicSampling(keras.callbacks.ProgbarLogger):
    """Trains with a mini-batch size that changes inside one `model.fit`.

    Give it the training data and a batch-size schedule, pass its `dataset`
    to `fit` and the object itself as a callback. An epoch is one pass over
    the data whatever the batch size: every example is trained on exactly
    once per epoch (a final partial batch is trained, or dropped with
    `drop_remainder`), so `epochs`, the progress bar (drawn by this callback,
    with this epoch's number of steps), validation, other callbacks and
    learning-rate schedules keep their meaning.

    The data is held in memory (``mode="in_memory"``: arrays, and small,
    finite datasets without random ops; every pass is a permutation drawn
    from `seed`) or streamed (``mode="stream"``: the `tf.data` pipeline,
    with its own shuffle and augmentation, runs afresh every pass, its
    examples prefetched, and is only rebatched into the sizes planned;
    memory stays bounded by the prefetch buffer). ``mode="auto"`` chooses.
    An endless dataset is streamed in epochs of `examples_per_epoch`
    examples.

    The schedule is asked for the size before every execution of the train
    function (every step; every `steps_per_execution` steps when that is
    larger). It may be one of `keras_fim.schedules` (`Staged`, the paper's;
    `Geometric`; `Linear`; `Automatic`, which grows the batch from the
    measurements of a `FisherCallback` in the same `fit`) or any function
    ``f(context) -> int`` of a `SamplingContext`.

    The learning rate can follow the batch size. The optimizer's rate (a
    float, a schedule, or one set by other callbacks) is multiplied, inside
    the compiled step, by a gain computed from the size ``B`` of the batch
    actually trained, relative to `reference_batch_size` ``B0``:
    ``"none"`` (1, the paper), ``"linear"`` (``B/B0``), ``"sqrt"``
    (``sqrt(B/B0)``), or ``"adascale"`` (``(1 + b/B0) / (1 + b/B)`` with
    ``b`` the gradient noise scale measured by a `FisherCallback`; AdaScale's
    gain, between 1 and ``B/B0``).

    Under a `tf.distribute` strategy the size is that of the global batch
    (split over the replicas by Keras), and the learning rate follows it;
    as tf.distribute reads the input ahead of the step, the batches are
    then planned ahead, so the schedule must not read the measurements
    (`Automatic` raises `ValueError` when `fit` starts).

    Where the sampling stands lives in `model.sampling_state` (Keras
    variables), so `BackupAndRestore` resumes the same sequence of batch
    sizes and learning rates after an interruption (a backup on a pass's
    last step included), and a later `fit` continues it. With `log_dir`, every step's ``sampling/batch_size``,
    ``sampling/learning_rate`` and ``sampling/learning_rate_gain`` are
    written for TensorBoard under ``<log_dir>/train`` (the x-axis of
    `keras.callbacks.TensorBoard`'s batch charts), and for `Automatic` the
    signal and its threshold at every decision (``sampling/signal``,
    ``sampling/threshold``).

    Args:
        data: the training examples: a `tf.data.Dataset` (unbatched or
            batched) or arrays, as ``x``, ``(x, y)`` or
            ``(x, y, sample_weight)``, each of which may be a dict or tuple.
            The structure is kept.
        schedule: a `keras_fim.schedules` schedule, a function
            ``f(SamplingContext) -> int``, or an integer (a fixed size).
        shuffle: draw a new permutation of the examples for every pass
            (in memory; a stream keeps its own order). Defaults to `True`.
        seed: integer seed of the permutations (in memory). Defaults to `0`.
        drop_remainder: drop a pass's final batch when it is smaller than
            the scheduled size. Defaults to `False`.
        allow_shrink: allow the schedule to decrease the size. Defaults to
            `False` (a decrease raises `ValueError`).
        learning_rate_scaling: one of ``"none"``, ``"linear"``, ``"sqrt"``,
            ``"adascale"``. Defaults to ``"none"``.
        reference_batch_size: ``B0``, the size the optimizer's rate is meant
            for. Defaults to the first size trained.
        batched: whether a `tf.data.Dataset` `data` is batched. `None`
            guesses from its element spec (a leading dimension of unknown
            size means batched). Defaults to `None`.
        preprocess: a function applied to every batch in the pipeline
            (augmentation, for instance). Defaults to `None`.
        log_dir: path for TensorBoard event files, or `None`. Defaults to
            `None`.
        mode: ``"auto"``, ``"in_memory"`` or ``"stream"``. ``"auto"``
            holds arrays, and datasets that are finite, without random ops
            and at most `dataset.IN_MEMORY_LIMIT_BYTES`, in memory, and
            streams the rest. Forcing ``"in_memory"`` on a pipeline with a
            random op warns (it would be drawn once). Defaults to ``"auto"``.
        examples_per_epoch: the examples in one epoch of a stream, which is
            then repeated endlessly and read by one iterator across epochs;
            needed for an endless dataset. Defaults to `None` (an epoch is
            one pass over a finite dataset).
        buffer_size: the examples a stream prefetches. With
            `drop_remainder`, a finite stream must look a whole execution's
            batches ahead to know whether the last is short, so it holds at
            least the largest size times `steps_per_execution`. Defaults to
            `None`: tf.data tunes it (twice the schedule's largest size with
            `drop_remainder`, which then needs a schedule whose sizes are
            known).

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> x, y = np.random.rand(100, 4), np.random.rand(100, 1)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> sampling = keras_fim.DynamicSampling(
    ...     (x, y), schedule=keras_fim.schedules.Staged([10, 20, 50]))
    >>> history = model.fit(sampling.dataset, epochs=3, callbacks=[sampling],
    ...                     verbose=0)
    >>> sampling.batch_sizes_per_epoch
    [[10, 10, 10, 10, 10, 10, 10, 10, 10, 10], [20, 20, 20, 20, 20], [50, 50]]
    """

    def __init__(
        self,
        data: tf.data.Dataset | np.ndarray | tuple | list | dict,
        schedule: BatchSizeSchedule | Callable[[SamplingContext], int] | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = False,
        allow_shrink: bool = False,
        learning_rate_scaling: str = "none",
        reference_batch_size: int | None = None,
        batched: bool | None = None,
        preprocess: Callable | None = None,
        log_dir: str | None = None,
        mode: str = "auto",
        examples_per_epoch: int | None = None,
        buffer_size: int | None = None,
    ):
        super().__init__()
        fixed_size = isinstance(schedule, (int, np.integer)) and not isinstance(
            schedule, bool
        )
        if not fixed_size and not callable(schedule):
            raise ValueError(
                "`schedule` must be a keras_fim.schedules schedule, a function "
                f"of a SamplingContext, or an integer. Received: schedule={schedule!r}"
            )
        check_choice(
            "learning_rate_scaling", learning_rate_scaling, LEARNING_RATE_SCALINGS
        )
        check_bool("shuffle", shuffle)
        check_bool("drop_remainder", drop_remainder)
        check_bool("allow_shrink", allow_shrink)
        if batched is not None:
            check_bool("batched", batched)
        seed = check_int("seed", seed, 0)
        if preprocess is not None and not callable(preprocess):
            raise ValueError(
                f"`preprocess` must be None or a function. Received: preprocess={preprocess!r}"
            )
        log_dir = check_log_dir(log_dir)
        check_choice("mode", mode, MODES)
        examples_per_epoch = check_int(
            "examples_per_epoch", examples_per_epoch, 1, allow_none=True
        )
        buffer_size = check_int("buffer_size", buffer_size, 1, allow_none=True)

        self.mode = choose_mode(data, mode, batched, examples_per_epoch)
        # A finite stream's pass ends where its data does: the driver learns
        # its length near the end.
        self._data_ends_pass = self.mode == "stream" and examples_per_epoch is None
        if self._data_ends_pass and drop_remainder and buffer_size is None:
            buffer_size = 2 * largest_size(schedule)
        granularity = size_granularity(schedule)
        if examples_per_epoch is not None:  # the passes of a stream line up too
            granularity = math.gcd(granularity, examples_per_epoch)
        # A fixed size in whole groups: every batch of a stream is one group.
        single_group = granularity == single_size(schedule)
        self._examples = make_examples(
            self.mode,
            data,
            batched,
            preprocess,
            examples_per_epoch,
            buffer_size,
            granularity,
            single_group,
        )
        # `None`: a finite stream of unknown length.
        self.num_examples = self._examples.num_examples
        self.schedule = checked_schedule(schedule, self.num_examples, allow_shrink)
        self.reference_batch_size = (
            None
            if reference_batch_size is None
            else check_size("reference_batch_size", reference_batch_size)
        )
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.allow_shrink = allow_shrink
        self.learning_rate_scaling = learning_rate_scaling
        self.log_dir = log_dir
        self.batch_sizes_per_epoch: list[list[int]] = []

        self.dataset = self._examples.dataset
        self._state: SamplingState | None = None
        self._writer = None
        # One per fit, from the state as the first epoch begins.
        self._driver: SamplingDriver | None = None
        # Under a strategy: the input is read ahead, the steps planned ahead.
        self._read_ahead = False
        self._rows: list[tuple[int, int, int]] = []
        # (key, train function, writer) of the last fit, reused by the next
        # while the key stays the same (`_train_function`).
        self._cache: tuple | None = None

    # -- lifecycle ---------------------------------------------------------

    def set_params(self, params) -> None:
        # ProgbarLogger keeps only what it draws; keep all of `params` too.
        keras.callbacks.Callback.set_params(self, params)
        super().set_params(params)

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._state = attach_state(model, "sampling_state", SamplingState)

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        model = self.model
        if self._needs_fisher() and getattr(model, "fisher_state", None) is None:
            raise ValueError(
                f"{self._needs_fisher()} needs the Fisher measurements: add a "
                "keras_fim.FisherCallback to the same fit (or use a FisherModel)."
            )
        # Under a strategy (even of one replica), tf.distribute reads the
        # input ahead of the step (Keras gives it no option not to): the
        # batches are planned ahead.
        strategy = model.distribute_strategy
        self._read_ahead = not is_default_strategy(strategy)
        if self._read_ahead and getattr(self.schedule, "uses_measurements", True):
            raise ValueError(
                f"Under a tf.distribute strategy ({type(strategy).__name__}, "
                f"{strategy.num_replicas_in_sync} replicas), "
                "tf.distribute reads the input a few batches ahead of the "
                "step, so DynamicSampling plans the sizes ahead and the "
                "schedule cannot read the Fisher measurements. Use Staged, "
                "Geometric, Linear or an integer, or a function with the "
                "attribute `uses_measurements = False`. Received: "
                f"schedule={self.schedule!r}"
            )
        if self._data_ends_pass:
            self._examples.check_read_ahead()
        if self.log_dir is not None:
            try:
                self._writer = summaries.create_writer(self.log_dir)
            except Exception as error:
                raise ValueError(
                    "`log_dir` must be a writable directory. "
                    f"Received: log_dir={self.log_dir!r} ({error})"
                ) from error
        # Keras warns when an epoch ends on OutOfRangeError; here that is
        # how every epoch ends.
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=_RAN_OUT_WARNING)
        begin_fit(model, "dynamic_sampling", self._end_fit)
        # Everything `_wrap_step` reads while it is traced: a train function
        # traced with it (this callback's, a FisherCallback's) is reused by
        # a later fit only while this stays the same.
        step_key = (self, self.learning_rate_scaling, self._writer, self._state)
        add_step_wrapper(model, "dynamic_sampling", self._wrap_step, step_key)
        if self._reads_noise_scale():
            read_noise_scale(model, "dynamic_sampling")
        # A FisherCallback in the same fit replaces it at every batch with
        # its own functions, which include this callback's step wrapper.
        model.train_function = self._train_function()
        # Made at the first epoch, after BackupAndRestore restored the state.
        self._driver = None

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        end_fit(self.model, "dynamic_sampling")

    def _train_function(self):
        """Keras's train function with this callback's step: the last fit's
        when nothing it was traced with has changed (as `FisherCallback`
        reuses its own), else a new one."""
        model = self.model
        steps = int(getattr(model, "steps_per_execution", 1) or 1)
        key = train_function_key(model, steps)
        if (
            self._cache is not None
            and key is not None
            and same_key(self._cache[0], key)
        ):
            return self._cache[1]
        function = compile_train_function(model)
        # The writer is kept with it: the function writes through its
        # resource, which `summaries.create_writer` then reopens.
        self._cache = None if key is None else (key, function, self._writer)
        return function

    def _end_fit(self) -> None:
        self.model.train_function = None
        self._examples.open(False)
        self._warnings.__exit__(None, None, None)
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def _new_driver(self) -> SamplingDriver:
        counters = self._state.read()
        if self._writer is not None:
            # As FisherCallback does (the first caller per file wins):
            # TensorBoard drops what an interrupted run wrote from here on.
            summaries.start_session(self._writer, counters["step"] + 1)
        return SamplingDriver(
            self.schedule,
            counters,
            num_examples=self.num_examples,
            epochs=int(self.params.get("epochs") or 1),
            steps_per_execution=int(getattr(self.model, "steps_per_execution", 1) or 1),
            seed=self.seed,
            shuffle=self.shuffle,
            drop_remainder=self.drop_remainder,
            allow_shrink=self.allow_shrink,
            reference_batch_size=self.reference_batch_size,
            data_end=self._examples if self._data_ends_pass else None,
            measurements=self._measurements,
            log_signal=self._writer is not None,
            write=self._state.write,
        )

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._driver is None:
            self._driver = self._new_driver()
        driver = self._driver
        start = driver.begin_epoch(epoch)
        self._examples.open(True)
        # Planned before a stream's `begin_pass`, which marks its pipeline
        # as not yet read (the epoch's first decision does not wait for it).
        self._plan_ahead(restart=True)
        if self.mode == "in_memory":
            self._examples.set_order(driver.planner.permutation(start.data_pass))
        elif (
            not self._examples.begin_pass(
                start.data_pass, start.position, start.examples_seen, start.need
            )
            and driver.data_ended()
        ):
            # Resumed where a stream's pass had ended: the next one.
            self._plan_ahead(restart=True)
            self._examples.begin_pass(
                start.data_pass + 1, 0, start.examples_seen, start.need
            )
        self.batch_sizes_per_epoch.append([])
        # The progress bar's target, from the size the schedule asks for now
        # (updated if it changes during the epoch).
        self.target = driver.epoch_target()
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None) -> None:
        decision, plan = self._driver.next_execution()
        if decision is not None and decision.signal is not None:
            summaries.write_sampling_decision(
                self._writer, decision.log_step, decision.signal, decision.threshold
            )
        if decision is not None and decision.target is not None:
            self.target = decision.target
            if self.progbar is not None:
                self.progbar.target = self.target
        if plan is None:
            # Keras's own signal that the data ran out: the epoch ends here,
            # before this step's train function is called.
            raise tf.errors.OutOfRangeError(
                None, None, "keras-fim: end of a pass over the data"
            )
        if self._read_ahead:
            self._check_planned(decision.size, plan)
            self._plan_ahead(restart=False)
        else:
            self._examples.set_batches(plan.batches)

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.batch_sizes_per_epoch[-1].extend(self._driver.end_execution())
        # Keras numbers a short last execution as if it were full; the bar
        # counts the steps actually taken.
        update_progress_bar(self, self._driver.epoch_steps - 1, logs)

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self._driver.pass_unfinished() and not self.model.stop_training:
            raise RuntimeError(
                "The DynamicSampling dataset ended before the pass over the "
                "data did. Pass `sampling.dataset` to fit as it is (do not "
                "map, prefetch or repeat it) and do not set `steps_per_epoch`."
            )
        driver = self._driver
        if not (driver.epoch_steps or driver.resumed or self.model.stop_training):
            # Only a stream can hold too few examples for a step (a known
            # length is checked against the schedule when it is built): its
            # length as the driver learnt it, or as the data ended.
            length = driver.pass_length
            if length is None:
                length = self._examples.pass_length()
            raise ValueError(
                f"A pass over `data` (pass {driver.counters['data_pass']}) held "
                f"{length} examples: "
                + (
                    f"fewer than the batch size ({driver.counters['batch_size']}), "
                    "which drop_remainder=True drops, so nothing was trained."
                    if length
                    else "nothing to train. `data` must hold at least one example."
                )
                + f" Received: drop_remainder={self.drop_remainder}"
            )
        driver.end_epoch()
        super().on_epoch_end(epoch, logs)

    # -- under a strategy: planned ahead ------------------------------------

    def _plan_ahead(self, restart: bool) -> None:
        """Under a strategy: plans the epoch's steps up to `LOOK_AHEAD` past
        the one about to train, before tf.distribute reads them (`restart`:
        from the epoch's first step)."""
        if not self._read_ahead:
            return
        driver = self._driver
        if restart:
            self._rows = []
        self._rows[driver.epoch_steps :] = driver.planned_ahead(LOOK_AHEAD)
        # An epoch of no step reads nothing of the data.
        self._examples.open(bool(self._rows))
        if not self._rows:
            return
        # A stream is cut at the sizes decided (the data ends the last
        # batch); a planned size never changes once the pipeline may be
        # cutting it, as the pass's length, when learnt, would change it.
        exact = self.mode == "in_memory"
        self._examples.set_batches(
            [
                (start, size if exact else decided)
                for start, size, decided in self._rows
            ],
            restart=restart,
        )

    def _check_planned(self, size: int, plan) -> None:
        """`ValueError` unless the execution decided is the one planned
        ahead: a schedule must answer the same for the same context."""
        first = self._driver.epoch_steps
        planned = [(start, s) for start, _, s in self._rows[first:]]
        decided = [(start, size) for start, _ in plan.batches]
        if decided != planned[: len(decided)]:
            raise ValueError(
                f"schedule {self.schedule!r} answered {size} at step "
                f"{self._driver.counters['step'] + 1} but "
                f"{planned[0][1] if planned else None} when the step was "
                "planned ahead (under a tf.distribute strategy): it must give "
                "the same size for the same context."
            )

    # -- what the schedule reads -------------------------------------------

    def _needs_fisher(self) -> str | None:
        if isinstance(self.schedule, Automatic):
            return "schedule=Automatic(...)"
        if self.learning_rate_scaling == "adascale":
            return "learning_rate_scaling='adascale'"
        return None

    def _reads_noise_scale(self) -> bool:
        """Whether this fit reads `fisher_state.noise_scale`: AdaScale, an
        `Automatic` schedule on the noise scale (or on a signal function of
        its own), or a schedule function of the user's, which may read the
        context's `noise_scale`."""
        if self.learning_rate_scaling == "adascale":
            return True
        if isinstance(self.schedule, Automatic):
            return self.schedule.signal != "condition_number"
        return getattr(self.schedule, "uses_measurements", True)

    def _measurements(self) -> dict:
        """The latest Fisher measurements, for the schedule (device reads)."""
        fisher_state = getattr(self.model, "fisher_state", None)
        if fisher_state is None:
            return {}
        measurements = int(fisher_state.measurements.numpy())
        if not measurements:
            return {"measurements": 0}
        return {
            "measurements": measurements,
            "noise_scale": float(fisher_state.noise_scale.numpy()),
            "condition_number": float(fisher_state.condition_ema.numpy()),
            "condition_mean": float(fisher_state.condition_mean.numpy()),
            "energy": float(fisher_state.energy_sum.numpy()),
        }

    # -- the train step ----------------------------------------------------

    def _wrap_step(self, step):
        def sampled_step(data):
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            batch = tf.shape(keras.tree.flatten(x)[0], out_type=tf.int64)[0]
            replica = tf.distribute.get_replica_context()
            distributed = replica is not None and replica.num_replicas_in_sync > 1
            if distributed:  # each replica has its shard: the global batch
                batch = replica.all_reduce("sum", batch)
            gain = self._gain(batch)
            install = self.learning_rate_scaling != "none"
            with scaled_learning_rate(self.model.optimizer, gain, install) as rate:
                logs = step(data)
            state = self._state
            state.step.assign_add(1)
            state.position.assign_add(batch)
            state.examples_seen.assign_add(batch)
            if self._writer is not None:

                def write():
                    summaries.write_sampling_step(
                        self._writer, state.step, batch, rate, gain
                    )
                    return tf.constant(True)

                if not distributed:
                    write()
                else:  # once, by the first replica
                    first = tf.equal(replica.replica_id_in_sync_group, 0)
                    tf.cond(first, write, lambda: tf.constant(False))
            return logs

        return sampled_step

    def _gain(self, batch: tf.Tensor) -> tf.Tensor:
        noise_scale = None
        if self.learning_rate_scaling == "adascale":
            noise_scale = self.model.fisher_state.noise_scale
        return learning_rate_gain(
            self.learning_rate_scaling,
            batch,
            self._state.reference_batch_size,
            noise_scale,
        )
