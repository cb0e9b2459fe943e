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
    weights: list  # values of layer.trainable_variables at call entry
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


def _cotangent_probe(tensor, sink: list, index: int):
    """`tensor` through an identity whose gradient is written to `sink`.

    Placed on a layer's outputs inside someone else's backward pass (Keras's
    own `train_step`), it hands us the cotangent that pass computes anyway.
    """

    @tf.custom_gradient
    def identity(t):
        def gradient(upstream):
            sink[index] = upstream
            return upstream

        return tf.identity(t), gradient

    return identity(tensor)


class _Recorder:
    """Replaces `layer.call` by a recording wrapper for the pass's duration.

    With `probe_cotangents`, each recorded output also passes through a
    `_cotangent_probe`, so that any backward pass through the model fills in
    `LayerCall.cotangents` (see `recording_train_step`).
    """

    def __init__(self, layers, probe_cotangents: bool = False):
        self.layers = layers
        self.probe_cotangents = probe_cotangents
        self.calls: dict[int, list[LayerCall]] = {id(l): [] for l in layers}
        self.sinks: list[tuple[LayerCall, list]] = []

    def _probe(self, outputs, call: LayerCall):
        sink = [None] * len(call.outputs)
        self.sinks.append((call, sink))
        probed, position = [], 0
        for o in keras.tree.flatten(outputs):
            if tf.is_tensor(o) and o.dtype.is_floating:
                new = _cotangent_probe(o, sink, position)
                logits = getattr(o, "_keras_logits", None)
                if tf.is_tensor(logits):
                    new._keras_logits = _cotangent_probe(logits, sink, position + 1)
                mask = getattr(o, "_keras_mask", None)
                if mask is not None:
                    new._keras_mask = mask
                probed.append(new)
                position += 2
            else:
                probed.append(o)
        return keras.tree.pack_sequence_as(outputs, probed)

    def _wrap(self, layer):
        original = layer.call
        records = self.calls[id(layer)]

        def recording_call(*args, **kwargs):
            # Read now: outside a stateless scope `v.value` is the variable
            # itself, which the step's update would change under us.
            state = [
                tf.convert_to_tensor(v.value) for v in layer.non_trainable_variables
            ]
            weights = [tf.convert_to_tensor(v.value) for v in layer.trainable_variables]
            outputs = original(*args, **kwargs)
            call = LayerCall(
                args, kwargs, state, weights, differentiable_outputs(outputs)
            )
            records.append(call)
            if self.probe_cotangents:
                outputs = self._probe(outputs, call)
            return outputs

        return recording_call

    def collect_probed_cotangents(self, scale=None) -> None:
        """Fills `cotangents` from the probes (zeros where none arrived),
        divided by `scale`."""
        for call, sink in self.sinks:
            cotangents = []
            for output, cotangent in zip(call.outputs, sink, strict=True):
                if cotangent is None:
                    cotangents.append(tf.zeros_like(output))
                    continue
                cotangent = tf.convert_to_tensor(cotangent)
                if scale is not None:
                    dtype = tf.float32 if cotangent.dtype.size < 4 else cotangent.dtype
                    cotangent = tf.cast(cotangent, dtype) / tf.cast(scale, dtype)
                cotangents.append(cotangent)
            call.cotangents = cotangents

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
