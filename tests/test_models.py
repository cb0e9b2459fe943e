"""The reference networks of `keras_fim.models`: CIFAR ResNets and DenseNet-BC.

Parameter counts are checked against a hand count written from the papers'
architecture descriptions (He et al. 2016, section 4.2; Huang et al. 2017,
section 3) and against the figures the papers publish.
"""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fim
from keras_fim.models import (
    CoupledSGD,
    ZeroPadShortcut,
    cifar_resnet,
    compile_like_the_paper,
    densenet_bc,
)

# ---------------------------------------------------------------------------
# Hand counts. Each returns (total, trainable) parameters: a k x k convolution
# has k*k*cin*cout weights (+ cout biases), BatchNormalization 4 per channel
# (gamma and beta trainable, moving mean and variance not), a dense layer
# cin*cout + cout.


def _conv(k, cin, cout, bias):
    n = k * k * cin * cout + (cout if bias else 0)
    return n, n


def _bn(c):
    return 4 * c, 2 * c


def _dense(cin, cout):
    n = cin * cout + cout
    return n, n


def _add(*counts):
    return tuple(map(sum, zip(*counts, strict=True)))


def resnet_count(
    in_channels,
    num_classes,
    n,
    widths=(16, 32, 64),
    batch_norm=True,
    shortcut="zero_pad",
):
    parts = [_conv(3, in_channels, widths[0], not batch_norm)]
    if batch_norm:
        parts.append(_bn(widths[0]))
    channels = widths[0]
    for stage, filters in enumerate(widths):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            parts.append(_conv(3, channels, filters, not batch_norm))
            parts.append(_conv(3, filters, filters, not batch_norm))
            if batch_norm:
                parts += [_bn(filters), _bn(filters)]
            if shortcut == "projection" and (stride != 1 or channels != filters):
                parts.append(_conv(1, channels, filters, not batch_norm))
                if batch_norm:
                    parts.append(_bn(filters))
            channels = filters
    parts.append(_dense(channels, num_classes))
    return _add(*parts)


def densenet_channels(depth, growth_rate, compression):
    """Channels after each dense block and each transition, in order."""
    n = (depth - 4) // 6
    channels, after = 2 * growth_rate, []
    for block in range(3):
        if block > 0:
            channels = max(1, math.floor(compression * channels))
            after.append(("transition", channels))
        channels += n * growth_rate
        after.append(("block", channels))
    return after


def densenet_count(in_channels, num_classes, depth, growth_rate, compression):
    n, k = (depth - 4) // 6, growth_rate
    parts = [_conv(3, in_channels, 2 * k, False)]
    channels = 2 * k
    for block in range(3):
        if block > 0:
            out = max(1, math.floor(compression * channels))
            parts += [_bn(channels), _conv(1, channels, out, False)]
            channels = out
        for _ in range(n):
            parts += [
                _bn(channels),
                _conv(1, channels, 4 * k, False),
                _bn(4 * k),
                _conv(3, 4 * k, k, False),
            ]
            channels += k
    parts += [_bn(channels), _dense(channels, num_classes)]
    return _add(*parts)


def counts(model):
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return model.count_params(), trainable


def layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


# ---------------------------------------------------------------------------
# Parameter counts.


def test_hand_count_matches_a_known_figure():
    # n = 1 on CIFAR-10, worked out on paper as a check of the hand count:
    # stem 432 + BN 64; stage 1: 2 * 2304 + 2 * 64; stage 2: 4608 + 9216 +
    # 2 * 128; stage 3: 18432 + 36864 + 2 * 256; dense 650.
    assert resnet_count(3, 10, 1) == (75_770, 75_770 - 2 * 240)
    # Without BN the convs get biases (240 of them) instead of 960 BN values.
    assert resnet_count(3, 10, 1, batch_norm=False) == (75_050, 75_050)


# He et al. 2016, Table 6: 0.27M / 0.85M / 1.7M parameters.
@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_resnet_parameter_counts(depth, published):
    model = cifar_resnet((32, 32, 3), 10, depth=depth)
    n = (depth - 2) // 6
    assert counts(model) == resnet_count(3, 10, n)
    assert model.count_params() == pytest.approx(published, rel=0.03)


