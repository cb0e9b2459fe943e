"""The public measuring functions: one batch, by hand.

`per_example_gradients`, `fisher_gram`, `layer_grams` and `measure` each run
(from a second call on, through a function kept on the model, `_run`)
a recorded pass of their own (`keras_fim.engine.record.record_pass`:
stateless, in training mode) and go the way every measurement goes
(`keras_fim.engine.pipeline`).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_fim._keras_compat import compile_loss, set_instance_attribute
from keras_fim.engine.gram import per_variable_gradients, sum_blocks
from keras_fim.engine.pipeline import local_grams, measure_pass
from keras_fim.engine.record import PerExampleLoss, record_pass
from keras_fim.measurements import FisherMeasurement


def _not_converted(function):
    """`function`, which autograph leaves as it is inside a user's
    `tf.function`: it has no Python control flow on tensors, and
    transpiling the engine it calls took longer than tracing it (MobileNetV2:
    12.6 s of a 21.6 s trace, issue 15)."""
    return tf.autograph.experimental.do_not_convert(function)


@_not_converted
def per_example_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    training: bool = True,
    per_example_loss: PerExampleLoss | None = None,
    measured_layers: list | None = None,
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
        per_example_loss: `None` (the compiled loss) or a function
            ``(model, x, y, sample_weight)`` returning one loss per example,
            shaped `(batch,)`, whose sum's gradient is split per example: the
            objective of a custom `train_step` (see docs/custom-loops.md). It
            runs statelessly, may call the model or any of its layers, and
            chooses their mode itself (`training` is not used).
        measured_layers: `None` (all) or a list of layers of the model (or
            their names): only their weights make up ``J``; the others'
            gradients are zeros.

    Returns:
        A list aligned with `model.trainable_variables`, each tensor shaped
        `(batch, *variable.shape)`. They sum over examples to `|B|` times the
        gradient of the compiled loss (of the sum of `per_example_loss`
        over the batch, with one).

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> grads = keras_fim.per_example_gradients(
    ...     model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    >>> [tuple(g.shape) for g in grads]
    [(4, 3, 2), (4, 2)]
    """

    def body(x, y, sample_weight):
        record = record_pass(
            model,
            x,
            y,
            sample_weight,
            max_examples=max_examples,
            training=training,
            per_example_loss=per_example_loss,
            measured_layers=measured_layers,
        )
        return per_variable_gradients(
            record.units, record.calls, record.examples, model.trainable_variables
        )

    options = (max_examples, training, per_example_loss, measured_layers)
    return _run(model, "per_example_gradients", body, options, x, y, sample_weight)


@_not_converted
def layer_grams(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    memory_budget: float | None = None,
    fail_mode: str = "error",
    per_example_loss: PerExampleLoss | None = None,
    measured_layers: list | None = None,
) -> dict[str, tf.Tensor]:
    """The Gram matrix ``J J^T`` split by layer: ``{layer name: block}``.

    Each block is the Gram matrix of the per-example contributions to one
    layer's weights; they sum to `fisher_gram`. The eigenvalues of a block
    (over the batch size) are that layer's own Fisher spectrum, and its
    trace its share of the energy ``||J||_F^2``. Blocks are formed without
    materialising per-example gradients where a cheaper form exists
    (`keras_fim.engine.gram`). Only the layers measured (and, with
    `per_example_loss`, called by it) have a block.

    Args:
        model: A built and compiled `keras.Model`. Its compiled loss, per
            example and unreduced, is differentiated (unless
            `per_example_loss`); regularisation losses are left out.
        x: The inputs of one batch, as `model.fit` takes them.
        y: The targets of that batch, or `None`.
        sample_weight: Optional sample weights; they multiply each example's
            loss as in Keras. Defaults to `None`.
        max_examples: Integer >= 1 or `None`. Only the first `max_examples`
            examples' contributions (the batch pass still uses the whole
            batch, so batch statistics are those of the whole batch).
            Defaults to `None` (all).
        memory_budget: Positive number of bytes or `None` (1 GiB), the
            bound on any one layer's largest temporary
            (`keras_fim.engine.gram`). Defaults to `None`.
        fail_mode: String, what a layer whose rule fails does: ``"error"``
            raises; ``"warn"`` and ``"skip"`` leave the layer out of ``J``,
            with or without a warning. Defaults to `"error"`.
        per_example_loss: `None` (the compiled loss) or a function
            ``(model, x, y, sample_weight)`` returning one loss per example,
            shaped `(batch,)`: the objective of a custom `train_step` (see
            docs/custom-loops.md). Defaults to `None`.
        measured_layers: `None` (all) or a list of layers of the model (or
            their names) whose weights make up ``J``. Defaults to `None`.

    Returns:
        ``{layer name: (batch, batch) float64 tensor}``.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> model.compile(loss="mse")
    >>> blocks = keras_fim.layer_grams(
    ...     model, np.ones((5, 3), "float32"), np.zeros((5, 2), "float32"))
    >>> sorted(blocks), tuple(blocks["head"].shape)
    (['head', 'hidden'], (5, 5))
    """

    def body(x, y, sample_weight):
        record = record_pass(
            model,
            x,
            y,
            sample_weight,
            max_examples=max_examples,
            per_example_loss=per_example_loss,
            measured_layers=measured_layers,
        )
        return local_grams(memory_budget, fail_mode)(record)

    options = (
        max_examples,
        memory_budget,
        fail_mode,
        per_example_loss,
        measured_layers,
    )
    return _run(model, "layer_grams", body, options, x, y, sample_weight)


