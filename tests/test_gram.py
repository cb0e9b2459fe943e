"""The Gram engine: every path of every layer against brute-force float64
references, per-layer blocks, the memory budget, and measuring from the
training step's own pass."""

from unittest import mock

import fim_reference as ref
import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import compiled, labels

import keras_fim
from keras_fim.engine import (
    ProbedPass,
    gradient_noise_components,
    grams_from_calls,
    noise_components_from_gram,
    record_pass,
    reuses_training_pass,
)
from keras_fim.engine.gram import path_choice


def reference_blocks(model, x, y, **kwargs):
    """float64 Gram blocks per layer from a loop over examples."""
    grads = ref.loop_per_example_gradients(model, x, y, **kwargs)
    by_variable = dict(
        zip([id(v) for v in model.trainable_variables], grads, strict=True)
    )
    blocks = {}
    for layer in model.layers:
        owned = [by_variable[id(v)] for v in layer.trainable_variables]
        if owned:
            jac = ref.flatten_gradients(owned)
            blocks[layer.name] = jac @ jac.T
    return blocks


def engine_blocks(model, x, y, memory_budget=None, sample_weight=None):
    record = record_pass(model, x, y, sample_weight)
    blocks, plans = grams_from_calls(
        record.units, record.calls, record.examples, memory_budget
    )
    return {k: v.numpy() for k, v in blocks.items()}, {p.layer: p for p in plans}


