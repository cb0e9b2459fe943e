"""`SamplingDriver` on its own, driven by hand without `fit`: when the
schedule is asked, what it sees, what its answers do to the pass, the
counters written back, the signal logged, and a pass whose length only the
data knows.

Every expected value is counted by hand from the specification
(docs/sampling.md); the driver is never asked for one.
"""

import math

import pytest

from keras_fim.sampling.driver import (
    COUNTERS,
    Decision,
    EpochStart,
    Execution,
    SamplingDriver,
    checked_schedule,
    largest_size,
)
from keras_fim.sampling.planner import ExecutionPlan
from keras_fim.schedules import Automatic, Geometric, Staged


def fresh(**values):
    """`SamplingState`'s counters before the first step, with `values`."""
    return {**dict.fromkeys(COUNTERS, 0), **values}


def driver_of(schedule, counters=None, **options):
    """A driver whose writes are kept, in order, in `driver.written`."""
    written = []
    driver = SamplingDriver(
        schedule, counters or fresh(), write=written.append, **options
    )
    driver.written = written
    return driver


def run_rest(driver):
    """The rest of an epoch as the callback runs it: the sizes of every
    execution, and the `Execution` that ended it."""
    sizes = []
    while (execution := driver.next_execution()).plan is not None:
        sizes.append(driver.end_execution())
    return sizes, execution


def run_epoch(driver, epoch):
    driver.begin_epoch(epoch)
    return run_rest(driver)


class Stream:
    """A finite stream of `length` examples that does not say its length in
    advance: it answers as `StreamedExamples` does once its prefetching side
    has made them all (`ended`), and nothing about the end before."""

    def __init__(self, length, ended=True):
        self.length, self.ended, self.asked = length, ended, []

    def examples_left(self, position, need):
        self.asked.append((position, need))
        left = self.length - position
        if left >= need:
            return None
        self.ended = True  # it had to reach the end to say so
        return left

    def pass_length(self):
        return self.length if self.ended else None


# -- passes of a known length ------------------------------------------------------


def test_a_staged_schedule_over_two_epochs():
    # Staged([4, 8]) over 2 epochs of 10: 4 for the first pass, 8 for the
    # second; each pass ends on its remainder.
    driver = driver_of(Staged([4, 8]), num_examples=10, epochs=2, shuffle=False)
    assert driver.begin_epoch(0) == EpochStart(0, 0, 0, 1)
    assert driver.epoch_target() == 3  # 4 + 4 + 2
    first = driver.next_execution()
    assert first == Execution(Decision(4, log_step=1), ExecutionPlan(((0, 4),), 4))
    # The epoch is open; the first size is written, and is the reference size.
    assert driver.written == [
        dict(open_epoch=1),
        dict(
            batch_size=4,
            last_change_step=0,
            measurements_at_change=0,
            reference_batch_size=4,
        ),
    ]
    assert driver.end_execution() == [4]
    assert driver.counters == fresh(
        step=1,
        position=4,
        examples_seen=4,
        batch_size=4,
        reference_batch_size=4,
        open_epoch=1,
    )
    rest, end = run_rest(driver)
    assert rest == [[4], [2]]
    assert end == Execution(None, None)  # the pass is over: no decision
    assert not driver.pass_unfinished()
    assert driver.epoch_steps == 3

    # The next epoch starts the next pass, written back.
    driver.end_epoch()
    assert driver.written[-1] == dict(open_epoch=0)
    del driver.written[:]
    assert driver.begin_epoch(1) == EpochStart(1, 0, 10, 1)
    assert driver.written == [dict(open_epoch=2, data_pass=1, position=0)]
    assert driver.epoch_target() == 2  # 8 + 2
    sizes, end = run_epoch(driver, 1)
    assert sizes == [[8], [2]]
    assert driver.counters["step"] == 5 and driver.counters["examples_seen"] == 20
    assert driver.counters["last_change_step"] == 3


def test_the_schedule_sees_where_training_stands():
    seen = []

    def schedule(context):
        seen.append(context)
        return 3

    driver = driver_of(schedule, num_examples=7, epochs=4)
    driver.begin_epoch(0)
    assert driver.epoch_target() == 3
    run_rest(driver)
    # The first context is asked twice: for the bar's target, then to decide.
    assert [(c.step, c.position, c.examples_seen, c.batch_size) for c in seen] == [
        (0, 0, 0, None),
        (0, 0, 0, None),
        (1, 3, 3, 3),
        (2, 6, 6, 3),
    ]
    assert {(c.epoch, c.epochs, c.data_pass, c.num_examples) for c in seen} == {
        (0, 4, 0, 7)
    }
    assert [c.steps_since_change for c in seen] == [0, 0, 1, 2]
    assert seen[-1].progress == pytest.approx(6 / 7 / 4)
    assert seen[-1].measurements == 0 and seen[-1].noise_scale is None


