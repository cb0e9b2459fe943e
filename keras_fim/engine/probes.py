"""Measuring from the training step's own forward and backward pass.

`ProbedPass` records the calls of the model's next forward pass and, through
identity operations whose gradient is recorded (`capture._cotangent_probe`),
the cotangents of the training step's own backward pass: no second pass.
Keras's step differentiates ``s / (R N) sum_i l_i`` (plus weight
regularisation, which no layer output sees); its cotangents divided by that
factor (`keras_fim.engine.scaling.training_loss_factor`) are those of the
per-example losses. `reuses_training_pass` says where this is exact.
"""

from __future__ import annotations

import keras

from keras_fim._keras_compat import (
    compile_loss,
    flatten_layers,
    is_keras_loss_computation,
    is_keras_train_step,
)
from keras_fim.engine import capture
from keras_fim.engine.losses import keras_losses_only, reduction_kinds
from keras_fim.engine.record import RecordedPass, measured_examples
from keras_fim.engine.scaling import training_loss_factor
from keras_fim.engine.units import batch_size, find_units, read_variables


def reuses_training_pass(model: keras.Model, step) -> bool:
    """Whether `ProbedPass` is exact around `step`: Keras's own train step,
    loss computation and losses, one kind of loss reduction (so that the
    training loss is the sum of per-example losses times one factor), and no
    activity regulariser (whose loss would add to the layers' cotangents).
    """
    kinds = reduction_kinds(model)
    return (
        is_keras_train_step(step)
        and is_keras_loss_computation(type(model))
        and model.optimizer is not None
        and compile_loss(model) is not None
        and keras_losses_only(model)
        and len(kinds) == 1
        and kinds <= {"mean", "sum"}
        and not any(
            getattr(layer, "activity_regularizer", None) is not None
            for layer in flatten_layers(model, include_self=True, recursive=True)
        )
    )


class ProbedPass:
    """Records the calls of the model's next forward pass, and the
    cotangents of the training step's own backward pass through them.

    Usage (inside the compiled step): ``with probe: logs = step(data)``,
    then ``probe.recorded()``, a `keras_fim.engine.record.RecordedPass`.
    With `read_values`, the record also holds the variables as the step
    found them (`RecordedPass.variable_values`: what passes of their own
    need, such as the noise passes); without, `None`, and nothing is read.
    """

    def __init__(
        self, model, x, max_examples=None, registry=None, layers=None, read_values=True
    ):
        if not model.built:
            raise ValueError("ProbedPass needs a built model.")
        self.units = find_units(model, registry, layers)
        self._recorder = capture.Recorder(
            [unit.layer for unit in self.units], probe_cotangents=True
        )
        # Read now, before the step updates the loss scale.
        self.factor = training_loss_factor(model, batch_size(x))
        self.examples = measured_examples(x, max_examples)
        # For measurements that need passes of their own (the half batches of
        # a coupled model): the variables as the step found them. A read of
        # every variable, a few hundred graph operations: only when asked.
        self.variable_values = read_variables(model) if read_values else None

    def __enter__(self):
        self._recorder.__enter__()
        return self

    def __exit__(self, *exc):
        return self._recorder.__exit__(*exc)

    def recorded(self) -> RecordedPass:
        """The pass the step ran, with its cotangents unscaled."""
        self._recorder.collect_probed_cotangents(self.factor)
        return RecordedPass(
            self.units, self._recorder.calls, self.examples, self.variable_values
        )
