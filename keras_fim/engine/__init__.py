"""The Fisher engine: per-example gradient contributions and their Gram matrix.

``per_example_gradients`` returns, for every trainable variable, each
example's contribution to the mini-batch gradient (METHOD.md): the gradient of
its own loss for models whose examples never interact, and its share of the
batch backward pass for batch-coupled layers such as BatchNormalization in
training mode. They sum to ``|B|`` times the gradient of the compiled loss
(without regularisation).
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper

from keras_fim.engine import capture, rules
from keras_fim.engine import gram as gram_module
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
    return _per_variable(units, batch_pass.calls, examples, model)


def _per_variable(units, calls, examples, model=None):
    """Per-example gradients per variable (the model's order if given)."""
    by_variable = {}
    for layer, rule in units:
        for call in calls[id(layer)]:
            for v, g in zip(
                layer.trainable_variables, rule(layer, call, examples), strict=True
            ):
                g = tf.cast(g, v.dtype)
                by_variable[id(v)] = (
                    by_variable[id(v)] + g if id(v) in by_variable else g
                )
    if model is None:
        return list(by_variable.values())
    return [
        by_variable.get(id(v), tf.zeros([examples, *v.shape], v.dtype))
        for v in model.trainable_variables
    ]


def _loss_scale(model, batch):
    """The factor Keras's step multiplies the summed per-example losses by
    under ``mixed_float16`` (`LossScaleOptimizer`): ``s / (R N)``, the
    optimizer's loss scale over the replicas in sync and the batch size
    (1 for "sum" losses). `None` without loss scaling."""
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    from keras_fim.engine.distribute import replicas_in_sync

    scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32)
    kinds = _loss_reduction_kinds(model)
    normaliser = 1.0 if kinds == {"sum"} else tf.cast(batch, tf.float32)
    return scale / (replicas_in_sync() * normaliser)


def _record(model, x, y, sample_weight, max_examples, training, variable_values=None):
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
        variable_values=variable_values,
        loss_scale=_loss_scale(model, _batch_size(x)),
    )
    examples = _batch_size(x)
    if max_examples is not None:
        examples = tf.minimum(examples, max_examples)
    return batch_pass, units, examples


def gradient_noise_components(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    variable_values: tuple | None = None,
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
    a batch of fewer than 2 examples. `variable_values`: the values of the
    trainable and non-trainable variables to use (read now if `None`).
    """
    if variable_values is None:
        variable_values = _read_variables(model)
    trainable, non_trainable = variable_values
    kwargs = {"training": True} if model._call_has_training_arg else {}
    # Mixed precision: scaled as Keras's step scales its loss, unscaled in
    # float32 (16-bit gradients of a mean loss would underflow otherwise).
    scale = _loss_scale(model, 1)

    def squared_norm(start, stop):
        def part(t):
            return None if t is None else t[start:stop]

        xs, ys, ws = (keras.tree.map_structure(part, t) for t in (x, y, sample_weight))
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, _ = model.stateless_call(trainable, non_trainable, xs, **kwargs)
            losses = per_example_losses(model, ys, y_pred, ws)
            loss = tf.reduce_sum(losses) / tf.cast(stop - start, losses.dtype)
            if scale is not None:
                loss = loss * tf.cast(scale, loss.dtype)
        grads = tape.gradient(
            loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        # convert_to_tensor: an Embedding's gradient is IndexedSlices.
        total = tf.add_n(
            [
                tf.reduce_sum(tf.cast(tf.convert_to_tensor(g), tf.float64) ** 2)
                for g in grads
            ]
        )
        return total if scale is None else total / tf.cast(scale, tf.float64) ** 2

    batch = _batch_size(x)
    half = tf.maximum(batch // 2, 1)
    big = squared_norm(0, batch)
    small = 0.5 * (squared_norm(0, half) + squared_norm(half, 2 * half))
    return _noise_components(batch, half, big, small)


def _noise_components(batch, half, big, small):
    """McCandlish et al.'s unbiased estimates from the squared gradient norms
    of a batch (`big`) and of its halves (`small`, their mean)."""
    batch_f, half_f = tf.cast(batch, tf.float64), tf.cast(half, tf.float64)
    defined = batch >= 2
    safe = tf.where(defined, batch_f - half_f, 1.0)
    true_gradient_sq = (batch_f * big - half_f * small) / safe
    trace_sigma = (small - big) / tf.where(defined, 1.0 / half_f - 1.0 / batch_f, 1.0)
    nan = tf.constant(float("nan"), tf.float64)
    return tf.where(defined, trace_sigma, nan), tf.where(defined, true_gradient_sq, nan)


def _read_variables(model) -> tuple[list, list]:
    """The model's trainable and non-trainable values, read now."""
    return (
        [tf.convert_to_tensor(v.value) for v in model.trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables],
    )


def gram_from_gradients(gradients: list) -> tf.Tensor:
    """The Gram matrix ``J J^T`` of per-example gradients, summed per
    variable, in float64 (`keras_fim.engine.gram.gram_of`)."""
    return tf.add_n([gram_module.gram_of(g) for g in gradients])


def _check_memory_budget(memory_budget):
    if memory_budget is None:
        return gram_module.DEFAULT_MEMORY_BUDGET
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, numbers.Real)
        or not memory_budget > 0
    ):
        raise ValueError(
            "`memory_budget` must be a positive number of bytes (inf: no "
            f"bound) or None. Received: memory_budget={memory_budget!r}"
        )
    return float(memory_budget)