def test_several_steps_per_execution_and_a_dropped_remainder():
    # 10 examples, 2 steps per execution at 4: (0, 4), (4, 4); then 2 left,
    # fewer than 4: the pass ends, position written to its end.
    driver = driver_of(
        checked_schedule(4, 10, False),
        num_examples=10,
        steps_per_execution=2,
        drop_remainder=True,
    )
    sizes, end = run_epoch(driver, 0)
    assert sizes == [[4, 4]]
    assert end.decision.size == 4 and end.plan is None
    assert driver.written[-1] == dict(position=10)
    assert driver.counters["step"] == 2 and driver.counters["examples_seen"] == 8
    assert driver.begin_epoch(1) == EpochStart(1, 0, 8, 4)  # need: a batch


def test_a_growing_size_mid_pass_retargets_the_bar():
    driver = driver_of(lambda c: 2 if c.position < 4 else 3, num_examples=11, epochs=1)
    driver.begin_epoch(0)
    assert driver.epoch_target() == 6  # 11 / 2, rounded up
    targets = []
    while (execution := driver.next_execution()).plan is not None:
        targets.append(execution.decision.target)
        driver.end_execution()
    # At position 4, after 2 steps: 7 left at 3 is 3 more steps.
    assert targets == [None, None, 5, None, None]


def test_a_shrinking_or_oversized_answer_raises():
    driver = driver_of(lambda c: 8 if c.step < 1 else 4, num_examples=20)
    driver.begin_epoch(0)
    driver.next_execution()
    driver.end_execution()
    with pytest.raises(ValueError, match=r"shrank the batch from 8 to 4.*allow_shrink"):
        driver.next_execution()
    # With allow_shrink it may.
    driver.allow_shrink = True
    assert driver.next_execution().decision.size == 4
    for size, match in ((21, "at most the number of examples"), (0, ">= 1")):
        driver = driver_of(lambda c, s=size: s, num_examples=20)
        driver.begin_epoch(0)
        with pytest.raises(ValueError, match=match):
            driver.next_execution()
        assert driver.written == [dict(open_epoch=1)]


# -- Automatic, from a given noise scale ----------------------------------------------


def test_automatic_grows_from_the_noise_scale_it_is_given():
    # B_simple = 40, measured after every odd step. A change needs 2 steps
    # and 1 fresh measurement at the current size; the signal is
    # B_simple / batch: 5 over 8, 2.5 over 16, 1.25 over 32 (all above the
    # threshold 1), so the batch doubles every 2 steps up to the maximum, 64.
    fisher = {"measurements": 0, "noise_scale": 40.0}
    schedule = Automatic(8, maximum=64, min_steps=2, min_measurements=1)
    driver = driver_of(
        schedule,
        num_examples=10_000,
        measurements=lambda: dict(fisher),
        log_signal=True,
    )
    driver.begin_epoch(0)
    decisions = []
    for step in range(12):
        execution = driver.next_execution()
        decisions.append(execution.decision)
        assert driver.end_execution() == [execution.decision.size]
        fisher["measurements"] += step % 2
    assert [d.size for d in decisions] == [8, 8, 16, 16, 32, 32] + [64] * 6
    # The signal is logged at every decision with a measurement at the
    # current size (none before the first batch).
    assert [d.signal for d in decisions] == [
        None,
        None,
        5.0,
        None,
        2.5,
        None,
        1.25,
        None,
    ] + [0.625] * 4
    assert {d.threshold for d in decisions} == {None, 1.0}
    assert all((d.threshold is None) == (d.signal is None) for d in decisions)
    assert [d.log_step for d in decisions] == list(range(1, 13))
    assert driver.counters["batch_size"] == 64
    assert driver.counters["last_change_step"] == 6
    assert driver.counters["measurements_at_change"] == 3
    assert driver.counters["reference_batch_size"] == 8
    assert [w["batch_size"] for w in driver.written if "batch_size" in w] == [
        8,
        16,
        32,
        64,
    ]


def test_automatic_holds_while_the_noise_scale_is_undefined():
    schedule = Automatic(8, maximum=64, min_steps=1)
    driver = driver_of(
        schedule,
        num_examples=100,
        measurements=lambda: {"measurements": 5, "noise_scale": math.nan},
        log_signal=True,
    )
    driver.begin_epoch(0)
    sizes, signals = [], []
    for _ in range(4):
        execution = driver.next_execution()
        sizes.append(execution.decision.size)
        signals.append(execution.decision.signal)
        driver.end_execution()
    assert sizes == [8, 8, 8, 8] and signals == [None] * 4


