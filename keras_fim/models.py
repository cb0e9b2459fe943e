"""Small reference networks (the paper's CIFAR-style ResNet family)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="keras_fim")
class ZeroPadShortcut(keras.layers.Layer):
    """The CIFAR ResNets' "option A" shortcut: subsample, zero-pad channels."""

    def __init__(self, filters: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stride = stride

    def call(self, x):
        x = x[:, :: self.stride, :: self.stride, :]
        missing = self.filters - x.shape[-1]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, missing]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        shrink = lambda n: None if n is None else -(-n // self.stride)  # noqa: E731
        return (batch, shrink(height), shrink(width), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


def _residual_block(x, filters, stride, batch_norm):
    shortcut = x
    h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=not batch_norm)(x)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm)(h)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = ZeroPadShortcut(filters, stride)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))


def cifar_resnet(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    blocks_per_stage: int = 1,
    widths=(16, 32, 64),
    batch_norm: bool = True,
    model_class=keras.Model,
    **model_kwargs,
) -> keras.Model:
    """A CIFAR-style ResNet of depth ``6 n + 2`` (``n = blocks_per_stage``).

    conv(16) -> three stages of ``n`` residual blocks (16/32/64 filters, the
    last two starting with stride 2) -> global average pooling -> dense
    softmax. With ``n = 1`` this is the ~78k-parameter network of the peer
    benchmarks; ``n = 18`` is the paper's ResNet-110.

    Args:
        input_shape: Tuple, the image shape (channels last).
        num_classes: Integer, the number of classes.
        blocks_per_stage: Integer ``n`` >= 1.
        widths: Three integers, the filters of each stage.
        batch_norm: Boolean, conv-BN-ReLU blocks (`True`) or conv-ReLU.
        model_class: The model class to build, e.g. `keras_fim.FisherModel`.
        **model_kwargs: Passed to `model_class`.

    Example:

    >>> model = cifar_resnet((8, 8, 1), num_classes=10)
    >>> model.output_shape
    (None, 10)
    """
    if blocks_per_stage < 1:
        raise ValueError(
            f"`blocks_per_stage` must be >= 1. Received: blocks_per_stage={blocks_per_stage}"
        )
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=not batch_norm)(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _residual_block(x, filters, stride, batch_norm)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return model_class(inputs, outputs, **model_kwargs)


def compile_like_the_paper(model: keras.Model, learning_rate: float = 0.1, **compile_kwargs):
    """Compiles `model` as the paper trains its classifiers.

    SGD with Nesterov momentum 0.9 at `learning_rate`, sparse categorical
    cross-entropy (on the softmax outputs of `cifar_resnet`) and accuracy.
    Further keyword arguments go to `compile` (e.g. ``jit_compile``).

    Example:

    >>> model = compile_like_the_paper(cifar_resnet((8, 8, 1)), 0.05)
    >>> float(model.optimizer.learning_rate), model.optimizer.nesterov
    (0.05000000074505806, True)
    """
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return model
