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
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_fim._keras_compat import call_has_training_arg
from keras_fim.engine.capture import LayerCall, record_batch_pass
from keras_fim.engine.losses import per_example_losses
from keras_fim.engine.scaling import pass_loss_factor
from keras_fim.engine.units import (
    Unit,
    batch_size,
    find_units,
    is_coupled,
    read_variables,
    resolve_layers,
)
from keras_fim.validation import check_int

PerExampleLoss = Callable[[keras.Model, Any, Any, Any], tf.Tensor]
"""``per_example_loss(model, x, y, sample_weight) -> (batch,) losses``: the
loss of each example of a batch, whose sum's gradient a custom training step
follows (`keras_fim.FisherCallback`'s `per_example_loss`)."""


@dataclasses.dataclass
class RecordedPass:
    """One recorded batch pass.

    Attributes:
        units: The `keras_fim.engine.units.Unit`s recorded.
        calls: ``id(layer) -> [LayerCall, ...]``, every call of each unit.
        examples: Int32 scalar tensor, the number of examples measured (the
            first ones of the batch).
        variable_values: ``(trainable, non_trainable)`` values the pass ran
            with (for measurements that need passes of their own), or
            `None` where they were not read (`ProbedPass`).
        valid: Boolean (or boolean tensor): whether the record describes
            the batch's examples row by row. A pass through a user's
            per-example loss is not when a recorded layer call, or the
            losses, have another number of rows than the batch
            (`record_pass`); its Gram blocks are then NaN
            (`keras_fim.engine.pipeline.measure_pass`), so a measurement
            that `FisherCallback` records counts as skipped.
    """

    units: list[Unit]
    calls: dict[int, list[LayerCall]]
    examples: tf.Tensor
    variable_values: tuple[list, list] | None
    valid: tf.Tensor | bool = True

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
    per_example_loss: PerExampleLoss | None = None,
    measured_layers: list | None = None,
) -> RecordedPass:
    """A batch pass of its own (stateless: no variable is written).

    Args:
        model: A built, compiled `keras.Model` (any model whose
            `per_example_loss` runs, with one).
        x, y, sample_weight: One batch, as `model.fit` takes it (as the
            model's `train_step` receives it, with `per_example_loss`).
        max_examples: Integer or `None`, measure only the first ones.
        training: Boolean, the mode of the pass (of the compiled loss's
            forward pass; `per_example_loss` chooses its own).
        variable_values: ``(trainable, non_trainable)`` values to run with
            (read now if `None`).
        registry: A `keras_fim.engine.rules.RuleRegistry` (the process-wide
            one if `None`).
        per_example_loss: `None` (the compiled loss, per example, of
            ``model(x)``) or a function ``(model, x, y, sample_weight) ->
            (batch,) losses`` (`per_example_loss_pass`).
        measured_layers: Layers of `model` (or their names) whose weights
            make up ``J``; `None`: all of them.
    """
    check_int("max_examples", max_examples, 1, allow_none=True)
    layers = resolve_layers(model, measured_layers)
    if per_example_loss is not None:
        return per_example_loss_pass(
            model,
            per_example_loss,
            x,
            y,
            sample_weight,
            max_examples=max_examples,
            variable_values=variable_values,
            registry=registry,
            layers=layers,
        )
    if not model.built:
        raise ValueError(
            "keras-fim needs a built model (call it on data or train it first). "
            f"Received: model={model.name!r} with built=False."
        )
    units = find_units(model, registry, layers)
    kwargs = {"training": training} if call_has_training_arg(model) else {}

    def batch_losses(trainable, non_trainable):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, **kwargs)
        return per_example_losses(model, y, y_pred, sample_weight)

    batch_pass = record_batch_pass(
        model,
        [unit.layer for unit in units],
        batch_losses,
        variable_values=variable_values,
        loss_scale=pass_loss_factor(model, batch_size(x)),
    )
    return RecordedPass(
        units,
        batch_pass.calls,
        measured_examples(x, max_examples),
        batch_pass.variable_values,
    )


