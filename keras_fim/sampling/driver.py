"""When the schedule is asked, and what its answers do to the pass, in plain
Python.

`SamplingDriver` runs the schedule over the passes of one `fit`: before
every execution of the train function it asks the schedule for the size
(from a `SamplingContext` of its counters and the latest measurements),
checks the answer, and plans the execution's batches with the
`planner.SamplingPlanner`; after the execution it advances its counters by
what was trained. It keeps a copy of `SamplingState`'s counters; what it
changes that the train step does not (a new size, a dropped remainder, the
next pass) it hands to `write` as it changes them, for the caller to write
back.

It uses neither Keras nor TensorFlow: `DynamicSampling` reads the counters
and the measurements from Keras, hands the plans to the pipeline and draws
what the driver decides; a test drives it by hand.

A finite stream's pass ends where its data does (`PassEnd`): the driver
asks the data how many examples are left as soon as the next decision
needs to know, before the train function is called.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from keras_fim.sampling.planner import ExecutionPlan, SamplingPlanner
from keras_fim.schedules import (
    Automatic,
    BatchSizeSchedule,
    SamplingContext,
    Staged,
    check_size,
)
from keras_fim.state import SamplingState

# The counters of `SamplingState`, in its order.
COUNTERS = SamplingState.NAMES


def checked_schedule(schedule, num_examples: int | None, allow_shrink: bool):
    """`schedule` checked against one pass of `num_examples` examples: an
    integer becomes ``Staged([size])``; the sizes a schedule knows in advance
    must fit in a pass, and not shrink unless `allow_shrink`."""
    if isinstance(schedule, (int, np.integer)):
        schedule = Staged([check_size("schedule", schedule, num_examples)])
    known = schedule.sizes() if isinstance(schedule, BatchSizeSchedule) else []
    for i, size in enumerate(known):
        check_size(f"schedule size {i}", size, num_examples)
    if not allow_shrink and any(b < a for a, b in itertools.pairwise(known)):
        raise ValueError(
            f"`schedule` shrinks the batch ({known}) but allow_shrink=False. "
            "Pass allow_shrink=True to allow it."
        )
    return schedule


def largest_size(schedule) -> int:
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


def size_granularity(schedule) -> int:
    """A number every size of `schedule` is a multiple of (1 when not known
    in advance): a stream is cut into batches of whole groups of that many
    examples, which is cheaper than one example at a time."""
    if isinstance(schedule, (int, np.integer)):
        return int(schedule)
    if isinstance(schedule, Staged):
        return math.gcd(*schedule.sizes())
    return 1


def single_size(schedule) -> int | None:
    """The one size `schedule` returns when it is fixed (an integer, a
    `Staged` of one size), else `None`."""
    if isinstance(schedule, (int, np.integer)):
        return int(schedule)
    if isinstance(schedule, Staged) and len(set(schedule.sizes())) == 1:
        return schedule.sizes()[0]
    return None


class PassEnd(Protocol):
    """The data that ends a pass (`dataset.StreamedExamples`, a finite
    stream), asked where."""

    def examples_left(self, position: int, need: int) -> int | None:
        """The examples after `position` when fewer than `need` are left
        (waiting for them if need be), else `None`."""

    def pass_length(self) -> int | None:
        """The pass's examples once the data has ended, else `None`."""


class EpochStart(NamedTuple):
    """Where an epoch starts, for the pipeline.

    Attributes:
        data_pass: the pass over the data.
        position: the examples of the pass already trained.
        examples_seen: the examples trained so far, over all passes.
        need: the examples a resumed pass must still hold to go on.
    """

    data_pass: int
    position: int
    examples_seen: int
    need: int


class Decision(NamedTuple):
    """The schedule's answer before one execution.

    Attributes:
        size: the batch size decided.
        signal: `Automatic`'s signal at this decision, to log, or `None`.
        threshold: what the signal is compared with (`None` with no signal).
        log_step: the step the signal is logged at (the one about to be
            trained, counted from 1).
        target: the epoch's steps for the progress bar, when the size
            changed mid-epoch and the pass's length is known; else `None`.
    """

    size: int
    signal: float | None = None
    threshold: float | None = None
    log_step: int = 0
    target: int | None = None