def _unique_names(units) -> list[str]:
    names, seen = [], {}
    for layer, _ in units:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        names.append(layer.name if count == 0 else f"{layer.name}_{count}")
    return names


def grams_from_calls(units, calls, examples, memory_budget=None):
    """Per-unit Gram blocks from recorded calls: ``(blocks, plans)``.

    `blocks` maps unit names to ``(examples, examples)`` blocks summing to
    ``J J^T``. When units share a weight, their contributions must be added
    before the product, so the whole model is then one block, ``"model"``.
    """
    budget = _check_memory_budget(memory_budget)
    owners = [id(v) for layer, _ in units for v in layer.trainable_variables]
    if len(owners) != len(set(owners)):
        grads = _per_variable(units, calls, examples)
        return {"model": gram_from_gradients(grads)}, []
    blocks, plans = {}, []
    for name, (layer, rule) in zip(_unique_names(units), units, strict=True):
        unit_calls = calls[id(layer)]
        if not unit_calls:
            continue
        block, plan = gram_module.unit_gram(layer, rule, unit_calls, examples, budget)
        blocks[name] = block
        plans.append(plan)
    return blocks, plans


def payloads_from_calls(units, calls, examples) -> dict:
    """Per-unit `keras_fim.engine.gram.Payload`s from recorded calls: what a
    replica all-gathers so that every replica forms the global batch's
    blocks (`keras_fim.engine.distribute`). Keys as `grams_from_calls`."""
    owners = [id(v) for layer, _ in units for v in layer.trainable_variables]
    if len(owners) != len(set(owners)):
        grads = _per_variable(units, calls, examples)
        return {"model": gram_module.gradients_payload("model", grads)}
    payloads = {}
    for name, (layer, rule) in zip(_unique_names(units), units, strict=True):
        unit_calls = calls[id(layer)]
        if unit_calls:
            payloads[name] = gram_module.unit_payload(layer, rule, unit_calls, examples)
    return payloads


def layer_grams(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    memory_budget: float | None = None,
) -> dict[str, tf.Tensor]:
    """The Gram matrix ``J J^T`` split by layer: ``{layer name: block}``.

    Each block is the Gram matrix of the per-example contributions to one
    layer's weights; they sum to `fisher_gram`. The eigenvalues of a block
    (over the batch size) are that layer's own Fisher spectrum, and its
    trace its share of the energy ``||J||_F^2``. Blocks are formed without
    materialising per-example gradients where a cheaper form exists
    (`keras_fim.engine.gram`). Arguments as in `fisher_gram`.

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
    batch_pass, units, examples = _record(
        model, x, y, sample_weight, max_examples, True
    )
    return grams_from_calls(units, batch_pass.calls, examples, memory_budget)[0]


def fisher_gram(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    max_examples: int | None = None,
    memory_budget: float | None = None,
) -> tf.Tensor:
    """The `(batch, batch)` Gram matrix ``J J^T`` of per-example contributions.

    Its eigenvalues divided by the batch size are the non-zero eigenvalues of
    the approximate Fisher ``F = J^T J / |B|``. Arguments as in
    `per_example_gradients`, and `memory_budget`: bytes, or `None` for 1 GiB,
    the bound on any one layer's largest temporary (see
    `keras_fim.engine.gram`).

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
    )
    return sum_blocks(blocks)


