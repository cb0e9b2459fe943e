"""Which examples the next batches of a pass hold, in plain Python.

A pass over ``N`` examples trains them in the order of its permutation, cut
into consecutive batches of the size the schedule asks for at each decision;
a batch never straddles two passes. The final batch of a pass is what
remains, or, with ``drop_remainder``, nothing: the pass then ends as soon as
fewer examples remain than the size asked for.

A pass of unknown length (``N`` is `None`: a streamed dataset that ends
where its data does) never ends by position: the data ends it.

`SamplingPlanner` answers from where a pass stands (``data_pass``, and
``position``: the examples of the pass already trained) and the size asked
for. It holds no state and uses neither TensorFlow nor Keras, so the same
questions always get the same answers: what lets a resumed run repeat an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np


class ExecutionPlan(NamedTuple):
    """The batches of one execution of the train function.

    Attributes:
        batches: ``(start, size)`` of each step's batch, as positions in
            the pass's permutation.
        end: the position in the pass after the execution: the number of
            examples when the pass ended in it, including when its
            remainder is dropped.
    """

    batches: tuple[tuple[int, int], ...]
    end: int

    @property
    def sizes(self) -> list[int]:
        """The size of each step's batch."""
        return [size for _, size in self.batches]


@dataclasses.dataclass(frozen=True)
class SamplingPlanner:
    """The batches of every pass over `num_examples` examples.

    Args:
        num_examples: Integer, the examples in one pass, ``N``, or `None`
            when the data ends the pass.
        seed: Integer, the seed of the permutations. Defaults to `0`.
        shuffle: Boolean, whether every pass draws its own permutation
            (otherwise every pass is in the data order). Defaults to `True`.
        drop_remainder: Boolean, whether a pass ends, untrained, when fewer
            examples remain than the size asked for. Defaults to `False`.

    Example:

    >>> planner = SamplingPlanner(10, shuffle=False)
    >>> planner.plan(position=0, size=4, steps=3)
    ExecutionPlan(batches=((0, 4), (4, 4), (8, 2)), end=10)
    >>> SamplingPlanner(10, drop_remainder=True).plan(position=8, size=4)
    ExecutionPlan(batches=(), end=10)
    """

    num_examples: int | None
    seed: int = 0
    shuffle: bool = True
    drop_remainder: bool = False

    def permutation(self, data_pass: int) -> np.ndarray:
        """The order of the examples in pass `data_pass`.

        ``numpy.random.default_rng([seed, data_pass]).permutation(N)``, or
        ``numpy.arange(N)`` without `shuffle`.
        """
        if self.shuffle:
            return np.random.default_rng([self.seed, data_pass]).permutation(
                self.num_examples
            )
        return np.arange(self.num_examples)

    def pass_done(self, position: int) -> bool:
        """Whether a pass that reached `position` is over."""
        return self.num_examples is not None and position >= self.num_examples

    def epoch_start(self, data_pass: int, position: int) -> tuple[int, int]:
        """``(data_pass, position)`` where the next epoch starts: where the
        pass stands, or the start of the next pass when this one is over."""
        if self.pass_done(position):
            return data_pass + 1, 0
        return data_pass, position

    def next_batch(self, position: int, size: int) -> tuple[int, int] | None:
        """``(start, size)`` of the batch after `position` when `size` is
        asked for (smaller at the end of the pass), or `None` where the pass
        ends: at its end, or, with `drop_remainder`, where fewer than `size`
        examples remain."""
        if self.num_examples is None:
            return position, size
        remaining = self.num_examples - position
        if remaining <= 0 or (self.drop_remainder and remaining < size):
            return None
        return position, min(size, remaining)

    def plan(self, position: int, size: int, steps: int = 1) -> ExecutionPlan:
        """The batches of an execution of `steps` steps at `size` from
        `position`: fewer when the pass ends during it.

        When the execution takes all its steps, the pass goes on after it
        even if fewer than `size` examples remain: the next decision may ask
        for another size.
        """
        batches = []
        for _ in range(steps):
            batch = self.next_batch(position, size)
            if batch is None:
                break
            batches.append(batch)
            position += batch[1]
        end = self.num_examples if len(batches) < steps else position
        return ExecutionPlan(tuple(batches), end)

    def steps_left(self, position: int, size: int) -> int | None:
        """Steps the rest of the pass takes from `position` at `size`
        (`None` for a pass of unknown length)."""
        if self.num_examples is None:
            return None
        remaining = self.num_examples - position
        if self.drop_remainder:
            return remaining // size
        return math.ceil(remaining / size)
