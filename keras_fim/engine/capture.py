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
import threading
from typing import Any

import keras
import tensorflow as tf

from keras_fim._keras_compat import (
    get_keras_mask,
    keras_logits,
    recording_moments,
    set_instance_attribute,
    set_keras_logits,
    set_keras_mask,
    tape_identity,
    unset_instance_attribute,
)


def first_rows(tensor: tf.Tensor, examples) -> tf.Tensor:
    """``tensor[:examples]``, in one graph operation while tracing (`None`
    stays `None`: an output without logits, `differentiable_outputs`).

    A Python slice by a tensor bound adds about ten operations (the packed
    begin, end and strides), and the rules slice every recorded input and
    cotangent: thousands of operations over a network's hundred units,
    each paid in tracing and graph optimisation (issue 15, the first
    `fit`). The bounds are made once per `examples` tensor and rank, in
    that tensor's graph, and kept on it.
    """
    if tensor is None:
        return None
    plain = isinstance(tensor, tf.Tensor) and isinstance(examples, tf.Tensor)
    rank = tensor.shape.rank if plain else None
    if not rank or tf.executing_eagerly():  # ragged, unknown rank, eager
        return tensor[:examples]
    bounds = getattr(examples, "_keras_fim_bounds", None)
    if bounds is None:
        bounds = {}
        examples._keras_fim_bounds = bounds
    if rank not in bounds:
        with examples.graph.as_default():
            end = tf.concat(
                [
                    tf.reshape(tf.cast(examples, tf.int32), [1]),
                    tf.zeros([rank - 1], tf.int32),
                ],
                axis=0,
            )
            bounds[rank] = (tf.zeros([rank], tf.int32), end, tf.ones([rank], tf.int32))
    begin, end, strides = bounds[rank]
    # end_mask: every axis but the first runs to its end
    rows = tf.strided_slice(tensor, begin, end, strides, end_mask=(1 << rank) - 2)
    rows.set_shape(
        [None, *tensor.shape[1:]]
    )  # inference drops it (bounds not constant)
    return rows


@dataclasses.dataclass
class LayerCall:
    """What one call of a unit layer saw during the recorded batch pass.

    Attributes:
        args: Tuple, the positional arguments the layer's `call` received
            (the inputs first).
        kwargs: Dict, the keyword arguments the layer's `call` received
            (`training`, `mask`, ...).
        state: List of tensors, the values of `layer.non_trainable_variables`
            when the call began (BatchNorm statistics, seed state).
        weights: List of tensors, the values of `layer.trainable_variables`
            when the call began.
        outputs: List, the call's floating outputs, flattened, each
            followed by its logits or `None` (`differentiable_outputs`).
        cotangents: List aligned with `outputs` or `None`: the derivative
            of the summed per-example losses with respect to each output
            (16-bit ones in float32; `None` where the output is), filled in
            after the backward pass. Defaults to `None` (not yet known).
        moments: ``(mean, variance)``, the batch statistics a
            `BatchNormalization` normalised the call with in training
            mode, reduced over every axis but its own; `None` otherwise.
    """

    args: tuple
    kwargs: dict[str, Any]
    state: list[tf.Tensor]  # values of layer.non_trainable_variables at call entry
    weights: list[tf.Tensor]  # values of layer.trainable_variables at call entry
    outputs: list  # flat output tensors and logits (see `differentiable_outputs`)
    cotangents: list | None = None  # aligned with `outputs`
    moments: tuple | None = None  # a BatchNormalization's batch statistics


def differentiable_outputs(outputs) -> list:
    """The floating tensors of a layer's output, each followed by its logits
    (`None` for one without: a placeholder of zeros would cost two graph
    operations per output, its own and its cotangent's, for nothing).

    Keras's softmax and sigmoid attach their input as `_keras_logits`, and the
    cross-entropy losses differentiate through that tensor instead of the
    probabilities. Both must be recorded for the cotangents to be complete;
    the logits' cotangent must be that of the loss's direct use of them only
    (see `_separate_logits`).
    """
    flat = []
    for o in keras.tree.flatten(outputs):
        if tf.is_tensor(o) and o.dtype.is_floating:
            flat.append(o)
            flat.append(keras_logits(o))
    return flat