def assert_blocks_match(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, block in expected.items():
        scale = np.abs(block).max()
        np.testing.assert_allclose(actual[name], block, atol=2e-6 * scale, err_msg=name)


def assert_small_eigenvalues_resolved(actual, expected):
    """Each block's eigenvalues down to 1e-11 of its largest match the
    reference's to 2 %. The blocks of nearly identical examples have
    eigenvalues far below float32's eps of the largest: a block formed with
    float32 products gets them wrong by orders of magnitude."""
    smallest = []
    for name, block in expected.items():
        assert actual[name].dtype == np.float64, name
        want = np.linalg.eigvalsh(block)[::-1]
        got = np.linalg.eigvalsh(actual[name])[::-1]
        resolved = want > 1e-11 * want[0]
        np.testing.assert_allclose(
            got[resolved], want[resolved], rtol=2e-2, err_msg=name
        )
        smallest.append(want[resolved][-1] / want[0])
    assert min(smallest) < 1e-8  # the test reaches below float32's resolution


# Each case: a model, its input shape, and the path each layer must take
# under the default budget ("ghost", "materialise" or "rule").
CASES = {
    "dense_ghost": (
        lambda: [
            keras.layers.Dense(7, activation="tanh", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        (5,),
        {"hidden": "ghost", "head": "ghost"},
    ),
    "dense_sequence": (
        lambda: [
            keras.layers.Dense(32, activation="relu", name="seq_dense"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        (2, 24),
        {"seq_dense": "ghost", "head": "ghost"},
    ),
    "conv_materialise": (
        lambda: [
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1"),
            keras.layers.Conv2D(16, 4, strides=4, padding="valid", name="c2"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        (8, 8, 2),
        {"c1": "materialise", "c2": "ghost", "head": "ghost"},
    ),
    "conv1d_causal_dilated": (
        lambda: [
            keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, name="c1"),
            keras.layers.Conv1D(16, 5, strides=5, activation="tanh", name="c2"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        (9, 2),
        {"c1": "materialise", "c2": "ghost", "head": "ghost"},
    ),
    "layernorm_rule": (
        lambda: [
            keras.layers.Dense(6, name="d"),
            keras.layers.LayerNormalization(name="ln"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ],
        (5,),
        {"d": "ghost", "ln": "rule", "head": "ghost"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_paths_match_loop_per_layer(case):
    layers, shape, paths = CASES[case]
    keras.utils.set_random_seed(1)
    model = compiled(keras.Sequential([keras.Input(shape), *layers()]))
    x = np.random.default_rng(2).normal(size=(6, *shape)).astype("float32")
    y = labels(6)
    actual, plans = engine_blocks(model, x, y)
    assert {name: plan.path for name, plan in plans.items()} == paths
    assert_blocks_match(actual, reference_blocks(model, x, y))
    # Both paths of every kernel agree: a tiny budget forbids the ghost form
    # and splits the materialised gradients.
    squeezed, plans = engine_blocks(model, x, y, memory_budget=64)
    assert all(p.path != "ghost" for p in plans.values())
    assert any(p.chunks > 1 for p in plans.values())
    assert_blocks_match(squeezed, reference_blocks(model, x, y))
    # Nearly identical examples, one label: every path, ghost and
    # materialised, resolves the tiny eigenvalues (float64 products).
    near = x[:1] + 3e-5 * np.random.default_rng(4).normal(size=x.shape)
    near, same = near.astype("float32"), np.zeros(6, "int64")
    expected = reference_blocks(model, near, same)
    for budget in (None, 64):
        assert_small_eigenvalues_resolved(
            engine_blocks(model, near, same, memory_budget=budget)[0], expected
        )


def test_embedding_ghost_and_rule_match_loop():
    keras.utils.set_random_seed(3)
    model = compiled(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Embedding(50, 3, name="emb"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )
    )
    # Repeated tokens within and across examples meet in the ghost form.
    x = np.array([[1, 2, 2, 7], [7, 1, 3, 3], [4, 4, 4, 4], [9, 1, 2, 7]], "int32")
    y = labels(4)
    expected = reference_blocks(model, x, y)
    actual, plans = engine_blocks(model, x, y)
    assert plans["emb"].path == "ghost"
    assert_blocks_match(actual, expected)
    # Over the budget: the (B, vocabulary, dim) gradients, scattered from
    # the same factors.
    actual, plans = engine_blocks(model, x, y, memory_budget=64)
    assert plans["emb"].path == "materialise"
    assert_blocks_match(actual, expected)


def test_layer_called_twice_sums_its_calls_before_the_product():
    keras.utils.set_random_seed(4)
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    inputs = keras.Input((4,))
    h = shared(shared(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = compiled(keras.Model(inputs, outputs))
    x = np.random.default_rng(5).normal(size=(5, 4)).astype("float32")
    y = labels(5)
    actual, _ = engine_blocks(model, x, y)
    assert_blocks_match(actual, reference_blocks(model, x, y))


def test_layer_grams_sum_to_fisher_gram_with_sample_weights():
    keras.utils.set_random_seed(6)
    layers, shape, _ = CASES["conv_materialise"]
    model = compiled(keras.Sequential([keras.Input(shape), *layers()]))
    x = np.random.default_rng(7).normal(size=(5, *shape)).astype("float32")
    y, weights = labels(5), np.array([1.0, 0.0, 2.0, 0.5, 1.0], "float32")
    blocks = keras_fim.layer_grams(model, x, y, weights)
    total = keras_fim.fisher_gram(model, x, y, weights).numpy()
    np.testing.assert_allclose(
        sum(b.numpy() for b in blocks.values()), total, rtol=1e-6
    )
    jac = ref.flatten_gradients(ref.loop_per_example_gradients(model, x, y, weights))
    np.testing.assert_allclose(
        total, jac @ jac.T, rtol=2e-5, atol=1e-6 * np.abs(total).max()
    )


def test_invalid_memory_budget_names_the_argument():
    model = compiled(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]))
    x, y = np.ones((2, 2), "float32"), labels(2)
    for bad in (0, -1.0, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget"):
            keras_fim.fisher_gram(model, x, y, memory_budget=bad)
    with pytest.raises(ValueError, match="memory_budget"):
        keras_fim.FisherCallback(memory_budget=0)


def test_noise_components_from_gram_equal_real_half_batches():
    keras.utils.set_random_seed(8)
    layers, shape, _ = CASES["dense_sequence"]
    model = compiled(keras.Sequential([keras.Input(shape), *layers()]))
    x = np.random.default_rng(9).normal(size=(8, *shape)).astype("float32")
    y = labels(8)
    from_gram = noise_components_from_gram(keras_fim.fisher_gram(model, x, y))
    real = gradient_noise_components(model, x, y)
    np.testing.assert_allclose(
        [float(v) for v in from_gram], [float(v) for v in real], rtol=1e-4
    )


# -- measuring from the training step's own pass ---------------------------


def probed_and_separate(model, x, y, sample_weight=None):
    """Gram blocks from a probed Keras train step and from a separate pass,
    at the same weights (inside one function)."""

    @tf.function
    def both():
        record = record_pass(model, x, y, sample_weight)
        separate = grams_from_calls(record.units, record.calls, record.examples)[0]
        probe = ProbedPass(model, x)
        data = (x, y) if sample_weight is None else (x, y, sample_weight)
        with probe:
            model.train_step(data)
        probed_record = probe.recorded()
        probed = grams_from_calls(
            probed_record.units, probed_record.calls, probed_record.examples
        )[0]
        return separate, probed

    separate, probed = both()
    return (
        {k: v.numpy() for k, v in separate.items()},
        {k: v.numpy() for k, v in probed.items()},
    )


def two_output_model():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, activation="relu", name="trunk")(inputs)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(2, name="reg")(h)
    return keras.Model(inputs, {"cls": cls, "reg": reg})


@pytest.mark.parametrize(
    "setup",
    [
        "softmax_sgd",
        "weighted_sum_reduction",
        "two_outputs_loss_weights",
        "loss_scale",
        "batchnorm",
    ],
)
def test_probed_pass_equals_separate_pass(setup):
    keras.utils.set_random_seed(10)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 5)).astype("float32")
    y, weights = labels(6), None
    if setup == "batchnorm":
        # Both passes take the BatchNorm statistics the call computed.
        x = rng.normal(size=(6, 4, 4, 2)).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((4, 4, 2)),
                keras.layers.Conv2D(3, 3, padding="same"),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    elif setup == "two_outputs_loss_weights":
        model = two_output_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
            loss_weights={"cls": 1.0, "reg": 0.3},
        )
        y = {"cls": y, "reg": rng.normal(size=(6, 2)).astype("float32")}
    else:
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="tanh", kernel_regularizer="l2"),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        optimizer = keras.optimizers.SGD(0.1)
        loss = "sparse_categorical_crossentropy"
        if setup == "weighted_sum_reduction":
            loss = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
            weights = np.array([1, 0, 2, 0.5, 1, 3], "float32")
        if setup == "loss_scale":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, 2.0**10)
        model.compile(optimizer=optimizer, loss=loss)
    model(x)
    assert reuses_training_pass(model, model.train_step)
    separate, probed = probed_and_separate(model, x, y, weights)
    assert_blocks_match(probed, separate)


def test_probed_pass_is_not_used_where_it_would_be_wrong():
    def model_with(**dense_kwargs):
        return keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, **dense_kwargs)]
        )

    activity = compiled(model_with(activity_regularizer="l2"), loss="mse")
    assert not reuses_training_pass(activity, activity.train_step)
    mixed = two_output_model()
    mixed.compile(
        optimizer="sgd",
        loss={
            "cls": "sparse_categorical_crossentropy",
            "reg": keras.losses.MeanSquaredError(reduction="sum"),
        },
    )
    assert not reuses_training_pass(mixed, mixed.train_step)

    class CustomStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    custom = compiled(
        CustomStep([keras.Input((3,)), keras.layers.Dense(2)]), loss="mse"
    )
    assert not reuses_training_pass(custom, custom.train_step)
    plain = compiled(model_with(), loss="mse")
    assert reuses_training_pass(plain, plain.train_step)


def bn_dropout_layers():
    return [
        keras.layers.Conv2D(4, 3, padding="same", name="c1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dropout(0.3),
        keras.layers.Conv2D(16, 4, strides=4, activation="relu", name="c2"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ]


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn_dropout"])
def test_fit_measurements_do_not_depend_on_reusing_the_pass(batch_norm, tmp_path):
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(32, 8, 8, 2)).astype("float32"), labels(32)

    def run(reuse_training_pass):
        keras.utils.set_random_seed(13)
        layers = bn_dropout_layers if batch_norm else CASES["conv_materialise"][0]
        model = compiled(keras.Sequential([keras.Input((8, 8, 2)), *layers()]))
        callback = keras_fim.FisherCallback(
            every_n_steps=1,
            reuse_training_pass=reuse_training_pass,
            per_layer=True,
            log_dir=str(tmp_path / str(reuse_training_pass)),
            noise_scale="always",
        )
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[callback]
        )
        return model

    a, b = run(True), run(False)
    for name in ("condition_sum", "energy_sum", "trace_sigma_ema"):
        np.testing.assert_allclose(
            float(getattr(a.fisher_state, name)),
            float(getattr(b.fisher_state, name)),
            rtol=1e-5,
            err_msg=name,
        )
    for va, vb in zip(a.trainable_variables, b.trainable_variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    layers, _ = ref.read_scalars(str(tmp_path / "True"), prefix="fisher_layers/")
    shares = [v for tag, v in layers.items() if tag.endswith("/trace_share")]
    assert len(shares) == 3 + batch_norm  # c1, (bn,) c2, head
    np.testing.assert_allclose(np.sum([s[-1][1] for s in shares]), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=2, padding="same", strides=2),
        dict(kernel_size=(2, 3), padding="valid", strides=(2, 1)),
        dict(kernel_size=3, padding="same", dilation_rate=2),
    ],
    ids=["same_s2", "valid_rect_s21", "same_dilated"],
)
def test_convolution_gradients_under_xla_match_loop(conv):
    """Under XLA the kernel gradients are one grouped convolution."""
    keras.utils.set_random_seed(14)
    model = compiled(
        keras.Sequential(
            [
                keras.Input((7, 6, 2)),
                keras.layers.Conv2D(3, **conv),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    )
    x = np.random.default_rng(15).normal(size=(5, 7, 6, 2)).astype("float32")
    y = labels(5)
    xla = tf.function(
        lambda: keras_fim.per_example_gradients(model, x, y), jit_compile=True
    )()
    expected = ref.loop_per_example_gradients(model, x, y)
    for actual, wanted in zip(xla, expected, strict=True):
        np.testing.assert_allclose(actual.numpy(), wanted, rtol=1e-4, atol=1e-6)


# -- choosing paths: forced, calibrated (timed), by cost ---------------------------

KERNEL_MODELS = {
    "conv_same_s2": (
        lambda: [
            keras.layers.Conv2D(4, 3, strides=2, padding="same", name="k"),
            keras.layers.Flatten(),
        ],
        (9, 8, 3),
    ),
    "conv_valid_rect_s21": (
        lambda: [
            keras.layers.Conv2D(5, (3, 2), strides=(2, 1), activation="tanh", name="k"),
            keras.layers.GlobalAveragePooling2D(),
        ],
        (7, 6, 2),
    ),
    "conv_same_dilated": (
        lambda: [
            keras.layers.Conv2D(3, 3, padding="same", dilation_rate=2, name="k"),
            keras.layers.Flatten(),
        ],
        (7, 6, 2),
    ),
    "conv1d_causal": (
        lambda: [
            keras.layers.Conv1D(4, 3, padding="causal", strides=2, name="k"),
            keras.layers.Flatten(),
        ],
        (9, 2),
    ),
    "separable_pointwise": (
        lambda: [
            keras.layers.SeparableConv2D(4, 3, strides=2, padding="same", name="k"),
            keras.layers.Flatten(),
        ],
        (7, 6, 3),
    ),
    "dense_sequence": (
        lambda: [keras.layers.Dense(4, name="k"), keras.layers.Flatten()],
        (3, 5),
    ),
}


def kernel_model(case):
    layers, shape = KERNEL_MODELS[case]
    keras.utils.set_random_seed(16)
    model = compiled(
        keras.Sequential(
            [
                keras.Input(shape),
                *layers(),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )
    )
    x = np.random.default_rng(17).normal(size=(5, *shape)).astype("float32")
    return model, x, labels(5)


@pytest.mark.parametrize(
    "method", ["ghost", "materialise", "map_fn", "slices", "im2col", "einsum"]
)
@pytest.mark.parametrize("case", list(KERNEL_MODELS))
def test_every_forced_path_matches_loop(case, method):
    """Whichever path is chosen, the block is the reference's: each path
    (and each method of materialising) forced in turn."""
    model, x, y = kernel_model(case)
    with path_choice(method):
        actual, plans = engine_blocks(model, x, y)
    plan = plans["k"]
    dilated = case == "conv_same_dilated"
    convolution = case.startswith("conv")
    candidate = method in ("ghost", "materialise") or (
        method == "einsum" and not convolution
    )
    candidate |= convolution and method in ("slices", "im2col")
    candidate |= convolution and method == "map_fn" and not dilated
    if candidate:
        assert plan.chosen_by == "forced", plan
        if method != "materialise":
            assert plan.method == method, plan
    else:
        assert plan.chosen_by in ("cost", ""), plan  # one candidate: ""
    assert_blocks_match(actual, reference_blocks(model, x, y))


def conv_stack(shape, convolutions, seed):
    """A compiled stack of 3x3 Conv2D layers, ``{name: (filters, options)}``
    in order, then a softmax head named "head"."""
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Conv2D(filters, 3, name=name, **options)
        for name, (filters, options) in convolutions.items()
    ]
    head = keras.layers.Dense(3, activation="softmax", name="head")
    return compiled(
        keras.Sequential([keras.Input(shape), *layers, keras.layers.Flatten(), head])
    )


def test_calibration_takes_the_fastest_candidate_once_per_shape():
    """With timings injected: the fastest candidate by the timer is taken,
    timed once per shape (two identical layers share it), and a candidate
    over the memory budget is never timed."""
    from keras_fim.engine.gram import calibrations, clear_calibrations

    same = dict(padding="same")
    model = conv_stack(
        (8, 8, 2), dict(a=(2, same), b=(2, same), c=(3, dict(strides=2))), seed=18
    )
    x = np.random.default_rng(19).normal(size=(4, 8, 8, 2)).astype("float32")
    y = labels(4)
    speeds = {"ghost": 3.0, "map_fn": 2.0, "slices": 1.0, "im2col": 4.0, "einsum": 5}
    timed = []

    def timer(plan, run):
        timed.append((plan.layer, plan.method))
        run()  # each candidate runs on the random operands
        return speeds[plan.method]

    clear_calibrations()
    with path_choice("calibrate", timer=timer):
        actual, plans = engine_blocks(model, x, y)
    assert {plans[n].method for n in "abc"} == {"slices"}
    assert all(plans[n].chosen_by == "calibration" for n in "abc")
    # Each plan carries its candidates' times (4 examples: not scaled).
    timed_a = {method for layer, method in timed if layer == "a"}
    assert plans["a"].timings == {m: speeds[m] for m in timed_a}
    # a and b share a shape: timed once; c has its own (and the head).
    assert sorted({layer for layer, _ in timed}) == ["a", "c", "head"]
    assert plans["head"].method == "ghost"
    assert len(timed) == len(set(timed))
    assert_blocks_match(actual, reference_blocks(model, x, y))

    # Cached: planning again times nothing.
    timed.clear()
    with path_choice("calibrate", timer=timer):
        engine_blocks(model, x, y)
    assert timed == []
    assert len(calibrations()) >= 2

    # Over the budget, the ghost form and im2col (its patches) are no
    # candidates, and the materialised kernels are split.
    clear_calibrations()
    speeds.update(ghost=0.1, im2col=0.2)
    with path_choice("calibrate", timer=timer):
        actual, plans = engine_blocks(model, x, y, memory_budget=600)
    convolutions = [method for layer, method in timed if layer != "head"]
    assert convolutions and not {"ghost", "im2col"} & set(convolutions)
    assert plans["a"].method == "slices" and plans["a"].chunks > 1
    assert_blocks_match(actual, reference_blocks(model, x, y))


def test_calibration_times_a_large_batch_on_fewer_examples(monkeypatch):
    """A batch over `CALIBRATION_BATCH_SIZE` is timed on that many examples
    and each time scaled by its candidate's multiply-adds: equal times at
    the small batch make the ghost form (quadratic in the batch) lose at
    the large one; the block is still the reference's."""
    from keras_fim.engine import gram

    monkeypatch.setattr(gram, "CALIBRATION_BATCH_SIZE", 3)
    keras.utils.set_random_seed(20)
    model = compiled(
        keras.Sequential(
            [
                keras.Input((2, 2, 2)),
                keras.layers.Conv2D(2, 3, padding="same", name="k"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )
    )
    x = np.random.default_rng(21).normal(size=(12, 2, 2, 2)).astype("float32")
    y = labels(12)
    sizes = []

    def timer(plan, run):
        sizes.append(run().shape[0])
        return 1.0

    gram.clear_calibrations()
    with path_choice("calibrate", timer=timer):
        actual, plans = engine_blocks(model, x, y)
    assert set(sizes) == {3}
    scaled = gram.calibrations()
    times = next(t for key, (_, t) in scaled.items() if key[0][0] == "convolution")
    # 12 examples, 4 positions, m = 18, n = 2: the ghost form's count grows
    # by (12/3)^2, the materialised one's by 12 (4 + 12) / (3 (4 + 3)).
    assert times["ghost"] == pytest.approx(16.0)
    assert times["slices"] == pytest.approx(12 * 16 / (3 * 7))
    assert plans["k"].method != "ghost" and plans["k"].chosen_by == "calibration"
    assert_blocks_match(actual, reference_blocks(model, x, y))


def test_units_of_one_kind_share_one_traced_block_in_a_graph():
    """Inside a traced function, units of one kind (class, options, shapes)
    call one block function, traced once and kept out of line; each unit's
    block is still its own (the float64 loop's) and its plan bears its name.
    A block that reads a tensor beyond its factors is not shared, and is
    right too."""
    from keras_fim.engine import gram
    from keras_fim.engine.rules import LayerRule, builtin_registry, convolution_rule

    same = dict(padding="same")
    model = conv_stack(
        (6, 6, 3),
        dict(a=(3, same), b=(3, same), c=(3, same), d=(2, dict(strides=2))),
        seed=22,
    )
    x = np.random.default_rng(23).normal(size=(5, 6, 6, 3)).astype("float32")
    y = labels(5)
    expected = reference_blocks(model, x, y)
    traced = []
    original = gram.SharedBlocks.__call__

    def counting(self, unit, factors, budget):
        before = len(self._functions)
        result = original(self, unit, factors, budget)
        traced.append(len(self._functions) > before)
        return result

    def blocks_in_a_graph(registry=None):
        out = {}

        @tf.function(autograph=False)
        def blocks():
            record = record_pass(model, x, y, registry=registry)
            built, plans = grams_from_calls(record.units, record.calls, record.examples)
            out["plans"] = {p.layer: p for p in plans}
            out["graph"] = tf.compat.v1.get_default_graph()
            return built

        values = {k: v.numpy() for k, v in blocks().items()}
        return values, out

    with mock.patch.object(gram.SharedBlocks, "__call__", counting):
        actual, out = blocks_in_a_graph()
    assert_blocks_match(actual, expected)
    assert traced == [True, False, False, True, True]  # a = b = c, d, head
    assert all(out["plans"][name].layer == name for name in "abcd")
    calls = [op for op in out["graph"].get_operations() if "PartitionedCall" in op.type]
    assert len(calls) == 5

    # A custom block reading an outer tensor (here: the cotangent beside its
    # factors) captures it: formed in place, per unit.
    base = builtin_registry()
    conv = base.rule_for(model.get_layer("a"))

    def leaky_factors(layer, calls, examples):
        factors = conv.factors(layer, calls, examples)
        outer = tf.reduce_sum(factors.tensors[0]) * 0.0

        def block(tensors, budget):
            value, plan = factors.block(tensors, budget)
            return value + tf.cast(outer, value.dtype), plan

        return gram.GhostFactors(factors.tensors, block)

    registry = builtin_registry()
    registry.register(
        keras.layers.Conv2D,
        LayerRule(convolution_rule, factors=leaky_factors),
        overwrite=True,
    )
    traced.clear()
    with mock.patch.object(gram.SharedBlocks, "__call__", counting):
        actual, out = blocks_in_a_graph(registry)
    assert_blocks_match(actual, expected)
    calls = [op for op in out["graph"].get_operations() if "PartitionedCall" in op.type]
    assert len(calls) == 1  # the head's Dense only


def test_the_clock_times_again_only_the_candidates_close_to_the_fastest():
    """Each candidate is warmed up and timed once; those within `CLOSE` of
    the fastest are timed `CALIBRATION_REPEATS` times in all, the fastest
    run counting; each time is scaled by its candidate's factor."""
    from keras_fim.engine import gram

    ran = []

    def build(name):
        def block(operands):
            ran.append(name)
            return tf.zeros([2, 2], tf.float64) + tf.cast(operands[0][0, 0], tf.float64)

        return None, block

    candidates = {"a": build("a"), "b": build("b"), "c": build("c")}
    # first runs: a 1.0, b 1.2, c 3.0; then a and b twice more
    durations = [1.0, 1.2, 3.0, 0.9, 0.95, 1.3, 1.1]
    ticks = np.cumsum([[0.0, d] for d in durations]).tolist()
    with mock.patch.object(gram.time, "perf_counter", side_effect=ticks):
        seconds = gram._clocked(
            candidates, [tf.ones([2, 2])], {"a": 1.0, "b": 1.0, "c": 2.0}
        )
    assert seconds == pytest.approx({"a": 0.9, "b": 1.1, "c": 6.0})
    assert sorted(set(ran)) == ["a", "b", "c"]  # each branch traced once


def test_calibrations_are_kept_on_disk_per_machine(monkeypatch, tmp_path):
    """A calibration timed by the clock is written to the store; a new
    process (memory cleared) takes it from there without timing; another
    machine's fingerprint, or an unreadable file (one warning), times again;
    ``off`` writes nothing."""
    import json

    from keras_fim.engine import calibration_store, gram

    model, x, y = kernel_model("conv_same_s2")
    speeds = {"ghost": 3.0, "map_fn": 2.0, "slices": 1.0, "im2col": 4.0}
    timed = []

    def clocked(candidates, operands, scale):
        timed.extend(candidates)
        return {method: speeds.get(method, 5.0) for method in candidates}

    monkeypatch.setattr(gram, "_clocked", clocked)
    path = tmp_path / "cache" / "calibrations.json"
    monkeypatch.setenv("KERAS_FIM_CALIBRATION_CACHE", str(path))

    def plan_k():
        with path_choice("calibrate"):
            actual, plans = engine_blocks(model, x, y)
        assert_blocks_match(actual, reference_blocks(model, x, y))
        return plans["k"]

    gram.clear_calibrations()
    assert plan_k().method == "slices" and timed
    section = json.loads(path.read_text())[calibration_store.fingerprint()]
    assert any(method == "slices" for method, _ in section.values())

    timed.clear()
    gram.clear_calibrations()  # as a new process
    plan = plan_k()
    assert (plan.method, plan.chosen_by, timed) == ("slices", "calibration", [])

    monkeypatch.setattr(calibration_store, "fingerprint", lambda: "another machine")
    gram.clear_calibrations()
    plan_k()
    assert timed
    assert len(json.loads(path.read_text())) == 2  # both machines kept

    path.write_text("{not json")
    timed.clear()
    gram.clear_calibrations()
    with pytest.warns(UserWarning, match="calibration cache"):
        plan_k()
    assert timed and "another machine" in json.loads(path.read_text())

    off = tmp_path / "off"
    monkeypatch.setenv("KERAS_FIM_CALIBRATION_CACHE", "off")
    monkeypatch.setenv("KERAS_HOME", str(off))
    gram.clear_calibrations()
    plan_k()
    assert calibration_store.cache_path() is None and not off.exists()


def test_the_default_takes_kept_calibrations_and_times_nothing(monkeypatch, tmp_path):
    """By default (``"auto"``) nothing is timed: the cost model plans a
    shape the store does not hold, and a shape calibrated earlier (here by
    another "process", on disk) takes the calibrated choice."""
    from keras_fim.engine import gram

    model, x, y = kernel_model("conv_same_s2")
    with path_choice("cost"):
        by_cost = engine_blocks(model, x, y)[1]["k"].method
    # The clock finds the cost model's choice slowest of all.
    speeds = {"ghost": 2, "slices": 3, "map_fn": 4, "im2col": 5, "einsum": 6}
    speeds[by_cost] = 10
    timed = []

    def clocked(candidates, operands, scale):
        timed.extend(candidates)
        return {method: speeds[method] for method in candidates}

    monkeypatch.setattr(gram, "_clocked", clocked)
    monkeypatch.setenv("KERAS_FIM_CALIBRATION_CACHE", str(tmp_path / "c.json"))
    monkeypatch.delenv("KERAS_FIM_PATH_CHOICE")

    def plan_k():
        actual, plans = engine_blocks(model, x, y)
        assert_blocks_match(actual, reference_blocks(model, x, y))
        return plans["k"].method, plans["k"].chosen_by

    gram.clear_calibrations()
    assert plan_k() == (by_cost, "cost") and timed == []
    assert engine_blocks(model, x, y)[1]["k"].timings is None
    with path_choice("calibrate"):
        calibrated, _ = plan_k()
    assert timed and calibrated != by_cost
    timed.clear()
    gram.clear_calibrations()  # as a new process
    assert plan_k() == (calibrated, "calibration") and timed == []


def test_calibration_by_the_clock_inside_a_function_matches_loop():
    """Timed for real (whatever wins on this machine), from inside a
    `tf.function` being traced: the block is the reference's."""
    from keras_fim.engine.gram import clear_calibrations

    model, x, y = kernel_model("conv_same_s2")
    clear_calibrations()
    plans = []

    @tf.function
    def blocks():
        record = record_pass(model, x, y)
        built, unit_plans = grams_from_calls(
            record.units, record.calls, record.examples
        )
        plans[:] = unit_plans
        return built

    with path_choice("calibrate"):
        actual = {k: v.numpy() for k, v in blocks().items()}
    plan = {p.layer: p for p in plans}["k"]
    assert plan.chosen_by == "calibration"
    assert plan.method in ("ghost", "map_fn", "slices", "im2col")
    assert_blocks_match(actual, reference_blocks(model, x, y))


def test_path_choice_is_checked_and_the_environment_sets_its_default(monkeypatch):
    with pytest.raises(ValueError, match="choice"), path_choice(""):
        pass
    model, x, y = kernel_model("conv_same_s2")
    monkeypatch.setenv("KERAS_FIM_PATH_CHOICE", "im2col")
    _, plans = engine_blocks(model, x, y)
    assert (plans["k"].method, plans["k"].chosen_by) == ("im2col", "forced")