def test_measurements_are_read_only_for_a_schedule_that_reads_them():
    reads = []

    def measurements():
        reads.append(1)
        return {"measurements": 3, "noise_scale": 1e6}

    driver = driver_of(Staged([4]), num_examples=8, measurements=measurements)
    run_epoch(driver, 0)
    assert reads == []
    seen = []
    driver = driver_of(
        lambda c: seen.append(c) or 4, num_examples=8, measurements=measurements
    )
    run_epoch(driver, 0)
    assert reads and {(c.measurements, c.noise_scale) for c in seen} == {(3, 1e6)}
    assert seen[-1].measurements_since_change == 0  # measured when 4 was chosen


def test_without_log_signal_no_signal_is_computed():
    calls = []

    def signal(context):
        calls.append(context)
        return 10.0

    schedule = Automatic(4, maximum=8, signal=signal, min_steps=1, min_measurements=0)
    driver = driver_of(schedule, num_examples=100)
    driver.begin_epoch(0)
    for _ in range(3):
        assert driver.next_execution().decision.signal is None
        driver.end_execution()
    # Asked by the schedule only (at 4 after one step; 8 is the maximum).
    assert len(calls) == 1


# -- a pass whose length only the data knows ------------------------------------------


def test_unknown_pass_length_is_learnt_from_the_data():
    stream = Stream(10, ended=False)
    driver = driver_of(Staged([4]), num_examples=None, data_end=stream)
    assert driver.begin_epoch(0) == EpochStart(0, 0, 0, 1)
    assert driver.epoch_target() is None  # no count for the bar
    plans = []
    while (execution := driver.next_execution()).plan is not None:
        plans.append(execution.plan)
        if execution.plan.batches[0][0] == 8:
            stream.ended = True  # the data ran out during this execution
        driver.end_execution()
    # Planned at 4 each time; the data ended in the third batch, which the
    # driver then counts as the 2 examples it held.
    assert [p.batches for p in plans] == [((0, 4),), ((4, 4),), ((8, 4),)]
    assert driver.counters["position"] == 10
    assert driver.counters["examples_seen"] == 10
    assert driver.pass_length == 10
    assert not driver.pass_unfinished()  # the data ends the pass
    # The next epoch starts the next pass, its length unknown again.
    assert driver.begin_epoch(1) == EpochStart(1, 0, 10, 1)
    assert driver.pass_length is None


def test_unknown_pass_length_with_drop_remainder_asks_a_batch_ahead():
    stream = Stream(10, ended=False)
    driver = driver_of(
        Staged([4]), num_examples=None, data_end=stream, drop_remainder=True
    )
    sizes, end = run_epoch(driver, 0)
    assert sizes == [[4], [4]]
    # Before each decision one example is asked for, then a whole batch.
    assert stream.asked == [(0, 1), (0, 4), (4, 1), (4, 4), (8, 1), (8, 4)]
    assert end.decision.size == 4 and end.plan is None  # 2 left, dropped
    assert driver.written[-1] == dict(position=10)


def test_resumed_where_a_streams_pass_had_ended_moves_to_the_next():
    # A new process: the state says pass 3 at position 10, the data has
    # not run yet (it cannot say where the pass ended); the epoch that
    # trained it had ended (no open epoch).
    counters = fresh(data_pass=3, position=10, examples_seen=40, batch_size=4)
    driver = driver_of(
        Staged([4]), counters, num_examples=None, data_end=Stream(10, ended=False)
    )
    start = driver.begin_epoch(7)
    assert start == EpochStart(3, 10, 40, 1)
    assert driver.written == [dict(open_epoch=8)]
    # The pipeline finds fewer than `need` examples after position 10.
    assert driver.data_ended()
    assert driver.written[-1] == dict(data_pass=4, position=0)
    assert (driver.counters["data_pass"], driver.counters["position"]) == (4, 0)