def _separate_logits(outputs) -> None:
    """Gives each output's `_keras_logits` a tensor of its own (an identity).

    The attached logits are the tensor the probabilities were computed
    from, so the derivative of the loss with respect to them is the *total*
    one, through the probabilities too. A rule adds the activation's
    backward pass of the probabilities' cotangent to the logits' cotangent,
    so the latter must be the direct path alone: the one a loss takes when
    it reads `_keras_logits` (a loss that casts the probabilities, or reads
    them itself, takes the other path; both counted would double the
    contributions of a softmax layer).
    """
    for o in keras.tree.flatten(outputs):
        logits = keras_logits(o)
        if tf.is_tensor(o) and o.dtype.is_floating and logits is not None:
            set_keras_logits(o, tf.identity(logits))


def _cotangent_probe(tensor, sink: list, index: int):
    """`tensor` through an identity whose gradient is written to `sink`.

    Placed on a layer's outputs inside someone else's backward pass (Keras's
    own `train_step`), it hands us the cotangent that pass computes anyway.
    """

    def gradient(upstream):
        sink[index] = upstream
        return [upstream]

    return tape_identity(tensor, gradient)


# Which recorders are active, per thread. Under `MirroredStrategy` the
# replicas trace the train step in threads of their own, which take turns
# and switch at every synchronisation point (an all-reduce inside the step):
# a recorder must see the calls of its own replica only, and the wrapper on
# a shared layer must stay in place until the last replica is done with it.
_ACTIVE = threading.local()
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(layer) -> [layer, users]


def _active_recorders() -> list:
    recorders = getattr(_ACTIVE, "recorders", None)
    if recorders is None:
        recorders = _ACTIVE.recorders = []
    return recorders


def _dispatching_call(layer, original):
    """`layer.call` while any recorder covers it: the innermost recorder of
    the calling thread that covers `layer` records the call."""

    def call(*args, **kwargs):
        for recorder in reversed(_active_recorders()):
            if id(layer) in recorder.calls:
                return recorder._record(layer, original, args, kwargs)
        return original(*args, **kwargs)

    return call


class Recorder:
    """Records the calls of `layers` made by this thread while entered.

    With `probe_cotangents`, each recorded output also passes through a
    `_cotangent_probe`, so that any backward pass through the model fills in
    `LayerCall.cotangents` (see `collect_probed_cotangents`).
    """

    def __init__(self, layers, probe_cotangents: bool = False):
        self.layers = layers
        self.probe_cotangents = probe_cotangents
        self.calls: dict[int, list[LayerCall]] = {id(layer): [] for layer in layers}
        self.sinks: list[tuple[LayerCall, list]] = []

    def _probe(self, outputs, call: LayerCall):
        sink = [None] * len(call.outputs)
        self.sinks.append((call, sink))
        probed, position = [], 0
        for o in keras.tree.flatten(outputs):
            if tf.is_tensor(o) and o.dtype.is_floating:
                new = _cotangent_probe(o, sink, position)
                logits = keras_logits(o)
                if logits is not None:
                    set_keras_logits(new, _cotangent_probe(logits, sink, position + 1))
                mask = get_keras_mask(o)
                if mask is not None:
                    set_keras_mask(new, mask)
                probed.append(new)
                position += 2
            else:
                probed.append(o)
        return keras.tree.pack_sequence_as(outputs, probed)

    def _record(self, layer, original, args, kwargs):
        # Read now: outside a stateless scope `v.value` is the variable
        # itself, which the step's update would change under us.
        state = [tf.convert_to_tensor(v.value) for v in layer.non_trainable_variables]
        weights = [tf.convert_to_tensor(v.value) for v in layer.trainable_variables]
        moments = []
        with recording_moments(layer, moments):
            outputs = original(*args, **kwargs)
        if not self.probe_cotangents:  # probes separate the logits themselves
            _separate_logits(outputs)
        call = LayerCall(
            args,
            kwargs,
            state,
            weights,
            differentiable_outputs(outputs),
            moments=moments[0] if len(moments) == 1 else None,
        )
        self.calls[id(layer)].append(call)
        if self.probe_cotangents:
            outputs = self._probe(outputs, call)
        return outputs

    def collect_probed_cotangents(self, scale=None) -> None:
        """Fills `cotangents` from the probes (zeros where none arrived),
        divided by `scale`; 16-bit cotangents become float32 first."""
        for call, sink in self.sinks:
            cotangents = []
            for output, cotangent in zip(call.outputs, sink, strict=True):
                if output is None:  # no logits
                    cotangents.append(None)
                    continue
                if cotangent is None:  # an output the loss does not reach
                    cotangents.append(tf.zeros_like(_widened(output)))
                    continue
                cotangent = _widened(tf.convert_to_tensor(cotangent))
                if scale is not None:
                    cotangent = cotangent / tf.cast(scale, cotangent.dtype)
                cotangents.append(cotangent)
            call.cotangents = cotangents

    def __enter__(self):
        with _INSTALL_LOCK:
            for layer in self.layers:
                entry = _INSTALLED.get(id(layer))
                if entry is None:
                    # A plain instance attribute, invisible
                    # to Keras's attribute tracking; removed by the last user.
                    set_instance_attribute(
                        layer, "call", _dispatching_call(layer, layer.call)
                    )
                    entry = _INSTALLED[id(layer)] = [layer, 0]
                entry[1] += 1
        _active_recorders().append(self)
        return self

    def __exit__(self, *exc):
        recorders = _active_recorders()
        if self in recorders:
            del recorders[len(recorders) - 1 - recorders[::-1].index(self)]
        with _INSTALL_LOCK:
            for layer in self.layers:
                entry = _INSTALLED[id(layer)]
                entry[1] -= 1
                if entry[1] == 0:
                    del _INSTALLED[id(layer)]
                    unset_instance_attribute(layer, "call")
        return False


