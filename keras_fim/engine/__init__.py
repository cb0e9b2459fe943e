"""The Fisher engine: per-example gradient contributions and their Gram matrix.

``per_example_gradients`` returns, for every trainable variable, each
example's contribution to the mini-batch gradient (METHOD.md): the gradient of
its own loss for models whose examples never interact, and its share of the
batch backward pass for batch-coupled layers such as BatchNormalization in
training mode. They sum to ``|B|`` times the gradient of the compiled loss
(without regularisation).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_fim.engine import rules
from keras_fim.engine.capture import record_batch_pass
from keras_fim.engine.losses import per_example_losses


def _own_trainable_variables(layer) -> list:
    inner = {
        id(v)
        for sub in layer._flatten_layers(include_self=False, recursive=True)
        for v in sub.trainable_variables
    }
    return [v for v in layer.trainable_variables if id(v) not in inner]


def find_units(model: keras.Model) -> list:
    """The layers whose calls are recorded, each with the rule that handles it.

    A layer with a registered rule is one unit (the rule covers all its
    weights); a layer holding weights of its own with no rule is handled by
    the exact generic rule as a whole; otherwise we descend into sublayers.
    """
    units, seen = [], set()

    def visit(layer, is_root):
        if id(layer) in seen or not layer.trainable_variables:
            return
        seen.add(id(layer))
        rule = None if is_root else rules.rule_for(layer)
        if rule is None and _own_trainable_variables(layer):
            rule = rules.generic_rule
        if rule is not None:
            units.append((layer, rule))
            return
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            visit(sub, False)

    visit(model, True)
    return units


def _batch_size(x) -> tf.Tensor:
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return tf.shape(first)[0]


def per_example_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    training: bool = True,
) -> list:
    """Each example's contribution to the mini-batch gradient.

    Args:
        model: A built and compiled `keras.Model`. Its compiled loss, per
            example and unreduced, is differentiated; regularisation losses
            are left out.
        x: The inputs of one batch, as `model.fit` takes them.
        y: The targets of that batch.
        sample_weight: Optional sample weights; they multiply each example's
            loss as in Keras.
        max_examples: Integer or `None`. Return the contributions of only the
            first `max_examples` examples (the batch pass still uses the whole
            batch, so batch statistics are those of the whole batch).
        training: Boolean, the mode of the batch pass. Defaults to `True`, the
            mode `fit` trains in (BatchNorm with batch statistics).

    Returns:
        A list aligned with `model.trainable_variables`, each tensor shaped
        `(batch, *variable.shape)`. They sum over examples to `|B|` times the
        gradient of the compiled loss.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> grads = keras_fim.per_example_gradients(
    ...     model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    >>> [tuple(g.shape) for g in grads]
    [(4, 3, 2), (4, 2)]
    """
    batch_pass, units, examples = _record(
        model, x, y, sample_weight, max_examples, training
    )
    by_variable = {}
    for layer, rule in units:
        for call in batch_pass.calls[id(layer)]:
            for v, g in zip(
                layer.trainable_variables, rule(layer, call, examples), strict=True
            ):
                g = tf.cast(g, v.dtype)
                by_variable[id(v)] = (
                    by_variable[id(v)] + g if id(v) in by_variable else g
                )
    return [
        by_variable.get(id(v), tf.zeros([examples, *v.shape], v.dtype))
        for v in model.trainable_variables
    ]


def _record(model, x, y, sample_weight, max_examples, training):
    if not model.built:
        raise ValueError(
            "keras-fim needs a built model (call it on data or train it first). "
            f"Received: model={model.name!r} with built=False."
        )
    if max_examples is not None and (
        isinstance(max_examples, bool)
        or not isinstance(max_examples, int)
        or max_examples < 1
    ):
        raise ValueError(
            "`max_examples` must be a positive integer or None. "
            f"Received: max_examples={max_examples!r}"
        )
    units = find_units(model)
    batch_pass = record_batch_pass(
        model,
        [layer for layer, _ in units],
        x,
        y,
        sample_weight,
        per_example_losses,
        training=training,
    )
    examples = _batch_size(x)
    if max_examples is not None:
        examples = tf.minimum(examples, max_examples)
    return batch_pass, units, examples


def gradient_noise_components(
    model: keras.Model, x: Any, y: Any, sample_weight: Any = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Estimates ``tr(Sigma)`` and ``|G|^2`` from mini-batch gradients.

    McCandlish et al. (2018, appendix A): with ``|g_B|^2`` the squared norm
    of the gradient of the whole batch (size ``B``) and ``|g_b|^2`` the mean
    over its two halves (size ``b = B // 2``),

    ``|G|^2 = (B |g_B|^2 - b |g_b|^2) / (B - b)`` and
    ``tr(Sigma) = (|g_b|^2 - |g_B|^2) / (1/b - 1/B)``,

    both unbiased; their ratio is the gradient noise scale ``B_simple``.
    Each gradient is that of a real batch (a stateless pass in training mode,
    the compiled loss without regularisation), so this holds for
    batch-coupled layers too, where the per-example contributions of
    BatchNorm in training mode are negatively correlated and the
    per-example estimate of `measure` is undefined. Returns float64 NaNs for
    a batch of fewer than 2 examples.
    """
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    kwargs = {"training": True} if model._call_has_training_arg else {}

    def squared_norm(start, stop):
        def part(t):
            return None if t is None else t[start:stop]

        xs, ys, ws = (keras.tree.map_structure(part, t) for t in (x, y, sample_weight))
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, _ = model.stateless_call(trainable, non_trainable, xs, **kwargs)
            losses = per_example_losses(model, ys, y_pred, ws)
            loss = tf.reduce_sum(losses) / tf.cast(stop - start, losses.dtype)
        grads = tape.gradient(
            loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        # convert_to_tensor: an Embedding's gradient is IndexedSlices.
        return tf.add_n(
            [
                tf.reduce_sum(tf.cast(tf.convert_to_tensor(g), tf.float64) ** 2)
                for g in grads
            ]
        )

    batch = _batch_size(x)
    half = tf.maximum(batch // 2, 1)
    big = squared_norm(0, batch)
    small = 0.5 * (squared_norm(0, half) + squared_norm(half, 2 * half))
    batch_f, half_f = tf.cast(batch, tf.float64), tf.cast(half, tf.float64)
    defined = batch >= 2
    safe = tf.where(defined, batch_f - half_f, 1.0)
    true_gradient_sq = (batch_f * big - half_f * small) / safe
    trace_sigma = (small - big) / tf.where(defined, 1.0 / half_f - 1.0 / batch_f, 1.0)
    nan = tf.constant(float("nan"), tf.float64)
    return tf.where(defined, trace_sigma, nan), tf.where(defined, true_gradient_sq, nan)


def gram_from_gradients(gradients: list) -> tf.Tensor:
    """The Gram matrix ``J J^T`` of per-example gradients, summed per variable."""
    gram = None
    for g in gradients:
        flat = tf.reshape(g, [tf.shape(g)[0], -1])
        block = tf.matmul(flat, flat, transpose_b=True)
        gram = block if gram is None else gram + tf.cast(block, gram.dtype)
    return gram


def fisher_gram(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
) -> tf.Tensor:
    """The `(batch, batch)` Gram matrix ``J J^T`` of per-example contributions.

    Its eigenvalues divided by the batch size are the non-zero eigenvalues of
    the approximate Fisher ``F = J^T J / |B|``. Arguments as in
    `per_example_gradients`.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> gram = keras_fim.fisher_gram(
    ...     model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    >>> tuple(gram.shape)
    (4, 4)
    """
    return gram_from_gradients(
        per_example_gradients(model, x, y, sample_weight, max_examples=max_examples)
    )


def measure(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    zero_threshold: float | None = None,
):
    """Measures the approximate Fisher of one mini-batch.

    Arguments as in `per_example_gradients`; `zero_threshold` as in
    `keras_fim.measurements.spectrum_from_gram`. Works eagerly and inside a
    `tf.function` (a compiled train step).

    Returns:
        A `keras_fim.FisherMeasurement`.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> m = keras_fim.measure(model, np.eye(3, dtype="float32"),
    ...                       np.zeros((3, 2), "float32"))
    >>> int(m.batch_size), m.eigenvalues.shape
    (3, TensorShape([3]))
    """
    from keras_fim.measurements import spectrum_from_gram

    gram = fisher_gram(model, x, y, sample_weight, max_examples=max_examples)
    return spectrum_from_gram(gram, zero_threshold)
