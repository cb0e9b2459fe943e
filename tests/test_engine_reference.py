"""keras_fim's engine against independent brute-force references.

The references (tests/reference.py) never import keras_fim: a per-example
loop of gradient tapes for models whose examples do not interact, a
per-example-weight-copies forward pass written by hand in float64 for
BatchNorm models, and numpy for the spectral measurements.
"""

import contextlib

import fim_reference as ref
import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import compiled

import keras_fim

TOL = {
    "float32": dict(rtol=1e-4, atol=1e-5),
    "float64": dict(rtol=1e-9, atol=1e-11),
}
SCCE = keras.losses.SparseCategoricalCrossentropy


@contextlib.contextmanager
def use_floatx(dtype):
    """Builds models in `dtype`; restores floatx and the dtype policy."""
    old_floatx = keras.config.floatx()
    old_policy = keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(old_floatx)
        keras.config.set_dtype_policy(old_policy)


def fim_grads(model, x, y, sample_weight=None, **kwargs):
    grads = keras_fim.per_example_gradients(model, x, y, sample_weight, **kwargs)
    return [np.asarray(g, np.float64) for g in grads]


def assert_grads_close(actual, expected, model, rtol, atol):
    variables = model.trainable_variables
    assert len(actual) == len(expected) == len(variables)
    for a, e, v in zip(actual, expected, variables, strict=True):
        assert a.shape == e.shape, (v.path, a.shape, e.shape)
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=atol * scale, err_msg=f"variable {v.path}"
        )


