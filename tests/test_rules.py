"""Rules as objects in a registry (`keras_fim.engine.rules`): a user's layer
with a per-example rule *and* a factored (ghost) form, used on one device and
as the payload a replica all-gathers; registries built by the factory and
injected; what happens to a layer whose rule fails (`fail_mode`)."""

import fim_reference as ref
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fim
from keras_fim.engine import grams_from_calls, payloads_from_calls, record_pass
from keras_fim.engine.gram import kernel_factors, path_choice
from keras_fim.engine.rules import (
    GENERIC,
    LayerRule,
    RuleRegistry,
    builtin_registry,
    dense_rule,
    depthwise_rule,
    register_rule,
)


class Affine(keras.layers.Layer):
    """A Dense in disguise: keras-fim has no rule for it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), name="bias")

    def call(self, x):
        return tf.tanh(x @ self.kernel + self.bias)


def affine_cotangent(call, examples):
    """The cotangent before the tanh, from the recorded output and its
    cotangent: d tanh(z) = (1 - y^2) dy."""
    y, dy = call.outputs[0][:examples], call.cotangents[0][:examples]
    return (1 - y**2) * dy


def affine_per_example(layer, call, examples):
    x, dz = call.args[0][:examples], affine_cotangent(call, examples)
    return [tf.einsum("bi,bj->bij", x, dz), dz]


CALLS_SEEN = []


def affine_factors(layer, calls, examples):
    CALLS_SEEN.append(layer.name)
    a = tf.concat([c.args[0][:examples][:, None] for c in calls], axis=1)
    d = tf.concat([affine_cotangent(c, examples)[:, None] for c in calls], axis=1)
    return kernel_factors(layer.name, a, d, use_bias=True)


def model_and_batch(n=10):
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            Affine(6, name="affine"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(5)
    return model, rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def loop_block(model, x, y, layer_name):
    grads = ref.loop_per_example_gradients(model, x, y)
    by_id = dict(zip([id(v) for v in model.trainable_variables], grads, strict=True))
    jac = ref.flatten_gradients(
        [by_id[id(v)] for v in model.get_layer(layer_name).trainable_variables]
    )
    return jac @ jac.T


def test_a_custom_layer_with_a_ghost_form_uses_it_locally_and_distributed():
    model, x, y = model_and_batch()
    registry = builtin_registry()
    register_rule(Affine, affine_per_example, factors=affine_factors, registry=registry)
    expected = loop_block(model, x, y, "affine")

    record = record_pass(model, x, y, registry=registry)
    blocks, plans = grams_from_calls(record.units, record.calls, record.examples)
    assert {p.layer: p.path for p in plans}["affine"] == "ghost"
    np.testing.assert_allclose(blocks["affine"], expected, rtol=1e-5, atol=1e-7)

    # Distributed: each replica sends the factors (fewer values than the
    # parameters), and the block of the gathered factors is the global one.
    parts = []
    for part in (slice(0, 4), slice(4, 10)):
        shard = record_pass(model, x[part], y[part], registry=registry)
        parts.append(payloads_from_calls(shard.units, shard.calls, shard.examples))
    payload = parts[0]["affine"]
    assert payload.kind == "factors"
    gathered = [
        tf.concat([a, b], 0)
        for a, b in zip(payload.tensors, parts[1]["affine"].tensors, strict=True)
    ]
    block, plan = payload.block(gathered, 1 << 30)
    assert plan.path == "ghost"
    np.testing.assert_allclose(block, expected, rtol=1e-5, atol=1e-7)


def test_without_a_registered_rule_the_generic_rule_is_exact():
    model, x, y = model_and_batch()
    record = record_pass(model, x, y)  # the process-wide registry: no Affine
    units = {unit.layer.name: unit.rule for unit in record.units}
    assert units["affine"] is GENERIC
    blocks, plans = grams_from_calls(record.units, record.calls, record.examples)
    assert {p.layer: p.path for p in plans}["affine"] == "rule"
    np.testing.assert_allclose(
        blocks["affine"], loop_block(model, x, y, "affine"), rtol=1e-5, atol=1e-7
    )


def test_an_injected_partial_registry_leaves_other_layers_to_the_generic_rule():
    model, x, y = model_and_batch()
    partial = RuleRegistry({Affine: LayerRule(affine_per_example)})
    record = record_pass(model, x, y, registry=partial)
    rules = {unit.layer.name: unit.rule for unit in record.units}
    assert rules["affine"].per_example is affine_per_example
    assert rules["head"] is GENERIC  # no Dense rule in this registry
    blocks, _ = grams_from_calls(record.units, record.calls, record.examples)
    np.testing.assert_allclose(
        blocks["head"], loop_block(model, x, y, "head"), rtol=1e-5, atol=1e-7
    )
    # The process-wide registry is untouched by either.
    assert keras_fim.engine.rules.rule_for(Affine(2)) is None


def test_registries_from_the_factory_are_independent():
    first, second = builtin_registry(), builtin_registry()
    register_rule(Affine, affine_per_example, registry=first)
    assert first.rule_for(Affine(2)).per_example is affine_per_example
    assert second.rule_for(Affine(2)) is None
    assert first.rule_for(keras.layers.Dense(2)).per_example is dense_rule


def test_register_rule_errors_name_the_argument():
    registry = builtin_registry()
    with pytest.raises(ValueError, match="layer_class"):
        register_rule(int, affine_per_example, registry=registry)
    with pytest.raises(ValueError, match="`rule`"):
        register_rule(Affine, "not a rule", registry=registry)
    with pytest.raises(ValueError, match="factors"):
        register_rule(
            Affine,
            LayerRule(affine_per_example),
            factors=affine_factors,
            registry=registry,
        )
    register_rule(Affine, affine_per_example, registry=registry)
    with pytest.raises(ValueError, match="overwrite=True"):
        register_rule(Affine, affine_per_example, registry=registry)


# -- fail_mode -------------------------------------------------------------------


def broken_rule(layer, call, examples):
    raise NotImplementedError("no per-example gradients for this layer")


@pytest.fixture
def broken_affine():
    register_rule(Affine, broken_rule)
    yield
    keras_fim.engine.rules.DEFAULT_REGISTRY.unregister(Affine)


def test_fail_mode_error_raises(broken_affine):
    model, x, y = model_and_batch()
    with pytest.raises(NotImplementedError, match="no per-example gradients"):
        keras_fim.measure(model, x, y)


@pytest.mark.parametrize("fail_mode", ["warn", "skip"])
def test_fail_mode_leaves_the_failing_layer_out(broken_affine, fail_mode):
    import warnings

    model, x, y = model_and_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram = keras_fim.fisher_gram(model, x, y, fail_mode=fail_mode)
        blocks = keras_fim.layer_grams(model, x, y, fail_mode=fail_mode)
    messages = [str(w.message) for w in caught if "keras-fim leaves" in str(w.message)]
    assert sorted(blocks) == ["head"]
    # J is the other layers' only.
    np.testing.assert_allclose(
        gram, loop_block(model, x, y, "head"), rtol=1e-5, atol=1e-7
    )
    if fail_mode == "warn":
        assert messages and all("'affine'" in m for m in messages)
    else:
        assert messages == []


def test_fail_mode_in_fit_measures_the_rest_and_trains_as_keras(broken_affine):
    def train(callbacks):
        model, x, y = model_and_batch(32)
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
        )
        return model

    plain = train([])
    with pytest.warns(UserWarning, match="keras-fim leaves layer 'affine'"):
        measured = train([keras_fim.FisherCallback(every_n_steps=1, fail_mode="warn")])
    for a, b in zip(plain.get_weights(), measured.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(measured.fisher_state.measurements) == 4


def test_fail_mode_is_checked():
    with pytest.raises(ValueError, match="fail_mode"):
        keras_fim.FisherCallback(fail_mode="ignore")
    model, x, y = model_and_batch()
    with pytest.raises(ValueError, match="fail_mode"):
        keras_fim.measure(model, x, y, fail_mode="loud")


# -- depthwise and separable convolutions ------------------------------------------

DEPTHWISE_CASES = {
    "same_s1_m1_bias": dict(kernel_size=3, padding="same"),
    "valid_s2_m2_nobias": dict(
        kernel_size=3, strides=2, depth_multiplier=2, use_bias=False
    ),
    "same_s2_m3_rect": dict(
        kernel_size=(2, 3), strides=2, padding="same", depth_multiplier=3
    ),
    "same_dilated": dict(kernel_size=3, padding="same", dilation_rate=2),
    "valid_s21": dict(kernel_size=(3, 2), strides=(2, 1)),
}


def conv_model(layer, shape):
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(shape),
            layer,
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def check_layer_against_loop(model, x, name, expected_paths=None):
    y = np.random.default_rng(8).integers(0, 3, len(x))
    expected = loop_block(model, x, y, name)
    record = record_pass(model, x, y)
    blocks, plans = grams_from_calls(record.units, record.calls, record.examples)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(blocks[name], expected, atol=2e-6 * scale, rtol=1e-5)
    # The per-example rule (the naive path, and the distributed payload).
    grads = keras_fim.per_example_gradients(model, x, y)
    loop = ref.loop_per_example_gradients(model, x, y)
    for got, want in zip(grads, loop, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    return {p.layer: p for p in plans}


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_depthwise_conv2d_matches_loop(case, batch):
    layer = keras.layers.DepthwiseConv2D(
        activation="tanh", name="dw", **DEPTHWISE_CASES[case]
    )
    model = conv_model(layer, (7, 6, 3))
    x = np.random.default_rng(9).normal(size=(batch, 7, 6, 3)).astype("float32")
    assert builtin_registry().rule_for(layer).per_example is depthwise_rule
    plans = check_layer_against_loop(model, x, "dw")
    assert plans["dw"].path == "materialise"
    # Each way of forming the kernel gradients (where it applies).
    for method in ("folded", "slices"):
        with path_choice(method):
            plans = check_layer_against_loop(model, x, "dw")
        assert plans["dw"].method == method or "dilation_rate" in DEPTHWISE_CASES[case]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_separable_conv2d_matches_loop(case, batch):
    kwargs = DEPTHWISE_CASES[case]
    layer = keras.layers.SeparableConv2D(4, activation="relu", name="sep", **kwargs)
    model = conv_model(layer, (7, 6, 3))
    x = np.random.default_rng(10).normal(size=(batch, 7, 6, 3)).astype("float32")
    plans = check_layer_against_loop(model, x, "sep")
    assert plans["sep"].path in ("ghost", "materialise")


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.DepthwiseConv1D(
            3, strides=2, depth_multiplier=2, name="c"
        ),
        lambda: keras.layers.SeparableConv1D(
            4, 3, padding="same", activation="tanh", name="c"
        ),
    ],
    ids=["depthwise1d", "separable1d"],
)
def test_one_dimensional_depthwise_and_separable_match_loop(layer):
    model = conv_model(layer(), (9, 3))
    x = np.random.default_rng(11).normal(size=(5, 9, 3)).astype("float32")
    check_layer_against_loop(model, x, "c")


@pytest.mark.parametrize("kind", ["depthwise", "separable"])
def test_channels_first_and_both_pointwise_paths_match_loop(kind):
    kwargs = dict(
        kernel_size=3, strides=2, padding="same", data_format="channels_first"
    )
    if kind == "depthwise":
        layer = keras.layers.DepthwiseConv2D(depth_multiplier=2, name="c", **kwargs)
    else:
        layer = keras.layers.SeparableConv2D(4, activation="tanh", name="c", **kwargs)
    model = conv_model(layer, (3, 7, 6))
    x = np.random.default_rng(12).normal(size=(5, 3, 7, 6)).astype("float32")
    check_layer_against_loop(model, x, "c")
    if kind == "separable":  # the pointwise kernel materialised, split
        y = np.random.default_rng(8).integers(0, 3, 5)
        record = record_pass(model, x, y)
        blocks, plans = grams_from_calls(
            record.units, record.calls, record.examples, memory_budget=64
        )
        assert {p.layer: p.path for p in plans}["c"] == "materialise"
        expected = loop_block(model, x, y, "c")
        np.testing.assert_allclose(
            blocks["c"], expected, atol=2e-6 * np.abs(expected).max()
        )


def mobile_block_model():
    """An inverted residual block with squeeze-and-excitation, as
    keras.applications builds them (EfficientNet, MobileNetV3), without
    BatchNorm (the loop reference has no batch statistics), and a
    separable convolution."""
    keras.utils.set_random_seed(13)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    h = keras.layers.Activation("swish")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.Activation("swish")(h)
    se = keras.layers.GlobalAveragePooling2D()(h)
    se = keras.layers.Reshape((1, 1, 8))(se)
    se = keras.layers.Conv2D(2, 1, activation="swish", name="se_reduce")(se)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(se)
    h = keras.layers.Multiply()([h, se])
    h = keras.layers.Conv2D(8, 1, name="project")(h)
    h = keras.layers.SeparableConv2D(6, 3, strides=2, padding="same", name="sep")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    dense_se = keras.layers.Dense(3, activation="relu", name="dense_se")(h)
    dense_se = keras.layers.Dense(6, activation="sigmoid", name="dense_ex")(dense_se)
    h = keras.layers.Multiply()([h, dense_se])
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def test_a_mobile_block_with_squeeze_and_excitation_matches_loop():
    model = mobile_block_model()
    x = np.random.default_rng(14).normal(size=(5, 8, 8, 3)).astype("float32")
    y = np.random.default_rng(15).integers(0, 3, 5)
    record = record_pass(model, x, y)
    rules = {u.layer.name: u.rule.per_example.__name__ for u in record.units}
    assert rules["dw"] == "depthwise_rule" and rules["sep"] == "separable_rule"
    blocks, plans = grams_from_calls(record.units, record.calls, record.examples)
    paths = {p.layer: p.path for p in plans}
    # Squeeze-and-excitation: 1x1 convolutions on 1x1 maps and Dense layers
    # on pooled vectors, one position each: the ghost form.
    for name in ("se_reduce", "se_expand", "dense_se", "dense_ex", "head"):
        assert paths[name] == "ghost", (name, paths)
    assert paths["dw"] == "materialise"
    grads = ref.loop_per_example_gradients(model, x, y)
    jac = ref.flatten_gradients(grads)
    np.testing.assert_allclose(
        sum(b.numpy() for b in blocks.values()),
        jac @ jac.T,
        atol=2e-6 * np.abs(jac @ jac.T).max(),
    )
    for name in blocks:
        expected = loop_block(model, x, y, name)
        np.testing.assert_allclose(
            blocks[name], expected, atol=2e-6 * np.abs(expected).max(), err_msg=name
        )


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="c"),
        lambda: keras.layers.DepthwiseConv2D(3, dilation_rate=2, name="c"),
        lambda: keras.layers.SeparableConv2D(4, 3, padding="same", name="c"),
    ],
    ids=["depthwise_s2", "depthwise_dilated", "separable"],
)
def test_depthwise_and_separable_under_xla_match_loop(layer):
    model = conv_model(layer(), (7, 6, 3))
    x = np.random.default_rng(16).normal(size=(5, 7, 6, 3)).astype("float32")
    y = np.random.default_rng(8).integers(0, 3, 5)
    xla = tf.function(
        lambda: keras_fim.per_example_gradients(model, x, y), jit_compile=True
    )()
    gram = tf.function(lambda: keras_fim.fisher_gram(model, x, y), jit_compile=True)()
    loop = ref.loop_per_example_gradients(model, x, y)
    for got, want in zip(xla, loop, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    jac = ref.flatten_gradients(loop)
    np.testing.assert_allclose(gram, jac @ jac.T, atol=2e-6 * np.abs(jac @ jac.T).max())
