"""One batch forward/backward pass that records what the layer rules need.

For every *unit* (a layer whose weights one rule handles) and every time it is
called, we keep the call's arguments, the values of its non-trainable
variables at that moment (BatchNorm statistics, dropout seed state) and, after
the backward pass, the cotangent of its outputs: the derivative of the summed
per-example losses with respect to each output. An example's contribution to
the mini-batch gradient at a layer is the vector-Jacobian product of that
example's output rows with that example's cotangent rows (METHOD.md), so these
records are all a rule needs, and batch-coupled layers (BatchNorm in training
mode) come out exact.

The forward pass runs through `stateless_call`: measuring never writes to the
model's variables (moving statistics, seed generators stay untouched).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf


@dataclasses.dataclass
class LayerCall:
    """What one call of a unit layer saw during the recorded batch pass."""

    args: tuple
    kwargs: dict
    state: list  # values of layer.non_trainable_variables at call entry
    outputs: list  # flat list of output tensors (see `differentiable_outputs`)
    cotangents: list | None = None  # aligned with `outputs`


def differentiable_outputs(outputs) -> list:
    """The floating tensors of a layer's output, each followed by its logits.

    Keras's softmax and sigmoid attach their input as `_keras_logits`, and the
    cross-entropy losses differentiate through that tensor instead of the
    probabilities. Both must be recorded for the cotangents to be complete.
    """
    flat = []
    for o in keras.tree.flatten(outputs):
        if tf.is_tensor(o) and o.dtype.is_floating:
            flat.append(o)
            logits = getattr(o, "_keras_logits", None)
            flat.append(logits if tf.is_tensor(logits) else tf.zeros_like(o))
    return flat


class _Recorder:
    """Replaces `layer.call` by a recording wrapper for the pass's duration."""

    def __init__(self, layers):
        self.layers = layers
        self.calls: dict[int, list[LayerCall]] = {id(l): [] for l in layers}

    def _wrap(self, layer):
        original = layer.call
        records = self.calls[id(layer)]

        def recording_call(*args, **kwargs):
            state = [v.value for v in layer.non_trainable_variables]
            outputs = original(*args, **kwargs)
            records.append(
                LayerCall(args, kwargs, state, differentiable_outputs(outputs))
            )
            return outputs

        return recording_call

    def __enter__(self):
        for layer in self.layers:
            # object.__setattr__: a plain instance attribute, invisible to
            # Keras's attribute tracking; removed again in __exit__.
            object.__setattr__(layer, "call", self._wrap(layer))
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            object.__delattr__(layer, "call")
        return False


@dataclasses.dataclass
class BatchPass:
    """Result of `record_batch_pass`."""

    per_example_loss: tf.Tensor  # (batch,)
    calls: dict[int, list[LayerCall]]
    batch_gradient: list  # d(sum_i l_i)/d(theta), aligned with trainable vars


def record_batch_pass(
    model: keras.Model,
    units: list,
    x: Any,
    y: Any,
    sample_weight: Any,
    loss_fn,
    training: bool = True,
) -> BatchPass:
    """Runs the batch forward/backward once, recording every unit's calls."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    recorder = _Recorder(units)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trainable)
        with recorder:
            kwargs = {"training": training} if model._call_has_training_arg else {}
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, **kwargs)
        losses = loss_fn(model, y, y_pred, sample_weight)
        total = tf.reduce_sum(losses)
    outputs = [call.outputs for records in recorder.calls.values() for call in records]
    flat_outputs = [o for group in outputs for o in group]
    grads = tape.gradient(
        total,
        flat_outputs + trainable,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    del tape
    cotangents, batch_gradient = grads[: len(flat_outputs)], grads[len(flat_outputs) :]
    position = 0
    for records in recorder.calls.values():
        for call in records:
            n = len(call.outputs)
            call.cotangents = cotangents[position : position + n]
            position += n
    return BatchPass(losses, recorder.calls, batch_gradient)
