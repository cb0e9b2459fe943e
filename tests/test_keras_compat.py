"""What keras-fim relies on in Keras's and TensorFlow's internals
(`keras_fim._keras_compat`), one behaviour per test: a release that changes
one fails here, by name."""

import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fim
from keras_fim import _keras_compat as compat
from keras_fim.sampling.dataset import DeclaredCardinality


class Outer(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(2, name="inner")

    def call(self, x):
        return self.inner(x)


def test_flatten_layers_reaches_a_subclassed_layers_attributes():
    model = keras.Sequential([keras.Input((3,)), Outer(name="outer")])

    def names(layers):
        return [x.name for x in layers if not isinstance(x, keras.layers.InputLayer)]

    recursive = compat.flatten_layers(model, include_self=False, recursive=True)
    assert names(recursive) == ["outer", "inner"]
    direct = compat.flatten_layers(model, include_self=True, recursive=False)
    assert names(direct)[0] == model.name and names(direct)[1:] == ["outer"]


def test_call_has_training_arg():
    class NoTraining(keras.Model):
        def call(self, x):
            return x

    assert compat.call_has_training_arg(keras.Sequential([keras.Input((2,))]))
    assert not compat.call_has_training_arg(NoTraining())


def test_strategies():
    assert compat.is_default_strategy(tf.distribute.get_strategy())
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert not compat.is_default_strategy(strategy)
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert compat.distribute_strategy(model) is strategy


def test_compiled_losses_before_and_after_build():
    inputs = keras.Input((3,))
    model = keras.Model(
        inputs, {"a": keras.layers.Dense(1)(inputs), "b": keras.layers.Dense(1)(inputs)}
    )
    model.compile(loss={"a": "mse", "b": None})
    assert compat.compiled_losses(model) == ["mse"]
    assert compat.user_loss(compat.compile_loss(model)) == {"a": "mse", "b": None}
    x = np.ones((2, 3), "float32")
    y = {"a": np.zeros((2, 1), "float32"), "b": np.zeros((2, 1), "float32")}
    model.compute_loss(x, y, model(x))
    (entry,) = compat.flat_losses(compat.compile_loss(model))
    _, fn, weight, _ = entry
    assert isinstance(fn, compat.LossFunctionWrapper) and weight is None
    assert compat.compiled_losses(model) == [fn]
    assert compat.compile_loss(keras.Sequential([keras.Input((2,))])) is None


def test_cross_entropy_reads_the_attached_logits():
    logits = tf.constant([[2.0, 0.0, -1.0]])
    probabilities = tf.nn.softmax(tf.zeros_like(logits))  # uniform
    compat.set_keras_logits(probabilities, logits)
    assert compat.keras_logits(probabilities) is logits
    loss = keras.losses.sparse_categorical_crossentropy(tf.constant([0]), probabilities)
    expected = -tf.nn.log_softmax(logits)[0, 0]
    np.testing.assert_allclose(loss.numpy()[0], expected.numpy(), rtol=1e-6)
    assert compat.keras_logits(tf.constant([1.0])) is None


def test_masks_and_sample_weights_as_keras_applies_them():
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(tf.constant([[1, 0]]))
    np.testing.assert_array_equal(compat.get_keras_mask(embedded), [[True, False]])
    other = tf.identity(embedded)
    compat.set_keras_mask(other, tf.constant([[False, True]]))
    np.testing.assert_array_equal(compat.get_keras_mask(other), [[False, True]])
    weights = compat.apply_mask(
        None, tf.constant([True, False]), dtype="float32", reduction="sum"
    )
    np.testing.assert_array_equal(weights, [1.0, 0.0])
    values, weights = compat.squeeze_or_expand_to_same_rank(
        tf.ones((2, 1)), tf.ones((2,))
    )
    assert values.shape.rank == weights.shape.rank


def test_keras_train_step_and_loss_computation_are_recognised():
    class OwnStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    class OwnLoss(keras.Sequential):
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs)

    plain = keras.Sequential([keras.Input((2,))])
    assert compat.is_keras_train_step(plain.train_step)
    assert not compat.is_keras_train_step(OwnStep([keras.Input((2,))]).train_step)
    assert compat.is_keras_loss_computation(keras.Sequential)
    assert not compat.is_keras_loss_computation(OwnLoss)


def test_in_xla_context():
    @tf.function(jit_compile=True)
    def compiled():
        return tf.constant(compat.in_xla_context())

    @tf.function
    def traced():
        return tf.constant(compat.in_xla_context())

    assert bool(compiled()) and not bool(traced())


