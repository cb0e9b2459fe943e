"""A recorded batch pass: what every measurement is computed from.

`RecordedPass` is the typed record of one batch forward/backward pass: the
units, every call each one made (inputs, state, weights, output cotangents:
`keras_fim.engine.capture.LayerCall`), how many examples are measured, and
the variable values the pass ran with. It comes from a pass of keras-fim's
own (`record_pass`, stateless, in training mode) or from the training step's
own pass (`keras_fim.engine.probes.ProbedPass`); `keras_fim.engine.pipeline`
turns either into a measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf

from keras_fim.engine.capture import LayerCall, record_batch_pass
from keras_fim.engine.losses import per_example_losses
from keras_fim.engine.scaling import pass_loss_factor
from keras_fim.engine.units import Unit, batch_size, find_units, is_coupled
from keras_fim.validation import check_int


@dataclasses.dataclass
class RecordedPass:
    """One recorded batch pass.

    Attributes:
        units: The `keras_fim.engine.units.Unit`s recorded.
        calls: ``id(layer) -> [LayerCall, ...]``, every call of each unit.
        examples: Int32 scalar tensor, the number of examples measured (the
            first ones of the batch).
        variable_values: ``(trainable, non_trainable)`` values the pass ran
            with (for measurements that need passes of their own).
    """

    units: list[Unit]
    calls: dict[int, list[LayerCall]]
    examples: tf.Tensor
    variable_values: tuple[list, list]

    @property
    def coupled(self) -> bool:
        """Whether a unit may mix examples (BatchNorm in training mode, the
        generic rule): half batches must then be run for real."""
        return any(is_coupled(unit) for unit in self.units)


def measured_examples(x: Any, max_examples: int | None) -> tf.Tensor:
    """How many of the batch's examples are measured."""
    examples = batch_size(x)
    return examples if max_examples is None else tf.minimum(examples, max_examples)


def record_pass(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    training: bool = True,
    variable_values: tuple | None = None,
    registry=None,
) -> RecordedPass:
    """A batch pass of its own (stateless: no variable is written).

    Args:
        model: A built, compiled `keras.Model`.
        x, y, sample_weight: One batch, as `model.fit` takes it.
        max_examples: Integer or `None`, measure only the first ones.
        training: Boolean, the mode of the pass.
        variable_values: ``(trainable, non_trainable)`` values to run with
            (read now if `None`).
        registry: A `keras_fim.engine.rules.RuleRegistry` (the process-wide
            one if `None`).
    """
    if not model.built:
        raise ValueError(
            "keras-fim needs a built model (call it on data or train it first). "
            f"Received: model={model.name!r} with built=False."
        )
    check_int("max_examples", max_examples, 1, allow_none=True)
    units = find_units(model, registry)
    batch_pass = record_batch_pass(
        model,
        [unit.layer for unit in units],
        x,
        y,
        sample_weight,
        per_example_losses,
        training=training,
        variable_values=variable_values,
        loss_scale=pass_loss_factor(model, batch_size(x)),
    )
    return RecordedPass(
        units,
        batch_pass.calls,
        measured_examples(x, max_examples),
        batch_pass.variable_values,
    )