def test_resnet_blocks_per_stage_and_depth_agree():
    by_depth = cifar_resnet((8, 8, 1), 4, depth=20, widths=(4, 8, 8))
    by_blocks = cifar_resnet((8, 8, 1), 4, 3, widths=(4, 8, 8))
    both = cifar_resnet((8, 8, 1), 4, blocks_per_stage=3, depth=20, widths=(4, 8, 8))
    assert (
        [type(layer) for layer in by_depth.layers]
        == [type(layer) for layer in by_blocks.layers]
        == [type(layer) for layer in both.layers]
    )
    assert counts(by_depth) == counts(by_blocks) == resnet_count(1, 4, 3, (4, 8, 8))


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("widths", [(16, 32, 64), (4, 4, 8), (6, 3, 5)])
def test_resnet_projection_adds_exactly_the_projections(batch_norm, widths):
    kwargs = dict(widths=widths, batch_norm=batch_norm, depth=14)
    zero_pad = cifar_resnet((8, 8, 2), 7, **kwargs)
    projection = cifar_resnet((8, 8, 2), 7, shortcut="projection", **kwargs)
    assert counts(zero_pad) == resnet_count(2, 7, 2, widths, batch_norm)
    assert counts(projection) == resnet_count(2, 7, 2, widths, batch_norm, "projection")
    # Option B: a 1x1 conv (+ BN) only where the shape changes (each stage's
    # first block; the first stage's too when widths[0] is not the stem's).
    expected = (0, 0)
    for cin, cout in itertools.pairwise(widths):
        expected = _add(expected, _conv(1, cin, cout, not batch_norm))
        if batch_norm:
            expected = _add(expected, _bn(cout))
    difference = tuple(
        p - z for p, z in zip(counts(projection), counts(zero_pad), strict=True)
    )
    assert difference == expected
    assert difference[0] > 0


def test_resnet20_projection_difference_on_cifar():
    zero_pad = cifar_resnet(depth=20)
    projection = cifar_resnet(depth=20, shortcut="projection")
    # 16->32 and 32->64: 1x1 convs 512 + 2048, BN 4 * (32 + 64).
    assert projection.count_params() - zero_pad.count_params() == 512 + 2048 + 4 * 96


def test_densenet_bc_100_parameter_count():
    # Huang et al. 2017, Table 2: DenseNet-BC (L = 100, k = 12) has 0.8M.
    model = densenet_bc()
    assert counts(model) == densenet_count(3, 10, 100, 12, 0.5)
    assert model.count_params() == pytest.approx(0.8e6, rel=0.03)


@pytest.mark.parametrize(
    "depth, growth_rate, compression, in_channels, classes",
    [(10, 4, 0.5, 1, 10), (16, 3, 1.0, 3, 5), (22, 2, 0.3, 2, 3), (10, 5, 0.01, 1, 2)],
)
def test_densenet_small_parameter_counts(
    depth, growth_rate, compression, in_channels, classes
):
    model = densenet_bc((8, 8, in_channels), classes, depth, growth_rate, compression)
    assert counts(model) == densenet_count(
        in_channels, classes, depth, growth_rate, compression
    )


# ---------------------------------------------------------------------------
# Shapes and structure.


@pytest.mark.parametrize(
    "shape, classes",
    [
        ((8, 8, 1), 10),
        ((32, 32, 3), 100),
        ((7, 9, 2), 3),
        ((1, 1, 3), 2),
        ((5, 5, 1), 4),
    ],
)
@pytest.mark.parametrize("build", ["zero_pad", "projection", "densenet"])
def test_output_shapes(shape, classes, build):
    if build == "densenet":
        model = densenet_bc(shape, classes, depth=10, growth_rate=2)
    else:
        model = cifar_resnet(shape, classes, widths=(2, 4, 4), shortcut=build)
    assert model.output_shape == (None, classes)
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")
    probabilities = np.asarray(model(x, training=False))
    assert probabilities.shape == (3, classes)
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_resnet_spatial_sizes_halve_per_stage():
    model = cifar_resnet((32, 32, 3), depth=8)
    adds = layers_of(model, keras.layers.Add)
    assert [tuple(a.output.shape[1:]) for a in adds] == [
        (32, 32, 16),
        (16, 16, 32),
        (8, 8, 64),
    ]