def _unscaled(gradient, loss_scale):
    """`gradient` widened (`_widened`) and divided by `loss_scale`."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            _unscaled(gradient.values, loss_scale),
            gradient.indices,
            gradient.dense_shape,
        )
    gradient = _widened(tf.convert_to_tensor(gradient))
    if loss_scale is None:
        return gradient
    return gradient / tf.cast(loss_scale, gradient.dtype)


def _widened(tensor):
    """16-bit floating tensors as float32 (per-example products and their
    sums are formed in float32 under mixed precision); others unchanged."""
    if tensor.dtype.is_floating and tensor.dtype.size < 4:
        return tf.cast(tensor, tf.float32)
    return tensor


@dataclasses.dataclass
class BatchPass:
    """Result of `record_batch_pass`."""

    calls: dict[int, list[LayerCall]]
    variable_values: tuple[list, list]  # (trainable, non_trainable) run with
    losses: tf.Tensor  # the per-example losses, (batch,)


def record_batch_pass(
    model: keras.Model,
    units: list,
    batch_losses,
    variable_values: tuple | None = None,
    loss_scale=None,
) -> BatchPass:
    """Runs the batch forward/backward once, recording every unit's calls.

    `batch_losses(trainable, non_trainable)` runs the forward pass with
    those variable values (statelessly) and returns the per-example losses,
    shaped ``(batch,)`` (`keras_fim.engine.record`). `variable_values`: the
    ``(trainable, non_trainable)`` values to run with (read now if `None`).
    `loss_scale`: a factor the summed loss is multiplied by before
    differentiating and the results are divided by again in float32, as
    Keras's loss scaling does under ``mixed_float16`` (16-bit cotangents
    then neither underflow nor, with the optimizer's own scale, overflow
    more than the training step's). Cotangents of 16-bit tensors are
    returned in float32. Only the layers' cotangents are computed, not the
    weights' gradient.
    """
    if variable_values is None:
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
    else:
        trainable, non_trainable = (list(values) for values in variable_values)
    recorder = Recorder(units)
    with tf.GradientTape() as tape:
        # Watched so that the ops reading them are recorded; their own
        # gradient is never asked for.
        tape.watch(trainable)
        with recorder:
            losses = batch_losses(trainable, non_trainable)
        total = tf.reduce_sum(losses)
        if loss_scale is not None:
            total = total * tf.cast(loss_scale, total.dtype)
    records = [call for calls in recorder.calls.values() for call in calls]
    flat_outputs = [o for call in records for o in call.outputs if o is not None]
    cotangents = iter(
        tape.gradient(
            total, flat_outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    )
    for call in records:
        call.cotangents = [
            None if o is None else _unscaled(next(cotangents), loss_scale)
            for o in call.outputs
        ]
    return BatchPass(recorder.calls, (trainable, non_trainable), losses)


def dense_gradient(gradient, like) -> tf.Tensor:
    """`gradient` as a dense tensor shaped like `like` (a variable or its
    value): an Embedding's `IndexedSlices` is summed into its rows by index
    (`tf.math.unsorted_segment_sum`), with the static row count, rather
    than converted with an unknown shape (which TensorFlow warns about)."""
    if isinstance(gradient, tf.IndexedSlices):
        rows = like.shape[0]
        values = tf.reshape(gradient.values, [-1, *like.shape[1:]])
        return tf.math.unsorted_segment_sum(values, gradient.indices, rows)
    return gradient