def classification_data(batch, shape, classes=3, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(dtype)
    y = rng.integers(0, classes, size=(batch,)).astype("int32")
    return x, y


def tape_batch_gradient(model, x, y, sample_weight=None, loss=None):
    """Gradient of an explicit mean loss over model(x, training=True)."""
    loss = loss or SCCE()
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        value = loss(y, y_pred, sample_weight=sample_weight)
    grads = tape.gradient(value, model.trainable_variables)
    return [np.asarray(g, np.float64) for g in grads]


def assert_sums_to_batch_gradient(contributions, batch_gradient, batch, rtol):
    for c, g in zip(contributions, batch_gradient, strict=True):
        total = c.sum(axis=0)
        expected = batch * g
        err = np.linalg.norm(total - expected)
        # Scale: the batch gradient, or the contributions themselves where
        # they cancel (e.g. a bias followed by BatchNorm sums to zero).
        scale = max(np.linalg.norm(expected), np.linalg.norm(c), 1e-12)
        assert err <= rtol * scale, (err, np.linalg.norm(expected), scale)


def mlp(input_dim=5, hidden=7, classes=3, **dense_kwargs):
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(hidden, activation="relu", **dense_kwargs),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


# ---------------------------------------------------------------------------
# Models whose examples never interact: against the per-example loop.


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mlp_matches_loop(dtype, weighted):
    with use_floatx(dtype):
        keras.utils.set_random_seed(1)
        model = compiled(mlp())
        x, y = classification_data(6, (5,), dtype=dtype)
        sw = np.array([1.0, 0.5, 2.0, 0.0, 1.5, 3.0], dtype) if weighted else None
        actual = fim_grads(model, x, y, sw)
        expected = ref.loop_per_example_gradients(model, x, y, sw)
    assert all(a.dtype == np.float64 for a in actual)
    if weighted:  # example with weight 0 contributes nothing
        assert all(np.all(a[3] == 0) for a in actual)
    assert_grads_close(actual, expected, model, **TOL[dtype])


def _conv_cases(cases):
    return list(cases)


def assert_image_model_matches_loop(input_shape, *layers):
    """Layers -> Flatten -> softmax Dense, compared to the loop in float32."""
    model = compiled(
        keras.Sequential(
            [
                keras.Input(input_shape),
                *layers,
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    x, y = classification_data(4, input_shape)
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y)
    assert_grads_close(actual, expected, model, **TOL["float32"])


CONV2D_CASES = {
    "same_s1": dict(kernel_size=3, padding="same"),
    "same_s2": dict(kernel_size=3, padding="same", strides=2),
    "same_s2_k2": dict(kernel_size=2, padding="same", strides=2),
    "valid_s1": dict(kernel_size=3, padding="valid"),
    "valid_s2": dict(kernel_size=3, padding="valid", strides=2),
    "valid_rect_s21": dict(kernel_size=(2, 3), padding="valid", strides=(2, 1)),
    "same_dilated": dict(kernel_size=3, padding="same", dilation_rate=2),
    "valid_dilated": dict(kernel_size=2, padding="valid", dilation_rate=(2, 1)),
    "no_bias_relu": dict(
        kernel_size=3, padding="same", use_bias=False, activation="relu"
    ),
    "groups": dict(kernel_size=3, padding="same", groups=2, filters=4),
}


@pytest.mark.parametrize("case", _conv_cases(CONV2D_CASES))
def test_conv2d_matches_loop(case):
    assert_image_model_matches_loop(
        (7, 6, 2),
        keras.layers.Conv2D(**{"filters": 3, **CONV2D_CASES[case]}),
        keras.layers.Conv2D(2, 3, padding="same", activation="tanh"),
    )


CONV1D_CASES = {
    "same_s2": dict(kernel_size=3, padding="same", strides=2),
    "valid_dilated": dict(kernel_size=3, padding="valid", dilation_rate=2),
    "causal": dict(kernel_size=3, padding="causal", activation="relu"),
    "valid_s3": dict(kernel_size=2, padding="valid", strides=3),
    "same_dilated": dict(kernel_size=3, padding="same", dilation_rate=3),
    "groups": dict(kernel_size=3, padding="same", groups=3, filters=6, use_bias=False),
}


@pytest.mark.parametrize("case", _conv_cases(CONV1D_CASES))
def test_conv1d_matches_loop(case):
    model = compiled(
        keras.Sequential(
            [
                keras.Input((9, 3)),
                keras.layers.Conv1D(**{"filters": 4, **CONV1D_CASES[case]}),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    x, y = classification_data(5, (9, 3))
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y)
    assert_grads_close(actual, expected, model, **TOL["float32"])


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
        lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="valid"),
        lambda: keras.layers.SeparableConv2D(4, 3, padding="same", activation="relu"),
        lambda: keras.layers.SeparableConv2D(3, 2, strides=2, padding="valid"),
    ],
    ids=["depthwise_same", "depthwise_s2", "separable_same", "separable_s2"],
)
def test_depthwise_and_separable_match_loop(layer):
    assert_image_model_matches_loop((6, 6, 2), layer())


MISC_MODELS = {
    "conv2d_transpose": lambda: [
        keras.Input((4, 4, 2)),
        keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ],
    "group_norm": lambda: [
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.GroupNormalization(groups=2),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ],
    "bidirectional_lstm": lambda: [
        keras.Input((5, 3)),
        keras.layers.Bidirectional(keras.layers.LSTM(3)),
        keras.layers.Dense(3, activation="softmax"),
    ],
    "time_distributed": lambda: [
        keras.Input((4, 3)),
        keras.layers.TimeDistributed(keras.layers.Dense(5, activation="relu")),
        keras.layers.LayerNormalization(axis=(1, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ],
    "unnormalised_logits": lambda: [
        keras.Input((5,)),
        keras.layers.Dense(6, activation="gelu"),
        keras.layers.Dense(3),
    ],
}
MISC_SHAPES = {
    "conv2d_transpose": (4, 4, 2),
    "group_norm": (5, 5, 2),
    "bidirectional_lstm": (5, 3),
    "time_distributed": (4, 3),
    "unnormalised_logits": (5,),
}


@pytest.mark.parametrize("name", list(MISC_MODELS))
def test_misc_layers_match_loop(name):
    model = keras.Sequential(MISC_MODELS[name]())
    if name == "unnormalised_logits":
        compiled(model, loss=SCCE(from_logits=True))
        loss = SCCE(from_logits=True, reduction=None)
    else:
        compiled(model)
        loss = None
    x, y = classification_data(4, MISC_SHAPES[name])
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y, loss=loss)
    assert_grads_close(actual, expected, model, **TOL["float32"])


def test_sigmoid_binary_crossentropy_matches_loop():
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu"),
            keras.layers.Dense(2, activation="sigmoid"),
        ]
    )
    compiled(model, loss="binary_crossentropy")
    x, _ = classification_data(5, (5,))
    y = np.random.default_rng(1).integers(0, 2, size=(5, 2)).astype("float32")
    sw = np.array([1.0, 0.0, 2.0, 0.5, 1.0], "float32")
    actual = fim_grads(model, x, y, sw)
    expected = ref.loop_per_example_gradients(
        model, x, y, sw, loss=keras.losses.BinaryCrossentropy(reduction=None)
    )
    assert_grads_close(actual, expected, model, **TOL["float32"])


def test_masked_embedding_gru_matches_loop():
    model = compiled(
        keras.Sequential(
            [
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(10, 4, mask_zero=True),
                keras.layers.GRU(5),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    x = np.array(
        [
            [3, 4, 5, 6, 7, 8],
            [1, 2, 0, 0, 0, 0],
            [9, 9, 9, 0, 0, 0],
            [5, 0, 0, 0, 0, 0],
            [2, 7, 1, 8, 2, 0],
        ],
        "int32",
    )
    y = np.array([0, 2, 1, 1, 0], "int32")
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y)
    assert_grads_close(actual, expected, model, **TOL["float32"])
    # The padding token's embedding row never receives a gradient.
    embeddings = model.trainable_variables.index(model.layers[0].embeddings)
    np.testing.assert_array_equal(actual[embeddings][:, 0], 0.0)


def test_attention_layernorm_einsum_match_loop():
    inputs = keras.Input((4, 6))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([inputs, h]))
    h = keras.layers.EinsumDense(
        "btd,de->bte", output_shape=(None, 5), bias_axes="e", activation="relu"
    )(h)
    h = keras.layers.Dense(4, activation="tanh")(h)  # Dense on a 3-D input
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = compiled(keras.Model(inputs, outputs))
    x, y = classification_data(4, (4, 6))
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y)
    assert_grads_close(actual, expected, model, **TOL["float32"])


def test_shared_layer_called_twice_matches_loop():
    shared = keras.layers.Dense(4, activation="tanh")
    a, b = keras.Input((5,)), keras.Input((5,))
    h = keras.layers.Concatenate()([shared(a), shared(b)])
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = compiled(keras.Model([a, b], outputs))
    x1, y = classification_data(4, (5,), seed=1)
    x2, _ = classification_data(4, (5,), seed=2)
    actual = fim_grads(model, [x1, x2], y)
    expected = ref.loop_per_example_gradients(model, [x1, x2], y)
    assert_grads_close(actual, expected, model, **TOL["float32"])


@pytest.mark.parametrize(
    "dtype, loss_weights",
    [
        ("float32", {"cls": 1.0, "reg": 0.3}),
        # Loss weights exactly representable in float32.
        ("float64", {"cls": 2.0, "reg": 0.25}),
        ("float64", {"cls": 1.0, "reg": 0.3}),
    ],
    ids=["float32", "float64-exact-weights", "float64-weight-0.3"],
)
def test_multi_output_dict_losses_match_loop(dtype, loss_weights):
    with use_floatx(dtype):
        keras.utils.set_random_seed(2)
        inputs = {
            "img": keras.Input((5, 5, 1), name="img"),
            "vec": keras.Input((3,), name="vec"),
        }
        h = keras.layers.Conv2D(2, 3, activation="relu")(inputs["img"])
        h = keras.layers.Flatten()(h)
        h = keras.layers.Concatenate()([h, inputs["vec"]])
        h = keras.layers.Dense(6, activation="tanh")(h)
        cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
        reg = keras.layers.Reshape((2, 3))(keras.layers.Dense(6)(h))
        reg = keras.layers.Identity(name="reg")(reg)
        model = keras.Model(inputs, {"cls": cls, "reg": reg})
        compiled(
            model,
            loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
            loss_weights=loss_weights,
        )
        rng = np.random.default_rng(3)
        batch = 5
        x = {
            "img": rng.normal(size=(batch, 5, 5, 1)).astype(dtype),
            "vec": rng.normal(size=(batch, 3)).astype(dtype),
        }
        y = {
            "cls": rng.integers(0, 3, size=(batch,)).astype("int32"),
            "reg": rng.normal(size=(batch, 2, 3)).astype(dtype),
        }
        sw = {
            "cls": np.array([1.0, 2.0, 0.5, 1.0, 0.0], dtype),
            # (B, 1): Keras broadcasts it over the (B, 2) loss values.
            "reg": np.array([[0.5], [1.0], [3.0], [0.0], [1.0]], dtype),
        }
        actual = fim_grads(model, x, y, sw)
        with tf.GradientTape() as tape:
            compiled_loss = model.compute_loss(
                x, y, model(x, training=True), sample_weight=sw
            )
        compiled_grad = [
            np.asarray(g)
            for g in tape.gradient(compiled_loss, model.trainable_variables)
        ]
        loss = {
            "cls": SCCE(reduction=None),
            "reg": keras.losses.MeanSquaredError(reduction=None),
        }
        expected = ref.loop_per_example_gradients(
            model, x, y, sw, loss=loss, loss_weights=loss_weights
        )
    assert_grads_close(actual, expected, model, **TOL[dtype])
    assert_sums_to_batch_gradient(
        actual, compiled_grad, batch, rtol=1e-5 if dtype == "float32" else 1e-12
    )


def test_regularisation_is_excluded():
    keras.utils.set_random_seed(3)
    model = compiled(
        mlp(
            kernel_regularizer=keras.regularizers.L2(0.5),
            bias_regularizer=keras.regularizers.L1(0.2),
        )
    )
    model.layers[0].bias.assign(np.linspace(-0.5, 0.5, 7).astype("float32"))
    x, y = classification_data(6, (5,))
    actual = fim_grads(model, x, y)
    expected = ref.loop_per_example_gradients(model, x, y)  # no regulariser
    assert_grads_close(actual, expected, model, **TOL["float32"])
    # Sum = |B| * gradient of the compiled loss minus its regularisation.
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x, training=True)
        total = model.compute_loss(x, y, y_pred)
        regularisation = tf.add_n(model.losses)
        data_loss = total - regularisation
    assert float(regularisation) > 0.01
    without = [
        np.asarray(g) for g in tape.gradient(data_loss, model.trainable_variables)
    ]
    with_reg = [np.asarray(g) for g in tape.gradient(total, model.trainable_variables)]
    assert_sums_to_batch_gradient(actual, without, 6, rtol=1e-5)
    first_kernel = actual[0].sum(axis=0)
    assert not np.allclose(first_kernel, 6 * with_reg[0], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# BatchNorm in training mode: against per-example weight copies.


def bn_dense_model():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def bn_conv_model():
    return keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(3, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 2, strides=2, padding="valid", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _perturb_bn(model, seed):
    """Non-trivial gamma/beta and moving statistics (to see they're unused)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in (layer.gamma, layer.beta, layer.moving_mean):
                if v is None:  # scale=False or center=False
                    continue
                v.assign(
                    (rng.normal(size=v.shape) * 0.5 + (v is layer.gamma)).astype(
                        v.dtype
                    )
                )
            layer.moving_variance.assign(
                rng.uniform(0.5, 2.0, size=layer.moving_variance.shape).astype(
                    layer.moving_variance.dtype
                )
            )


def _bn_state(model):
    return [np.array(v.numpy()) for v in model.non_trainable_variables]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["dense", "conv"])
def test_batchnorm_matches_weight_copies(arch, dtype, weighted):
    with use_floatx(dtype):
        keras.utils.set_random_seed(4)
        model = compiled(bn_dense_model() if arch == "dense" else bn_conv_model())
        _perturb_bn(model, 5)
        shape = (5,) if arch == "dense" else (5, 5, 2)
        x, y = classification_data(6, shape, dtype=dtype, seed=6)
        sw = np.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.5], dtype) if weighted else None
        before = _bn_state(model)
        actual = fim_grads(model, x, y, sw)
        after = _bn_state(model)
        expected = ref.copies_per_example_gradients(model, x, y, sw)
        batch_gradient = tape_batch_gradient(model, x, y, sw)
    for b, a in zip(before, after, strict=True):  # moving statistics untouched
        np.testing.assert_array_equal(a, b)
    tol = TOL[dtype] if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
    assert_grads_close(actual, expected, model, **tol)
    # The reference itself sums to |B| times the real batch gradient.
    assert_sums_to_batch_gradient(
        expected, batch_gradient, 6, rtol=1e-4 if dtype == "float32" else 1e-10
    )


class _OwnCallBatchNorm(keras.layers.BatchNormalization):
    """A subclass with a `call` of its own: keras-fim re-runs the layer."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask)


@pytest.mark.parametrize(
    "variant", ["subclass", "no_center", "no_scale", "other_axis", "float16"]
)
def test_batchnorm_variants_match_weight_copies(variant):
    """BatchNorm's x_hat, formed directly for the plain layer and by
    re-running a subclass with its own `call`, agrees with per-example
    weight copies whatever its axis and variables, and with 16-bit inputs."""
    options = {
        "no_center": dict(center=False),
        "no_scale": dict(scale=False),
        "other_axis": dict(axis=1),  # statistics per row: gamma is (5,)
        "float16": dict(dtype="mixed_float16"),
    }.get(variant, {})
    norm = (
        _OwnCallBatchNorm if variant == "subclass" else keras.layers.BatchNormalization
    )
    dtype = "float32" if variant == "float16" else "float64"
    with use_floatx(dtype):
        keras.utils.set_random_seed(4)
        model = keras.Sequential(
            [
                keras.Input((5, 5, 2)),
                keras.layers.Conv2D(3, 3, padding="same"),
                norm(**options),
                keras.layers.ReLU(),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        model = compiled(model)
        _perturb_bn(model, 5)
        x, y = classification_data(6, (5, 5, 2), dtype=dtype, seed=6)
        actual = fim_grads(model, x, y)
        expected = ref.copies_per_example_gradients(model, x, y)
    tol = TOL["float64"] if dtype == "float64" else dict(rtol=0.05, atol=2e-4)
    assert_grads_close(actual, expected, model, **tol)


def test_batchnorm_max_examples_keeps_whole_batch_statistics():
    keras.utils.set_random_seed(4)
    model = compiled(bn_dense_model())
    x, y = classification_data(6, (5,), seed=7)
    full = fim_grads(model, x, y)
    first = fim_grads(model, x, y, max_examples=4)
    for f, k in zip(full, first, strict=True):
        assert k.shape == (4, *f.shape[1:])
        np.testing.assert_allclose(k, f[:4], rtol=1e-5, atol=1e-7)


def resnet_block_model():
    inputs = keras.Input((6, 6, 2))
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(stem)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(keras.layers.Add()([h, stem]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def test_resnet_block_sums_to_batch_gradient_and_measures():
    keras.utils.set_random_seed(5)
    model = compiled(resnet_block_model())
    x, y = classification_data(6, (6, 6, 2), seed=8)
    before = _bn_state(model)
    contributions = fim_grads(model, x, y)
    for b, a in zip(before, _bn_state(model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Explicit mean loss, and the compiled loss (no regulariser in the model).
    assert_sums_to_batch_gradient(
        contributions, tape_batch_gradient(model, x, y), 6, rtol=1e-4
    )
    with tf.GradientTape() as tape:
        compiled_loss = model.compute_loss(x, y, model(x, training=True))
    compiled_grad = [
        np.asarray(g) for g in tape.gradient(compiled_loss, model.trainable_variables)
    ]
    assert_sums_to_batch_gradient(contributions, compiled_grad, 6, rtol=1e-4)
    jac = ref.flatten_gradients(contributions)
    assert_measurement_matches(
        keras_fim.measure(model, x, y), ref.numpy_measurements(jac)
    )


def test_mobilenet_v2_against_its_float64_twin():
    """MobileNetV2's contributions against the float64 truth, the same
    network and batch in float64. In float64 they sum to its batch gradient
    to round-off. In float32, eagerly as traced (a loop of calls traces
    them), they are as close to it as Keras's own float32 gradient is:
    float32 round-off, amplified by BatchNorm over three examples, moves
    each gradient by up to 2e-2 of itself (measured), so two float32
    computations in another order differ by as much, and no closer
    agreement between them is owed."""

    def build():
        keras.utils.set_random_seed(6)
        return compiled(
            keras.applications.MobileNetV2(
                input_shape=(32, 32, 3), weights=None, classes=3, alpha=0.35
            )
        )

    model = build()
    with use_floatx("float64"):
        twin = build()
    twin.set_weights([w.astype("float64") for w in model.get_weights()])
    x, y = classification_data(3, (32, 32, 3), seed=9)
    truth = tape_batch_gradient(twin, x.astype("float64"), y)
    exact = fim_grads(twin, x.astype("float64"), y)
    assert_sums_to_batch_gradient(exact, truth, 3, rtol=1e-6)
    # The test's scale, from the float64 truth.
    scales = [
        max(np.linalg.norm(3 * g), np.linalg.norm(c))
        for g, c in zip(truth, exact, strict=True)
    ]

    def errors(batch_gradient):
        return np.array(
            [
                np.linalg.norm(3 * (a - g)) / s
                for a, g, s in zip(batch_gradient, truth, scales, strict=True)
            ]
        )

    float32_roundoff = errors(tape_batch_gradient(model, x, y)).max()
    assert 1e-4 < float32_roundoff < 5e-2  # float32 round-off, amplified
    before = _bn_state(model)
    for _ in range(2):  # the first call runs eagerly, the second traced
        contributions = fim_grads(model, x, y)
        for b, a in zip(before, _bn_state(model), strict=True):
            np.testing.assert_array_equal(a, b)
        assert len(contributions) == len(model.trainable_variables)
        for c, v in zip(contributions, model.trainable_variables, strict=True):
            assert c.shape == (3, *v.shape)
        summed = [c.sum(axis=0) / 3 for c in contributions]
        assert errors(summed).max() <= 2 * float32_roundoff
    ((_, traced),) = model._keras_fim_api_functions.values()
    assert traced.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------
# Gram matrix and measurements.


def assert_measurement_matches(m, expected, rtol=1e-4):
    assert isinstance(m, keras_fim.FisherMeasurement)
    for name in m._fields:
        value = getattr(m, name)
        if name == "rank":
            assert value.dtype == tf.int32
        elif name != "batch_size":
            assert value.dtype == tf.float64, name
    assert int(m.batch_size) == expected["batch_size"]
    assert int(m.rank) == expected["rank"]
    largest = expected["eigenvalues"][0]
    np.testing.assert_allclose(
        m.eigenvalues.numpy(), expected["eigenvalues"], rtol=rtol, atol=1e-5 * largest
    )
    np.testing.assert_allclose(
        m.singular_values.numpy(),
        expected["singular_values"],
        rtol=rtol,
        atol=3e-3 * expected["singular_values"][0],
    )
    assert np.all(np.diff(m.eigenvalues.numpy()) <= 0)
    assert np.all(m.eigenvalues.numpy() >= 0)
    for name in ("energy", "trace", "gradient_norm", "zero_threshold"):
        np.testing.assert_allclose(
            float(getattr(m, name)), expected[name], rtol=rtol, err_msg=name
        )
    np.testing.assert_allclose(
        float(m.condition_number), expected["condition_number"], rtol=10 * rtol
    )
    np.testing.assert_allclose(
        float(m.gradient_noise_scale),
        expected["gradient_noise_scale"],
        rtol=10 * rtol,
        equal_nan=True,
    )


def _mlp_batch(batch=8, seed=10):
    keras.utils.set_random_seed(7)
    model = compiled(mlp())
    x, y = classification_data(batch, (5,), seed=seed)
    return model, x, y


def test_fisher_gram_equals_reference_gram():
    model, x, y = _mlp_batch()
    sw = np.linspace(0.5, 2.0, 8).astype("float32")
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y, sw))
    gram = keras_fim.fisher_gram(model, x, y, sw).numpy()
    assert gram.shape == (8, 8)
    expected = jac @ jac.T
    np.testing.assert_allclose(
        gram, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
    )


def test_fisher_gram_conv_equals_reference_gram():
    keras.utils.set_random_seed(8)
    model = compiled(
        keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    x, y = classification_data(5, (6, 6, 2), seed=11)
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y))
    gram = keras_fim.fisher_gram(model, x, y).numpy()
    expected = jac @ jac.T
    np.testing.assert_allclose(
        gram, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_measure_matches_numpy(weighted):
    model, x, y = _mlp_batch()
    sw = np.linspace(0.5, 2.0, 8).astype("float32") if weighted else None
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y, sw))
    expected = ref.numpy_measurements(jac)
    assert expected["rank"] == 8
    assert_measurement_matches(keras_fim.measure(model, x, y, sw), expected)


def test_measure_float64_model_tight():
    with use_floatx("float64"):
        keras.utils.set_random_seed(7)
        model = compiled(mlp())
        x, y = classification_data(8, (5,), seed=10, dtype="float64")
        jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y))
        m = keras_fim.measure(model, x, y)
    expected = ref.numpy_measurements(jac, eps=np.finfo(np.float64).eps)
    assert_measurement_matches(m, expected, rtol=1e-8)


def test_measure_duplicated_example_is_rank_deficient():
    model, x, y = _mlp_batch()
    x[5], y[5] = x[1], y[1]
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y))
    expected = ref.numpy_measurements(jac)
    assert expected["rank"] == 7
    m = keras_fim.measure(model, x, y)
    assert_measurement_matches(m, expected)
    assert np.isfinite(float(m.condition_number))
    # The truncated condition number ignores the zero eigenvalue.
    sv = expected["singular_values"]
    np.testing.assert_allclose(float(m.condition_number), sv[0] / sv[6], rtol=1e-3)