@pytest.mark.parametrize("depth", [8, 20, 32])
@pytest.mark.parametrize("shortcut", ["zero_pad", "projection"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_resnet_layer_structure(depth, shortcut, batch_norm):
    model = cifar_resnet(
        (8, 8, 1),
        depth=depth,
        widths=(2, 4, 4),
        shortcut=shortcut,
        batch_norm=batch_norm,
    )
    n = (depth - 2) // 6
    projections = 2 if shortcut == "projection" else 0
    convs = layers_of(model, keras.layers.Conv2D)
    denses = layers_of(model, keras.layers.Dense)
    # depth counts the weighted layers on the main path: convs and the dense.
    assert len(convs) - projections + len(denses) == depth
    assert len([c for c in convs if c.kernel_size == (1, 1)]) == projections
    assert len([c for c in convs if c.strides == (2, 2)]) == 2 + projections
    assert all(c.use_bias is not batch_norm for c in convs)
    assert len(layers_of(model, keras.layers.BatchNormalization)) == (
        len(convs) if batch_norm else 0
    )
    assert len(layers_of(model, keras.layers.Add)) == 3 * n
    assert len(layers_of(model, ZeroPadShortcut)) == (
        2 if shortcut == "zero_pad" else 0
    )


def test_resnet_default_is_unchanged():
    # The default network: n = 1, option A, in its historical layer order.
    model = cifar_resnet()
    names = [type(layer).__name__ for layer in model.layers]
    block = ["Conv2D", "BatchNormalization", "ReLU", "Conv2D", "BatchNormalization"]
    expected = ["InputLayer", "Conv2D", "BatchNormalization", "ReLU"]
    expected += [*block, "Add", "ReLU"]
    for _ in range(2):
        expected += [*block, "ZeroPadShortcut", "Add", "ReLU"]
    expected += ["GlobalAveragePooling2D", "Dense"]
    assert names == expected
    assert model.count_params() == 75_770


@pytest.mark.parametrize(
    "depth, growth_rate, compression",
    [(10, 4, 0.5), (16, 3, 1.0), (22, 5, 0.3), (40, 12, 0.5)],
)
def test_densenet_layer_structure_and_channels(depth, growth_rate, compression):
    model = densenet_bc((8, 8, 1), 10, depth, growth_rate, compression)
    n = (depth - 4) // 6
    convs = layers_of(model, keras.layers.Conv2D)
    assert len(convs) + len(layers_of(model, keras.layers.Dense)) == depth
    assert not any(c.use_bias for c in convs)
    assert convs[0].filters == 2 * growth_rate and convs[0].kernel_size == (3, 3)
    assert len(layers_of(model, keras.layers.BatchNormalization)) == 6 * n + 3
    bottlenecks = [c for c in convs[1:] if c.kernel_size == (3, 3)]
    assert len(bottlenecks) == 3 * n
    assert all(c.filters == growth_rate for c in bottlenecks)
    one_by_one = [c.filters for c in convs if c.kernel_size == (1, 1)]
    assert one_by_one.count(4 * growth_rate) >= 3 * n
    assert len(layers_of(model, keras.layers.Concatenate)) == 3 * n
    assert not layers_of(model, keras.layers.Dropout)

    # Channels after each block (its last concatenation) and transition.
    seen = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.AveragePooling2D):
            seen.append(("transition", layer.output.shape[-1]))
    concats = layers_of(model, keras.layers.Concatenate)
    blocks = [("block", concats[(b + 1) * n - 1].output.shape[-1]) for b in range(3)]
    measured = [blocks[0], seen[0], blocks[1], seen[1], blocks[2]]
    assert measured == densenet_channels(depth, growth_rate, compression)
    assert model.layers[-1].input.shape[-1] == blocks[2][1]
    # Each transition halves the spatial size, rounding up.
    pools = layers_of(model, keras.layers.AveragePooling2D)
    assert [tuple(p.output.shape[1:3]) for p in pools] == [(4, 4), (2, 2)]


def test_densenet_tiny_inputs_never_shrink_to_zero():
    model = densenet_bc((1, 3, 2), 4, depth=10, growth_rate=2)
    pools = layers_of(model, keras.layers.AveragePooling2D)
    assert [tuple(p.output.shape[1:3]) for p in pools] == [(1, 2), (1, 1)]


def test_densenet_dropout_layers():
    model = densenet_bc((8, 8, 1), 10, depth=16, growth_rate=2, dropout=0.2)
    dropouts = layers_of(model, keras.layers.Dropout)
    # One after each conv of the dense blocks and transitions (not the stem).
    assert len(dropouts) == 6 * 2 + 2
    assert all(d.rate == 0.2 for d in dropouts)
    assert counts(model) == densenet_count(1, 10, 16, 2, 0.5)


def test_model_class_and_kwargs():
    for model in (
        densenet_bc(
            (8, 8, 1),
            3,
            depth=10,
            growth_rate=2,
            model_class=keras_fim.FisherModel,
            every_n_steps=3,
            name="dn",
        ),
        cifar_resnet(
            (8, 8, 1),
            3,
            widths=(2, 4, 4),
            shortcut="projection",
            model_class=keras_fim.FisherModel,
            every_n_steps=3,
            name="dn",
        ),
    ):
        assert isinstance(model, keras_fim.FisherModel)
        assert model.name == "dn"
        assert model.get_config()["every_n_steps"] == 3


# ---------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("depth", [19, 21, 2, 0, -4, 14.0, True, "20"])
def test_resnet_bad_depth(depth):
    with pytest.raises(
        ValueError,
        match=r"`depth` must be 6n\+2 with n >= 1 \(20, 56, 110, \.\.\.\)\. "
        rf"Received: depth={depth}$",
    ):
        cifar_resnet((8, 8, 1), depth=depth)


def test_resnet_depth_and_blocks_disagree():
    with pytest.raises(
        ValueError,
        match=r"`depth` and `blocks_per_stage` disagree: depth=6n\+2 needs "
        r"blocks_per_stage=3; give only one of them\. "
        r"Received: depth=20, blocks_per_stage=2$",
    ):
        cifar_resnet((8, 8, 1), blocks_per_stage=2, depth=20)


@pytest.mark.parametrize("blocks", [0, -1, 1.5])
def test_resnet_bad_blocks_per_stage(blocks):
    with pytest.raises(
        ValueError,
        match=r"`blocks_per_stage` must be >= 1\. "
        rf"Received: blocks_per_stage={blocks}$",
    ):
        cifar_resnet((8, 8, 1), blocks_per_stage=blocks)


@pytest.mark.parametrize("shortcut", ["B", "identity", None])
def test_resnet_bad_shortcut(shortcut):
    with pytest.raises(
        ValueError,
        match=r"`shortcut` must be one of \('zero_pad', 'projection'\)\. "
        rf"Received: shortcut={shortcut!r}$",
    ):
        cifar_resnet((8, 8, 1), shortcut=shortcut)


@pytest.mark.parametrize("depth", [4, 9, 11, 41, 100.0, False])
def test_densenet_bad_depth(depth):
    with pytest.raises(
        ValueError,
        match=r"`depth` must be 6n\+4 with n >= 1 \(10, 40, 100, 190, \.\.\.\)\. "
        rf"Received: depth={depth}$",
    ):
        densenet_bc((8, 8, 1), depth=depth)


@pytest.mark.parametrize("growth_rate", [0, -2, 1.5, True])
def test_densenet_bad_growth_rate(growth_rate):
    with pytest.raises(
        ValueError,
        match=r"`growth_rate` must be an integer >= 1\. "
        rf"Received: growth_rate={growth_rate}$",
    ):
        densenet_bc((8, 8, 1), depth=10, growth_rate=growth_rate)


@pytest.mark.parametrize("compression", [0, -0.5, 1.01, 2, "0.5", True])
def test_densenet_bad_compression(compression):
    with pytest.raises(
        ValueError,
        match=r"`compression` must be a number in \(0, 1\]\. "
        rf"Received: compression={compression}$",
    ):
        densenet_bc((8, 8, 1), depth=10, compression=compression)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.2"])
def test_densenet_bad_dropout(dropout):
    with pytest.raises(
        ValueError,
        match=rf"`dropout` must be a number in \[0, 1\)\. Received: dropout={dropout}$",
    ):
        densenet_bc((8, 8, 1), depth=10, dropout=dropout)


# ---------------------------------------------------------------------------
# The models measure: per-example contributions on BatchNorm networks.


def _tiny(build):
    if build == "densenet":
        return densenet_bc((8, 8, 1), 10, depth=10, growth_rate=4)
    return cifar_resnet((8, 8, 1), 10, widths=(3, 4, 6), shortcut="projection")


def _batch(batch=6, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    return x, y


@pytest.mark.parametrize("build", ["densenet", "projection"])
def test_contributions_sum_to_batch_times_batch_gradient(build):
    model = compile_like_the_paper(_tiny(build), 0.1)
    x, y = _batch()
    contributions = keras_fim.per_example_gradients(model, x, y)
    assert len(contributions) == len(model.trainable_variables)
    for c, v in zip(contributions, model.trainable_variables, strict=True):
        assert tuple(c.shape) == (6, *v.shape)

    with tf.GradientTape() as tape:
        probabilities = model(x, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, probabilities)
        )
    gradients = tape.gradient(loss, model.trainable_variables)
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in gradients)
    for c, g, v in zip(
        contributions, gradients, model.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(
            tf.reduce_sum(c, axis=0).numpy(),
            6 * g.numpy(),
            rtol=1e-4,
            atol=6e-6 * scale,
            err_msg=v.path,
        )
    # BatchNorm couples the examples: contributions are not per-example
    # gradients of a lone example, yet they are non-trivial.
    assert any(float(tf.reduce_max(tf.abs(c))) > 0 for c in contributions)


@pytest.mark.parametrize("build", ["densenet", "projection"])
def test_measure_gives_finite_spectrum(build):
    model = compile_like_the_paper(_tiny(build), 0.1)
    x, y = _batch()
    m = keras_fim.measure(model, x, y)
    assert isinstance(m, keras_fim.FisherMeasurement)
    eigenvalues = m.eigenvalues.numpy()
    assert eigenvalues.shape == (6,)
    assert np.all(np.isfinite(eigenvalues))
    assert eigenvalues[0] > 0
    assert np.all(np.diff(eigenvalues) <= 0)
    assert int(m.batch_size) == 6
    assert 1 <= int(m.rank) <= 6
    assert np.isfinite(float(m.trace)) and float(m.trace) > 0


# ---------------------------------------------------------------------------
# Saving.


@pytest.mark.parametrize("build", ["densenet", "projection", "zero_pad"])
def test_keras_round_trip(build, tmp_path):
    if build == "zero_pad":
        model = cifar_resnet((8, 8, 1), 10, widths=(3, 4, 6))
    else:
        model = _tiny(build)
    # Random weights and BN statistics, so that every variable matters.
    rng = np.random.default_rng(1)
    for v in model.variables:
        if "variance" in v.path:
            value = rng.uniform(0.5, 1.5, size=v.shape)
        else:
            value = rng.normal(0.0, 0.3, size=v.shape)
        v.assign(value.astype(v.dtype))
    x, _ = _batch()
    path = tmp_path / f"{build}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [
        type(layer) for layer in model.layers
    ]
    assert loaded.count_params() == model.count_params()
    expected = np.asarray(model(x, training=False))
    assert not np.array_equal(expected[0], expected[1])  # the examples differ
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: cifar_resnet((8, 8, 1), depth=8, shortcut="projection", **kw),
        lambda **kw: densenet_bc((8, 8, 1), depth=10, growth_rate=4, **kw),
    ],
)
def test_batch_norm_momentum_is_the_papers_unless_given(build):
    def momenta(model):
        return {
            layer.momentum
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }

    assert momenta(build()) == {0.9}
    assert momenta(build(batch_norm_momentum=0.99)) == {0.99}
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match="batch_norm_momentum"):
            build(batch_norm_momentum=bad)