def sum_blocks(blocks: dict) -> tf.Tensor:
    """The sum of Gram blocks (in the widest of their dtypes)."""
    values = list(blocks.values())
    dtype = max((b.dtype for b in values), key=lambda d: d.size)
    return tf.add_n([tf.cast(b, dtype) for b in values])


def noise_components_from_gram(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`gradient_noise_components` from the Gram matrix of independent
    per-example gradients: a half batch's gradient is the mean of its
    examples' gradients, so every squared norm is a sum of Gram entries.
    Wrong for batch-coupled models (BatchNorm in training mode), whose
    half batches must be run for real."""
    gram = tf.cast(gram, tf.float64)
    batch = tf.shape(gram)[0]
    half = tf.maximum(batch // 2, 1)

    def squared_norm(start, stop):
        n = tf.cast(stop - start, tf.float64)
        return tf.reduce_sum(gram[start:stop, start:stop]) / (n * n)

    big = squared_norm(0, batch)
    small = 0.5 * (squared_norm(0, half) + squared_norm(half, 2 * half))
    return _noise_components(batch, half, big, small)


def noise_components_from_groups(gram: tf.Tensor, counts: tf.Tensor):
    """`gradient_noise_components` with real sub-batches as the small
    batches: the Gram rows come in groups of `counts` (the replicas'
    shards, in order), each of which the model ran as a batch of its own,
    so a group's gradient is the mean of its rows' contributions even where
    examples interact (BatchNorm normalising each replica's shard).

    ``|g_B|^2`` is that of all rows, ``|g_b|^2`` the mean over the
    non-empty groups, ``b`` the mean group size; NaN with fewer than two
    non-empty groups."""
    gram = tf.cast(gram, tf.float64)
    counts = tf.cast(counts, tf.int32)
    groups = tf.size(counts)
    batch = tf.shape(gram)[0]
    members = tf.one_hot(tf.repeat(tf.range(groups), counts), groups, dtype=tf.float64)
    sums = tf.linalg.diag_part(
        tf.matmul(members, tf.matmul(gram, members), transpose_a=True)
    )
    sizes = tf.cast(counts, tf.float64)
    nonempty = counts > 0
    used = tf.reduce_sum(tf.cast(nonempty, tf.float64))
    small = tf.reduce_sum(
        tf.where(nonempty, sums / tf.where(nonempty, sizes**2, 1.0), 0.0)
    ) / tf.maximum(used, 1.0)
    batch_f = tf.cast(batch, tf.float64)
    big = tf.reduce_sum(gram) / batch_f**2
    half_f = batch_f / tf.maximum(used, 1.0)
    defined = used >= 2
    safe = tf.where(defined, batch_f - half_f, 1.0)
    true_gradient_sq = (batch_f * big - half_f * small) / safe
    trace_sigma = (small - big) / tf.where(defined, 1.0 / half_f - 1.0 / batch_f, 1.0)
    nan = tf.constant(float("nan"), tf.float64)
    return tf.where(defined, trace_sigma, nan), tf.where(defined, true_gradient_sq, nan)


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
    `keras_fim.measurements.spectrum_from_gram`, its default derived from
    the precision of the dtype the layers compute in
    (`contribution_precision`). Works eagerly and inside a `tf.function` (a
    compiled train step).

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

    batch_pass, units, examples = _record(
        model, x, y, sample_weight, max_examples, True
    )
    blocks, _ = grams_from_calls(units, batch_pass.calls, examples)
    return spectrum_from_gram(
        sum_blocks(blocks), zero_threshold, contribution_precision(units)
    )


def contribution_precision(units) -> float:
    """The unit round-off of the least precise dtype the units compute in:
    the relative precision their contributions carry (float32's eps for a
    float32 model, float16's under ``mixed_float16``)."""
    from keras_fim.measurements import unit_roundoff

    dtypes = {layer.compute_dtype for layer, _ in units} or {"float32"}
    return max(unit_roundoff(dtype) for dtype in dtypes)


# -- measuring inside a training step ------------------------------------------


def _is_coupled(layer, rule) -> bool:
    """Whether a unit may mix examples: BatchNorm (training mode in `fit`
    unless frozen) and whatever the generic rule handles."""
    if rule is rules.generic_rule:
        return True
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def record_pass(
    model, x, y, sample_weight=None, max_examples=None, variable_values=None
):
    """A recorded batch pass of its own, in training mode:
    ``(units, calls, examples, coupled)`` for `grams_from_calls`.
    `variable_values`: the ``(trainable, non_trainable)`` values to run
    with (read now if `None`)."""
    batch_pass, units, examples = _record(
        model, x, y, sample_weight, max_examples, True, variable_values
    )
    coupled = any(_is_coupled(layer, rule) for layer, rule in units)
    return units, batch_pass.calls, examples, coupled


_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _loss_reduction_kinds(model) -> set:
    """ "mean" or "sum" for each compiled loss (built or not yet)."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        return set()
    if compile_loss.built:
        reductions = [fn.reduction for _, fn, _, _ in compile_loss._flat_losses]
    else:
        reductions = [
            loss.reduction if isinstance(loss, keras.losses.Loss) else "mean"
            for loss in keras.tree.flatten(compile_loss._user_loss)
            if loss is not None
        ]
    return {"mean" if r in _MEAN_REDUCTIONS else r for r in reductions}


def _keras_losses_only(model) -> bool:
    """Whether every compiled loss is one of Keras's own (whose values keep
    the batch dimension, as `ProbedPass`'s factor assumes)."""

    def builtin(loss):
        if isinstance(loss, str):
            return True
        if isinstance(loss, LossFunctionWrapper):
            return builtin(loss.fn)
        owner = type(loss) if isinstance(loss, keras.losses.Loss) else loss
        return getattr(owner, "__module__", "").startswith("keras.")

    compile_loss = model._compile_loss
    if compile_loss.built:
        losses = [fn for _, fn, _, _ in compile_loss._flat_losses]
    else:
        losses = keras.tree.flatten(compile_loss._user_loss)
    return all(builtin(loss) for loss in losses if loss is not None)


def reuses_training_pass(model: keras.Model, step) -> bool:
    """Whether `ProbedPass` is exact around `step`: Keras's own train step,
    loss computation and losses, one kind of loss reduction (so that the
    training loss is the sum of per-example losses times one factor), and no
    activity regulariser (whose loss would add to the layers' cotangents).
    """
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from keras.src.trainers.trainer import Trainer

    cls = type(model)
    return (
        getattr(step, "__func__", None) is TensorFlowTrainer.train_step
        and cls.compute_loss is Trainer.compute_loss
        and cls._compute_loss is Trainer._compute_loss
        and model.optimizer is not None
        and getattr(model, "_compile_loss", None) is not None
        and _keras_losses_only(model)
        and len(_loss_reduction_kinds(model)) == 1
        and _loss_reduction_kinds(model) <= {"mean", "sum"}
        and not any(
            getattr(layer, "activity_regularizer", None) is not None
            for layer in model._flatten_layers(include_self=True, recursive=True)
        )
    )


class ProbedPass:
    """Records the calls of the model's next forward pass, and the cotangents
    of the training step's own backward pass through them.

    Keras's step differentiates ``s / (R N) * sum_i l_i`` (plus weight
    regularisation, which no layer output sees): ``s`` the optimizer's loss
    scale, ``R`` the replicas in sync, ``N`` the batch size for mean-type
    reductions (1 for "sum"). Its cotangents divided by that factor are those
    of the per-example losses, so no second pass is needed.

    Usage (inside the compiled step): ``with probe: logs = step(data)``,
    then ``probe.recorded()``.
    """

    def __init__(self, model, x, max_examples=None):
        if not model.built:
            raise ValueError("ProbedPass needs a built model.")
        self.units = find_units(model)
        self._recorder = capture._Recorder(
            [layer for layer, _ in self.units], probe_cotangents=True
        )
        batch = _batch_size(x)
        kind = _loss_reduction_kinds(model).pop()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        scale = tf.cast(model.optimizer.scale_loss(tf.constant(1.0)), tf.float32)
        normaliser = tf.cast(batch, tf.float32) if kind == "mean" else 1.0
        # Read now, before the step updates the loss scale.
        self.factor = scale / (replicas * normaliser)
        self.examples = (
            batch if max_examples is None else tf.minimum(batch, max_examples)
        )
        # For measurements that need passes of their own (the half batches of
        # a coupled model): the variables as the step found them.
        self.variable_values = _read_variables(model)

    def __enter__(self):
        self._recorder.__enter__()
        return self

    def __exit__(self, *exc):
        return self._recorder.__exit__(*exc)

    def recorded(self):
        """``(units, calls, examples, coupled)``, as `record_pass`."""
        self._recorder.collect_probed_cotangents(self.factor)
        coupled = any(_is_coupled(layer, rule) for layer, rule in self.units)
        return self.units, self._recorder.calls, self.examples, coupled