def test_measure_zero_threshold():
    model, x, y = _mlp_batch()
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y))
    threshold = 0.05
    expected = ref.numpy_measurements(jac, zero_threshold=threshold)
    assert 1 <= expected["rank"] < 8
    m = keras_fim.measure(model, x, y, zero_threshold=threshold)
    assert_measurement_matches(m, expected)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_max_examples(k):
    model, x, y = _mlp_batch()
    full_gram = keras_fim.fisher_gram(model, x, y).numpy()
    kept = min(k, 8)
    gram = keras_fim.fisher_gram(model, x, y, max_examples=k).numpy()
    assert gram.shape == (kept, kept)
    np.testing.assert_allclose(
        gram, full_gram[:kept, :kept], rtol=1e-5, atol=1e-7 * np.abs(full_gram).max()
    )
    grads = fim_grads(model, x, y, max_examples=k)
    full = fim_grads(model, x, y)
    for g, f in zip(grads, full, strict=True):
        np.testing.assert_allclose(g, f[:kept], rtol=1e-6, atol=1e-8)
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y))
    m = keras_fim.measure(model, x, y, max_examples=k)
    assert_measurement_matches(m, ref.numpy_measurements(jac[:kept]))


def test_batchnorm_inference_mode_matches_loop():
    """training=False: BN uses its moving statistics, examples independent."""
    keras.utils.set_random_seed(9)
    model = compiled(bn_conv_model())
    _perturb_bn(model, 12)
    x, y = classification_data(4, (5, 5, 2), seed=13)
    before = _bn_state(model)
    actual = fim_grads(model, x, y, training=False)
    for b, a in zip(before, _bn_state(model), strict=True):
        np.testing.assert_array_equal(a, b)
    expected = ref.loop_per_example_gradients(model, x, y)  # training=False
    assert_grads_close(actual, expected, model, **TOL["float32"])
    # ... and differs from the training-mode contributions.
    train = fim_grads(model, x, y)
    assert not np.allclose(train[0], actual[0], rtol=1e-2, atol=1e-3)
