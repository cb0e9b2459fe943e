"""`DynamicSampling`: the callback that drives the sampling inside `fit`.

It wires the parts of the package together: the schedule decides the size
before every execution of the train function, the planner
(`planner.SamplingPlanner`) which rows of the pass the batches take, the
pipeline (`dataset.InMemoryExamples`, or `dataset.StreamedExamples` for a
stream) makes them, and a step
wrapper scales the learning rate by `learning_rate.learning_rate_gain` and
advances `model.sampling_state`. The callback ends every epoch at the end of
a pass by raising `OutOfRangeError` before the next pass's first step (the
signal Keras itself uses for a dataset that ran out, so no phantom step is
run); a finite stream ends its pass itself, as any dataset that runs out
does in `fit`. It is Keras's progress bar too (a `ProgbarLogger`, which `fit`
then does not add a second time), so the bar counts this epoch's steps.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_fim import summaries
from keras_fim._keras_compat import (
    op_determinism_enabled,
    optimizer_learning_rate,
    set_optimizer_learning_rate,
    update_progress_bar,
)
from keras_fim.sampling.dataset import (
    MODES,
    InMemoryExamples,
    StreamedExamples,
    choose_mode,
    count_examples,
    materialize,
)
from keras_fim.sampling.learning_rate import (
    LEARNING_RATE_SCALINGS,
    ScaledLearningRate,
    innermost_optimizer,
    learning_rate_gain,
)
from keras_fim.sampling.planner import ExecutionPlan, SamplingPlanner
from keras_fim.schedules import (
    Automatic,
    BatchSizeSchedule,
    SamplingContext,
    Staged,
    check_size,
)
from keras_fim.state import SamplingState, attach_state
from keras_fim.train_step import (
    add_step_wrapper,
    begin_fit,
    compile_train_function,
    end_fit,
    read_noise_scale,
)
from keras_fim.validation import check_bool, check_choice, check_int, check_log_dir

_RAN_OUT_WARNING = "Your input ran out of data"


def _largest_size(schedule) -> int:
    """The largest size `schedule` (an integer, or a schedule) can return."""
    if isinstance(schedule, (int, np.integer)):
        return int(schedule)
    known = schedule.sizes() if isinstance(schedule, BatchSizeSchedule) else []
    if isinstance(schedule, Staged | Automatic) or (
        len(known) > 1 and getattr(schedule, "maximum", None) is not None
    ):
        return max(known)
    raise ValueError(
        "drop_remainder=True on a finite stream looks a whole batch ahead, "
        "and the largest batch of this schedule is not known. Pass "
        "`buffer_size` (at least the largest size times steps_per_execution) "
        f"or a schedule with a maximum. Received: schedule={schedule!r}, "
        "buffer_size=None"
    )


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

    Where the sampling stands lives in `model.sampling_state` (Keras
    variables), so `BackupAndRestore` resumes the same sequence of batch
    sizes and learning rates after an interruption, and a later `fit`
    continues it. With `log_dir`, every step's ``sampling/batch_size``,
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
        data,
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
        if self.mode == "in_memory":
            arrays = materialize(data, batched)
            self.num_examples = count_examples(arrays)
            self._examples = InMemoryExamples(arrays, preprocess)
        else:
            if drop_remainder and examples_per_epoch is None and buffer_size is None:
                buffer_size = 2 * _largest_size(schedule)
            self._examples = StreamedExamples(
                data, batched, examples_per_epoch, preprocess, buffer_size
            )
            # `None`: a finite stream of unknown length.
            self.num_examples = self._examples.num_examples
        # A finite stream's pass ends where its data does: its length is
        # learnt near the end (`_pass_length`).
        self._data_ends_pass = self.mode == "stream" and examples_per_epoch is None
        self._pass_length = None if self._data_ends_pass else self.num_examples
        if fixed_size:
            size = check_size("schedule", schedule, self.num_examples)
            schedule = Staged([size])
        self.schedule = schedule
        known = schedule.sizes() if isinstance(schedule, BatchSizeSchedule) else []
        for i, size in enumerate(known):
            check_size(f"schedule size {i}", size, self.num_examples)
        if not allow_shrink and any(b < a for a, b in itertools.pairwise(known)):
            raise ValueError(
                f"`schedule` shrinks the batch ({known}) but allow_shrink=False. "
                "Pass allow_shrink=True to allow it."
            )
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
        self._mirror: dict | None = None
        self._plan: ExecutionPlan | None = None
        self._ended_by_sampling = False

    @property
    def _planner(self) -> SamplingPlanner:
        # Built from the attributes at every use: `seed`, `shuffle` and
        # `drop_remainder` changed between fits take effect, as they always did.
        return SamplingPlanner(
            self._pass_length,
            self.seed,
            self.shuffle,
            self.drop_remainder,
        )

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
        self._steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        if self._data_ends_pass and op_determinism_enabled():
            raise ValueError(
                "A finite stream learns where its pass ends from tf.data's "
                "read-ahead, which tf.config.experimental.enable_op_determinism() "
                "turns off. Pass examples_per_epoch=<examples per epoch> (the "
                "planner then ends the passes) or mode='in_memory'. Received: "
                f"mode={self.mode!r}, examples_per_epoch=None"
            )
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
        add_step_wrapper(model, "dynamic_sampling", self._wrap_step)
        if self._reads_noise_scale():
            read_noise_scale(model, "dynamic_sampling")
        # A FisherCallback in the same fit replaces it at every batch with
        # its own functions, which include this callback's step wrapper.
        model.train_function = compile_train_function(model)
        # Read at the first epoch, after BackupAndRestore restored the state.
        self._mirror = None

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        end_fit(self.model, "dynamic_sampling")

    def _end_fit(self) -> None:
        self.model.train_function = None
        self._warnings.__exit__(None, None, None)
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._mirror is None:
            self._mirror = self._state.read()
            if self._writer is not None:
                # As FisherCallback does (the first caller per file wins):
                # TensorBoard drops what an interrupted run wrote from here on.
                summaries.start_session(self._writer, self._mirror["step"] + 1)
        mirror = self._mirror
        planner = self._planner
        data_pass, position = planner.epoch_start(
            mirror["data_pass"], mirror["position"]
        )
        if self.mode == "in_memory":
            self._examples.set_order(planner.permutation(data_pass))
        else:
            if self._data_ends_pass:
                self._pass_length = None
            need = max(mirror["batch_size"], 1) if self.drop_remainder else 1
            if not self._examples.begin_pass(position, mirror["examples_seen"], need):
                # Resumed where a stream's pass had ended: the next one.
                data_pass, position = data_pass + 1, 0
                self._examples.begin_pass(0, mirror["examples_seen"], need)
        if data_pass != mirror["data_pass"]:  # the last pass is done
            mirror["data_pass"], mirror["position"] = data_pass, position
            self._state.write({"data_pass": data_pass, "position": position})
        self._epoch = epoch
        self._epoch_steps = 0
        self._ended_by_sampling = False
        self.batch_sizes_per_epoch.append([])
        # The progress bar's target, from the size the schedule asks for now
        # (updated if it changes during the epoch).
        self.target = self._steps_left(self._peek_size(epoch))
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None) -> None:
        mirror = self._mirror
        self._learn_pass_length(1)
        planner = self._planner
        if planner.pass_done(mirror["position"]):
            self._ended_by_sampling = True
            # Keras's own signal that the data ran out: the epoch ends here,
            # before this step's train function is called.
            raise tf.errors.OutOfRangeError(
                None, None, "keras-fim: end of a pass over the data"
            )
        size = self._decide(self._context())
        if self.drop_remainder:
            self._learn_pass_length(size * self._steps_per_execution)
        planner = self._planner
        plan = planner.plan(mirror["position"], size, self._steps_per_execution)
        if not plan.batches:
            mirror["position"] = plan.end
            self._state.position.assign(plan.end)
            self._ended_by_sampling = True
            raise tf.errors.OutOfRangeError(None, None, "keras-fim: remainder dropped")
        self._examples.set_batches(plan.batches)
        self._plan = plan

    def _learn_pass_length(self, need: int) -> None:
        """For a finite stream: the pass's length, once fewer than `need`
        examples are left (waiting, if need be, for the prefetching side).
        The end must be known before the train function is called."""
        if self._data_ends_pass and self._pass_length is None:
            position = self._mirror["position"]
            left = self._examples.examples_left(position, need)
            if left is not None:
                self._pass_length = position + left

    def on_train_batch_end(self, batch, logs=None) -> None:
        mirror = self._mirror
        plan, self._plan = self._plan, None
        if self._data_ends_pass and self._pass_length is None:
            # If the data ended during the execution, its last batch was
            # short, or it took fewer steps: what the data held was trained.
            self._pass_length = self._examples.pass_length()
            if self._pass_length is not None:
                size = plan.batches[0][1]
                plan = self._planner.plan(mirror["position"], size, len(plan.batches))
        sizes = plan.sizes
        trained = sum(sizes)
        mirror["position"] += trained
        mirror["examples_seen"] += trained
        mirror["step"] += len(sizes)
        self._epoch_steps += len(sizes)
        self.batch_sizes_per_epoch[-1].extend(sizes)
        if plan.end != mirror["position"]:
            # The execution stopped at a remainder that will be dropped.
            mirror["position"] = plan.end
            self._state.position.assign(plan.end)
        # Keras numbers a short last execution as if it were full; the bar
        # counts the steps actually taken.
        update_progress_bar(self, self._epoch_steps - 1, logs)

    def on_epoch_end(self, epoch, logs=None) -> None:
        if (
            not self._data_ends_pass
            and not self._ended_by_sampling
            and self._mirror["position"] < self.num_examples
            and not self.model.stop_training
        ):
            raise RuntimeError(
                "The DynamicSampling dataset ended before the pass over the "
                "data did. Pass `sampling.dataset` to fit as it is (do not "
                "map, prefetch or repeat it) and do not set `steps_per_epoch`."
            )
        super().on_epoch_end(epoch, logs)

    # -- deciding the size -------------------------------------------------

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

    def _context(self) -> SamplingContext:
        mirror = self._mirror
        fisher = {}
        fisher_state = getattr(self.model, "fisher_state", None)
        measurements = 0
        # A user function may read the measurements; the built-in schedules
        # say whether they do.
        wanted = getattr(self.schedule, "uses_measurements", True)
        if fisher_state is not None and wanted:
            measurements = int(fisher_state.measurements.numpy())
            if measurements:
                noise = float(fisher_state.noise_scale.numpy())
                fisher = {
                    "noise_scale": noise if math.isfinite(noise) else None,
                    "condition_number": float(fisher_state.condition_ema.numpy()),
                    "condition_mean": float(fisher_state.condition_mean.numpy()),
                    "energy": float(fisher_state.energy_sum.numpy()),
                }
        return SamplingContext(
            epoch=self._epoch,
            epochs=int(self.params.get("epochs") or 1),
            step=mirror["step"],
            data_pass=mirror["data_pass"],
            position=mirror["position"],
            examples_seen=mirror["examples_seen"],
            num_examples=self.num_examples,
            batch_size=mirror["batch_size"] or None,
            steps_since_change=mirror["step"] - mirror["last_change_step"],
            measurements=measurements,
            measurements_since_change=measurements - mirror["measurements_at_change"],
            **fisher,
        )

    def _peek_size(self, epoch: int) -> int:
        """The first size, for the first epoch's progress bar."""
        self._epoch = epoch
        return self._checked(self.schedule(self._context()), None)

    def _checked(self, size, current: int | None) -> int:
        size = check_size(
            f"the size returned by schedule {self.schedule!r}", size, self.num_examples
        )
        if current is not None and size < current and not self.allow_shrink:
            raise ValueError(
                f"schedule {self.schedule!r} shrank the batch from {current} to "
                f"{size} but allow_shrink=False. Pass allow_shrink=True to allow it."
            )
        return size

    def _decide(self, context: SamplingContext) -> int:
        mirror = self._mirror
        current = mirror["batch_size"] or None
        size = self._checked(self.schedule(context), current)
        if isinstance(self.schedule, Automatic) and self._writer is not None:
            signal = self.schedule.signal_value(context)
            if signal is not None and context.measurements_since_change:
                summaries.write_sampling_decision(
                    self._writer, context.step + 1, signal, self.schedule.threshold
                )
        if size != current:
            mirror["batch_size"] = size
            mirror["last_change_step"] = context.step
            mirror["measurements_at_change"] = context.measurements
            if not mirror["reference_batch_size"]:
                mirror["reference_batch_size"] = self.reference_batch_size or size
            self._state.write(
                {
                    name: mirror[name]
                    for name in (
                        "batch_size",
                        "last_change_step",
                        "measurements_at_change",
                        "reference_batch_size",
                    )
                }
            )
            left = self._steps_left(size)
            if current is not None and left is not None:
                self.target = self._epoch_steps + left
                if self.progbar is not None:
                    self.progbar.target = self.target
        return size

    def _steps_left(self, size: int) -> int | None:
        # A finite stream's length, when known, is a hint for the bar only.
        planner = SamplingPlanner(self.num_examples, drop_remainder=self.drop_remainder)
        return planner.steps_left(self._mirror["position"], size)

    # -- the train step ----------------------------------------------------

    def _wrap_step(self, step):
        def sampled_step(data):
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            batch = tf.shape(keras.tree.flatten(x)[0], out_type=tf.int64)[0]
            gain = self._gain(batch)
            optimizer = innermost_optimizer(self.model.optimizer)
            base = optimizer_learning_rate(optimizer)
            scaled = ScaledLearningRate(base, gain)
            learning_rate = scaled(optimizer.iterations)
            if self.learning_rate_scaling != "none":
                set_optimizer_learning_rate(optimizer, scaled)
            try:
                logs = step(data)
            finally:
                set_optimizer_learning_rate(optimizer, base)
            state = self._state
            state.step.assign_add(1)
            state.position.assign_add(batch)
            state.examples_seen.assign_add(batch)
            if self._writer is not None:
                summaries.write_sampling_step(
                    self._writer, state.step, batch, learning_rate, gain
                )
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