@pytest.mark.parametrize("stream", [False, True])
def test_resumed_epoch_whose_pass_was_done_ends_without_a_step(stream):
    """A backup on a pass's last step, before its epoch ended (issue 14,
    item 4): Keras restarts epoch 7, which trained pass 3 to its end. It
    ends at once, in the same pass; epoch 8 starts pass 4."""
    counters = fresh(
        data_pass=3, position=10, examples_seen=40, batch_size=4, open_epoch=8
    )
    options = dict(num_examples=10)
    if stream:
        options = dict(num_examples=None, data_end=Stream(10, ended=False))
    driver = driver_of(Staged([4]), counters, **options)
    assert driver.begin_epoch(7) == EpochStart(3, 10, 40, 1)
    if stream:
        assert not driver.data_ended()  # this epoch ends; no next pass
    assert driver.next_execution() == Execution(None, None)
    assert not driver.pass_unfinished()
    driver.end_epoch()
    assert driver.written == [dict(open_epoch=8), dict(open_epoch=0)]
    # Epoch 8 is not the one that trained pass 3: the next pass.
    if stream:  # the data says where the pass ended: after position 10
        assert driver.begin_epoch(8) == EpochStart(3, 10, 40, 1)
        assert driver.data_ended()
    else:
        assert driver.begin_epoch(8) == EpochStart(4, 0, 40, 1)
    assert (driver.counters["data_pass"], driver.counters["position"]) == (4, 0)


def test_resumed_epoch_mid_pass_goes_on():
    counters = fresh(data_pass=3, position=4, batch_size=4, open_epoch=8)
    driver = driver_of(Staged([4]), counters, num_examples=10, shuffle=False)
    assert driver.begin_epoch(7) == EpochStart(3, 4, 0, 1)
    assert run_rest(driver)[0] == [[4], [2]]


# -- planned ahead (under a tf.distribute strategy) -----------------------------------


def test_planned_ahead_is_what_the_steps_then_decide_and_changes_nothing():
    """Geometric every 12 examples grows the batch inside the pass: the
    steps planned ahead are the steps then run, and planning them ahead
    writes nothing and moves no counter."""
    schedule = Geometric(2, every_examples=12, maximum=8)
    driver = driver_of(schedule, num_examples=30, shuffle=False)
    driver.begin_epoch(0)
    before, written = dict(driver.counters), list(driver.written)
    ahead = driver.planned_ahead(16)
    assert (driver.counters, driver.written) == (before, written)
    sizes, _ = run_rest(driver)
    assert [size for _, size, _ in ahead] == [s for (s,) in sizes]
    assert [size for _, _, size in ahead] == [2] * 6 + [4] * 3 + [8]
    assert ahead[-1] == (24, 6, 8)  # the pass's remainder, 8 asked
    # Two steps in, the rest of the pass, as planned from the start.
    driver = driver_of(schedule, num_examples=30, shuffle=False)
    driver.begin_epoch(0)
    for _ in range(2):
        driver.next_execution()
        driver.end_execution()
    assert driver.planned_ahead(3) == ahead[2:5]


def test_planned_ahead_in_a_stream_of_unknown_length_goes_on():
    """The data ends such a pass: planned ahead, it goes on, and the data
    is not asked (it may not have been read yet)."""
    stream = Stream(10, ended=False)
    driver = driver_of(Staged([4]), num_examples=None, data_end=stream)
    driver.begin_epoch(0)
    assert driver.planned_ahead(4) == [(0, 4, 4), (4, 4, 4), (8, 4, 4), (12, 4, 4)]
    assert stream.asked == []


# -- the dataset ran out before the pass ---------------------------------------------


def test_an_epoch_cut_short_is_seen():
    driver = driver_of(Staged([4]), num_examples=10)
    driver.begin_epoch(0)
    driver.next_execution()
    driver.end_execution()
    assert driver.pass_unfinished()  # position 4 of 10, not ended by the driver


# -- the schedule, checked at construction --------------------------------------------


def test_checked_schedule():
    assert checked_schedule(5, 10, False).sizes() == [5]
    with pytest.raises(ValueError, match="at most the number of examples"):
        checked_schedule(11, 10, False)
    with pytest.raises(ValueError, match=r"schedule size 1.*at most"):
        checked_schedule(Staged([4, 30]), 20, False)
    with pytest.raises(ValueError, match="allow_shrink"):
        checked_schedule(Staged([8, 4]), 20, False)
    assert checked_schedule(Staged([8, 4]), 20, True).sizes() == [8, 4]
    function = lambda c: 3  # noqa: E731
    assert checked_schedule(function, None, False) is function


def test_largest_size():
    assert largest_size(6) == 6
    assert largest_size(Staged([4, 16, 8])) == 16
    assert largest_size(Automatic(4, maximum=32)) == 32
    assert largest_size(Geometric(4, maximum=64)) == 64
    for schedule in (Geometric(4), lambda c: 8):
        with pytest.raises(ValueError, match=r"largest batch.*buffer_size"):
            largest_size(schedule)