@_not_converted
def fisher_gram(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    memory_budget: float | None = None,
    fail_mode: str = "error",
    per_example_loss: PerExampleLoss | None = None,
    measured_layers: list | None = None,
) -> tf.Tensor:
    """The `(batch, batch)` Gram matrix ``J J^T`` of per-example contributions.

    Its eigenvalues divided by the batch size are the non-zero eigenvalues of
    the approximate Fisher ``F = J^T J / |B|``: the sum of `layer_grams`.

    Args:
        model: A built and compiled `keras.Model`. Its compiled loss, per
            example and unreduced, is differentiated (unless
            `per_example_loss`); regularisation losses are left out.
        x: The inputs of one batch, as `model.fit` takes them.
        y: The targets of that batch, or `None`.
        sample_weight: Optional sample weights; they multiply each example's
            loss as in Keras. Defaults to `None`.
        max_examples: Integer >= 1 or `None`. Only the first `max_examples`
            examples' contributions (the batch pass still uses the whole
            batch, so batch statistics are those of the whole batch).
            Defaults to `None` (all).
        memory_budget: Positive number of bytes or `None` (1 GiB), the
            bound on any one layer's largest temporary
            (`keras_fim.engine.gram`). Defaults to `None`.
        fail_mode: String, what a layer whose rule fails does: ``"error"``
            raises; ``"warn"`` and ``"skip"`` leave the layer out of ``J``,
            with or without a warning. Defaults to `"error"`.
        per_example_loss: `None` (the compiled loss) or a function
            ``(model, x, y, sample_weight)`` returning one loss per example,
            shaped `(batch,)`: the objective of a custom `train_step` (see
            docs/custom-loops.md). Defaults to `None`.
        measured_layers: `None` (all) or a list of layers of the model (or
            their names) whose weights make up ``J``. Defaults to `None`.

    Returns:
        A ``(batch, batch)`` float64 tensor.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> gram = keras_fim.fisher_gram(
    ...     model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    >>> tuple(gram.shape)
    (4, 4)
    """
    blocks = layer_grams(
        model,
        x,
        y,
        sample_weight,
        max_examples=max_examples,
        memory_budget=memory_budget,
        fail_mode=fail_mode,
        per_example_loss=per_example_loss,
        measured_layers=measured_layers,
    )
    return sum_blocks(blocks)


