"""One measurement: from a recorded pass to what `FisherCallback` records.

Every measurement takes the same way, whoever asks (`keras_fim.measure`,
`FisherCallback` on one device or under a distribution strategy):

1. a `keras_fim.engine.record.RecordedPass` (a pass of keras-fim's own, or
   the training step's own, `keras_fim.engine.probes.ProbedPass`);
2. a *Gram source* turns it into per-unit blocks of ``G = J J^T`` (the
   local batch's, `local_grams`, or the global batch's gathered from every
   replica, `keras_fim.engine.distribute.gathered_grams`);
3. `grams_of_pass` sums the blocks and takes the gradient-noise components
   from a *noise source* (`keras_fim.engine.noise`); `measure_grams` solves
   the spectrum with the zero threshold of the contributions' precision
   (Liao et al. 2020; METHOD.md: ``e = sqrt(eig(J J^T))``, ``c_k = max(e) /
   min(e > 0)``). `measure_pass` is the two in turn; a step compiled by XLA
   runs the first inside and the second outside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from keras_fim.engine.gram import grams_from_calls, sum_blocks
from keras_fim.engine.record import RecordedPass
from keras_fim.measurements import FisherMeasurement, spectrum_from_gram, unit_roundoff

GramSource = Callable[[RecordedPass], dict]
"""``grams(record) -> {unit name: (B, B) block}``."""

NoiseSource = Callable[[tf.Tensor], tuple]
"""``noise(gram) -> (tr(Sigma), |G|^2)`` estimates (float64 scalars)."""


@dataclasses.dataclass
class Measured:
    """What one measured batch gives.

    Attributes:
        measurement: The batch's `FisherMeasurement`.
        noise_components: ``(tr(Sigma), |G|^2)``, McCandlish et al.'s
            unbiased estimates (NaN without a noise source).
        layers: ``{unit name: FisherMeasurement}``, each unit's own
            spectrum, with `per_layer` (empty otherwise).
    """

    measurement: FisherMeasurement
    noise_components: tuple
    layers: dict


def local_grams(
    memory_budget: float | None = None, fail_mode: str = "error"
) -> GramSource:
    """The Gram source of one device: the recorded batch's own blocks
    (`memory_budget`, `fail_mode`: as `keras_fim.engine.gram.grams_from_calls`)."""

    def grams(record: RecordedPass) -> dict:
        return grams_from_calls(
            record.units, record.calls, record.examples, memory_budget, fail_mode
        )[0]

    return grams


def contribution_precision(units) -> float:
    """The unit round-off of the least precise dtype the units compute in:
    the relative precision their contributions carry (float32's eps for a
    float32 model, float16's under ``mixed_float16``)."""
    dtypes = {layer.compute_dtype for layer, _ in units} or {"float32"}
    return max(unit_roundoff(dtype) for dtype in dtypes)


class PassGrams(NamedTuple):
    """The part of a measurement before the eigen-solve: what
    `grams_of_pass` forms from a recorded pass (a tuple, so that a traced
    function can return it).

    Attributes:
        gram: The ``(B, B)`` float64 Gram matrix, the sum of the blocks.
        blocks: ``{unit name: (B, B) block}`` with `per_layer`, else empty.
        noise_components: ``(tr(Sigma), |G|^2)`` (NaN without a noise
            source).
        precision: Float, the contributions' unit round-off
            (`contribution_precision`).
    """

    gram: tf.Tensor
    blocks: dict
    noise_components: tuple
    precision: float


def grams_of_pass(
    record: RecordedPass,
    *,
    grams: GramSource | None = None,
    noise: NoiseSource | None = None,
    per_layer: bool = False,
) -> PassGrams:
    """The Gram matrix of a recorded pass and what comes from it without
    an eigen-solve (arguments as `measure_pass`'s)."""
    blocks = (local_grams() if grams is None else grams)(record)
    if record.valid is not True:
        # A NaN block gives an all-NaN measurement, counted as skipped.
        blocks = {
            name: tf.where(record.valid, block, tf.constant(float("nan"), block.dtype))
            for name, block in blocks.items()
        }
    gram = sum_blocks(blocks)
    if noise is None:
        nan = tf.constant(float("nan"), tf.float64)
        components = (nan, nan)
    else:
        components = noise(gram)
    return PassGrams(
        gram,
        blocks if per_layer else {},
        components,
        contribution_precision(record.units),
    )


def measure_grams(grams: PassGrams, zero_threshold: float | None = None) -> Measured:
    """The measurement of `grams`: the eigen-solves (`zero_threshold` as in
    `measure_pass`). Kept apart from `grams_of_pass` so that a step compiled
    by XLA can solve outside it (XLA's eigen-solver is far slower)."""
    precision = grams.precision
    measurement = spectrum_from_gram(grams.gram, zero_threshold, precision)
    layers = {
        name: spectrum_from_gram(block, zero_threshold, precision)
        for name, block in grams.blocks.items()
    }
    return Measured(measurement, grams.noise_components, layers)


def measure_pass(
    record: RecordedPass,
    *,
    grams: GramSource | None = None,
    noise: NoiseSource | None = None,
    zero_threshold: float | None = None,
    per_layer: bool = False,
) -> Measured:
    """The measurement of a recorded pass.

    Args:
        record: The `RecordedPass`.
        grams: Where the Gram blocks come from; `None` means `local_grams()`.
        noise: Where the noise components come from; `None` leaves them NaN.
        zero_threshold: As in `keras_fim.measurements.spectrum_from_gram`;
            `None` derives it from `contribution_precision`.
        per_layer: Boolean, also each unit's own spectrum.

    Returns:
        A `Measured`. Works eagerly and in a traced step.
    """
    formed = grams_of_pass(record, grams=grams, noise=noise, per_layer=per_layer)
    return measure_grams(formed, zero_threshold)
