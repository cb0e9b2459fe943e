"""`SamplingPlanner` on its own, without `fit`: which rows of which
permutation every batch takes, and where passes end.

Every expected value is counted by hand from the specification
(docs/sampling.md, "What an epoch is"); the planner is never asked for one.
"""

import numpy as np
import pytest

from keras_fim.sampling import ExecutionPlan, SamplingPlanner


def walk(planner, sizes, position=0, steps=1):
    """The batches of the rest of a pass, asking `sizes(position)` at every
    decision (an execution of `steps` steps), and where the pass stood after
    each execution."""
    batches, ends = [], []
    while not planner.pass_done(position):
        plan = planner.plan(position, sizes(position), steps)
        assert plan.end > position, "the pass does not advance"
        batches.extend(plan.batches)
        position = plan.end
        ends.append(position)
    return batches, ends


# -- permutations ----------------------------------------------------------------


def test_each_pass_has_its_own_permutation_from_seed_and_pass():
    planner = SamplingPlanner(50, seed=7)
    orders = [planner.permutation(p) for p in range(4)]
    for p, order in enumerate(orders):
        # The documented formula, and a permutation of all 50 examples.
        np.testing.assert_array_equal(
            order, np.random.default_rng([7, p]).permutation(50)
        )
        assert sorted(order) == list(range(50))
    assert len({tuple(order) for order in orders}) == 4
    # Another seed, other permutations; the same seed, the same ones.
    assert not np.array_equal(SamplingPlanner(50, seed=8).permutation(0), orders[0])
    np.testing.assert_array_equal(SamplingPlanner(50, seed=7).permutation(3), orders[3])


def test_without_shuffle_every_pass_is_in_the_data_order():
    planner = SamplingPlanner(6, shuffle=False, seed=3)
    for data_pass in (0, 1, 9):
        assert planner.permutation(data_pass).tolist() == [0, 1, 2, 3, 4, 5]


# -- one size per pass -----------------------------------------------------------


def test_a_pass_is_cut_into_consecutive_batches_and_ends_on_the_remainder():
    batches, ends = walk(SamplingPlanner(10), lambda position: 4)
    assert batches == [(0, 4), (4, 4), (8, 2)]
    assert ends == [4, 8, 10]


def test_drop_remainder_ends_the_pass_before_a_short_batch():
    batches, ends = walk(SamplingPlanner(10, drop_remainder=True), lambda p: 4)
    assert batches == [(0, 4), (4, 4)]
    assert ends == [4, 8, 10]  # the third decision trains nothing
    assert SamplingPlanner(10, drop_remainder=True).plan(8, 4) == ExecutionPlan((), 10)


def test_a_size_that_divides_the_pass_leaves_no_remainder_to_drop():
    for drop_remainder in (False, True):
        planner = SamplingPlanner(12, drop_remainder=drop_remainder)
        assert walk(planner, lambda p: 4)[0] == [(0, 4), (4, 4), (8, 4)]


def test_the_whole_pass_in_one_batch():
    assert walk(SamplingPlanner(7), lambda p: 7)[0] == [(0, 7)]
    assert walk(SamplingPlanner(7, drop_remainder=True), lambda p: 7)[0] == [(0, 7)]


# -- growth mid-pass -------------------------------------------------------------


def test_growth_mid_pass_continues_from_the_position():
    # 3 until 6 examples are trained, then 5: 0-2, 3-5, 6-10, 11-12.
    def sizes(position):
        return 3 if position < 6 else 5

    batches, _ = walk(SamplingPlanner(13), sizes)
    assert batches == [(0, 3), (3, 3), (6, 5), (11, 2)]
    dropped, ends = walk(SamplingPlanner(13, drop_remainder=True), sizes)
    assert dropped == [(0, 3), (3, 3), (6, 5)]  # 2 left, fewer than 5
    assert ends[-1] == 13