def per_example_loss_pass(
    model: keras.Model,
    per_example_loss: PerExampleLoss,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    variable_values: tuple | None = None,
    registry=None,
    layers: list | None = None,
) -> RecordedPass:
    """A batch pass through a user's per-example loss (stateless).

    ``per_example_loss(model, x, y, sample_weight)`` runs inside a
    `keras.StatelessScope` mapping the model's variables to
    `variable_values`: it reads those values, and nothing it writes
    (BatchNorm statistics, seed generators, any Keras variable) reaches the
    model. It may call the model or any of its layers, in any mode, and
    must return a vector with one loss per example of the batch (the
    leading dimension of `x`), the gradient of whose sum is what is split
    per example. Only the units it calls are recorded (within `layers`),
    and each must be called on rows that belong to the batch's examples in
    order; otherwise the record is not `valid` (and, run eagerly, this
    raises `ValueError`).
    """
    if not model.trainable_variables:
        raise ValueError(
            "keras-fim needs a model whose weights exist (call it on data or "
            f"train it first). Received: model={model.name!r} without "
            "trainable weights."
        )
    if variable_values is None:
        variable_values = read_variables(model)
    candidates = find_units(model, registry, layers)
    examples = batch_size(x)

    def batch_losses(trainable, non_trainable):
        mapping = [
            *zip(model.trainable_variables, trainable, strict=True),
            *zip(model.non_trainable_variables, non_trainable, strict=True),
        ]
        with keras.StatelessScope(state_mapping=mapping):
            losses = per_example_loss(model, x, y, sample_weight)
        return _checked_losses(losses)

    batch_pass = record_batch_pass(
        model,
        [unit.layer for unit in candidates],
        batch_losses,
        variable_values=variable_values,
        loss_scale=pass_loss_factor(model, examples),
    )
    units = [unit for unit in candidates if batch_pass.calls[id(unit.layer)]]
    if not units:
        measured = "" if layers is None else " among `measured_layers`"
        raise ValueError(
            "`per_example_loss` must call layers with trainable weights of "
            f"the model{measured}: their weights are what is measured. "
            f"Received: per_example_loss={per_example_loss!r}, which called "
            f"none of those of model {model.name!r}."
        )
    calls = {id(unit.layer): batch_pass.calls[id(unit.layer)] for unit in units}
    rows = [tf.shape(batch_pass.losses)[0]] + [
        tf.shape(output)[0]
        for unit_calls in calls.values()
        for call in unit_calls
        for output in call.outputs
        if output is not None and output.shape.rank != 0
    ]
    valid = tf.reduce_all([tf.equal(r, examples) for r in rows])
    if tf.executing_eagerly() and not bool(valid):
        raise ValueError(
            "`per_example_loss` must return one loss per example of the "
            "batch and call the measured layers on rows of the batch's "
            f"examples in order. Received: a batch of {int(examples)} "
            f"examples, and losses or layer calls with {sorted({int(r) for r in rows})} "
            "rows."
        )
    # Never more rows than any call holds: a pass that is not valid must
    # still build (its blocks are then NaN), not fail when it runs.
    measured = tf.reduce_min([*rows, examples])
    if max_examples is not None:
        measured = tf.minimum(measured, max_examples)
    return RecordedPass(units, calls, measured, batch_pass.variable_values, valid)


def _checked_losses(losses) -> tf.Tensor:
    losses = tf.convert_to_tensor(losses)
    if losses.shape.rank != 1 or not losses.dtype.is_floating:
        raise ValueError(
            "`per_example_loss` must return a floating vector, one loss per "
            "example of the batch, shaped (batch,). Received: a tensor of "
            f"shape {losses.shape} and dtype {losses.dtype.name}."
        )
    return losses
