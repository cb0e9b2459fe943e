"""Batch-size schedules for `DynamicSampling`.

A schedule is any callable that takes a `SamplingContext` (where training
stands, and the latest Fisher measurements) and returns the mini-batch size
to train with next. `DynamicSampling` asks it before every execution of the
train function (every step, or every `steps_per_execution` steps).

* `Staged`: the paper's schedule, sizes each lasting a fraction of training
  (Liao et al., TPAMI 2020, grow the batch 16 -> 32 -> 64 -> 128 -> 256).
* `Geometric`, `Linear`: growth every so many epochs or examples.
* `Automatic`: grows the batch from the measurements of a `FisherCallback`
  (by default when the gradient noise scale ``B_simple`` of McCandlish et
  al. 2018 exceeds the batch).
* any function ``f(context) -> int``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from keras_fim.validation import check_bool, check_int, check_real, is_real


class SamplingContext(NamedTuple):
    """What a schedule sees when it chooses the next batch size.

    Attributes:
        epoch: 0-based Keras epoch (one pass over the data).
        epochs: the `epochs` given to `fit`.
        step: 0-based global training step about to be taken.
        data_pass: 0-based pass over the data (equals `epoch` when every
            `fit` starts where the last one stopped).
        position: examples already trained in this pass.
        examples_seen: examples trained so far, over all passes.
        num_examples: examples in one pass (`None` for a streamed dataset
            of unknown length).
        batch_size: the size used so far (`None` before the first step).
        steps_since_change: steps since the size last changed.
        measurements: Fisher measurements taken so far (0 without a
            `FisherCallback`).
        measurements_since_change: measurements taken at the current size.
        noise_scale: smoothed gradient noise scale ``B_simple``, or `None`
            while unmeasured.
        condition_number: exponential average of ``c_k``, or `None`.
        condition_mean: ``C_K bar``, or `None`.
        energy: ``L_K``, or `None`.
    """

    epoch: int
    epochs: int
    step: int
    data_pass: int
    position: int
    examples_seen: int
    num_examples: int | None
    batch_size: int | None = None
    steps_since_change: int = 0
    measurements: int = 0
    measurements_since_change: int = 0
    noise_scale: float | None = None
    condition_number: float | None = None
    condition_mean: float | None = None
    energy: float | None = None

    @property
    def progress(self) -> float:
        """Fraction of the `fit`'s passes done, in [0, 1] (counting whole
        passes only when their length is unknown)."""
        done = self.data_pass
        if self.num_examples:
            done += self.position / self.num_examples
        return min(done / max(self.epochs, 1), 1.0)


def check_size(name: str, value: int, num_examples: int | None = None) -> int:
    """`value` as a batch size (at most `num_examples` if given), or
    `ValueError` naming `name`.

    Args:
        name: String, the argument's name, for the error message.
        value: The value to check: an integer >= 1 (Python's or NumPy's, not
            a boolean) passes.
        num_examples: Integer or `None`. When given, `value` must also be at
            most this (the examples in one pass). Defaults to `None`.

    Returns:
        `value` as a Python `int`.
    """
    size = check_int(name, value, 1)
    if num_examples is not None and size > num_examples:
        raise ValueError(
            f"`{name}` must be at most the number of examples in one pass "
            f"({num_examples}). Received: {name}={size}"
        )
    return size


class BatchSizeSchedule:
    """Base class: `__call__(context) -> int` and `sizes()` to validate."""

    # Whether the schedule reads the Fisher measurements of the context
    # (reading them costs a few device reads per step).
    uses_measurements = False

    def __call__(self, context: SamplingContext) -> int:
        raise NotImplementedError

    def sizes(self) -> list[int]:
        """The sizes the schedule can return, as far as known in advance."""
        return []

    def get_config(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class Staged(BatchSizeSchedule):
    """Fixed sizes, each for a fraction of training (the paper's schedule).

    Liao et al. (TPAMI 2020) train with dynamic sampling in five equal
    stages, batch 16 -> 32 -> 64 -> 128 -> 256: ``Staged([16, 32, 64, 128,
    256])``.

    Stage ``i`` runs while the fraction of the `fit`'s passes done is below
    ``fractions[0] + ... + fractions[i]``.

    Args:
        sizes: Non-empty sequence of integers >= 1, the batch sizes, in
            order.
        fractions: Sequence of positive finite floats, one per size and
            summing to 1: the fraction of training each size lasts; or
            `None` for equal stages. Defaults to `None`.

    Example:

    >>> from keras_fim.schedules import SamplingContext, Staged
    >>> schedule = Staged([16, 32, 64, 128, 256])  # the paper's
    >>> [schedule(SamplingContext(epoch=e, epochs=10, step=0, data_pass=e,
    ...           position=0, examples_seen=0, num_examples=100))
    ...  for e in range(10)]
    [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    """

    def __init__(self, sizes: Sequence[int], fractions: Sequence[float] | None = None):
        if (
            isinstance(sizes, (str, bytes, dict))
            or not hasattr(sizes, "__len__")
            or len(sizes) == 0
        ):
            raise ValueError(
                f"`sizes` must be a non-empty list of integers. Received: sizes={sizes!r}"
            )
        self._sizes = [check_size(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
        if fractions is None:
            fractions = [1.0 / len(self._sizes)] * len(self._sizes)
        if isinstance(fractions, (str, bytes, dict)) or not hasattr(
            fractions, "__len__"
        ):
            raise ValueError(
                "`fractions` must be None or a list of positive numbers, one per "
                f"size. Received: fractions={fractions!r}"
            )
        fractions = list(fractions)
        if len(fractions) != len(self._sizes):
            raise ValueError(
                f"`fractions` must have one entry per size ({len(self._sizes)}). "
                f"Received: fractions={fractions!r}"
            )
        if any(not is_real(f) or not math.isfinite(f) or f <= 0 for f in fractions):
            raise ValueError(
                "`fractions` must be positive finite numbers. "
                f"Received: fractions={fractions!r}"
            )
        if not math.isclose(sum(fractions), 1.0, rel_tol=1e-6):
            raise ValueError(
                f"`fractions` must sum to 1. Received: fractions={fractions!r} (sum {sum(fractions)})"
            )
        self._fractions = [float(f) for f in fractions]
        self._ends = [
            sum(self._fractions[: i + 1]) for i in range(len(self._fractions))
        ]

    def __call__(self, context: SamplingContext) -> int:
        # A small tolerance so that a stage ending exactly on a pass boundary
        # is not lost to rounding.
        progress = context.progress + 1e-9
        for size, end in zip(self._sizes, self._ends, strict=True):
            if progress < end:
                return size
        return self._sizes[-1]

    def sizes(self) -> list[int]:
        return list(self._sizes)

    def get_config(self) -> dict:
        return {"sizes": self.sizes(), "fractions": list(self._fractions)}


class _PeriodicGrowth(BatchSizeSchedule):
    def __init__(self, initial, maximum, every_epochs, every_examples):
        self.initial = check_size("initial", initial)
        self.maximum = None if maximum is None else check_size("maximum", maximum)
        if self.maximum is not None and self.maximum < self.initial:
            raise ValueError(
                f"`maximum` must be at least `initial` ({self.initial}). Received: maximum={maximum}"
            )
        if every_examples is not None:
            self.every_examples = check_size("every_examples", every_examples)
            self.every_epochs = None
        else:
            self.every_epochs = check_size("every_epochs", every_epochs)
            self.every_examples = None

    def _periods(self, context: SamplingContext) -> int:
        if self.every_examples is not None:
            return context.examples_seen // self.every_examples
        return context.data_pass // self.every_epochs

    def _capped(self, size: float, context: SamplingContext) -> int:
        cap = self.maximum if self.maximum is not None else context.num_examples
        return int(size if cap is None else min(size, cap))

    def sizes(self) -> list[int]:
        return [self.initial] + ([self.maximum] if self.maximum is not None else [])

    def _period_config(self) -> dict:
        return {
            "initial": self.initial,
            "maximum": self.maximum,
            "every_epochs": self.every_epochs,
            "every_examples": self.every_examples,
        }


class Geometric(_PeriodicGrowth):
    """``initial * factor**k`` after ``k`` periods, at most `maximum`.

    A period is `every_epochs` passes over the data, or `every_examples`
    examples trained when that is given.

    Args:
        initial: Integer >= 1, the first batch size.
        factor: Float >= 1, the growth factor per period; the size is
            rounded down to an integer. Defaults to `2.0`.
        maximum: Integer >= `initial`, or `None` for no maximum other than
            the examples in one pass. Defaults to `None`.
        every_epochs: Integer >= 1, the period in passes over the data (used
            when `every_examples` is `None`). Defaults to `1`.
        every_examples: Integer >= 1 or `None`. When given, the period in
            examples trained, and `every_epochs` is ignored. Defaults to
            `None`.

    Example:

    >>> from keras_fim.schedules import Geometric, SamplingContext
    >>> schedule = Geometric(16, factor=2, maximum=64)
    >>> [schedule(SamplingContext(epoch=e, epochs=4, step=0, data_pass=e,
    ...           position=0, examples_seen=0, num_examples=100))
    ...  for e in range(4)]
    [16, 32, 64, 64]
    """

    def __init__(
        self,
        initial: int,
        factor: float = 2.0,
        maximum: int | None = None,
        every_epochs: int = 1,
        every_examples: int | None = None,
    ):
        super().__init__(initial, maximum, every_epochs, every_examples)
        self.factor = check_real("factor", factor, 1)

    def __call__(self, context: SamplingContext) -> int:
        return self._capped(
            math.floor(self.initial * self.factor ** self._periods(context)), context
        )

    def get_config(self) -> dict:
        return {**self._period_config(), "factor": self.factor}


class Linear(_PeriodicGrowth):
    """``initial + increment * k`` after ``k`` periods, at most `maximum`.

    A period is `every_epochs` passes over the data, or `every_examples`
    examples trained when that is given.

    Args:
        initial: Integer >= 1, the first batch size.
        increment: Integer >= 1, the size added per period.
        maximum: Integer >= `initial`, or `None` for no maximum other than
            the examples in one pass. Defaults to `None`.
        every_epochs: Integer >= 1, the period in passes over the data (used
            when `every_examples` is `None`). Defaults to `1`.
        every_examples: Integer >= 1 or `None`. When given, the period in
            examples trained, and `every_epochs` is ignored. Defaults to
            `None`.

    Example:

    >>> from keras_fim.schedules import Linear, SamplingContext
    >>> schedule = Linear(16, increment=16, every_examples=200)
    >>> [schedule(SamplingContext(epoch=0, epochs=1, step=0, data_pass=0,
    ...           position=0, examples_seen=n, num_examples=1000))
    ...  for n in (0, 199, 200, 450)]
    [16, 16, 32, 48]
    """

    def __init__(
        self,
        initial: int,
        increment: int,
        maximum: int | None = None,
        every_epochs: int = 1,
        every_examples: int | None = None,
    ):
        super().__init__(initial, maximum, every_epochs, every_examples)
        self.increment = check_size("increment", increment)

    def __call__(self, context: SamplingContext) -> int:
        return self._capped(
            self.initial + self.increment * self._periods(context), context
        )

    def get_config(self) -> dict:
        return {**self._period_config(), "increment": self.increment}


SIGNALS = ("noise_scale", "condition_number")


class Automatic(BatchSizeSchedule):
    """Grows the batch from the Fisher measurements (needs a `FisherCallback`).

    After at least `min_steps` steps and `min_measurements` measurements at
    the current size, the batch is multiplied by `factor` (rounded up to a
    power of two when `powers_of_two`, so that XLA compiles few shapes), up
    to `maximum`, whenever the signal exceeds `threshold`:

    * ``"noise_scale"`` (default): ``B_simple / batch_size``, the smoothed
      gradient noise scale of McCandlish et al. (2018) over the current
      size. Above 1, averaging more examples still reduces the gradient
      noise a lot, so a larger batch is nearly free in steps.
    * ``"condition_number"``: the exponential average of ``c_k``; grow while
      the measured spectrum is worse conditioned than `threshold`.
    * a function ``f(context) -> float | None`` (`None`: no decision yet).

    Args:
        initial: Integer >= 1, the first batch size.
        maximum: Integer >= `initial`, the largest batch size.
        signal: ``"noise_scale"``, ``"condition_number"`` or a function
            ``f(context) -> float | None`` (see above). Defaults to
            `"noise_scale"`.
        threshold: Finite float; grow when the signal is above it. Defaults
            to `1.0`, which suits ``"noise_scale"``.
        factor: Float > 1, the growth factor (the grown size is rounded
            up). Defaults to `2.0`.
        min_steps: Integer >= 1, the fewest steps at the current size before
            it may grow. Defaults to `50`.
        min_measurements: Integer >= 0, the fewest measurements at the
            current size before deciding. Defaults to `1`.
        powers_of_two: Boolean, whether to round grown sizes up to powers of
            two. Defaults to `True`.

    Example:

    >>> from keras_fim.schedules import Automatic, SamplingContext
    >>> grow = Automatic(16, maximum=256, min_steps=10)
    >>> context = SamplingContext(epoch=0, epochs=1, step=30, data_pass=0,
    ...     position=0, examples_seen=0, num_examples=1000, batch_size=16,
    ...     steps_since_change=30, measurements=3, measurements_since_change=3,
    ...     noise_scale=40.0)
    >>> grow(context), grow.signal_value(context)
    (32, 2.5)
    """

    uses_measurements = True

    def __init__(
        self,
        initial: int,
        maximum: int,
        signal: str | Callable[[SamplingContext], float | None] = "noise_scale",
        threshold: float = 1.0,
        factor: float = 2.0,
        min_steps: int = 50,
        min_measurements: int = 1,
        powers_of_two: bool = True,
    ):
        self.initial = check_size("initial", initial)
        self.maximum = check_size("maximum", maximum)
        if self.maximum < self.initial:
            raise ValueError(
                f"`maximum` must be at least `initial` ({self.initial}). Received: maximum={maximum}"
            )
        if not callable(signal) and signal not in SIGNALS:
            raise ValueError(
                f"`signal` must be one of {SIGNALS} or a function. Received: signal={signal!r}"
            )
        self.signal = signal
        self.threshold = check_real("threshold", threshold)
        self.factor = check_real("factor", factor, 1, include_low=False)
        self.min_steps = check_size("min_steps", min_steps)
        self.min_measurements = check_int("min_measurements", min_measurements, 0)
        check_bool("powers_of_two", powers_of_two)
        self.powers_of_two = powers_of_two

    def signal_value(self, context: SamplingContext) -> float | None:
        """The signal compared with `threshold` (`None` while unmeasured)."""
        if callable(self.signal):
            value = self.signal(context)
            return None if value is None else float(value)
        if self.signal == "noise_scale":
            if not context.noise_scale or context.batch_size is None:
                return None
            return context.noise_scale / context.batch_size
        return context.condition_number

    def __call__(self, context: SamplingContext) -> int:
        size = context.batch_size
        if size is None:
            return self.initial
        if (
            size >= self.maximum
            or context.steps_since_change < self.min_steps
            or context.measurements_since_change < self.min_measurements
        ):
            return size
        value = self.signal_value(context)
        if value is None or not value > self.threshold:
            return size
        grown = math.ceil(size * self.factor)
        if self.powers_of_two:
            grown = 2 ** math.ceil(math.log2(grown))
        return min(grown, self.maximum)

    def sizes(self) -> list[int]:
        return [self.initial, self.maximum]

    def get_config(self) -> dict:
        return {
            "initial": self.initial,
            "maximum": self.maximum,
            "signal": self.signal,
            "threshold": self.threshold,
            "factor": self.factor,
            "min_steps": self.min_steps,
            "min_measurements": self.min_measurements,
            "powers_of_two": self.powers_of_two,
        }