class Execution(NamedTuple):
    """What happens before one execution of the train function.

    Attributes:
        decision: the schedule's answer, or `None` when the pass was over
            before it was asked.
        plan: the batches to train, or `None`: the epoch ends here, before
            the train function is called (the pass is over, or its
            remainder is dropped).
    """

    decision: Decision | None
    plan: ExecutionPlan | None


class SamplingDriver:
    """Asks the schedule and plans the batches, pass after pass.

    Args:
        schedule: a `keras_fim.schedules` schedule or a function
            ``f(SamplingContext) -> int`` (see `checked_schedule`).
        counters: dict, the `COUNTERS` where the sampling stands (as
            `SamplingState.read` gives them); the driver keeps a copy.
        num_examples: Integer or `None`, the examples in one pass as the
            schedule sees them (and the largest size it may ask for).
        epochs: Integer, the epochs of the `fit`. Defaults to `1`.
        steps_per_execution: Integer, the steps of one execution of the
            train function. Defaults to `1`.
        seed: Integer, the seed of the permutations. Defaults to `0`.
        shuffle: Boolean, a new permutation every pass. Defaults to `True`.
        drop_remainder: Boolean, drop a pass's final batch when it is
            smaller than the size asked for. Defaults to `False`.
        allow_shrink: Boolean, allow the size to decrease. Defaults to
            `False`.
        reference_batch_size: Integer or `None`, the size the learning rate
            is meant for (`None`: the first size decided). Defaults to
            `None`.
        data_end: `PassEnd` or `None`: the data that ends every pass (a
            finite stream), whose length is then learnt from it; `None`: a
            pass is `num_examples`. Defaults to `None`.
        measurements: a function returning the measurement fields of the
            `SamplingContext` (``measurements``, ``noise_scale``,
            ``condition_number``, ``condition_mean``, ``energy``; a noise
            scale that is not finite counts as unmeasured), called only for
            a schedule that reads them, or `None` (no measurements).
            Defaults to `None`.
        log_signal: Boolean, whether a `Decision` carries `Automatic`'s
            signal to log. Defaults to `False`.
        write: a function called with the counters the driver changes that
            the train step does not (a dict), as it changes them
            (`SamplingState.write`), or `None`. Defaults to `None`.

    Example:

    >>> counters = dict.fromkeys(COUNTERS, 0)
    >>> driver = SamplingDriver(Staged([4, 8]), counters, num_examples=10,
    ...                         epochs=2, shuffle=False)
    >>> driver.begin_epoch(0)
    EpochStart(data_pass=0, position=0, examples_seen=0, need=1)
    >>> execution = driver.next_execution()
    >>> execution.decision.size, execution.plan
    (4, ExecutionPlan(batches=((0, 4),), end=4))
    >>> driver.end_execution()
    [4]
    """

    def __init__(
        self,
        schedule: BatchSizeSchedule | Callable,
        counters: dict,
        *,
        num_examples: int | None,
        epochs: int = 1,
        steps_per_execution: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = False,
        allow_shrink: bool = False,
        reference_batch_size: int | None = None,
        data_end: PassEnd | None = None,
        measurements: Callable[[], dict] | None = None,
        log_signal: bool = False,
        write: Callable[[dict], None] | None = None,
    ):
        self.schedule = schedule
        self.counters = {name: int(counters[name]) for name in COUNTERS}
        self.num_examples = num_examples
        self.epochs = epochs
        self.steps_per_execution = steps_per_execution
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.allow_shrink = allow_shrink
        self.reference_batch_size = reference_batch_size
        self._data_end = data_end
        self._measurements = measurements
        self._log_signal = log_signal and isinstance(schedule, Automatic)
        # The pass's length; a finite stream's is learnt near its end.
        self.pass_length = None if data_end is not None else num_examples
        self.epoch = 0
        self.epoch_steps = 0
        self.ended_by_sampling = False
        self._plan: ExecutionPlan | None = None
        self.resumed = False  # this epoch trained steps before (resumed)
        self._write = write

    @property
    def planner(self) -> SamplingPlanner:
        """The planner of the pass as far as its length is known."""
        return SamplingPlanner(
            self.pass_length, self.seed, self.shuffle, self.drop_remainder
        )

    def _set(self, **values) -> None:
        self.counters.update(values)
        if self._write is not None:
            self._write(values)

    # -- epochs --------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> EpochStart:
        """Starts epoch `epoch`: where the pass stands, or the next pass
        when the last one is over.

        An epoch that trained steps and did not end (`open_epoch`: resumed
        from a backup taken inside it, which Keras restarts) whose pass is
        over ends at once, with no step: its pass was trained, and the next
        one is the next epoch's. (Moving on would train one pass more than
        the uninterrupted run.)"""
        self.epoch, self.epoch_steps, self.ended_by_sampling = epoch, 0, False
        counters = self.counters
        self.resumed = counters["open_epoch"] == epoch + 1
        if self._data_end is not None:
            # Where the last pass ended, if the data got there.
            self.pass_length = self._data_end.pass_length()
        data_pass, position = counters["data_pass"], counters["position"]
        if not (self.resumed and self.planner.pass_done(position)):
            data_pass, position = self.planner.epoch_start(data_pass, position)
        if self._data_end is not None:
            self.pass_length = None  # this pass's: learnt near its end
        change = {"open_epoch": epoch + 1}
        if data_pass != counters["data_pass"]:  # the last pass is done
            change.update(data_pass=data_pass, position=position)
        self._set(**change)
        need = max(counters["batch_size"], 1) if self.drop_remainder else 1
        return EpochStart(data_pass, position, counters["examples_seen"], need)

    def end_epoch(self) -> None:
        """Ends the epoch: between epochs, no epoch is open."""
        self._set(open_epoch=0)

    def data_ended(self) -> bool:
        """The data holds fewer than `EpochStart.need` examples after the
        position (a finite stream, resumed where its pass had ended):
        `True` when the next pass starts, `False` when this epoch, the one
        that trained the pass (see `begin_epoch`), ends at once."""
        if self.resumed:
            self.pass_length = self.counters["position"]
            return False
        self._set(data_pass=self.counters["data_pass"] + 1, position=0)
        return True

    def epoch_target(self) -> int | None:
        """The progress bar's steps for this epoch, from the size the
        schedule asks for now (`None` for a pass of unknown length)."""
        return self.steps_left(self._checked(self.schedule(self.context()), None))

    def steps_left(self, size: int) -> int | None:
        """Steps the rest of the pass takes at `size` (a finite stream's
        length, when known, is a hint)."""
        planner = SamplingPlanner(self.num_examples, drop_remainder=self.drop_remainder)
        return planner.steps_left(self.counters["position"], size)

    def pass_unfinished(self) -> bool:
        """Whether the epoch ended before the pass did though the driver
        ends the passes (the dataset ran out: it was changed or cut)."""
        return (
            self._data_end is None
            and not self.ended_by_sampling
            and self.counters["position"] < self.num_examples
        )

    # -- executions ----------------------------------------------------------

    def context(self) -> SamplingContext:
        """What the schedule sees now."""
        counters = self.counters
        fields = {}
        # A user function may read the measurements; the built-in schedules
        # say whether they do.
        if self._measurements is not None and getattr(
            self.schedule, "uses_measurements", True
        ):
            fields = dict(self._measurements())
        measurements = fields.pop("measurements", 0)
        noise = fields.get("noise_scale")
        if noise is not None and not math.isfinite(noise):
            fields["noise_scale"] = None
        return SamplingContext(
            epoch=self.epoch,
            epochs=self.epochs,
            step=counters["step"],
            data_pass=counters["data_pass"],
            position=counters["position"],
            examples_seen=counters["examples_seen"],
            num_examples=self.num_examples,
            batch_size=counters["batch_size"] or None,
            steps_since_change=counters["step"] - counters["last_change_step"],
            measurements=measurements,
            measurements_since_change=measurements - counters["measurements_at_change"],
            **fields,
        )

    def next_execution(self) -> Execution:
        """Decides the next execution: the size, then its batches, or the
        end of the epoch.

        Raises:
            ValueError: the schedule returned a size that is not an integer
                >= 1, is larger than a pass, or shrinks the batch without
                `allow_shrink`.
        """
        self._learn_pass_length(1)
        if self.planner.pass_done(self.counters["position"]):
            self.ended_by_sampling = True
            return Execution(None, None)
        decision = self.decide(self.context())
        if self.drop_remainder:
            self._learn_pass_length(decision.size * self.steps_per_execution)
        plan = self.planner.plan(
            self.counters["position"], decision.size, self.steps_per_execution
        )
        if not plan.batches:  # the remainder is dropped
            self._set(position=plan.end)
            self.ended_by_sampling = True
            return Execution(decision, None)
        self._plan = plan
        return Execution(decision, plan)

    def planned_ahead(self, steps: int) -> list[tuple[int, int, int]]:
        """The next `steps` steps as they will be decided, for a schedule
        that reads no measurements (its answers then follow from the
        counters alone): ``(start, size, decided)`` per step, ``decided``
        being the schedule's size; fewer where the pass ends. A pass of
        unknown length (a finite stream) is taken to go on: its data ends
        it. Nothing of this driver changes."""
        twin = copy.copy(self)
        twin.counters = dict(self.counters)
        twin._write = twin._data_end = twin._measurements = None
        twin._log_signal = False
        rows: list[tuple[int, int, int]] = []
        while len(rows) < steps:
            decision, plan = twin.next_execution()
            if plan is None:
                break
            rows.extend((start, size, decision.size) for start, size in plan.batches)
            twin.end_execution()
        return rows[:steps]

    def decide(self, context: SamplingContext) -> Decision:
        """The schedule's size for `context`, checked; a change is recorded
        in the counters."""
        counters = self.counters
        current = counters["batch_size"] or None
        size = self._checked(self.schedule(context), current)
        signal = threshold = None
        if self._log_signal:
            signal = self.schedule.signal_value(context)
            if signal is None or not context.measurements_since_change:
                signal = None  # nothing measured at this size yet
            else:
                threshold = self.schedule.threshold
        target = None
        if size != current:
            change = {
                "batch_size": size,
                "last_change_step": context.step,
                "measurements_at_change": context.measurements,
            }
            if not counters["reference_batch_size"]:
                change["reference_batch_size"] = self.reference_batch_size or size
            self._set(**change)
            left = self.steps_left(size)
            if current is not None and left is not None:
                target = self.epoch_steps + left
        return Decision(size, signal, threshold, context.step + 1, target)

    def end_execution(self) -> list[int]:
        """Advances the counters past the execution planned last (as the
        train step advanced `SamplingState`); returns the sizes trained."""
        counters = self.counters
        plan, self._plan = self._plan, None
        if self._data_end is not None and self.pass_length is None:
            # If the data ended during the execution, its last batch was
            # short, or it took fewer steps: what the data held was trained.
            self.pass_length = self._data_end.pass_length()
            if self.pass_length is not None:
                size = plan.batches[0][1]
                plan = self.planner.plan(counters["position"], size, len(plan.batches))
        sizes = plan.sizes
        trained = sum(sizes)
        counters["position"] += trained
        counters["examples_seen"] += trained
        counters["step"] += len(sizes)
        self.epoch_steps += len(sizes)
        if plan.end != counters["position"]:
            # The execution stopped at a remainder that will be dropped.
            self._set(position=plan.end)
        return sizes

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

    def _learn_pass_length(self, need: int) -> None:
        """For a finite stream: the pass's length, once fewer than `need`
        examples are left (the data waits, if need be, for them). The end
        must be known before the train function is called."""
        if self._data_end is not None and self.pass_length is None:
            position = self.counters["position"]
            left = self._data_end.examples_left(position, need)
            if left is not None:
                self.pass_length = position + left
