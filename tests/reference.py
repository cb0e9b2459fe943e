"""Independent brute-force references for the Fisher engine tests.

Nothing here imports `keras_fim`. Four references:

* `loop_per_example_gradients`: one `GradientTape` per example, over the model
  called on that example alone, with an explicitly built per-example loss.
  Valid for models whose examples never interact (no batch statistics, no
  dropout).
* `loop_objective_gradients`: the same loop for any objective (a custom
  training step's), given as each example's loss.
* `copies_per_example_gradients`: for small Sequential models with
  BatchNormalization in training mode. The forward pass is written by hand in
  float64 with every weight tiled into one copy per example; the gradient of
  the summed loss with respect to copy ``i`` is example ``i``'s contribution
  to the batch backward pass (BN statistics over the whole batch).
* `numpy_measurements`: every `FisherMeasurement` field from a float64 ``J``.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf


def _slice(structure, i):
    return keras.tree.map_structure(lambda t: t[i : i + 1], structure)


def _batch_size(x):
    return int(np.shape(keras.tree.flatten(x)[0])[0])


def _keys(loss):
    if isinstance(loss, dict):
        return list(loss.keys())
    if isinstance(loss, (list, tuple)):
        return list(range(len(loss)))
    return [None]


def _pick(structure, key):
    return structure if key is None else structure[key]


def example_loss(loss, y_true, y_pred, sample_weight, i, loss_weights=None):
    """Example ``i``'s loss, from unreduced loss callables.

    `loss` is a callable ``(y_true, y_pred) -> unreduced values`` (or a
    dict/list of them, aligned with the model outputs). `y_true` and `y_pred`
    hold only example ``i`` (batch dimension 1); `sample_weight` holds the
    whole batch (a ``(B,)`` array, or a dict/list of them per output).
    """
    total = tf.constant(0.0, tf.float64)
    for key in _keys(loss):
        fn = _pick(loss, key)
        values = fn(_pick(y_true, key), _pick(y_pred, key))
        values = tf.cast(tf.reshape(values, [-1]), tf.float64)
        value = tf.reduce_mean(values)  # mean over this example's elements
        if sample_weight is not None:
            weights = (
                _pick(sample_weight, key)
                if isinstance(sample_weight, (dict, list, tuple))
                else sample_weight
            )
            value = value * float(np.asarray(weights, np.float64).reshape(-1)[i])
        if loss_weights is not None:
            value = value * float(_pick(loss_weights, key))
        total = total + value
    return total


def loop_per_example_gradients(
    model, x, y, sample_weight=None, *, loss=None, loss_weights=None
):
    """Per-example gradients by a Python loop, one tape per example.

    Args:
        model: A built Keras model without cross-example interaction.
        x, y: One batch (arrays, or dicts/lists of arrays).
        sample_weight: ``(B,)`` array, or a dict/list of them per output.
        loss: Unreduced loss callable(s); defaults to sparse categorical
            cross-entropy on probabilities.
        loss_weights: Optional weight per output (same structure as `loss`).

    Returns:
        A list aligned with `model.trainable_variables` of float64 arrays
        shaped ``(B, *variable.shape)``.
    """
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def one_example(i):
        y_pred = model(_slice(x, i), training=False)
        return example_loss(loss, _slice(y, i), y_pred, sample_weight, i, loss_weights)

    return loop_objective_gradients(
        one_example, model.trainable_variables, _batch_size(x)
    )


def loop_objective_gradients(example_loss, variables, batch_size):
    """Per-example gradients of any objective by a Python loop.

    `example_loss(i)` computes example ``i``'s loss (a scalar) from that
    example alone, as a custom training step defines it; one tape per
    example. Returns a list aligned with `variables` of float64 arrays shaped
    ``(B, *variable.shape)`` (zeros where the loss does not depend on one).
    """
    rows = []
    for i in range(batch_size):
        with tf.GradientTape() as tape:
            value = example_loss(i)
        grads = tape.gradient(value, variables)
        rows.append(
            [
                np.zeros(v.shape, np.float64)
                if g is None
                else np.asarray(tf.convert_to_tensor(g), np.float64)
                for v, g in zip(variables, grads, strict=True)
            ]
        )
    return [np.stack([r[k] for r in rows]) for k in range(len(variables))]


# --------------------------------------------------------------------------
# Per-example weight copies (BatchNorm models).


def _activation(name, h):
    if name in (None, "linear"):
        return h
    if name == "relu":
        return tf.nn.relu(h)
    if name == "tanh":
        return tf.tanh(h)
    raise NotImplementedError(name)


def _activation_name(layer):
    act = getattr(layer, "activation", None)
    return None if act is None else getattr(act, "__name__", str(act))


def copies_per_example_gradients(model, x, y, sample_weight=None):
    """Example contributions of a Sequential BN model, by per-example copies.

    Supports a Sequential stack of Dense (2-D input), Conv2D (channels_last,
    one group), BatchNormalization (training mode, last axis, center and
    scale), ReLU / Activation("relu"), GlobalAveragePooling2D and Flatten,
    ending with a Dense with softmax; the loss is sparse categorical
    cross-entropy (mean over the batch), times `sample_weight`.

    Every weight ``w`` becomes a tensor ``(B, *w.shape)`` of identical
    copies; example ``i`` uses copy ``i`` (BatchNorm statistics are those of
    the whole batch). ``d(sum_i l_i) / d(copy_i)`` is example ``i``'s
    contribution. Everything in float64.

    Returns:
        A list aligned with `model.trainable_variables`, float64 arrays.
    """
    batch = _batch_size(x)
    copies = {}
    for v in model.trainable_variables:
        value = tf.constant(np.asarray(v.numpy(), np.float64))
        copies[id(v)] = tf.tile(value[None], [batch] + [1] * len(v.shape))
    watched = list(copies.values())
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    with tf.GradientTape() as tape:
        tape.watch(watched)
        h = tf.constant(np.asarray(x, np.float64))
        logits = None
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dense):
                w = copies[id(layer.kernel)]
                z = tf.einsum("bi,bio->bo", h, w)
                if layer.use_bias:
                    z = z + copies[id(layer.bias)]
                name = _activation_name(layer)
                if name == "softmax":
                    logits = z
                    h = tf.nn.softmax(z)
                else:
                    h = _activation(name, z)
            elif isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer,
                (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D),
            ):
                assert layer.data_format == "channels_last" and layer.groups == 1
                k = copies[id(layer.kernel)]
                outs = [
                    tf.nn.conv2d(
                        h[i : i + 1],
                        k[i],
                        strides=[1, *layer.strides, 1],
                        padding=layer.padding.upper(),
                        dilations=[1, *layer.dilation_rate, 1],
                    )
                    for i in range(batch)
                ]
                z = tf.concat(outs, axis=0)
                if layer.use_bias:
                    z = z + copies[id(layer.bias)][:, None, None, :]
                h = _activation(_activation_name(layer), z)
            elif isinstance(layer, keras.layers.BatchNormalization):
                assert not layer.renorm
                axis = layer.axis % len(h.shape)
                axes = [a for a in range(len(h.shape)) if a != axis]
                mean = tf.reduce_mean(h, axis=axes, keepdims=True)
                var = tf.reduce_mean(tf.square(h - mean), axis=axes, keepdims=True)
                h = (h - mean) / tf.sqrt(var + float(layer.epsilon))
                # per-example copies (b, C) broadcast along the other axes
                expand = [None] * len(h.shape)
                expand[0], expand[axis] = slice(None), slice(None)
                if layer.scale:
                    h = copies[id(layer.gamma)][tuple(expand)] * h
                if layer.center:
                    h = h + copies[id(layer.beta)][tuple(expand)]
            elif isinstance(layer, keras.layers.ReLU):
                h = tf.nn.relu(h)
            elif isinstance(layer, keras.layers.Activation):
                h = _activation(_activation_name(layer), h)
            elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
                h = tf.reduce_mean(h, axis=[1, 2])
            elif isinstance(layer, keras.layers.Flatten):
                h = tf.reshape(h, [batch, -1])
            else:
                raise NotImplementedError(type(layer).__name__)
        assert logits is not None, "the model must end with a softmax Dense"
        per_example = -tf.gather(
            tf.nn.log_softmax(logits), labels, axis=1, batch_dims=1
        )
        if sample_weight is not None:
            per_example = per_example * tf.constant(
                np.asarray(sample_weight, np.float64).reshape(-1)
            )
        total = tf.reduce_sum(per_example)
    grads = tape.gradient(total, watched)
    return [np.asarray(g, np.float64) for g in grads]


# --------------------------------------------------------------------------
# Measurements.


def flatten_gradients(gradients):
    """``J``: one row per example, the concatenated flattened contributions."""
    gradients = [np.asarray(g, np.float64) for g in gradients]
    batch = gradients[0].shape[0]
    return np.concatenate([g.reshape(batch, -1) for g in gradients], axis=1)


EPS32 = float(np.finfo(np.float32).eps)


def numpy_measurements(jac, zero_threshold=None, eps=EPS32):
    """Every `FisherMeasurement` field, from ``J`` (B x P), with numpy.

    The default threshold is the documented one (docs/concepts.md): an
    eigenvalue of ``G`` is zero when at most ``max((4 eps)^2, 64 eps64)``
    times ``trace(G)``, with `eps` the unit round-off of the contributions.
    """
    jac = np.asarray(jac, np.float64)
    batch = jac.shape[0]
    gram = jac @ jac.T
    gram_eig = np.linalg.eigh(gram)[0][::-1]
    gram_eig = np.maximum(gram_eig, 0.0)
    if zero_threshold is None:
        floor = max((4 * eps) ** 2, 64 * np.finfo(np.float64).eps)
        zero_threshold = floor * np.trace(gram) / gram_eig[0]
    nonzero = (gram_eig > zero_threshold * gram_eig[0]) & (gram_eig > 0)
    rank = int(np.sum(nonzero))
    singular = np.sqrt(gram_eig)
    condition = singular[0] / singular[rank - 1] if rank > 0 else np.nan
    s = np.mean(np.sum(jac**2, axis=1))
    mean_g = jac.mean(axis=0)
    m = float(mean_g @ mean_g)
    if batch > 1:
        tr_sigma = (s - m) * batch / (batch - 1)
        g2 = (batch * m - s) / (batch - 1)
        noise = tr_sigma / g2 if g2 > 0 else np.nan
    else:
        noise = np.nan
    return dict(
        eigenvalues=gram_eig / batch,
        singular_values=singular,
        condition_number=condition,
        energy=np.sqrt(np.trace(gram)),
        trace=np.trace(gram) / batch,
        gradient_norm=np.linalg.norm(mean_g),
        gradient_noise_scale=noise,
        rank=rank,
        batch_size=batch,
        zero_threshold=zero_threshold,
    )


def read_scalars(log_dir, prefix="fisher/"):
    """{tag: [(step, value)]} of the scalars under ``<log_dir>/train`` whose
    tag starts with `prefix`, and the accumulator. (This legacy reader never
    purges tensor summaries, so points that a resumed run rewrote appear
    twice here; tests/test_persistence.py reads with TensorBoard's own.)"""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "train"), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["tensors"]:
        values = [
            (e.step, tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)
        ]
        if tag.startswith(prefix) and all(
            v.ndim == 0 and v.dtype.kind in "fiu" for _, v in values
        ):
            scalars[tag] = [(step, float(v)) for step, v in values]
    return scalars, accumulator