def test_a_smaller_size_after_a_full_execution_trains_the_remainder():
    # With drop_remainder, an execution that takes all its steps leaves the
    # pass going on: the next decision may ask for a size that fits.
    planner = SamplingPlanner(10, drop_remainder=True)
    assert planner.plan(0, 4, steps=2) == ExecutionPlan(((0, 4), (4, 4)), 8)
    assert planner.plan(8, 2) == ExecutionPlan(((8, 2),), 10)
    assert planner.plan(8, 3) == ExecutionPlan((), 10)


# -- several steps per execution -------------------------------------------------


def test_an_execution_stops_at_the_end_of_the_pass():
    planner = SamplingPlanner(10)
    assert planner.plan(0, 4, steps=5) == ExecutionPlan(((0, 4), (4, 4), (8, 2)), 10)
    assert planner.plan(0, 3, steps=2) == ExecutionPlan(((0, 3), (3, 3)), 6)
    assert planner.plan(6, 3, steps=2) == ExecutionPlan(((6, 3), (9, 1)), 10)


def test_an_execution_that_meets_a_dropped_remainder_ends_the_pass():
    planner = SamplingPlanner(10, drop_remainder=True)
    # Two batches of 4, then 2 examples left, fewer than 4: the pass ends
    # with this execution.
    plan = planner.plan(0, 4, steps=3)
    assert plan == ExecutionPlan(((0, 4), (4, 4)), 10)
    assert plan.sizes == [4, 4]
    assert planner.plan(0, 5, steps=3) == ExecutionPlan(((0, 5), (5, 5)), 10)


def test_steps_per_execution_over_whole_passes():
    # 23 examples, executions of 2 steps: 6 until position 12, then 10.
    def sizes(position):
        return 6 if position < 12 else 10

    batches, ends = walk(SamplingPlanner(23), sizes, steps=2)
    assert batches == [(0, 6), (6, 6), (12, 10), (22, 1)]
    assert ends == [12, 23]
    batches, ends = walk(SamplingPlanner(23, drop_remainder=True), sizes, steps=2)
    assert batches == [(0, 6), (6, 6), (12, 10)]
    assert ends == [12, 23]


# -- the progress bar's count ----------------------------------------------------


@pytest.mark.parametrize(
    "position, size, drop_remainder, steps",
    [
        (0, 4, False, 26),  # 103 = 25 * 4 + 3
        (0, 4, True, 25),
        (100, 8, False, 1),
        (100, 8, True, 0),
        (96, 7, False, 1),
        (96, 7, True, 1),
        (0, 103, True, 1),
    ],
)
def test_steps_left_in_the_pass(position, size, drop_remainder, steps):
    planner = SamplingPlanner(103, drop_remainder=drop_remainder)
    assert planner.steps_left(position, size) == steps


# -- passes and resuming ---------------------------------------------------------


def test_an_epoch_starts_where_the_pass_stands_or_at_the_next_pass():
    planner = SamplingPlanner(10)
    assert planner.epoch_start(0, 0) == (0, 0)
    assert planner.epoch_start(3, 6) == (3, 6)  # a pass left unfinished
    assert planner.epoch_start(3, 10) == (4, 0)  # the last pass is done
    assert not planner.pass_done(9)
    assert planner.pass_done(10)


def test_resuming_from_a_recorded_position_repeats_the_uninterrupted_pass():
    # Pass 2 of 17 examples, seed 5, size 4: interrupted after position 8.
    order = np.random.default_rng([5, 2]).permutation(17)
    whole = SamplingPlanner(17, seed=5)
    rows = [order[s : s + n].tolist() for s, n in walk(whole, lambda p: 4)[0]]
    assert [len(r) for r in rows] == [4, 4, 4, 4, 1]

    # A new planner (a new process) from the recorded (data_pass, position).
    resumed = SamplingPlanner(17, seed=5)
    data_pass, position = resumed.epoch_start(2, 8)
    assert (data_pass, position) == (2, 8)
    again = resumed.permutation(data_pass)
    rest = [again[s : s + n].tolist() for s, n in walk(resumed, lambda p: 4, 8)[0]]
    assert rest == rows[2:]
    assert sorted(i for r in rows for i in r) == list(range(17))  # each example once
