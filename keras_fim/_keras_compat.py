"""Every use of Keras's and TensorFlow's private internals, and every patch.

keras-fim works inside Keras's training loop, and a few things it needs have
no public API. Each is here, once, with why it is needed; and
tests/test_keras_compat.py checks the behaviour each one relies on, so that
a Keras or TensorFlow release that changes one fails there, by name, rather
than somewhere deep in a measurement.

The declared range (`tensorflow>=2.21,<3`, `keras>=3.15,<4`) is what CI
installs and tests. It was wider (TensorFlow 2.16, Keras 3.8) until the
whole suite was run there (TensorFlow 2.16.2, Keras 3.8.0, Python 3.11):
507 tests passed, but a float32 model's largest eigenvalue came out 2.8e-3
off the same weights in float64 (3e-7 on the tested versions; the forward
passes agree to 1e-7 on both, so the difference is in the backward pass
through the loss), tensorflow-datasets' test data did not import (the newest
tensorflow-metadata needs protobuf 5, which TensorFlow 2.16 excludes), and
plain Keras fails to train a masked GRU under XLA. Widening the range needs a
CI job on the older versions that passes.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

# Why each private import (each is checked in tests/test_keras_compat.py):
# * get_keras_mask, apply_mask, squeeze_or_expand_to_same_rank,
#   LossFunctionWrapper: the per-example losses apply masks and sample
#   weights exactly as Keras's own losses do, with Keras's own helpers;
# * TensorFlowTrainer, Trainer: measuring from the training step's own pass
#   is exact only around Keras's own train step and loss computation;
# * Functional, functional_init_arguments: `FisherModel(inputs, outputs)`
#   must become a functional model as `keras.Model(inputs, outputs)` does;
# * control_flow_util, summary_ops_v2, gen_summary_ops: whether a graph is
#   compiled by XLA, a raw event written into a summary file, and a closed
#   summary writer reopened on its resource;
# * record: an identity whose gradient the tapes hand to a Python function
#   (`tape_identity`), without `tf.custom_gradient`'s extra operations;
# * BatchNormalization._moments: the batch statistics a BatchNorm layer
#   normalised a recorded call with (`recording_moments`);
# * Operation._set_attr: a condition whose branches stay functions at run
#   time (`unlowered_cond`).
from keras.src.backend import get_keras_mask
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.losses.loss import apply_mask, squeeze_or_expand_to_same_rank
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.trainers.trainer import Trainer
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.eager import record
from tensorflow.python.ops import (
    control_flow_util,
    gen_dataset_ops,
    gen_summary_ops,
    summary_ops_v2,
)

__all__ = [
    "Functional",
    "LossFunctionWrapper",
    "apply_mask",
    "call_has_training_arg",
    "compile_loss",
    "compiled_losses",
    "dataset_op_names",
    "distribute_strategy",
    "flat_losses",
    "flatten_layers",
    "functional_init_arguments",
    "get_keras_mask",
    "import_event",
    "in_xla_context",
    "is_default_strategy",
    "is_keras_loss_computation",
    "is_keras_train_step",
    "keras_logits",
    "op_determinism_enabled",
    "optimizer_learning_rate",
    "recording_moments",
    "reopen_file_writer",
    "set_instance_attribute",
    "set_keras_logits",
    "set_keras_mask",
    "set_optimizer_learning_rate",
    "squeeze_or_expand_to_same_rank",
    "tape_identity",
    "unlowered_cond",
    "unset_instance_attribute",
    "update_progress_bar",
    "user_loss",
    "variant_tensor",
]


# -- layers and models ----------------------------------------------------------


def flatten_layers(layer, *, include_self: bool, recursive: bool) -> list:
    """A layer's sublayers, nested ones too, in the order they were set:
    what the units of a measurement are found among (Keras has no public
    recursive walk that reaches a subclassed layer's attributes)."""
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def call_has_training_arg(model) -> bool:
    """Whether `model.call` takes `training` (passing it otherwise fails):
    keras-fim's own passes run in training mode, as `fit` does."""
    return bool(model._call_has_training_arg)


def distribute_strategy(model):
    """The strategy a model was built under (`None` before it has one):
    keras-fim's state is created under it, as the model's own variables."""
    return getattr(model, "_distribute_strategy", None)


def is_default_strategy(strategy) -> bool:
    """Whether `strategy` is the default one (no `strategy.scope()`), whose
    class is private."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


def unlowered_cond(pred, true_fn, false_fn):
    """`tf.cond` whose `If` operation stays one when the function runs: its
    branches are functions of their own, optimised and instantiated when
    first taken, instead of being lowered into the caller's graph as
    `Switch` and `Merge` operations. The measurement under the step's
    measured condition is thousands of operations; lowered, they made the
    first call of the train function longer (graph optimisation and
    instantiation of the whole step; issue 15, the first `fit`:
    benchmarks/first_fit.py), with no difference in the steps after it."""
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    result = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[before:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return result


@contextlib.contextmanager
def recording_moments(layer, sink: list):
    """While entered, the ``(mean, variance)`` a `BatchNormalization`
    `layer` normalises its training-mode calls with are appended to `sink`
    (nothing for other layers). The measurement needs each example's
    normalised input; taking the statistics the call computed anyway spares
    forming them again, six graph operations for each of a network's 50 or
    so BatchNorm layers (issue 15, the first `fit`)."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        yield
        return
    moments = layer._moments

    def recorded(*args, **kwargs):
        statistics = moments(*args, **kwargs)
        sink.append(statistics)
        return statistics

    set_instance_attribute(layer, "_moments", recorded)
    try:
        yield
    finally:
        unset_instance_attribute(layer, "_moments")


# -- the compiled loss ----------------------------------------------------------


def compile_loss(model):
    """The model's `CompileLoss` (`None` when compiled without a loss): the
    losses keras-fim splits per example, with Keras's own structure."""
    return getattr(model, "_compile_loss", None)


def flat_losses(loss) -> list:
    """``(path, loss function, loss weight, _)`` per output of a built
    `CompileLoss`: what it applies to which output, flattened."""
    return list(loss._flat_losses)


def compiled_losses(model) -> list:
    """The loss objects compiled into `model` (built or not yet), `None`s
    left out."""
    loss = compile_loss(model)
    if loss is None:
        return []
    if loss.built:
        losses = [fn for _, fn, _, _ in flat_losses(loss)]
    else:
        losses = keras.tree.flatten(user_loss(loss))
    return [fn for fn in losses if fn is not None]


def keras_logits(tensor):
    """The logits Keras's softmax/sigmoid attach to their outputs, which its
    cross-entropy differentiates through instead of the probabilities."""
    logits = getattr(tensor, "_keras_logits", None)
    return logits if tf.is_tensor(logits) else None


def set_keras_logits(tensor, logits) -> None:
    """Attaches `logits` to `tensor` as Keras's softmax does."""
    tensor._keras_logits = logits


def set_keras_mask(tensor, mask) -> None:
    """Attaches a mask to `tensor` as Keras's layers do (`get_keras_mask`
    reads it), so that the masked losses of a recorded pass stay masked."""
    tensor._keras_mask = mask


def user_loss(loss):
    """What the user passed to `compile(loss=...)`, for messages."""
    return loss._user_loss


# -- the train step -------------------------------------------------------------


def is_keras_train_step(step) -> bool:
    """Whether `step` is Keras's own TensorFlow `train_step` (bound): only
    then is measuring from the step's own pass exact."""
    return getattr(step, "__func__", None) is TensorFlowTrainer.train_step


def is_keras_loss_computation(model_class) -> bool:
    """Whether `model_class` computes its loss as Keras's trainer does."""
    return (
        model_class.compute_loss is Trainer.compute_loss
        and model_class._compute_loss is Trainer._compute_loss
    )


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (`jit_compile`):
    convolutions' per-example kernels take the grouped form there."""
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def optimizer_learning_rate(optimizer):
    """What the optimizer reads its learning rate from (a variable, a
    schedule or a function), as set by the user or by other callbacks."""
    return optimizer._learning_rate


def set_optimizer_learning_rate(optimizer, value) -> None:
    """Replaces it while a step is traced (`DynamicSampling` multiplies it by
    the gain of the batch actually trained, and puts it back)."""
    optimizer._learning_rate = value


def tape_identity(tensor, backward):
    """`tensor` through one `Identity` operation that every active
    `tf.GradientTape` differentiates with ``backward(upstream)`` (which
    returns ``[gradient of tensor]``). The probes that collect a training
    step's cotangents are one per layer output: `tf.custom_gradient` would
    add an `IdentityN`, a `ZerosLike`, a registered gradient and a few
    milliseconds of tracing to each (issue 15, the first `fit`). Only tapes
    see it, not `tf.gradients`: the probes are placed only around Keras's
    own train step, which differentiates with a tape."""
    with record.stop_recording():
        output = tf.identity(tensor)
    record.record_operation("KerasFimProbe", [output], [tensor], backward)
    return output


# -- patches --------------------------------------------------------------------


def set_instance_attribute(obj, name: str, value) -> None:
    """Sets an attribute Keras's tracking does not see: a step wrapper, a
    recording `layer.call`, a plain model's untracked `fisher_state` (the
    user's `model.weights` stay theirs; weight saving still finds it)."""
    object.__setattr__(obj, name, value)


def unset_instance_attribute(obj, name: str) -> None:
    """Removes what `set_instance_attribute` set."""
    object.__delattr__(obj, name)


# -- tf.data, progress bar, event files -----------------------------------------


def variant_tensor(dataset):
    """The dataset's graph handle, for a `tf.data.Dataset` subclass that
    declares another cardinality (`DynamicSampling`'s epochs change size)."""
    return dataset._variant_tensor


def dataset_op_names(dataset) -> set[str]:
    """The op types in a dataset's graph and its functions (`DynamicSampling`
    warns when a pipeline it would read into memory holds a random op: that
    randomness would be drawn once and frozen)."""
    graph = tf.compat.v1.GraphDef.FromString(
        dataset._as_serialized_graph(
            external_state_policy=tf.data.experimental.ExternalStatePolicy.IGNORE
        ).numpy()
    )
    names = {node.op for node in graph.node}
    for function in graph.library.function:
        names.update(node.op for node in function.node_def)
    return names


def restart_iterator(iterator) -> None:
    """Starts `iterator` (from `iter(dataset)`) again at the beginning of its
    dataset, on the same iterator resource: a `DynamicSampling` stream reads
    one iterator from a dataset function that captured it, and starts it
    afresh when a `fit` resumes elsewhere than where it stands (tf.data's
    reinitializable iterator, which TF2 keeps only as this op)."""
    gen_dataset_ops.make_iterator(
        iterator._dataset._variant_tensor, iterator._iterator_resource
    )


def op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is on (it
    turns tf.data's read-ahead off, which a finite stream of
    `DynamicSampling` needs to see the end of its pass); TensorFlow has a
    setter but no public getter."""
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def update_progress_bar(progbar_logger, steps_done: int, logs) -> None:
    """Redraws a `ProgbarLogger`'s bar at `steps_done` steps (Keras numbers a
    short last execution as if it were full)."""
    progbar_logger._update_progbar(steps_done, logs)


def import_event(writer, serialized_event) -> None:
    """Writes a raw `Event` into `writer`'s file (a `SessionLog.START`, which
    TensorBoard needs to drop the points of an interrupted run)."""
    with writer.as_default():
        summary_ops_v2.import_event(tf.constant(serialized_event))


def reopen_file_writer(writer, logdir: str) -> None:
    """Opens a new event file in `logdir` for a closed `tf.summary` file
    writer, on the same resource, with `create_file_writer`'s defaults: the
    train functions traced with it (which hold its resource, not the Python
    object) keep writing through it, so a later `fit` reuses them instead of
    tracing them again."""
    gen_summary_ops.create_summary_file_writer(
        writer._resource,
        logdir=logdir,
        max_queue=10,
        flush_millis=120000,
        filename_suffix=".v2",
    )
    writer._closed = False