def numpy_coupled_sgd(thetas, gradients, lr, wd, momentum, nesterov):
    """float64: Torch's SGD (weight decay added to the gradient) in Keras's
    momentum convention, one variable, step by step."""
    theta = np.array(thetas, np.float64)
    velocity = np.zeros_like(theta)
    for g in gradients:
        g = g + wd * theta
        velocity = momentum * velocity - lr * g
        theta = theta + (momentum * velocity - lr * g if nesterov else velocity)
    return theta


@pytest.mark.parametrize("nesterov", [True, False])
def test_coupled_sgd_adds_the_decay_to_the_gradient(nesterov):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4))
    gradients = rng.normal(size=(5, 3, 4))
    variable = keras.Variable(start.astype("float32"))
    optimizer = CoupledSGD(
        0.1, coupled_weight_decay=0.01, momentum=0.9, nesterov=nesterov
    )
    for g in gradients:
        optimizer.apply([tf.constant(g, tf.float32)], [variable])
    expected = numpy_coupled_sgd(start, gradients, 0.1, 0.01, 0.9, nesterov)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Keras's decoupled decay differs: it is not amplified by the momentum.
    decoupled = keras.Variable(start.astype("float32"))
    keras_sgd = keras.optimizers.SGD(
        0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01
    )
    for g in gradients:
        keras_sgd.apply([tf.constant(g, tf.float32)], [decoupled])
    assert not np.allclose(decoupled.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_coupled_sgd_options_and_saving(tmp_path):
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        CoupledSGD(0.1, coupled_weight_decay=-1.0)
    with pytest.raises(ValueError, match="not Keras's decoupled `weight_decay`"):
        CoupledSGD(0.1, weight_decay=1e-4)
    model = compile_like_the_paper(cifar_resnet((8, 8, 1), depth=8), 0.05, 1e-4)
    assert isinstance(model.optimizer, CoupledSGD)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is CoupledSGD
    assert loaded.optimizer.coupled_weight_decay == 1e-4
    assert loaded.optimizer.nesterov and loaded.optimizer.momentum == 0.9
