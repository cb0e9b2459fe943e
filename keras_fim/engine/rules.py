"""Layer rules: per-example gradient contributions from recorded layer calls.

A rule takes a unit layer, one `LayerCall` (its inputs, its non-trainable
state and the cotangent of its outputs from the batch backward pass) and the
number of examples to return, and gives one tensor per variable in
`layer.trainable_variables`, shaped `(examples, *variable.shape)`: each
example's contribution to the gradient of the summed per-example losses.

Fast rules exist for the common layers; `generic_rule` handles any layer
exactly, batch-coupled or not, by differentiating each example's share of the
layer's output (its output rows dotted with its cotangent rows) on the whole
recorded batch.

A `LayerRule` is what keras-fim knows of one family of layers: its
per-example rule and, optionally, its Gram block in factored form (the
"ghost" form's rows, which also serve as the distributed payload). A
`RuleRegistry` maps layer classes to them, looked up along the class's MRO
so that subclasses inherit their parent's rule; `builtin_registry()` builds
keras-fim's own, and `register_rule` adds to the process-wide
`DEFAULT_REGISTRY` (or to a registry it is given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_fim._keras_compat import in_xla_context
from keras_fim.engine.capture import (
    LayerCall,
    dense_gradient,
    differentiable_outputs,
    first_rows,
)
from keras_fim.engine.gram import (
    GhostFactors,
    convolution_block,
    depthwise_block,
    embedding_block,
    gram_of,
    kernel_factors,
)

Rule = Callable[[keras.layers.Layer, LayerCall, int], list]


def per_example_shaped(gradients, shape) -> tf.Tensor:
    """`gradients` as ``(examples, *shape)``: no graph operation where they
    already are (a BatchNorm scale's, summed over positions), a reshape
    otherwise."""
    if gradients.shape[1:].as_list() == list(shape):
        return gradients
    return tf.reshape(gradients, [-1, *shape])


def _output_share(outputs, cotangents, examples):
    """Each example's <output rows, cotangent rows>, summed over outputs."""
    total = 0.0
    for out, cot in zip(outputs, cotangents, strict=True):
        if out is None:  # an output without logits
            continue
        product = tf.cast(first_rows(out, examples), cot.dtype) * first_rows(
            cot, examples
        )
        total += tf.reduce_sum(tf.reshape(product, [tf.shape(product)[0], -1]), axis=1)
    return total


def generic_rule(
    layer: keras.layers.Layer,
    call: LayerCall,
    examples: int,
    vectorize: bool = True,
) -> list[tf.Tensor]:
    """Exact for any layer: a Jacobian of per-example output shares.

    Re-runs the layer on the recorded batch (same inputs, same state, hence the
    same batch statistics and dropout masks) and takes the Jacobian of
    ``s_i = <y_i, dy_i>`` with respect to the layer's weights. Costs one
    vectorised backward pass per example over the layer's whole batch
    (a `tf.while_loop` over examples when `vectorize` is False).

    Args:
        layer: A Keras layer, the unit whose contributions are wanted.
        call: `LayerCall`, one recorded call of `layer` with its cotangents
            filled in.
        examples: Integer >= 1, how many examples (the first rows of the
            batch) to return contributions for; the layer still runs on the
            whole recorded batch.
        vectorize: Boolean. `True` takes the Jacobian with pfor
            (vectorised); `False` with a `tf.while_loop` over examples (for
            layers pfor cannot vectorise). Defaults to `True`.

    Returns:
        One tensor per variable in `layer.trainable_variables`, shaped
        ``(examples, *variable.shape)``: each example's contribution.
    """
    variables = call.weights
    with tf.GradientTape(persistent=not vectorize) as tape:
        tape.watch(variables)
        outputs, _ = layer.stateless_call(
            variables, call.state, *call.args, **call.kwargs
        )
        shares = _output_share(
            differentiable_outputs(outputs), call.cotangents, examples
        )
    jacobians = tape.jacobian(
        shares,
        variables,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
        experimental_use_pfor=vectorize,
    )
    return list(jacobians)


def per_example_rule(
    layer: keras.layers.Layer, call: LayerCall, examples: int
) -> list[tf.Tensor]:
    """For layers whose examples never interact: vectorised per example.

    Re-runs the layer on each example alone (``tf.vectorized_map``) and takes
    the gradient of its output dotted with its cotangent. Cheaper than the
    generic rule by a factor of the batch size. Only for single-input layers
    with no batch coupling and no randomness (Embedding, EinsumDense,
    convolutions).

    Args:
        layer: A Keras layer with one input and no batch coupling or
            randomness.
        call: `LayerCall`, one recorded call of `layer` with its cotangents
            filled in; its first positional argument is the input that is
            split per example.
        examples: Integer >= 1, how many examples (the first rows of the
            batch) to return contributions for.

    Returns:
        One tensor per variable in `layer.trainable_variables`, shaped
        ``(examples, *variable.shape)``: each example's contribution.
    """
    variables = call.weights
    inputs = first_rows(call.args[0], examples)
    # vectorized_map takes tensors only: the `None`s are put back per example
    cotangents = [first_rows(c, examples) for c in call.cotangents]
    present = [c for c in cotangents if c is not None]

    def one(example):
        x_i, given = example
        given = iter(given)
        dy_i = [None if c is None else next(given) for c in cotangents]
        with tf.GradientTape() as tape:
            tape.watch(variables)
            out, _ = layer.stateless_call(
                variables, call.state, x_i[None], *call.args[1:], **call.kwargs
            )
            share = _output_share(
                differentiable_outputs(out),
                [None if d is None else d[None] for d in dy_i],
                1,
            )
        grads = tape.gradient(
            share, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return [dense_gradient(g, v) for g, v in zip(grads, variables, strict=True)]

    return list(tf.vectorized_map(one, (inputs, present)))


def sequence_rule(layer, call: LayerCall, examples: int) -> list:
    """Recurrent layers (RNN, LSTM, GRU, Bidirectional, TimeDistributed).

    One example at a time in a `tf.map_fn`: vectorising the gradient of a
    `tf.while_loop` RNN is rejected by pfor (without `unroll=True`) and its
    Jacobian is rejected by XLA, while this loop compiles with and without
    `jit_compile`. The sequences, their mask and any initial state are sliced
    per example. Recurrent dropout masks are drawn per example, so with
    `dropout`/`recurrent_dropout` active the contributions are those of
    freshly drawn masks.
    """
    variables = call.weights

    def rows(structure, i):
        return keras.tree.map_structure(
            lambda t: t[i : i + 1] if tf.is_tensor(t) else t, structure
        )

    batched = ("mask", "initial_state")

    def one(i):
        kwargs = {k: rows(v, i) if k in batched else v for k, v in call.kwargs.items()}
        with tf.GradientTape() as tape:
            tape.watch(variables)
            out, _ = layer.stateless_call(
                variables, call.state, rows(call.args[0], i), *call.args[1:], **kwargs
            )
            share = _output_share(
                differentiable_outputs(out), rows(call.cotangents, i), 1
            )
        return tape.gradient(
            share, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    signature = [tf.TensorSpec(v.shape, v.dtype) for v in variables]
    return list(tf.map_fn(one, tf.range(examples), fn_output_signature=signature))


def _weight(layer, call: LayerCall, variable):
    """The value `variable` of `layer` had when `call` was made."""
    for v, value in zip(layer.trainable_variables, call.weights, strict=True):
        if v is variable:
            return value
    raise ValueError(f"{variable.path} is not a trainable weight of {layer.name}")


def preactivation_cotangent(layer, call: LayerCall, examples, pre_activation):
    """The cotangent of a layer's output before its `activation`.

    ``pre_activation()`` recomputes the output before the activation from
    the recorded call; it is only run when the activation is not linear.
    The cotangent of the activation's logits (softmax/sigmoid outputs that a
    cross-entropy reads through `_keras_logits`) is added.
    """
    dy, dlogits = (first_rows(c, examples) for c in call.cotangents[:2])

    def with_logits(dz):
        return dz if dlogits is None else dz + tf.cast(dlogits, dz.dtype)

    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return with_logits(dy)
    if activation is keras.activations.softmax:
        # From the recorded output, as TensorFlow's own softmax gradient:
        # no softmax recomputed (grappler cannot cost one whose input rank
        # it does not know, in a measurement under an in-graph condition,
        # and logs an error line for it).
        y = first_rows(call.outputs[0], examples)
        dy = tf.cast(dy, y.dtype)
        return with_logits((dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True)) * y)
    with tf.GradientTape() as tape:
        z = first_rows(pre_activation(), examples)
        tape.watch(z)
        y = activation(z)
    return with_logits(tape.gradient(y, z, output_gradients=tf.cast(dy, y.dtype)))


def dense_inputs_and_cotangents(layer, call: LayerCall, examples):
    """A Dense call as ``(x, dz)``, shaped ``(examples, T, in)`` and
    ``(examples, T, out)``: the kernel's per-example gradient is
    ``sum_t x_t^T dz_t`` and the bias's ``sum_t dz_t`` (T = 1 for 2D inputs,
    the positions of a sequence otherwise)."""
    x = call.args[0]
    kernel = _weight(layer, call, layer.kernel)

    def pre_activation():
        z = tf.tensordot(tf.cast(x, kernel.dtype), kernel, axes=1)
        return z + _weight(layer, call, layer.bias) if layer.use_bias else z

    dz = preactivation_cotangent(layer, call, examples, pre_activation)
    batch = tf.shape(dz)[0]
    x = tf.cast(first_rows(x, examples), dz.dtype)
    return (
        tf.reshape(x, [batch, -1, x.shape[-1]]),
        tf.reshape(dz, [batch, -1, dz.shape[-1]]),
    )


def _dense_is_plain(layer) -> bool:
    return not getattr(layer, "lora_enabled", False) and not layer.quantization_mode


def dense_rule(layer, call: LayerCall, examples: int) -> list:
    """Dense: ``g_W,i = sum_t x_it^T dz_it``, ``g_b,i = sum_t dz_it``.

    ``dz`` is the cotangent before the activation, recovered by
    differentiating the activation at the recomputed pre-activation.
    """
    if not _dense_is_plain(layer):
        return per_example_rule(layer, call, examples)
    x, dz = dense_inputs_and_cotangents(layer, call, examples)
    grads = {id(layer.kernel): tf.einsum("bti,btj->bij", x, dz)}
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(dz, axis=1)
    return [grads[id(v)] for v in layer.trainable_variables]


def convolution_is_plain(layer) -> bool:
    """Whether `convolution_operands` handles `layer`: a plain 1D/2D
    convolution (not grouped, depthwise, separable, transposed, LoRA, nor a
    subclass computing something else)."""
    for base in (keras.layers.Conv1D, keras.layers.Conv2D):
        if isinstance(layer, base):
            cls = type(layer)
            return (
                cls.call is base.call
                and cls.convolution_op is base.convolution_op
                and layer.groups == 1
                and not getattr(layer, "lora_enabled", False)
            )
    return False


def same_padding(size, kernel, stride, rate):
    """``[before, after]``: the zeros TensorFlow's ``"SAME"`` padding puts
    around an axis of `size` positions (half before, rounded down)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * rate + 1 - size, 0)
    return [total // 2, total - total // 2]


KERNEL_METHODS = ("slices", "map_fn", "im2col", "grouped")
"""The ways `ConvolutionOperands.kernel_gradients` forms the per-example
kernel gradients of a convolution (see there), in the cost model's order of
preference: calibrating the convolutions of the ResNet-style networks and
three `keras.applications` models on a 2-core machine found ``"slices"``
fastest for most units and within 1.8x of the fastest for all, ``"im2col"``
for the others, and the per-example filter-gradient loop once (up to 10x
the fastest); `benchmarks/cost_model.py` measures it (docs/performance.md).
"""

DEPTHWISE_METHODS = ("folded", "slices")
"""The ways `ConvolutionOperands.depthwise_gradients` forms those of a
depthwise convolution."""


@dataclasses.dataclass
class ConvolutionOperands:
    """A 1D/2D convolution call in NHWC form (1D as height 1): the input
    `x` (causal padding applied), the cotangent `dz` before the activation,
    and the convolution's geometry as `tf.nn` takes it."""

    x: tf.Tensor
    dz: tf.Tensor
    kernel_size: list
    strides: list
    rates: list
    padding: str

    @property
    def positions(self):
        """Output positions per example (static, or None)."""
        height, width = self.dz.shape[1:3]
        return None if height is None or width is None else height * width

    def patches(self):
        """``(patches, dz)``, shaped ``(B, positions, kernel_size)`` and
        ``(B, positions, filters)``: the kernel's per-example gradient is
        ``patches^T dz`` (im2col)."""
        patches = tf.image.extract_patches(
            self.x,
            sizes=[1, *self.kernel_size, 1],
            strides=[1, *self.strides, 1],
            rates=[1, *self.rates, 1],
            padding=self.padding,
        )
        batch = tf.shape(self.dz)[0]
        return (
            tf.reshape(patches, [batch, -1, patches.shape[-1]]),
            tf.reshape(self.dz, [batch, -1, self.dz.shape[-1]]),
        )

    def padded_input(self):
        """`x` with its ``"SAME"`` zeros added: the input of the equivalent
        ``"VALID"`` convolution."""
        if self.padding != "SAME":
            return self.x
        pads = [
            same_padding(self.x.shape[axis], k, s, r)
            for axis, k, s, r in zip(
                (1, 2), self.kernel_size, self.strides, self.rates, strict=True
            )
        ]
        return tf.pad(self.x, [[0, 0], *pads, [0, 0]])

    def has_static_geometry(self) -> bool:
        """Whether the spatial sizes of `x` and `dz` are known (`offsets`
        needs them)."""
        return None not in (*self.x.shape[1:3], *self.dz.shape[1:3])

    def offsets(self):
        """For each kernel offset ``(i, j)``, row-major, the input values it
        multiplies at every output position: ``(B, Ho, Wo, C)`` slices of
        the padded input (``x[p * stride + (i, j) * rate]``). Strided
        slices are slow on CPU (10x at stride 2), so a strided axis is
        first split into ``(positions, stride)`` and sliced without a
        stride."""
        x = self.padded_input()
        out = self.dz.shape[1:3]
        needed = [
            (k - 1) * r + (o - 1) * s + 1
            for k, r, o, s in zip(
                self.kernel_size, self.rates, out, self.strides, strict=True
            )
        ]
        # Each axis as (rows, stride): a multiple of its stride, cropped or
        # zero-padded at the end (positions past `needed` are never read).
        sizes = [-(-n // s) * s for n, s in zip(needed, self.strides, strict=True)]
        x = x[:, : sizes[0], : sizes[1]]
        pads = [
            max(size - x.shape[axis], 0)
            for axis, size in ((1, sizes[0]), (2, sizes[1]))
        ]
        if any(pads):
            x = tf.pad(x, [[0, 0], [0, pads[0]], [0, pads[1]], [0, 0]])
        (sh, sw), (rh, rw) = self.strides, self.rates
        x = tf.reshape(x, [-1, sizes[0] // sh, sh, sizes[1] // sw, sw, x.shape[-1]])
        for i in range(self.kernel_size[0]):
            for j in range(self.kernel_size[1]):
                (qi, ri), (qj, rj) = divmod(i * rh, sh), divmod(j * rw, sw)
                yield x[:, qi : qi + out[0], ri, qj : qj + out[1], rj]

    def kernel_methods(self) -> tuple:
        """The `KERNEL_METHODS` that can form this call's kernel gradients
        here: the grouped convolution under XLA only, the filter-gradient
        loop only without dilation (no dilated filter gradient on CPU), the
        shifted slices only with static spatial sizes."""
        if in_xla_context():
            return ("grouped",)
        methods = []
        if self.has_static_geometry():
            methods.append("slices")
        if all(rate == 1 for rate in self.rates):
            methods.append("map_fn")
        methods.append("im2col")
        return tuple(methods)

    def kernel_gradients(self, start=0, stop=None, method=None):
        """Per-example gradients of the kernel's output channels
        ``[start, stop)``, shaped ``(B, kh, kw, in, stop - start)``.

        `method` (one of `kernel_methods()`; `None`: the first of them):

        * ``"map_fn"``: one filter-gradient convolution per example
          (`tf.map_fn`), together as costly as the batch's own filter
          gradient; TensorFlow cannot vectorise this op.
        * ``"slices"``: for each kernel offset a batched matrix product of
          the shifted input slice and the cotangent (``kh * kw`` products of
          ``(B, in, positions) x (B, positions, out)``).
        * ``"im2col"``: the input patches (``tf.image.extract_patches``)
          times the cotangent, one batched matrix product.
        * ``"grouped"``: one convolution with a group per example (XLA).

        Which is fastest depends on the shape and the machine (issue 15:
        none wins every shape); `keras_fim.engine.gram` times them.
        """
        dz = self.dz[..., start:stop]
        sizes = [*self.kernel_size, self.x.shape[-1], dz.shape[-1]]
        method = method or self.kernel_methods()[0]
        if method == "grouped":
            return self._grouped_kernel_gradients(dz)
        if method == "im2col":
            patches, flat = self.patches()
            grads = tf.einsum("btk,bto->bko", patches, flat[..., start:stop])
            return tf.reshape(grads, [-1, *sizes])
        if method == "slices":
            batch = tf.shape(dz)[0]
            flat = tf.reshape(dz, [batch, -1, sizes[-1]])
            grads = [
                tf.matmul(tf.reshape(x, [batch, -1, sizes[-2]]), flat, transpose_a=True)
                for x in self.offsets()
            ]
            return tf.reshape(tf.stack(grads, axis=1), [-1, *sizes])
        if method != "map_fn":
            raise ValueError(f"unknown kernel method {method!r}")

        def one(example):
            x_i, dz_i = example
            return tf.raw_ops.Conv2DBackpropFilter(
                input=x_i[None],
                filter_sizes=sizes,
                out_backprop=dz_i[None],
                strides=[1, *self.strides, 1],
                dilations=[1, *self.rates, 1],
                padding=self.padding,
            )

        return tf.map_fn(
            one,
            (self.x, dz),
            fn_output_signature=tf.TensorSpec(sizes, dz.dtype),
            parallel_iterations=16,
        )

    def depthwise_methods(self) -> tuple:
        """The `DEPTHWISE_METHODS` that can form this call's depthwise
        kernel gradients here (``"folded"`` only without dilation), the one
        the cost model takes first: ``"slices"`` on maps under 64 output
        positions, where TensorFlow's depthwise filter gradient over
        ``B * C`` channels is up to 70x slower (1x1 and 2x2 maps of many
        channels, and 4x4 maps under 5x5 kernels), ``"folded"`` on larger
        ones (1.1-1.4x faster there; `benchmarks/cost_model.py`)."""
        if any(rate > 1 for rate in self.rates):
            return ("slices",)
        if (self.positions or 0) < 64:
            return ("slices", "folded")
        return ("folded", "slices")

    def depthwise_gradients(self, multiplier: int, method=None):
        """A depthwise convolution's per-example kernel gradients, shaped
        ``(B, kh, kw, in, multiplier)``, with `dz` the cotangent of its
        ``in * multiplier`` outputs (channel ``c * multiplier + m``).

        `method` (one of `depthwise_methods()`; `None`: the first):

        * ``"folded"``: one depthwise filter gradient with the examples
          folded into the channels (example ``b``'s channel ``c`` becomes
          channel ``b * in + c``), as costly as the batch's own;
        * ``"slices"``: for each kernel offset, the shifted input slice
          times the cotangent, summed over positions.
        """
        method = method or self.depthwise_methods()[0]
        batch = tf.shape(self.dz)[0]
        height, width = self.dz.shape[1:3]
        channels = self.x.shape[-1]
        if method == "folded":

            def folded(t):  # (B, H, W, C) -> (1, H, W, B * C)
                t = tf.transpose(t, [1, 2, 0, 3])
                return tf.reshape(t, [1, t.shape[0], t.shape[1], -1])

            grads = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=folded(self.x),
                filter_sizes=tf.stack(
                    [*self.kernel_size, batch * channels, multiplier]
                ),
                out_backprop=folded(self.dz),
                strides=[1, *self.strides, 1],
                padding=self.padding,
                dilations=[1, *self.rates, 1],
            )
            grads = tf.reshape(grads, [*self.kernel_size, -1, channels, multiplier])
            return tf.transpose(grads, [2, 0, 1, 3, 4])
        if method != "slices":
            raise ValueError(f"unknown depthwise method {method!r}")
        if multiplier == 1:  # the usual case: no multiplier axis to add
            grads = [tf.reduce_sum(x * self.dz, axis=[1, 2]) for x in self.offsets()]
        else:
            dz = tf.reshape(self.dz, [batch, height, width, channels, multiplier])
            grads = [
                tf.reduce_sum(x[..., None] * dz, axis=[1, 2]) for x in self.offsets()
            ]
        return tf.reshape(
            tf.stack(grads, axis=1),
            [-1, *self.kernel_size, channels, multiplier],
        )

    def _grouped_kernel_gradients(self, dz):
        """`kernel_gradients` as one convolution with a group per example:
        the examples become the input's channels and their cotangents the
        filters. XLA compiles grouped convolutions (TensorFlow's CPU kernels
        do not), and runs this 4x faster than a loop over examples."""
        x = self.padded_input()
        batch, out_h, out_w = tf.shape(dz)[0], dz.shape[1], dz.shape[2]
        channels, filters = x.shape[-1], dz.shape[-1]
        inputs = tf.transpose(x, [3, 1, 2, 0])  # (in, H, W, examples)
        kernels = tf.reshape(
            tf.transpose(dz, [1, 2, 0, 3]), [out_h, out_w, 1, -1]
        )  # (Ho, Wo, 1, examples * filters)
        out = tf.nn.conv2d(
            inputs, kernels, strides=self.rates, dilations=self.strides, padding="VALID"
        )[:, : self.kernel_size[0], : self.kernel_size[1]]
        out = tf.reshape(out, [channels, *self.kernel_size, batch, filters])
        return tf.transpose(out, [3, 1, 2, 0, 4])


def _bias_shape(layer):
    """The shape a bias of a `layer.rank`-D convolution broadcasts in."""
    if layer.data_format == "channels_first":
        return [1, -1] + [1] * layer.rank
    return [1] * (layer.rank + 1) + [-1]


def _nhwc_operands(layer, x, dz, padding) -> ConvolutionOperands:
    """`ConvolutionOperands` of a convolution call's input and cotangent
    (as `layer.data_format` lays them out; 1D as height 1)."""
    if layer.data_format == "channels_first":
        x = tf.experimental.numpy.moveaxis(x, 1, -1)
        dz = tf.experimental.numpy.moveaxis(dz, 1, -1)
    strides, rates = list(layer.strides), list(layer.dilation_rate)
    kernel_size = list(layer.kernel_size)
    if layer.rank == 1:  # as a 2D convolution of height 1
        x, dz = x[:, None], dz[:, None]
        strides, rates, kernel_size = [1, *strides], [1, *rates], [1, *kernel_size]
    return ConvolutionOperands(x, dz, kernel_size, strides, rates, padding.upper())


def convolution_operands(layer, call: LayerCall, examples) -> ConvolutionOperands:
    """The `ConvolutionOperands` of a plain 1D/2D convolution call."""
    x, padding = call.args[0], layer.padding
    channels_first = layer.data_format == "channels_first"
    if padding == "causal":  # Conv1D: pad the start of the steps, as Keras
        left = (layer.kernel_size[0] - 1) * layer.dilation_rate[0]
        steps_axis = 2 if channels_first else 1
        pads = [[0, 0]] * 3
        pads[steps_axis] = [left, 0]
        x, padding = tf.pad(x, pads), "valid"
    kernel = _weight(layer, call, layer.kernel)

    def pre_activation():
        z = keras.ops.conv(
            x,
            kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            z = z + tf.reshape(_weight(layer, call, layer.bias), _bias_shape(layer))
        return z

    dz = preactivation_cotangent(layer, call, examples, pre_activation)
    return _nhwc_operands(
        layer, tf.cast(first_rows(x, examples), dz.dtype), dz, padding
    )


def convolution_rule(layer, call: LayerCall, examples: int) -> list:
    """Convolutions. Plain 1D/2D ones by a filter-gradient convolution per
    example (`ConvolutionOperands.kernel_gradients`) and the sum of the
    cotangent over positions for the bias. Other convolutions take the
    per-example rule; grouped ones the exact generic rule, looping over
    examples (pfor rejects their filter shape).
    """
    if getattr(layer, "groups", 1) > 1:
        return generic_rule(layer, call, examples, vectorize=False)
    if not convolution_is_plain(layer):
        return per_example_rule(layer, call, examples)
    operands = convolution_operands(layer, call, examples)
    kernel = operands.kernel_gradients()
    grads = {id(layer.kernel): per_example_shaped(kernel, layer.kernel.shape)}
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(operands.dz, axis=[1, 2])
    return [grads[id(v)] for v in layer.trainable_variables]


# -- depthwise and separable convolutions ----------------------------------------


def _is_plain(layer, base) -> bool:
    """Whether `layer` computes what `base` (a Keras depthwise or separable
    convolution class) computes: its `call` is not overridden, no LoRA."""
    return type(layer).call is base.call and not getattr(layer, "lora_enabled", False)


def depthwise_is_plain(layer) -> bool:
    """Whether `depthwise_rule` handles `layer`: a Keras DepthwiseConv1D or
    DepthwiseConv2D whose spatial sizes are static (strides, ``"same"`` and
    ``"valid"`` padding, dilation, any depth multiplier, either data
    format)."""
    for base in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D):
        if isinstance(layer, base):
            return _is_plain(layer, base)
    return False


def separable_is_plain(layer) -> bool:
    """Whether `separable_rule` handles `layer` (as `depthwise_is_plain`,
    for SeparableConv1D and SeparableConv2D)."""
    for base in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
        if isinstance(layer, base):
            return _is_plain(layer, base)
    return False


def _depthwise(layer, x, kernel):
    return keras.ops.depthwise_conv(
        x,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )


def depthwise_operands(layer, call: LayerCall, examples) -> ConvolutionOperands:
    """The `ConvolutionOperands` of a plain depthwise convolution call (its
    input and the cotangent before the activation)."""
    x = call.args[0]
    kernel = _weight(layer, call, layer.kernel)

    def pre_activation():
        z = _depthwise(layer, tf.cast(x, kernel.dtype), kernel)
        if layer.use_bias:
            z = z + tf.reshape(_weight(layer, call, layer.bias), _bias_shape(layer))
        return z

    dz = preactivation_cotangent(layer, call, examples, pre_activation)
    return _nhwc_operands(
        layer, tf.cast(first_rows(x, examples), dz.dtype), dz, layer.padding
    )


def depthwise_rule(layer, call: LayerCall, examples: int) -> list:
    """DepthwiseConv1D/2D: the kernel's per-example gradient is, for each
    kernel offset and channel, the shifted input slice dotted with that
    channel's cotangents over positions
    (`ConvolutionOperands.depthwise_gradients`), ``(B, kh, kw, C, mult)``;
    the bias's is the cotangent summed over positions. Other depthwise
    layers (dynamic spatial sizes, overridden `call`) take the per-example
    rule."""
    if not depthwise_is_plain(layer):
        return per_example_rule(layer, call, examples)
    operands = depthwise_operands(layer, call, examples)
    if not operands.has_static_geometry():
        return per_example_rule(layer, call, examples)
    grads = operands.depthwise_gradients(layer.depth_multiplier)
    grads = {id(layer.kernel): per_example_shaped(grads, layer.kernel.shape)}
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(operands.dz, axis=[1, 2])
    return [grads[id(v)] for v in layer.trainable_variables]


def depthwise_factors(layer, calls, examples) -> GhostFactors | None:
    """A plain depthwise convolution's inputs and cotangents, per call: its
    block is formed by `keras_fim.engine.gram.depthwise_block` (the method
    of materialising chosen per shape). `None` for other depthwise
    layers."""
    if not depthwise_is_plain(layer):
        return None
    operands = [depthwise_operands(layer, c, examples) for c in calls]
    if not all(o.has_static_geometry() for o in operands):
        return None

    def block(tensors, budget):
        rows = [
            dataclasses.replace(o, x=tensors[2 * i], dz=tensors[2 * i + 1])
            for i, o in enumerate(operands)
        ]
        return depthwise_block(layer, rows, budget)

    return GhostFactors([t for o in operands for t in (o.x, o.dz)], block)


@dataclasses.dataclass
class SeparableOperands:
    """A separable convolution call, NHWC, as its two halves: the depthwise
    one (`depthwise`: the input and the cotangent of the intermediate
    ``in * multiplier`` channels) and the pointwise one, a Dense over
    positions (`u`: the intermediate, ``(B, T, in * multiplier)``; `dz`:
    the cotangent before the activation, ``(B, T, filters)``)."""

    depthwise: ConvolutionOperands
    u: tf.Tensor
    dz: tf.Tensor


def separable_operands(layer, call: LayerCall, examples) -> SeparableOperands | None:
    """The `SeparableOperands` of a plain separable convolution call
    (`None` where its spatial sizes are not static)."""
    x = call.args[0]
    depthwise = _weight(layer, call, layer.depthwise_kernel)
    pointwise = _weight(layer, call, layer.pointwise_kernel)
    u = _depthwise(layer, tf.cast(x, depthwise.dtype), depthwise)
    channels_first = layer.data_format == "channels_first"
    if channels_first:
        u = tf.experimental.numpy.moveaxis(u, 1, -1)
    pointwise = tf.reshape(pointwise, pointwise.shape[-2:])

    def pre_activation():
        z = tf.tensordot(u, pointwise, axes=1)
        if layer.use_bias:
            z = z + _weight(layer, call, layer.bias)
        return tf.experimental.numpy.moveaxis(z, -1, 1) if channels_first else z

    dz = preactivation_cotangent(layer, call, examples, pre_activation)
    if channels_first:
        dz = tf.experimental.numpy.moveaxis(dz, 1, -1)
    du = tf.tensordot(dz, tf.cast(tf.transpose(pointwise), dz.dtype), axes=1)
    x = tf.cast(first_rows(x, examples), dz.dtype)
    if channels_first:  # _nhwc_operands moves the channels of both
        du = tf.experimental.numpy.moveaxis(du, -1, 1)
    operands = _nhwc_operands(layer, x, du, layer.padding)
    if not operands.has_static_geometry():
        return None
    batch = tf.shape(dz)[0]
    u = tf.cast(first_rows(u, examples), dz.dtype)
    return SeparableOperands(
        operands,
        tf.reshape(u, [batch, -1, u.shape[-1]]),
        tf.reshape(dz, [batch, -1, dz.shape[-1]]),
    )


def separable_rule(layer, call: LayerCall, examples: int) -> list:
    """SeparableConv1D/2D: the depthwise kernel as `depthwise_rule` does it
    (with the cotangent of the intermediate channels, the pointwise
    kernel's transpose times the cotangent), the pointwise kernel as a Dense
    over positions (``sum_t u_t^T dz_t``), the bias as the cotangent summed
    over positions. Other separable layers take the per-example rule."""
    operands = (
        separable_operands(layer, call, examples) if separable_is_plain(layer) else None
    )
    if operands is None:
        return per_example_rule(layer, call, examples)
    depthwise = operands.depthwise.depthwise_gradients(layer.depth_multiplier)
    grads = {
        id(layer.depthwise_kernel): per_example_shaped(
            depthwise, layer.depthwise_kernel.shape
        ),
        id(layer.pointwise_kernel): per_example_shaped(
            tf.einsum("btu,btf->buf", operands.u, operands.dz),
            layer.pointwise_kernel.shape,
        ),
    }
    if layer.use_bias:
        grads[id(layer.bias)] = tf.reduce_sum(operands.dz, axis=1)
    return [grads[id(v)] for v in layer.trainable_variables]


def _batch_norm_x_hat(layer, call: LayerCall, examples: int):
    """``x_hat`` of the first `examples` as a plain `BatchNormalization`
    computes it (batch statistics in training mode, moving ones otherwise),
    formed directly: re-running the layer costs dozens of graph operations
    and most of the unit's tracing time, for each of the 50 or so BatchNorm
    layers of a keras.applications network (issue 15). `None` for any other
    normalisation (renorm, synchronized, masked, a subclass's own `call`)."""
    plain = (
        isinstance(layer, keras.layers.BatchNormalization)
        and type(layer).call is keras.layers.BatchNormalization.call
        and not layer.renorm
        and not layer.synchronized
    )
    training = call.kwargs.get("training")
    if not plain or not call.args or call.kwargs.get("mask") is not None:
        return None
    if not isinstance(training, (bool, type(None))):
        return None
    x = call.args[0]
    x = tf.cast(x, keras.backend.result_type(x.dtype, "float32"))
    rank = x.shape.rank
    axis = layer.axis % rank
    if training:
        if call.moments is None:  # a call recorded some other way
            reduced = [a for a in range(rank) if a != axis]
            mean, variance = tf.nn.moments(x, reduced, keepdims=True)
        else:  # the statistics the call normalised with
            mean, variance = (
                m if axis == rank - 1 else tf.reshape(m, [-1] + [1] * (rank - 1 - axis))
                for m in call.moments
            )
    else:
        state = {
            id(v): value
            for v, value in zip(layer.non_trainable_variables, call.state, strict=True)
        }
        shape = [1] * rank
        shape[axis] = -1
        mean = tf.reshape(tf.cast(state[id(layer.moving_mean)], x.dtype), shape)
        variance = tf.reshape(tf.cast(state[id(layer.moving_variance)], x.dtype), shape)
    return (first_rows(x, examples) - mean) * tf.math.rsqrt(variance + layer.epsilon)


def affine_normalization_rule(layer, call: LayerCall, examples: int) -> list:
    """BatchNormalization, LayerNormalization, GroupNormalization.

    These compute ``y = gamma * x_hat + beta``. Re-running the layer on the
    recorded batch with ``gamma = 1`` and ``beta = 0`` gives ``x_hat`` as the
    layer itself normalises it: with the batch statistics in training mode
    (BatchNorm) or the moving ones in inference mode. Then
    ``g_gamma,i = sum x_hat_i * dy_i`` and ``g_beta,i = sum dy_i`` over the
    axes that gamma and beta are broadcast along.
    """
    gamma = getattr(layer, "gamma", None)
    beta = getattr(layer, "beta", None)
    if any(v is not gamma and v is not beta for v in layer.trainable_variables):
        # an unknown extra weight: let the exact generic rule handle it
        return generic_rule(layer, call, examples)
    dy = first_rows(call.cotangents[0], examples)
    x_hat = _batch_norm_x_hat(layer, call, examples)
    if x_hat is None:
        neutral = [
            tf.ones_like(v.value) if v is gamma else tf.zeros_like(v.value)
            for v in layer.trainable_variables
        ]
        x_hat, _ = layer.stateless_call(neutral, call.state, *call.args, **call.kwargs)
        x_hat = first_rows(x_hat, examples)
    x_hat = tf.cast(x_hat, dy.dtype)
    rank = dy.shape.rank
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    axes = sorted(a % rank for a in axes)
    summed = [a for a in range(1, rank) if a not in axes]
    grads = []
    for v in layer.trainable_variables:
        term = x_hat * dy if v is gamma else dy
        reduced = tf.reduce_sum(term, axis=summed) if summed else term
        grads.append(per_example_shaped(tf.cast(reduced, v.dtype), v.shape))
    return grads


# -- factored forms: a unit's Gram block without its per-example gradients ------


def dense_factors(layer, calls, examples) -> GhostFactors | None:
    """A plain Dense unit's inputs and pre-activation cotangents, every
    call's positions together: ``g_W,i = sum_t x_it^T dz_it``."""
    if not _dense_is_plain(layer):
        return None
    pairs = [dense_inputs_and_cotangents(layer, c, examples) for c in calls]
    a = tf.concat([p[0] for p in pairs], axis=1)
    d = tf.concat([p[1] for p in pairs], axis=1)
    return kernel_factors(layer.name, a, d, layer.use_bias)


def convolution_factors(layer, calls, examples) -> GhostFactors | None:
    """A plain 1D/2D convolution's inputs and cotangents, per call
    (`ConvolutionOperands`); `None` for other convolutions."""
    if not convolution_is_plain(layer):
        return None
    operands = [convolution_operands(layer, c, examples) for c in calls]

    def block(tensors, budget):
        rows = [
            dataclasses.replace(o, x=tensors[2 * i], dz=tensors[2 * i + 1])
            for i, o in enumerate(operands)
        ]
        return convolution_block(layer, rows, budget)

    return GhostFactors([t for o in operands for t in (o.x, o.dz)], block)


def separable_factors(layer, calls, examples) -> GhostFactors | None:
    """A plain separable convolution's two halves (`SeparableOperands`):
    the depthwise kernel's per-example gradients, materialised (a few
    values per channel), and the pointwise kernel as a Dense over
    positions (`kernel_factors`: the ghost form or materialised, by cost).
    `None` for other separable layers."""
    if not separable_is_plain(layer):
        return None
    operands = [separable_operands(layer, c, examples) for c in calls]
    if any(o is None for o in operands):
        return None
    pointwise = kernel_factors(
        layer.name,
        tf.concat([o.u for o in operands], axis=1),
        tf.concat([o.dz for o in operands], axis=1),
        layer.use_bias,
    )
    count = 2 * len(operands)

    def block(tensors, budget):
        depthwise = tf.add_n(
            [
                dataclasses.replace(
                    o.depthwise, x=tensors[2 * i], dz=tensors[2 * i + 1]
                ).depthwise_gradients(layer.depth_multiplier)
                for i, o in enumerate(operands)
            ]
        )
        part, plan = pointwise.block(tensors[count:], budget)
        return part + gram_of(depthwise), plan

    tensors = [t for o in operands for t in (o.depthwise.x, o.depthwise.dz)]
    return GhostFactors([*tensors, *pointwise.tensors], block)


def embedding_factors(layer, calls, examples) -> GhostFactors | None:
    """An Embedding's tokens ``(B, T)`` and output cotangents ``(B, T,
    dim)``, every call's positions together: rows of equal tokens meet."""
    if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
        return None

    def tokens_and_cotangents(call):
        d = first_rows(call.cotangents[0], examples)
        batch = tf.shape(d)[0]
        tokens = tf.cast(first_rows(call.args[0], examples), tf.int32)
        return (
            tf.reshape(tokens, [batch, -1]),
            tf.reshape(d, [batch, -1, d.shape[-1]]),
        )

    pairs = [tokens_and_cotangents(c) for c in calls]
    tokens = tf.concat([p[0] for p in pairs], axis=1)
    d = tf.concat([p[1] for p in pairs], axis=1)
    return GhostFactors(
        [tokens, d], lambda t, budget: embedding_block(layer, t[0], t[1], budget)
    )


# -- rules and where they are looked up ------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How keras-fim handles one family of layers.

    Attributes:
        per_example: ``per_example(layer, call, examples) -> list``: one
            ``(examples, *variable.shape)`` tensor per trainable variable of
            the layer, each example's contribution (see the module
            docstring). Every rule has one; the generic rule is exact for
            any layer.
        factors: Optional ``factors(layer, calls, examples) ->
            GhostFactors | None``: the unit's Gram block in factored form,
            from all its calls (`keras_fim.engine.gram.kernel_factors` builds
            one for a kernel whose gradient is a sum of outer products).
            Where it is given and returns factors, the block is formed from
            them (the ghost form or materialised kernels, by cost), and
            under a distribution strategy they are what replicas all-gather
            when they are the smaller payload; `None` (or a `None` result)
            means the block comes from `per_example`.
    """

    per_example: Rule
    factors: Callable | None = None


GENERIC = LayerRule(generic_rule)
"""The exact rule for layers with weights of their own and no registered rule."""


class RuleRegistry:
    """Layer classes and their `LayerRule`s, looked up along the MRO: the
    first class of a layer's MRO that has a rule gives it, so subclasses
    inherit their parent's rule.

    `builtin_registry()` makes a fresh one with keras-fim's rules;
    `DEFAULT_REGISTRY` is the process-wide one that `register_rule` writes
    to and measurements read unless given another.

    Args:
        rules: Dict mapping layer classes to their `LayerRule`s, or `None`
            for an empty registry. The dict is copied, not validated (use
            `register` for checked entries). Defaults to `None`.
    """

    def __init__(self, rules: dict[type, LayerRule] | None = None):
        self._rules: dict[type, LayerRule] = dict(rules or {})

    def register(self, layer_class: type, rule, *, overwrite: bool = False) -> None:
        """Adds `rule` (a `LayerRule`) for `layer_class`; see `register_rule`."""
        if not (
            isinstance(layer_class, type)
            and issubclass(layer_class, keras.layers.Layer)
        ):
            raise ValueError(
                "`layer_class` must be a subclass of keras.layers.Layer. "
                f"Received: layer_class={layer_class!r}"
            )
        if not isinstance(rule, LayerRule):
            raise ValueError(
                "`rule` must be a LayerRule or a callable (layer, call, "
                f"examples) -> per-variable gradients. Received: rule={rule!r}"
            )
        if layer_class in self._rules and not overwrite:
            raise ValueError(
                f"A rule for {layer_class.__name__} is already registered. "
                "Pass overwrite=True to replace it. "
                f"Received: layer_class={layer_class.__name__}, "
                f"overwrite={overwrite}"
            )
        self._rules[layer_class] = rule

    def unregister(self, layer_class: type) -> None:
        """Removes `layer_class`'s own entry (its bases' rules then apply)."""
        self._rules.pop(layer_class, None)

    def rule_for(self, layer: keras.layers.Layer) -> LayerRule | None:
        """The rule of `layer`'s class or nearest base class, or `None`."""
        for cls in type(layer).__mro__:
            if cls in self._rules:
                return self._rules[cls]
        return None


def builtin_registry() -> RuleRegistry:
    """A fresh registry of keras-fim's own rules."""
    dense = LayerRule(dense_rule, dense_factors)
    convolution = LayerRule(convolution_rule, convolution_factors)
    transformed = LayerRule(convolution_rule)  # no factored form
    depthwise = LayerRule(depthwise_rule, depthwise_factors)
    separable = LayerRule(separable_rule, separable_factors)
    normalization = LayerRule(affine_normalization_rule)
    per_example = LayerRule(per_example_rule)
    # Layers that call their sublayers inside loops (the recorded tensors
    # would live in the loop's graph): one rule for the whole layer.
    sequence = LayerRule(sequence_rule)
    return RuleRegistry(
        {
            keras.layers.Dense: dense,
            keras.layers.Conv1D: convolution,
            keras.layers.Conv2D: convolution,
            keras.layers.BatchNormalization: normalization,
            keras.layers.LayerNormalization: normalization,
            keras.layers.GroupNormalization: normalization,
            keras.layers.EinsumDense: per_example,
            keras.layers.Embedding: LayerRule(per_example_rule, embedding_factors),
            keras.layers.Conv3D: transformed,
            keras.layers.DepthwiseConv1D: depthwise,
            keras.layers.DepthwiseConv2D: depthwise,
            keras.layers.SeparableConv1D: separable,
            keras.layers.SeparableConv2D: separable,
            keras.layers.Conv1DTranspose: transformed,
            keras.layers.Conv2DTranspose: transformed,
            keras.layers.Conv3DTranspose: transformed,
            keras.layers.RNN: sequence,
            keras.layers.Bidirectional: sequence,
            keras.layers.TimeDistributed: sequence,
        }
    )


DEFAULT_REGISTRY = builtin_registry()
"""The process-wide registry: `register_rule` adds to it."""


def register_rule(
    layer_class: type,
    rule: Rule | LayerRule,
    *,
    factors: Callable | None = None,
    overwrite: bool = False,
    registry: RuleRegistry | None = None,
) -> None:
    """Registers how keras-fim handles `layer_class` (and its subclasses).

    Args:
        layer_class: A subclass of `keras.layers.Layer`.
        rule: A callable ``rule(layer, call, examples) -> list`` returning one
            ``(examples, *variable.shape)`` tensor per trainable variable of
            the layer (see `keras_fim.engine.rules`), or a `LayerRule`.
        factors: Optional callable ``factors(layer, calls, examples) ->
            GhostFactors | None``: the layer's Gram block in factored form
            (`LayerRule.factors`), used on one device and, as the smaller
            payload, under a distribution strategy. Only with a callable
            `rule`.
        overwrite: Boolean, whether to replace an existing entry. Defaults
            to `False`.
        registry: The `RuleRegistry` to add to; `None` means
            `DEFAULT_REGISTRY`.

    Raises:
        ValueError: if `layer_class` is not a Keras layer class, `rule` is
            neither callable nor a `LayerRule`, or a rule is registered
            already and `overwrite` is `False`.

    Example:

    >>> import keras, keras_fim
    >>> from keras_fim.engine.rules import generic_rule
    >>> class Scale(keras.layers.Layer):
    ...     def build(self, shape):
    ...         self.w = self.add_weight(shape=shape[1:])
    ...     def call(self, x):
    ...         return x * self.w
    >>> keras_fim.register_rule(Scale, generic_rule)
    """
    if isinstance(rule, LayerRule):
        if factors is not None:
            raise ValueError(
                "`factors` goes with a callable `rule`; a LayerRule carries "
                f"its own. Received: rule={rule!r}, factors={factors!r}"
            )
    elif callable(rule):
        rule = LayerRule(rule, factors)
    registry = DEFAULT_REGISTRY if registry is None else registry
    registry.register(layer_class, rule, overwrite=overwrite)


def rule_for(
    layer: keras.layers.Layer, registry: RuleRegistry | None = None
) -> LayerRule | None:
    """The `LayerRule` for `layer`'s class or nearest base class (`None` if
    none is registered), in `registry` (`DEFAULT_REGISTRY` if `None`).

    Args:
        layer: A Keras layer instance; its class's MRO is searched.
        registry: `RuleRegistry` to look in, or `None` for
            `DEFAULT_REGISTRY`. Defaults to `None`.
    """
    return (DEFAULT_REGISTRY if registry is None else registry).rule_for(layer)