def test_the_optimizer_reads_a_replaced_learning_rate():
    variable = keras.Variable([1.0])
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([variable])
    base = compat.optimizer_learning_rate(optimizer)
    compat.set_optimizer_learning_rate(optimizer, lambda: tf.constant(0.5))
    optimizer.apply_gradients([(tf.constant([1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [0.5])
    compat.set_optimizer_learning_rate(optimizer, base)
    optimizer.apply_gradients([(tf.constant([1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [0.4])


def test_instance_attributes_are_used_and_untracked_state_is_saved(tmp_path):
    layer = keras.layers.Dense(1)
    compat.set_instance_attribute(layer, "call", lambda x: x * 0 + 7)
    np.testing.assert_array_equal(layer(tf.ones((1, 2))), [[7, 7]])
    compat.unset_instance_attribute(layer, "call")
    assert layer(tf.ones((1, 2))).shape == (1, 1)
    # A plain model's fisher_state: not among its weights, but saved with them.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keras_fim.FisherCallback().set_model(model)
    assert len(model.weights) == 2
    model.fisher_state.step.assign(5)
    path = os.path.join(tmp_path, "w.weights.h5")
    model.save_weights(path)
    model.fisher_state.step.assign(0)
    model.load_weights(path)
    assert int(model.fisher_state.step) == 5


def test_a_dataset_subclass_with_its_own_cardinality():
    dataset = DeclaredCardinality(tf.data.Dataset.range(3), 10**6)
    assert int(dataset.cardinality()) == 10**6
    assert list(dataset.as_numpy_iterator()) == [0, 1, 2]
    assert compat.variant_tensor(tf.data.Dataset.range(3)) is not None


def test_an_iterator_restarts_on_its_resource():
    made = tf.Variable(0, dtype=tf.int64)

    @tf.autograph.experimental.do_not_convert
    def counted(i):
        with tf.control_dependencies([made.assign_add(1)]):
            return tf.identity(i)

    iterator = iter(tf.data.Dataset.range(10**9).map(counted).prefetch(10**6))

    @tf.function
    def pull():  # a function that captured the iterator reads the restart
        return iterator.get_next()

    assert [int(pull()), int(pull())] == [0, 1]
    time.sleep(0.1)
    assert int(made.numpy()) > 2  # prefetching
    compat.restart_iterator(iterator)
    # The old iterator's prefetching has stopped; the new one starts at
    # its first request.
    stopped = int(made.numpy())
    time.sleep(0.2)
    assert int(made.numpy()) == stopped
    assert [int(pull()) for _ in range(3)] == [0, 1, 2]


def test_op_determinism_is_readable():
    assert compat.op_determinism_enabled() in (True, False)


def test_dataset_op_names_reach_into_map_functions():
    plain = tf.data.Dataset.range(3).map(lambda i: i * 2)
    flipped = plain.map(lambda i: i + tf.random.uniform([], 0, 2, tf.int64))
    assert not any("Random" in op for op in compat.dataset_op_names(plain))
    assert "RandomUniformInt" in compat.dataset_op_names(flipped)
    shuffled = compat.dataset_op_names(plain.shuffle(3))
    assert any("Shuffle" in op for op in shuffled)


def test_progress_bar_internals():
    logger = keras.callbacks.ProgbarLogger()
    logger.set_params({"verbose": 1, "epochs": 1, "steps": 3})
    logger.on_train_begin()
    logger.on_epoch_begin(0)
    assert hasattr(logger, "target") and hasattr(logger, "progbar")
    compat.update_progress_bar(logger, 0, {})


def test_a_raw_event_reaches_the_file(tmp_path):
    from tensorflow.core.util import event_pb2

    writer = tf.summary.create_file_writer(str(tmp_path))
    event = event_pb2.Event(
        step=4, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    )
    compat.import_event(writer, event.SerializeToString())
    writer.close()
    (name,) = os.listdir(tmp_path)
    events = list(tf.compat.v1.train.summary_iterator(os.path.join(tmp_path, name)))
    assert any(e.step == 4 and e.HasField("session_log") for e in events)


def test_a_closed_writer_reopens_on_its_resource_for_a_traced_function(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    traces = []

    @tf.function
    def write(value):
        traces.append(1)
        with writer.as_default(step=tf.cast(value, tf.int64)):
            tf.summary.scalar("x", value)

    write(tf.constant(1.0))
    writer.close()
    compat.reopen_file_writer(writer, str(tmp_path))
    write(tf.constant(2.0))  # the same trace, writing into a new file
    writer.close()
    assert len(traces) == 1
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2
    steps = [
        [
            e.step
            for e in tf.compat.v1.train.summary_iterator(os.path.join(tmp_path, n))
            if e.summary.value
        ]
        for n in names
    ]
    assert steps == [[1], [2]]


def test_functional_construction_is_recognised():
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(inputs)
    assert compat.functional_init_arguments((inputs, outputs), {})
    assert not compat.functional_init_arguments((), {})
    model = keras_fim.FisherModel(inputs, outputs)
    assert isinstance(model, compat.Functional)


def test_a_saved_fisher_model_loads_back_as_a_fisher_model(tmp_path):
    inputs = keras.Input((2,))
    model = keras_fim.FisherModel(inputs, keras.layers.Dense(1)(inputs), per_layer=True)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == "FisherModel"
    assert (
        isinstance(loaded, keras_fim.FisherModel) and loaded.fisher_options["per_layer"]
    )
    # Files saved by keras-fim 0.1 name the class FunctionalFisherModel.
    old = keras.saving.get_registered_object("keras_fim>FunctionalFisherModel")
    assert old is type(loaded)


def test_a_tape_identity_hands_its_gradient_to_python_in_one_operation():
    seen = []

    def backward(upstream):
        seen.append(upstream)
        return [3.0 * upstream]

    @tf.function(autograph=False)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            before = len(tf.compat.v1.get_default_graph().get_operations())
            y = compat.tape_identity(tf.sin(x), backward)
            added = len(tf.compat.v1.get_default_graph().get_operations()) - before
            loss = tf.reduce_sum(2.0 * y)
        return y, tape.gradient(loss, x), added

    x = tf.constant([0.5, 1.0])
    y, gradient, added = step(x)
    # sin, then one Identity: no IdentityN, no ZerosLike
    assert int(added) == 2
    np.testing.assert_allclose(y, np.sin(x))
    np.testing.assert_allclose(gradient, 6.0 * np.cos(x), rtol=1e-6)
    assert len(seen) == 1 and seen[0].shape == (2,)


def test_a_batch_norm_training_call_hands_over_its_moments():
    norm = keras.layers.BatchNormalization(axis=1)
    x = tf.random.stateless_normal((4, 3, 5), seed=[1, 2])
    norm.build(x.shape)
    seen = []
    with compat.recording_moments(norm, seen):
        norm(x, training=True)
        norm(x, training=False)  # the moving statistics: nothing recorded
    assert len(seen) == 1
    mean, variance = tf.nn.moments(x, axes=[0, 2])
    np.testing.assert_allclose(seen[0][0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen[0][1], variance, rtol=1e-5, atol=1e-6)
    # and the layer is itself again
    assert "_moments" not in vars(norm)
    dense, other = keras.layers.Dense(2), []
    with compat.recording_moments(dense, other):
        dense(x)
    assert other == []


def test_an_unlowered_cond_keeps_its_branches_functions():
    @tf.function(autograph=False)
    def pick(flag, x):
        result = compat.unlowered_cond(flag, lambda: x * 2.0, lambda: x - 1.0)
        ifs = [
            op
            for op in tf.compat.v1.get_default_graph().get_operations()
            if op.type in ("If", "StatelessIf")
        ]
        assert len(ifs) == 1
        assert ifs[0].get_attr("_lower_using_switch_merge") is False
        return result

    x = tf.constant(3.0)
    assert float(pick(tf.constant(True), x)) == 6.0
    assert float(pick(tf.constant(False), x)) == 2.0


@pytest.mark.parametrize("name", compat.__all__)
def test_every_export_exists(name):
    assert getattr(compat, name) is not None


def test_a_stateless_scope_maps_reads_and_keeps_every_write():
    # Public API, but keras-fim relies on exactly this
    # (`engine.record.per_example_loss_pass`): inside the scope, variables
    # read the mapped values, and neither a seed generator's draw nor a
    # BatchNorm update reaches the model.
    keras.utils.set_random_seed(0)
    seeds = keras.random.SeedGenerator(5)
    norm = keras.layers.BatchNormalization()
    norm.build((None, 2))
    dense = keras.layers.Dense(1, kernel_initializer="ones")
    dense.build((None, 2))
    state = seeds.state.numpy().copy()
    mapping = [(dense.kernel, tf.fill((2, 1), 2.0))]
    x = tf.ones((3, 2))

    @tf.function
    def run():
        with keras.StatelessScope(state_mapping=mapping):
            norm(x + 5.0, training=True)
            return dense(x), keras.random.normal((2,), seed=seeds)

    out, draw = run()
    np.testing.assert_array_equal(out.numpy(), np.full((3, 1), 4.0))
    np.testing.assert_array_equal(seeds.state.numpy(), state)
    np.testing.assert_array_equal(norm.moving_mean.numpy(), np.zeros(2))
    np.testing.assert_array_equal(dense.kernel.numpy(), np.ones((2, 1)))
    # The draw is the one the generator would make next, outside the scope.
    np.testing.assert_array_equal(
        draw.numpy(), keras.random.normal((2,), seed=seeds).numpy()
    )