@_not_converted
def measure(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    zero_threshold: float | None = None,
    fail_mode: str = "error",
    per_example_loss: PerExampleLoss | None = None,
    measured_layers: list | None = None,
) -> FisherMeasurement:
    """Measures the approximate Fisher of one mini-batch.

    Works eagerly and inside a `tf.function` (a compiled train step).

    Args:
        model: A built and compiled `keras.Model`. Its compiled loss, per
            example and unreduced, is differentiated (unless
            `per_example_loss`); regularisation losses are left out.
        x: The inputs of one batch, as `model.fit` takes them.
        y: The targets of that batch, or `None`.
        sample_weight: Optional sample weights; they multiply each example's
            loss as in Keras. Defaults to `None`.
        max_examples: Integer >= 1 or `None`. Only the first `max_examples`
            examples' contributions (the batch pass still uses the whole
            batch, so batch statistics are those of the whole batch).
            Defaults to `None` (all).
        zero_threshold: Float in [0, 1) or `None`, as in
            `keras_fim.measurements.spectrum_from_gram`; `None` derives it
            from the precision of the dtype the layers compute in
            (`keras_fim.engine.pipeline.contribution_precision`). Defaults to
            `None`.
        fail_mode: String, what a layer whose rule fails does: ``"error"``
            raises; ``"warn"`` and ``"skip"`` leave the layer out of ``J``,
            with or without a warning. Defaults to `"error"`.
        per_example_loss: `None` (the compiled loss) or a function
            ``(model, x, y, sample_weight)`` returning one loss per example,
            shaped `(batch,)`: the objective of a custom `train_step` (see
            docs/custom-loops.md). Defaults to `None`.
        measured_layers: `None` (all) or a list of layers of the model (or
            their names) whose weights make up ``J``. Defaults to `None`.

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

    def body(x, y, sample_weight):
        record = record_pass(
            model,
            x,
            y,
            sample_weight,
            max_examples=max_examples,
            per_example_loss=per_example_loss,
            measured_layers=measured_layers,
        )
        grams = local_grams(fail_mode=fail_mode)
        return measure_pass(
            record, grams=grams, zero_threshold=zero_threshold
        ).measurement

    options = (
        max_examples,
        zero_threshold,
        fail_mode,
        per_example_loss,
        measured_layers,
    )
    return _run(model, "measure", body, options, x, y, sample_weight)


_FUNCTIONS = "_keras_fim_api_functions"


def _run(model, name: str, body, options: tuple, x, y, sample_weight):
    """`body(x, y, sample_weight)`. Called eagerly, from the second call on
    through a `tf.function` kept on the model per function and options:
    repeated calls (a Python loop over batches) trace once per input
    signature, and the vectorised
    rules run in a graph instead of building a function of their own at
    every call (which TensorFlow warns about after five). Inside a traced
    function, for a model not built yet (its first call creates its
    variables), or with a `per_example_loss` (a user's function, which may
    need eager execution, and whose rows are checked eagerly: a wrong count
    raises there, where a traced step can only mark it), `body` runs as it
    is."""
    per_example_loss = options[-2]  # options end (per_example_loss, measured_layers)
    if not tf.executing_eagerly() or not model.built or per_example_loss is not None:
        return body(x, y, sample_weight)
    functions = model.__dict__.get(_FUNCTIONS)
    if functions is None:
        functions = {}
        set_instance_attribute(model, _FUNCTIONS, functions)
    # What the trace read besides the options: another dtype policy (by
    # name: Keras makes a new default policy object at every call), a
    # recompile (another loss or loss weights) or another set of trainable
    # variables needs a new trace.
    key = (
        name,
        keras.config.dtype_policy().name,
        *(tuple(o) if isinstance(o, list) else o for o in options),
    )
    traced_with = (compile_loss(model), *model.trainable_variables)
    cached = functions.get(key)
    if cached is None or not _same_objects(cached[0], traced_with):
        # A first call runs eagerly (tracing costs more than one eager
        # call); a second one with the same key is a loop: trace it once.
        functions[key] = (traced_with, None)
        return body(x, y, sample_weight)
    if cached[1] is None:
        function = tf.function(body, reduce_retracing=True, autograph=False)
        cached = functions[key] = (traced_with, function)
    return cached[1](x, y, sample_weight)


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(u is v for u, v in zip(a, b, strict=True))
