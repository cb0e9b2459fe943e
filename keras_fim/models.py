"""Small reference networks: CIFAR-style ResNets and DenseNet-BC, and the
paper's optimizer.

The paper's networks were trained in Torch, and two of its defaults differ
from Keras's (METHOD.md): BatchNormalization's running statistics move by
0.1 of the batch's at each step (Keras ``momentum=0.9``, where Keras's own
default 0.99 keeps about half of its initial statistics after 70 steps),
and SGD's weight decay is *coupled*: ``wd * theta`` is added to the gradient
before momentum (`CoupledSGD`), where Keras's `weight_decay` shrinks the
weights directly. Both are the defaults here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import keras

from keras_fim.validation import check_real

BATCH_NORM_MOMENTUM = 0.9
"""The paper's BatchNormalization momentum, in Keras's convention (Torch's
0.1)."""


@keras.saving.register_keras_serializable(package="keras_fim")
class ZeroPadShortcut(keras.layers.Layer):
    """The CIFAR ResNets' "option A" shortcut: subsample, zero-pad channels.

    Takes every `stride`-th row and column (starting with the first) of a
    channels-last image batch and appends zero channels up to `filters`. It
    has no weights.

    Args:
        filters: Integer, the number of output channels, at least the
            input's (the missing ones are zeros).
        stride: Integer >= 1, the subsampling step along height and width.
        **kwargs: Passed to `keras.layers.Layer` (`name`, `dtype`, ...).
    """

    def __init__(self, filters: int, stride: int, **kwargs: Any):
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


_SHORTCUTS = ("zero_pad", "projection")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _batch_norm(x, momentum):
    return keras.layers.BatchNormalization(momentum=momentum)(x)


def _residual_block(x, filters, stride, batch_norm, shortcut_type, momentum):
    shortcut = x
    h = keras.layers.Conv2D(
        filters, 3, strides=stride, padding="same", use_bias=not batch_norm
    )(x)
    if batch_norm:
        h = _batch_norm(h, momentum)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm)(h)
    if batch_norm:
        h = _batch_norm(h, momentum)
    if stride != 1 or shortcut.shape[-1] != filters:
        if shortcut_type == "projection":
            shortcut = keras.layers.Conv2D(
                filters, 1, strides=stride, padding="same", use_bias=not batch_norm
            )(shortcut)
            if batch_norm:
                shortcut = _batch_norm(shortcut, momentum)
        else:
            shortcut = ZeroPadShortcut(filters, stride)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))


def _blocks_from_depth(depth, blocks_per_stage):
    if depth is None:
        n = 1 if blocks_per_stage is None else blocks_per_stage
        if not _is_int(n) or n < 1:
            raise ValueError(
                f"`blocks_per_stage` must be >= 1. Received: blocks_per_stage={n}"
            )
        return int(n)
    if not _is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "`depth` must be 6n+2 with n >= 1 (20, 56, 110, ...). "
            f"Received: depth={depth}"
        )
    n = (depth - 2) // 6
    if blocks_per_stage is not None and blocks_per_stage != n:
        raise ValueError(
            "`depth` and `blocks_per_stage` disagree: depth=6n+2 needs "
            f"blocks_per_stage={n}; give only one of them. Received: "
            f"depth={depth}, blocks_per_stage={blocks_per_stage}"
        )
    return int(n)


def cifar_resnet(
    input_shape: tuple[int | None, ...] = (32, 32, 3),
    num_classes: int = 10,
    blocks_per_stage: int | None = None,
    widths: Sequence[int] = (16, 32, 64),
    batch_norm: bool = True,
    model_class: type[keras.Model] = keras.Model,
    *,
    depth: int | None = None,
    shortcut: str = "zero_pad",
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM,
    **model_kwargs: Any,
) -> keras.Model:
    """A CIFAR-style ResNet of depth ``6 n + 2`` (``n = blocks_per_stage``).

    conv(16) -> three stages of ``n`` residual blocks (16/32/64 filters, the
    last two starting with stride 2) -> global average pooling -> dense
    softmax. With ``n = 1`` this is the ~76k-parameter (75,770 on CIFAR-10)
    network of the peer benchmarks; ``n = 18`` (``depth=110``) is the
    paper's ResNet-110 (He et al. 2016, section 4.2).

    Args:
        input_shape: Tuple, the image shape (channels last). Defaults to
            `(32, 32, 3)`.
        num_classes: Integer, the number of classes. Defaults to `10`.
        blocks_per_stage: Integer ``n`` >= 1 or `None`. Defaults to `None`:
            1, or ``(depth - 2) // 6`` when `depth` is given.
        widths: Sequence of integers, the filters of each stage (the first
            also those of the stem convolution); the depth ``6 n + 2``
            counts three stages. Defaults to `(16, 32, 64)`.
        batch_norm: Boolean, conv-BN-ReLU blocks (`True`) or conv-ReLU
            (convolutions with biases). Defaults to `True`.
        model_class: The model class to build, e.g. `keras_fim.FisherModel`;
            called as ``model_class(inputs, outputs, **model_kwargs)``.
            Defaults to `keras.Model`.
        depth: Integer or `None`, the number of weighted layers ``6 n + 2``
            (20, 32, 44, 56, 110, ...), an alternative to
            `blocks_per_stage`; giving both requires them to agree. Defaults
            to `None`.
        shortcut: String, the shortcut of the blocks that change shape:
            ``"zero_pad"`` (He et al.'s option A: subsample and zero-pad the
            channels, no parameters) or ``"projection"`` (option B: a 1x1
            convolution with the block's stride, followed by batch
            normalisation when `batch_norm`). Other shortcuts are identities.
            Defaults to `"zero_pad"`.
        batch_norm_momentum: Float in [0, 1), the momentum of every
            BatchNormalization's moving statistics. Defaults to `0.9`, the
            paper's (Torch's 0.1); Keras's own default is 0.99.
        **model_kwargs: Passed to `model_class`.

    Example:

    >>> model = cifar_resnet((8, 8, 1), num_classes=10)
    >>> model.output_shape
    (None, 10)
    >>> cifar_resnet((8, 8, 1), depth=8, shortcut="projection").count_params()
    78426
    """
    blocks_per_stage = _blocks_from_depth(depth, blocks_per_stage)
    if shortcut not in _SHORTCUTS:
        raise ValueError(
            f"`shortcut` must be one of {_SHORTCUTS}. Received: shortcut={shortcut!r}"
        )
    check_real("batch_norm_momentum", batch_norm_momentum, 0, 1, include_high=False)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=not batch_norm)(
        inputs
    )
    if batch_norm:
        x = _batch_norm(x, batch_norm_momentum)
    x = keras.layers.ReLU()(x)
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _residual_block(
                x, filters, stride, batch_norm, shortcut, batch_norm_momentum
            )
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return model_class(inputs, outputs, **model_kwargs)


def _bn_relu_conv(x, filters, kernel_size, dropout, momentum):
    x = _batch_norm(x, momentum)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False)(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return x


def densenet_transition_channels(channels: int, compression: float) -> int:
    """The channels a DenseNet-BC transition keeps: ``floor(compression * c)``.

    At least one channel is kept.

    Args:
        channels: Integer, the channels ``c`` entering the transition.
        compression: Float in ``(0, 1]``, the fraction of them kept.
    """
    return max(1, math.floor(compression * channels))


def densenet_bc(
    input_shape: tuple[int | None, ...] = (32, 32, 3),
    num_classes: int = 10,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    dropout: float = 0.0,
    model_class: type[keras.Model] = keras.Model,
    *,
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM,
    **model_kwargs: Any,
) -> keras.Model:
    """DenseNet-BC for CIFAR (Huang et al. 2017), e.g. depth 100, k = 12.

    conv3x3(``2k``) -> three dense blocks of ``n = (depth - 4) // 6``
    bottleneck layers, each BN-ReLU-conv1x1(``4k``)-BN-ReLU-conv3x3(``k``)
    whose ``k`` outputs are concatenated to its input, with a transition
    BN-ReLU-conv1x1(``floor(compression * channels)``)-average pooling 2x2
    between blocks -> BN-ReLU -> global average pooling -> dense softmax.
    Convolutions have no bias. The pooling pads (``padding="same"``), so
    any input size works: a side of 1 stays 1 and odd sides round up.
    Depth 100 with ``k = 12`` is the paper's ~0.8M-parameter network.

    Args:
        input_shape: Tuple, the image shape (channels last). Defaults to
            `(32, 32, 3)`.
        num_classes: Integer, the number of classes. Defaults to `10`.
        depth: Integer ``6 n + 4`` >= 10 (40, 100, 190, 250, ...). Defaults
            to `100`.
        growth_rate: Integer ``k`` >= 1, the channels each bottleneck layer
            adds. Defaults to `12`.
        compression: Float in ``(0, 1]``, the fraction of channels a
            transition keeps (``1`` is the plain DenseNet-B). Defaults to
            `0.5`.
        dropout: Float in ``[0, 1)``, the dropout rate after each
            convolution of the dense blocks and transitions (the paper uses
            0.2 without data augmentation); 0 adds no dropout layers.
            Defaults to `0.0`.
        model_class: The model class to build, e.g. `keras_fim.FisherModel`;
            called as ``model_class(inputs, outputs, **model_kwargs)``.
            Defaults to `keras.Model`.
        batch_norm_momentum: Float in [0, 1), the momentum of every
            BatchNormalization's moving statistics. Defaults to `0.9`, the
            paper's (Torch's 0.1); Keras's own default is 0.99.
        **model_kwargs: Passed to `model_class`.

    Example:

    >>> model = densenet_bc((8, 8, 1), num_classes=10, depth=10, growth_rate=4)
    >>> model.output_shape
    (None, 10)
    >>> model.count_params()
    2718
    """
    if not _is_int(depth) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            "`depth` must be 6n+4 with n >= 1 (10, 40, 100, 190, ...). "
            f"Received: depth={depth}"
        )
    if not _is_int(growth_rate) or growth_rate < 1:
        raise ValueError(
            "`growth_rate` must be an integer >= 1. "
            f"Received: growth_rate={growth_rate}"
        )
    if (
        isinstance(compression, bool)
        or not isinstance(compression, numbers.Real)
        or not (0 < compression <= 1)
    ):
        raise ValueError(
            "`compression` must be a number in (0, 1]. "
            f"Received: compression={compression}"
        )
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not (0 <= dropout < 1)
    ):
        raise ValueError(
            f"`dropout` must be a number in [0, 1). Received: dropout={dropout}"
        )
    check_real("batch_norm_momentum", batch_norm_momentum, 0, 1, include_high=False)
    layers_per_block = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(2 * growth_rate, 3, padding="same", use_bias=False)(inputs)
    for block in range(3):
        if block > 0:
            channels = densenet_transition_channels(x.shape[-1], compression)
            x = _bn_relu_conv(x, channels, 1, dropout, batch_norm_momentum)
            x = keras.layers.AveragePooling2D(2, padding="same")(x)
        for _ in range(layers_per_block):
            h = _bn_relu_conv(x, 4 * growth_rate, 1, dropout, batch_norm_momentum)
            h = _bn_relu_conv(h, growth_rate, 3, dropout, batch_norm_momentum)
            x = keras.layers.Concatenate()([x, h])
    x = _batch_norm(x, batch_norm_momentum)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return model_class(inputs, outputs, **model_kwargs)


@keras.saving.register_keras_serializable(package="keras_fim")
class CoupledSGD(keras.optimizers.SGD):
    """SGD whose weight decay is added to the gradient, as Torch's SGD does.

    Each step follows ``g + weight_decay * theta`` with (Nesterov) momentum,
    so the decay is amplified by the momentum as in the paper's training
    (``1 / (1 - momentum)``, 10x at 0.9), where Keras's own `weight_decay`
    shrinks the weights by ``learning_rate * weight_decay`` outside the
    momentum. The decay acts on every trainable variable, as Torch's does,
    and on no per-example gradient: it lives in the optimizer, not in the
    loss.

    Args:
        learning_rate: Float or a `keras.optimizers.schedules`
            schedule. Defaults to `0.01`.
        coupled_weight_decay: Float >= 0, ``wd``. Defaults to `0.0`.
        **kwargs: Passed to `keras.optimizers.SGD` (`momentum`, `nesterov`,
            ...; its decoupled `weight_decay` is refused).

    Example:

    >>> import numpy as np
    >>> variable = keras.Variable([1.0, -2.0])
    >>> optimizer = CoupledSGD(0.1, coupled_weight_decay=0.5)
    >>> optimizer.apply([keras.ops.zeros(2)], [variable])
    >>> np.round(variable.numpy(), 4)  # theta - 0.1 * 0.5 * theta
    array([ 0.95, -1.9 ], dtype=float32)
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.01,
        coupled_weight_decay: float = 0.0,
        **kwargs: Any,
    ):
        if kwargs.get("weight_decay"):
            raise ValueError(
                "`CoupledSGD` adds its decay to the gradient: give "
                "`coupled_weight_decay`, not Keras's decoupled `weight_decay`. "
                f"Received: weight_decay={kwargs['weight_decay']!r}"
            )
        super().__init__(learning_rate, **kwargs)
        self.coupled_weight_decay = check_real(
            "coupled_weight_decay", coupled_weight_decay, 0
        )

    def update_step(self, gradient, variable, learning_rate):
        if self.coupled_weight_decay:
            decay = keras.ops.cast(self.coupled_weight_decay, variable.dtype)
            gradient = gradient + decay * variable
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "coupled_weight_decay": self.coupled_weight_decay,
        }


def compile_like_the_paper(
    model: keras.Model,
    learning_rate: float = 0.1,
    weight_decay: float | None = None,
    **compile_kwargs: Any,
) -> keras.Model:
    """Compiles `model` as the paper trains its classifiers.

    SGD with Nesterov momentum 0.9 at `learning_rate` and weight decay
    coupled to the gradient as Torch applies it (`CoupledSGD`), sparse
    categorical cross-entropy (on the softmax outputs of `cifar_resnet`) and
    accuracy. The decay is the optimizer's, so it is no part of any
    per-example gradient, as METHOD.md asks. Further keyword arguments go to
    `compile` (e.g. ``jit_compile``).

    Args:
        model: The `keras.Model` to compile (in place).
        learning_rate: Float, the SGD learning rate. Defaults to `0.1`.
        weight_decay: Float >= 0 or `None`, the weight decay ``wd`` added to
            the gradient (``g + wd * theta``; the paper's is 1e-4); `None`
            or 0 for none. Defaults to `None`.
        **compile_kwargs: Passed to `model.compile`.

    Returns:
        `model`, compiled.

    Example:

    >>> model = compile_like_the_paper(cifar_resnet((8, 8, 1)), 0.05, 1e-4)
    >>> float(model.optimizer.learning_rate), model.optimizer.nesterov
    (0.05000000074505806, True)
    >>> model.optimizer.coupled_weight_decay
    0.0001
    """
    model.compile(
        optimizer=CoupledSGD(
            learning_rate,
            coupled_weight_decay=weight_decay or 0.0,
            momentum=0.9,
            nesterov=True,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return model
