"""Gram blocks, unit by unit, without materialising what need not be.

The Gram matrix ``G = J J^T`` of per-example contributions is a sum of one
``(B, B)`` block per unit (layer), since units own disjoint weights. A block
can often be formed without the unit's per-example gradients:

* Dense (and any layer whose gradient is a sum of outer products
  ``g_i = sum_t a_it^T d_it``): ``G_ij = sum_{t,s} (a_it . a_js)(d_it . d_js)``,
  the "ghost" form; for one position per example it is
  ``(A A^T) * (D D^T)``.
* Convolutions: the same over spatial positions, with ``a`` the im2col
  patches. Materialising ``g_i = P_i^T D_i`` is cheaper when there are many
  positions, the ghost form when there are few; a cost model chooses.
* Embedding: ``G_ij = sum_{t,s} [tok_it = tok_js] (d_it . d_js)``, never the
  ``(B, vocabulary, dim)`` gradients.
* Everything else (normalisation layers, attention, recurrent layers, the
  generic rule): the unit's per-example gradients from its rule, each
  ``(B, variable size)``: one product over all the unit's variables when
  they are small (`POOLED_VALUES`), else one variable at a time.

Every product that forms a block is taken in float64 from the (float32,
float64, or widened 16-bit) factors (`gram_of`, `_ghost`): a product of two
float32 numbers is exact in float64, so a block is the exact Gram matrix of
the contributions the factors describe, up to float64 accumulation. A float32
Gram would carry absolute errors of about ``eps32 * ||g_i|| ||g_j||`` per
entry, which hide every eigenvalue below about ``1e-7`` of the largest
(singular values of ``J`` below ``3e-4`` of the largest), while float32
contributions resolve singular values down to about ``eps32`` of ``||J||_F``
(`keras_fim.measurements.noise_floor`). The float64 products cost
1.0-1.6 times the float32 ones on CPU (`benchmarks/precision.py`).

Costs are counted in multiply-adds and memory in bytes of the largest
temporary; a path whose temporary exceeds the memory budget is not taken,
and a materialised kernel gradient is split over output channels until each
piece fits. The batch size in these plans is the static one, or
`PLANNING_BATCH_SIZE` when the graph leaves it unknown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from keras_fim._keras_compat import in_xla_context
from keras_fim.engine import calibration_store
from keras_fim.validation import check_choice, check_real

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes: the default bound on one unit's largest temporary (1 GiB)."""

PLANNING_BATCH_SIZE = 256
"""The batch size plans assume when the graph does not know it."""

POOLED_VALUES = 1 << 16
"""A rule unit whose variables hold at most this many values per example
forms its block with one product over all of them (`rule_gram`)."""

GRAM_DTYPE = tf.float64
"""The dtype every Gram product is taken in (see the module docstring)."""

_GRAM_ITEMSIZE = GRAM_DTYPE.size


def gram_of(rows: tf.Tensor) -> tf.Tensor:
    """``R R^T`` in float64 for `rows` shaped ``(B, ...)`` (flattened per
    example): the exact Gram matrix of float32 rows, up to float64
    accumulation."""
    flat = tf.cast(_rows(rows), GRAM_DTYPE)
    return tf.matmul(flat, flat, transpose_b=True)


def _rows(tensor: tf.Tensor) -> tf.Tensor:
    """`tensor` as ``(B, values per example)``; by its static size where
    known (two graph operations, against eight for a dynamic shape: they
    add up over a network's hundred units)."""
    if tensor.shape.rank == 2:
        return tensor
    known = tensor.shape[1:].is_fully_defined()
    size = math.prod(tensor.shape[1:]) if known else 0
    if size:
        return tf.reshape(tensor, [-1, size])
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1])


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one unit's Gram block is formed.

    Attributes:
        layer: The unit layer's name.
        path: ``"ghost"``, ``"materialise"`` (per-example kernel gradients,
            im2col for convolutions) or ``"rule"`` (the unit's per-example
            rule: `rule_gram`).
        multiply_adds: Estimated multiply-adds of the block.
        peak_bytes: Estimated bytes of its largest temporary.
        chunks: Pieces the materialised kernel gradient is split into.
        method: How the path was taken: ``"ghost"``; for materialised
            kernels ``"einsum"`` (Dense), ``"map_fn"``, ``"slices"``,
            ``"im2col"`` or ``"grouped"`` (convolutions:
            `keras_fim.engine.rules.ConvolutionOperands.kernel_gradients`);
            ``""`` where there is one way.
        chosen_by: ``"calibration"`` (the fastest when timed on this
            machine, `path_choice`), ``"cost"`` (the cost model),
            ``"forced"`` (`path_choice` naming it) or ``""`` (one
            candidate).
        timings: With ``chosen_by="calibration"``, the seconds each
            candidate took on this machine (``{method: seconds}``, scaled
            to the planned batch); `None` otherwise.
    """

    layer: str
    path: str
    multiply_adds: float
    peak_bytes: float
    chunks: int = 1
    method: str = ""
    chosen_by: str = ""
    timings: dict | None = dataclasses.field(default=None, hash=False)


def _static_batch(examples, tensor) -> int:
    value = None if examples is None else tf.get_static_value(examples)
    if value is None:
        value = tensor.shape[0]
    return int(value) if value is not None else PLANNING_BATCH_SIZE


# -- choosing a kernel's path: the cost model, or timings on this machine --------

PATH_CHOICE_ENV = "KERAS_FIM_PATH_CHOICE"
"""The environment variable giving the default of `path_choice`:
``"auto"`` (unset), ``"calibrate"``, ``"cost"``, or a path or method to
force."""

CALIBRATION_REPEATS = 3
"""Timed runs of a candidate that comes close to the fastest when
calibrating (after one warm-up; the others are timed once); the fastest
run counts."""

CLOSE = 1.5
"""A candidate timed within this factor of the fastest is timed again."""

CALIBRATION_BATCH_SIZE = 32
"""The most examples a candidate is timed on when calibrating. A plan for a
larger batch (`PLANNING_BATCH_SIZE` in `fit`, whose graph leaves the batch
size open) times its candidates on this many and scales each time by the
candidate's own multiply-adds at the planned batch over those at this one:
the methods' speeds per multiply-add are what timing measures, and timing
256 examples cost the first `fit` 3-4 times as long (issue 15)."""

HOPELESS = 16
"""A candidate path with this many times the multiply-adds of another is
not a candidate (nor timed): the methods' speeds per multiply-add differ by
less (issue 15 measured up to 5x)."""

_CHOICE: list = []  # the `path_choice` contexts entered, innermost last
_CALIBRATIONS: dict = {}  # calibration key -> (method, {method: seconds})


def _default_choice() -> str:
    return os.environ.get(PATH_CHOICE_ENV, "").strip() or "auto"


@contextlib.contextmanager
def path_choice(choice: str = "calibrate", timer: Callable | None = None):
    """How the Gram blocks built inside this context choose their paths.

    A kernel's block (Dense, convolutions, separable convolutions, a
    `kernel_factors` layer) can be formed several ways: the ghost form, or
    the per-example gradients materialised by one of several methods (for
    convolutions: a filter gradient per example, shifted slices times
    batched matrix products, im2col), each with its Gram product. Which is
    fastest depends on the shapes and the machine.

    * ``"auto"`` (the default when neither this context nor the environment
      variable ``KERAS_FIM_PATH_CHOICE`` says otherwise): the calibrated
      choice where this machine holds one (timed earlier in this process or
      kept on disk by an earlier one), the cost model elsewhere. Nothing is
      timed, so a first `fit` on a new machine pays no calibration (issue
      15); the cost model's choices were the calibrated ones, or within
      a few per cent of them, on the machine docs/performance.md describes.
    * ``"calibrate"``: the first time a kernel of given shapes is
      planned, each candidate that fits the memory budget runs on random
      operands of those shapes (a branch each of one `tf.function`, once to
      warm up and once timed, then `CALIBRATION_REPEATS` in all if within
      `CLOSE` of the fastest; at most `CALIBRATION_BATCH_SIZE`
      examples, a larger batch's times scaled by each candidate's
      multiply-adds) and the fastest is taken; the choice is
      cached per (layer kind, geometry, operand shapes with the batch size,
      dtypes, candidates), for the process and on disk for the next ones on
      this machine (`keras_fim.engine.calibration_store`; the environment
      variable ``KERAS_FIM_CALIBRATION_CACHE`` names the file, ``off``
      keeps none), where ``"auto"`` finds it. The candidates include the naive
      path (the per-example rule's own method), so the chosen block is never
      slower than it, up to timing noise. Where timing is not possible (under
      XLA, under a distribution strategy, shapes not static) the cost model
      chooses.
    * ``"cost"``: the cost model alone (multiply-adds, and the method
      found fastest per multiply-add; see docs/performance.md):
      deterministic, no timing, nothing read from disk.
    * a path or a method (``"ghost"``, ``"materialise"``, ``"einsum"``,
      ``"map_fn"``, ``"slices"``, ``"im2col"``, ``"grouped"``): that one
      wherever it is a candidate (tests use this), the cost model elsewhere.

    Args:
        choice: String, one of the above. Defaults to ``"calibrate"``.
        timer: `None` or a callable ``timer(plan, run) -> seconds``, where
            ``run()`` forms the candidate `plan`'s block once: replaces the
            timing while calibrating (to make it deterministic in tests).
            Defaults to `None` (wall-clock timing).

    Example:

    >>> from keras_fim.engine.gram import path_choice
    >>> with path_choice("cost"):
    ...     pass  # measurements here plan by multiply-adds alone
    """
    if not isinstance(choice, str) or not choice:
        raise ValueError(
            "`choice` must be 'calibrate', 'cost' or a path or method name. "
            f"Received: choice={choice!r}"
        )
    _CHOICE.append((choice, timer))
    try:
        yield
    finally:
        _CHOICE.pop()


def clear_calibrations() -> None:
    """Forgets every calibrated choice of this process, and what was read
    of the on-disk cache (`keras_fim.engine.calibration_store`): the next
    plans read that file again, and time what it does not hold."""
    _CALIBRATIONS.clear()
    calibration_store.forget()


def calibrations() -> dict:
    """The calibrated choices of this process: ``{key: (method, {method:
    seconds})}``."""
    return dict(_CALIBRATIONS)


def _synthetic(tensor, batch):
    """Random (or zero, for integers) values shaped like `tensor` with
    `batch` examples, eagerly, without touching TensorFlow's random state."""
    shape = [batch, *tensor.shape[1:]]
    if tensor.dtype.is_floating:
        values = np.random.default_rng(0).standard_normal(shape, np.float32)
        return tf.cast(values, tensor.dtype)
    return tf.zeros(shape, tensor.dtype)


def _clocked(candidates, operands, scale) -> dict:
    """Seconds of each candidate (``{method: (plan, build)}``) on
    `operands`, each times its `scale`: all in one function, a branch each
    (one trace and one instantiation for all, which cost more than the
    timed runs), each branch run once to warm up and once timed, then
    those within `CLOSE` of the fastest `CALIBRATION_REPEATS - 1` times
    more; the fastest run counts."""
    methods = list(candidates)
    branches = [lambda build=candidates[m][1]: build(operands) for m in methods]
    run = tf.function(lambda i: tf.switch_case(i, branches), autograph=False)

    def clock(index):
        start = time.perf_counter()
        np.asarray(run(tf.constant(index)))
        return (time.perf_counter() - start) * scale[methods[index]]

    seconds = {}
    for index, method in enumerate(methods):
        run(tf.constant(index))  # traces (the first), warms up
        seconds[method] = clock(index)
    fastest = min(seconds.values())
    for index, method in enumerate(methods):
        if seconds[method] <= CLOSE * fastest:
            for _ in range(CALIBRATION_REPEATS - 1):
                seconds[method] = min(seconds[method], clock(index))
    return seconds


def _calibrated(key, candidates, tensors, batch, timer, cost=None, timing=True):
    """``(method, {method: seconds})``: the fastest of `candidates`
    (``{method: (plan, build)}``) for `batch` examples and the times of
    all, timed on random operands shaped like `tensors`, cached under
    `key`; `None` where timing is not possible here, or where nothing is
    kept for `key` and `timing` is false. With `cost` (``cost(method,
    batch)``: a candidate's multiply-adds), a batch over
    `CALIBRATION_BATCH_SIZE` is timed at that size and each time scaled by
    the candidate's multiply-adds at `batch` over those at the timed size."""
    if key is None or in_xla_context() or tf.distribute.has_strategy():
        return None
    if not all(t.shape[1:].is_fully_defined() for t in tensors):
        return None
    key = (
        key,
        batch,
        tuple((tuple(t.shape[1:]), t.dtype.name) for t in tensors),
        tuple(sorted((m, p.chunks) for m, (p, _) in candidates.items())),
    )
    if key not in _CALIBRATIONS and timer is None:
        kept = calibration_store.load(repr(key))
        if kept is not None and kept[0] in candidates:
            _CALIBRATIONS[key] = kept
    if key not in _CALIBRATIONS and not timing:
        return None
    if key not in _CALIBRATIONS:
        timed = batch if cost is None else min(batch, CALIBRATION_BATCH_SIZE)
        scale = {
            method: 1.0 if timed == batch else cost(method, batch) / cost(method, timed)
            for method in candidates
        }
        seconds = {}
        with tf.init_scope():  # out of the graph being built: run eagerly
            operands = [_synthetic(t, timed) for t in tensors]
            if timer is None:
                seconds = _clocked(candidates, operands, scale)
            else:
                for method, (plan, build) in candidates.items():
                    run = tf.function(
                        lambda build=build: build(operands), autograph=False
                    )
                    seconds[method] = timer(plan, run) * scale[method]
        _CALIBRATIONS[key] = (min(seconds, key=seconds.get), seconds)
        if timer is None:
            calibration_store.store(repr(key), *_CALIBRATIONS[key])
    return _CALIBRATIONS[key]


def _kernel_block(
    name,
    batch,
    positions,
    m,
    n,
    itemsize,
    budget,
    tensors,
    ghost,
    materialisers,
    key=None,
    patch_bytes=0,
):
    """The block of a kernel whose per-example gradient is
    ``g_i = sum_t a_it^T d_it`` over `positions` (a: m wide, d: n wide).

    ``ghost(tensors)`` forms it from the ``(B, B, T, T)`` products of the
    rows (`None`: no ghost form); ``materialisers`` maps method names to
    ``materialise(tensors, start, stop)``, which returns the per-example
    gradients of the output columns ``[start, stop)``, leading axis the
    batch. Each candidate whose temporary fits `budget` (the materialised
    ones split over output columns until each piece fits; `patch_bytes`:
    the im2col patches the ghost form and ``"im2col"`` also hold) is
    planned; `path_choice` picks one (`key`: the kernel's geometry beyond
    the shapes of `tensors`, for the calibration cache; `None`: never
    timed). Returns ``(block, plan)``.
    """
    candidates = {}

    def cost(method, examples):
        if method == "ghost":
            return examples * examples * positions * positions * (m + n)
        return examples * (positions or 1) * m * n + examples * examples * m * n

    materialise_cost = cost("materialise", batch)
    ghost_cost = None
    if ghost is not None and positions is not None:
        ghost_bytes = max(
            2 * batch * batch * positions * positions * _GRAM_ITEMSIZE, patch_bytes
        )
        ghost_cost = cost("ghost", batch)
        if ghost_bytes <= budget:
            plan = Plan(name, "ghost", ghost_cost, ghost_bytes, method="ghost")
            candidates["ghost"] = (plan, ghost)
    # The gradients and their float64 copy for the product.
    gradient_bytes = batch * m * n * (itemsize + _GRAM_ITEMSIZE)
    chunks = max(1, min(n, math.ceil(gradient_bytes / budget)))
    width = math.ceil(n / chunks)

    def chunked(materialise):
        def build(tensors):
            block = None
            for start in range(0, n, width):
                part = gram_of(materialise(tensors, start, start + width))
                block = part if block is None else block + part
            return block

        return build

    for method, materialise in materialisers.items():
        peak = gradient_bytes / chunks
        if method == "im2col":
            if patch_bytes > budget:
                continue
            peak = max(peak, patch_bytes)
        plan = Plan(name, "materialise", materialise_cost, peak, chunks, method)
        candidates[method] = (plan, chunked(materialise))
    fitting = dict(candidates)  # what a forced choice may take
    if ghost_cost is not None:  # not worth timing: far dearer by the count
        if ghost_cost > HOPELESS * materialise_cost and len(candidates) > 1:
            candidates.pop("ghost", None)
        if materialise_cost > HOPELESS * ghost_cost and "ghost" in candidates:
            candidates = {"ghost": candidates["ghost"]}
    materialised = [m for m in candidates if m != "ghost"]
    cheap_ghost = "ghost" in candidates and ghost_cost <= materialise_cost
    default = "ghost" if cheap_ghost or not materialised else materialised[0]
    return choose_path(candidates, tensors, batch, key, default, fitting, cost)


def choose_path(candidates, tensors, batch, key, default, forceable=None, cost=None):
    """Forms a unit's block by the candidate `path_choice` picks.

    `candidates` maps method names to ``(plan, build)``, ``build(tensors)``
    forming the block from `tensors` (or from random ones shaped like them
    when calibrating, for `batch` examples); `default` is the cost model's
    pick; `forceable` (default: `candidates`) what a forced choice may
    take. `key` describes the computation beyond the shapes of `tensors`
    (`None`: never timed). `cost`: ``cost(method, batch)``, a candidate's
    multiply-adds, which lets calibration time a large batch on
    `CALIBRATION_BATCH_SIZE` examples (`None`: timed on `batch`). Returns
    ``(block, plan)``.
    """
    forceable = candidates if forceable is None else forceable
    materialised = [m for m in forceable if m != "ghost"]
    choice, timer = _CHOICE[-1] if _CHOICE else (_default_choice(), None)
    chosen, by, timings = None, "cost", None
    if choice in forceable:
        chosen, by, candidates = choice, "forced", forceable
    elif choice == "materialise" and materialised:
        chosen, by, candidates = materialised[0], "forced", forceable
    elif len(candidates) == 1:
        chosen, by = next(iter(candidates)), ""
    elif choice in ("calibrate", "auto"):
        timing = choice == "calibrate"
        calibrated = _calibrated(key, candidates, tensors, batch, timer, cost, timing)
        if calibrated is not None:
            (chosen, timings), by = calibrated, "calibration"
    if chosen is None:
        chosen, by = default, "cost"
    plan, build = candidates[chosen]
    return build(tensors), dataclasses.replace(plan, chosen_by=by, timings=timings)


def _ghost(a, d):
    """``sum_{t,s} (a_it . a_js)(d_it . d_js)`` for a: (B, T, m), d: (B, T, n),
    in float64."""
    if a.shape[1] == 1:
        return gram_of(a[:, 0]) * gram_of(d[:, 0])
    a, d = tf.cast(a, GRAM_DTYPE), tf.cast(d, GRAM_DTYPE)
    return tf.einsum(
        "abts,abts->ab",
        tf.einsum("atm,bsm->abts", a, a),
        tf.einsum("atn,bsn->abts", d, d),
    )


def _bias_block(sums):
    """The bias block from each call's per-example cotangent sums."""
    return gram_of(tf.add_n(sums))


def convolution_block(layer, operands, budget):
    """A plain convolution unit's block from its calls' operands
    (`keras_fim.engine.rules.ConvolutionOperands`): the ghost form or the
    kernel gradients materialised by one of the operands'
    `kernel_methods()`, as `path_choice` chooses."""
    sizes = [o.positions for o in operands]
    positions = None if None in sizes else sum(sizes)
    kernel = layer.kernel.shape
    tensors = [t for o in operands for t in (o.x, o.dz)]

    def rebuilt(tensors):
        return [
            dataclasses.replace(o, x=tensors[2 * i], dz=tensors[2 * i + 1])
            for i, o in enumerate(operands)
        ]

    def ghost(tensors):
        pairs = [o.patches() for o in rebuilt(tensors)]
        return _ghost(
            tf.concat([p[0] for p in pairs], axis=1),
            tf.concat([p[1] for p in pairs], axis=1),
        )

    def materialiser(method):
        def materialise(tensors, start, stop):
            return tf.add_n(
                [o.kernel_gradients(start, stop, method) for o in rebuilt(tensors)]
            )

        return materialise

    methods = [o.kernel_methods() for o in operands]
    common = [m for m in methods[0] if all(m in other for other in methods)]
    d = operands[0].dz
    batch = _static_batch(None, d)
    m = math.prod(kernel[:-1])
    key = (
        "convolution",
        tuple(
            (tuple(o.kernel_size), tuple(o.strides), tuple(o.rates), o.padding)
            for o in operands
        ),
    )
    block, plan = _kernel_block(
        layer.name,
        batch,
        positions,
        m,
        kernel[-1],
        d.dtype.size,
        budget,
        tensors,
        ghost,
        {method: materialiser(method) for method in common},
        key,
        patch_bytes=batch * (positions or 0) * m * d.dtype.size,
    )
    if layer.use_bias:
        block += _bias_block([tf.reduce_sum(o.dz, axis=[1, 2]) for o in operands])
    return block, plan


def depthwise_block(layer, operands, budget):
    """A plain depthwise convolution unit's block from its calls' operands
    (`keras_fim.engine.rules.ConvolutionOperands`): its per-example kernel
    gradients (a few values per channel) by one of the operands'
    `depthwise_methods()`, as `path_choice` chooses (the fastest differs
    by 100x between 16x16 maps and 1x1 maps of many channels), and their
    Gram product. `budget` is not needed: the gradients are small."""
    kernel = layer.kernel.shape
    multiplier = kernel[-1]
    tensors = [t for o in operands for t in (o.x, o.dz)]
    d = operands[0].dz
    batch = _static_batch(None, d)
    size = math.prod(kernel)
    positions = sum(o.positions or 0 for o in operands)

    def cost(method, examples):
        return examples * positions * size + examples * examples * size

    peak = batch * size * (d.dtype.size + _GRAM_ITEMSIZE)

    def build(method):
        def gradients(tensors):
            rebuilt = [
                dataclasses.replace(o, x=tensors[2 * i], dz=tensors[2 * i + 1])
                for i, o in enumerate(operands)
            ]
            return gram_of(
                tf.add_n([o.depthwise_gradients(multiplier, method) for o in rebuilt])
            )

        return gradients

    methods = [o.depthwise_methods() for o in operands]
    common = [m for m in methods[0] if all(m in other for other in methods)]
    candidates = {
        m: (Plan(layer.name, "materialise", cost(m, batch), peak, method=m), build(m))
        for m in common
    }
    key = (
        "depthwise",
        multiplier,
        tuple(
            (tuple(o.kernel_size), tuple(o.strides), tuple(o.rates), o.padding)
            for o in operands
        ),
    )
    block, plan = choose_path(candidates, tensors, batch, key, common[0], cost=cost)
    if layer.use_bias:
        block += _bias_block([tf.reduce_sum(o.dz, axis=[1, 2]) for o in operands])
    return block, plan


def embedding_block(layer, tokens, d, budget):
    """An Embedding unit's block from its tokens ``(B, T)`` and output
    cotangents ``(B, T, dim)``: the ghost form (rows of equal tokens meet)
    where it fits `budget` and is smaller than the ``(B, vocabulary, dim)``
    gradients, otherwise those gradients, scattered from the factors."""
    batch, positions = _static_batch(None, d), d.shape[1]
    vocabulary = layer.input_dim
    ghost_bytes = (
        None if positions is None else 2 * batch * batch * positions**2 * _GRAM_ITEMSIZE
    )
    if ghost_bytes is None or ghost_bytes > budget or positions**2 > vocabulary:
        rows = tf.shape(d)[0]
        examples = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(tokens))
        # scatter_nd sums the cotangents of repeated tokens.
        grads = tf.scatter_nd(
            tf.stack([examples, tokens], axis=-1), d, [rows, vocabulary, d.shape[-1]]
        )
        size = vocabulary * layer.output_dim
        plan = Plan(
            layer.name,
            "materialise",
            batch * batch * size,
            batch * size * (d.dtype.size + _GRAM_ITEMSIZE),
        )
        return gram_of(grads), plan
    same = tf.equal(tokens[:, None, :, None], tokens[None, :, None, :])
    d = tf.cast(d, GRAM_DTYPE)
    products = tf.einsum("atn,bsn->abts", d, d)
    block = tf.reduce_sum(tf.where(same, products, tf.zeros_like(products)), [2, 3])
    cost = batch * batch * positions * positions * layer.output_dim
    return block, Plan(layer.name, "ghost", cost, ghost_bytes)


@dataclasses.dataclass
class GhostFactors:
    """A unit's Gram block in factored form: what a rule's `factors`
    returns (`keras_fim.engine.rules.LayerRule`).

    Attributes:
        tensors: Tensors with the examples first, ``(B, ...)``: the rows the
            block is formed from (a Dense unit's inputs and cotangents, a
            convolution's inputs and cotangents, an Embedding's tokens and
            cotangents). Under a distribution strategy they are what a
            replica all-gathers when they are fewer values per example than
            the unit's parameters.
        block: ``block(tensors, budget) -> (block, Plan)``: the unit's Gram
            block from such tensors (the local ones, or the gathered ones of
            the global batch), choosing its path under the memory `budget`.
    """

    tensors: list
    block: Callable[[list, float], tuple]


def kernel_factors(
    name: str, a: tf.Tensor, d: tf.Tensor, use_bias: bool = False
) -> GhostFactors:
    """`GhostFactors` of a kernel whose per-example gradient is ``g_i =
    sum_t a_it^T d_it`` (and, with `use_bias`, a bias whose gradient is
    ``sum_t d_it``). For a custom layer that is a Dense in disguise;
    `_kernel_block`'s cost model picks the ghost or the materialised form.

    Args:
        name: String, the unit's name, for its `Plan`.
        a: Tensor ``(B, T, m)``, the rows multiplying the kernel (a Dense
            layer's inputs) at each of the ``T`` positions, examples first.
        d: Tensor ``(B, T, n)`` of the same dtype as `a`, the cotangents of
            the pre-activation outputs ``a_it W (+ bias)`` at the same
            positions.
        use_bias: Boolean, whether the unit also has a bias whose
            per-example gradient is ``sum_t d_it``. Defaults to `False`.

    Returns:
        `GhostFactors` holding ``[a, d]`` and the function that forms the
        unit's Gram block from them.
    """

    def block(tensors, budget):
        a, d = tensors
        kernel, plan = _kernel_block(
            name,
            _static_batch(None, d),
            a.shape[1],
            a.shape[-1],
            d.shape[-1],
            d.dtype.size,
            budget,
            tensors,
            lambda t: _ghost(*t),
            {
                "einsum": lambda t, start, stop: tf.einsum(
                    "bti,btj->bij", t[0], t[1][..., start:stop]
                )
            },
            key=("kernel",),
        )
        if use_bias:
            kernel += _bias_block([tf.reduce_sum(d, axis=1)])
        return kernel, plan

    return GhostFactors([a, d], block)


def rule_gram(layer, per_example, calls, examples):
    """Any unit: its per-example gradients (`per_example(layer, call,
    examples)`), summed over calls; their product over all variables at once
    when they hold at most `POOLED_VALUES` values per example, else a
    variable at a time."""
    per_call = [per_example(layer, call, examples) for call in calls]
    summed = [
        tf.add_n([tf.cast(t, grads[0].dtype) for t in grads])
        for grads in zip(*per_call, strict=True)
    ]
    sizes = [
        math.prod(g.shape[1:]) if g.shape[1:].is_fully_defined() else None
        for g in summed
    ]
    batch = _static_batch(examples, summed[0])
    itemsize = max(g.dtype.size for g in summed) + _GRAM_ITEMSIZE
    if None not in sizes and sum(sizes) <= POOLED_VALUES:
        # Small variables (normalisation scales and offsets): one product
        # for all, a third of the graph operations of one per variable.
        size = sum(sizes)
        block = gram_of(_flat(summed))
    else:  # one variable at a time: the float64 copies one by one
        size = max(s or 0 for s in sizes)
        block = tf.add_n([gram_of(g) for g in summed])
    plan = Plan(
        layer.name, "rule", batch * batch * _parameters(layer), batch * size * itemsize
    )
    return block, plan


def unit_factors(unit, calls, examples) -> GhostFactors | None:
    """The unit's `GhostFactors` from its rule, or `None` (no factored form)."""
    layer, rule = unit
    return None if rule.factors is None else rule.factors(layer, calls, examples)


def unit_gram(
    unit,
    calls: list,
    examples,
    budget: float = DEFAULT_MEMORY_BUDGET,
    shared: SharedBlocks | None = None,
):
    """The Gram block of one unit over all its recorded calls, and its plan:
    from its rule's factored form where it has one (through `shared`, when
    given), else from its per-example gradients."""
    factors = unit_factors(unit, calls, examples)
    if factors is None:
        return rule_gram(unit.layer, unit.rule.per_example, calls, examples)
    if shared is not None:
        return shared(unit, factors, budget)
    return factors.block(factors.tensors, budget)


class SharedBlocks:
    """One traced function per kind of factored block, shared by the units
    of a graph that have that kind.

    A network repeats its blocks: of the 105 to 131 units of MobileNetV2,
    EfficientNetB0 and ResNet50, 30 to 66 differ in layer class, options
    and shapes. Each unit's block written into the measuring graph cost
    tracing time, graph optimisation and instantiation for every copy, a
    first `fit` several times a plain one (issue 15). Here the units of one
    kind (layer class, config but for the name, rule, the factors' shapes
    and dtypes, the memory budget, the `path_choice` in force) call one
    function, traced and optimised once and kept apart from the caller's
    graph (``_noinline``), so that it is instantiated once too.

    A block function that would capture a tensor of the caller's graph (a
    custom rule's block reading more than its factors) is not shared: that
    unit and its kind form their blocks in place. Eagerly, under XLA or a
    distribution strategy, nothing is shared.
    """

    def __init__(self):
        self._functions: dict = {}  # kind -> (concrete function, [plan]) or None

    @staticmethod
    def enabled() -> bool:
        """Whether sharing applies here (building a graph of one device
        without XLA)."""
        return not (
            tf.executing_eagerly() or in_xla_context() or tf.distribute.has_strategy()
        )

    def _kind(self, unit, factors, budget):
        layer = unit.layer
        try:
            config = layer.get_config()
        except Exception:  # a custom layer without a config: no kind
            return None
        config.pop("name", None)
        choice, timer = _CHOICE[-1] if _CHOICE else (_default_choice(), None)
        return (
            type(layer),
            repr(sorted(config.items())),
            id(unit.rule),
            tuple((tuple(t.shape), t.dtype.name) for t in factors.tensors),
            budget,
            choice,
            id(timer),
        )

    def __call__(self, unit, factors, budget):
        kind = self._kind(unit, factors, budget)
        if kind is None or not all(isinstance(t, tf.Tensor) for t in factors.tensors):
            return factors.block(factors.tensors, budget)
        if kind not in self._functions:
            plans = []

            def block(*tensors):
                value, plan = factors.block(list(tensors), budget)
                plans.append(plan)
                return value

            shared = tf.function(
                block, autograph=False, experimental_attributes={"_noinline": True}
            ).get_concrete_function(
                *[tf.TensorSpec(t.shape, t.dtype) for t in factors.tensors]
            )
            self._functions[kind] = None if shared.captured_inputs else (shared, plans)
        if self._functions[kind] is None:
            return factors.block(factors.tensors, budget)
        shared, plans = self._functions[kind]
        return shared(*factors.tensors), dataclasses.replace(
            plans[0], layer=unit.layer.name
        )


# -- payloads: what a replica contributes to the global batch's blocks --------


@dataclasses.dataclass
class Payload:
    """One unit's share of a replica's examples, to be all-gathered.

    Attributes:
        tensors: Tensors with the examples first (``(b, ...)``); gathered
            along that axis across replicas, they describe the global batch.
        block: ``block(gathered_tensors, budget) -> (block, plan)``, the
            unit's Gram block from the gathered tensors.
        kind: ``"factors"`` (the ghost form's rows: a Dense unit's inputs and
            cotangents, a convolution's inputs and cotangents, an
            Embedding's tokens and cotangents) or ``"gradients"`` (the
            unit's per-example gradients, flattened).
        values_per_example: The number of values one example sends (`None`
            where a shape is unknown).
    """

    tensors: list
    block: object
    kind: str
    values_per_example: int | None


def _flat(gradients) -> tf.Tensor:
    """Per-example gradients (one tensor per variable) as one ``(b, P)``."""
    flat = [_rows(g) for g in gradients]
    dtype = max((g.dtype for g in flat), key=lambda d: d.size)
    flat = [tf.cast(g, dtype) for g in flat]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


def gradients_payload(name, gradients) -> Payload:
    """A payload of materialised per-example gradients."""
    flat = _flat(gradients)

    def block(tensors, budget):
        g = tensors[0]
        batch = _static_batch(None, g)
        size = g.shape[-1] or 0
        plan = Plan(
            name,
            "materialise",
            batch * batch * size,
            batch * size * (g.dtype.size + _GRAM_ITEMSIZE),
        )
        return gram_of(g), plan

    return Payload([flat], block, "gradients", flat.shape[-1])


def _values(*shapes):
    """Values per example of tensors shaped `shapes` (batch axis dropped)."""
    total = 0
    for shape in shapes:
        dims = shape[1:]
        if any(d is None for d in dims):
            return None
        total += math.prod(dims)
    return total


def _parameters(layer) -> int:
    return sum(math.prod(v.shape) for v in layer.trainable_variables)


def unit_payload(unit, calls: list, examples) -> Payload:
    """What one replica sends so that every replica can form the unit's
    Gram block over the global batch: its rule's factors where they are
    fewer values per example than the unit's parameters (Dense and
    Embedding, as a rule), otherwise the per-example gradients
    (convolutions with many positions, every other layer). The block formed
    from the gathered factors is exactly `unit_gram`'s on the global
    batch."""
    layer, rule = unit
    factors = unit_factors(unit, calls, examples)
    if factors is not None:
        values = _values(*(t.shape for t in factors.tensors))
        if values is not None and values <= _parameters(layer):
            return Payload(factors.tensors, factors.block, "factors", values)
    per_call = [rule.per_example(layer, call, examples) for call in calls]
    gradients = [
        tf.add_n([tf.cast(t, grads[0].dtype) for t in grads])
        for grads in zip(*per_call, strict=True)
    ]
    return gradients_payload(layer.name, gradients)


# -- every unit: the model's blocks ----------------------------------------------

FAIL_MODES = ("error", "warn", "skip")
"""What a measurement does with a layer whose rule fails while it is built
(BackPACK's ``fail_mode``): raise, or leave the layer out of ``J`` with one
warning, or silently."""


def check_fail_mode(fail_mode) -> str:
    """`fail_mode`, or `ValueError` naming it unless one of `FAIL_MODES`."""
    return check_choice("fail_mode", fail_mode, FAIL_MODES)


def _per_unit(units, calls, fail_mode, build) -> dict:
    """``{name: build(unit, unit_calls)}`` for the units that were called;
    a unit whose `build` raises is left out under ``fail_mode`` "warn" (one
    warning naming it) or "skip", and raises under "error"."""
    check_fail_mode(fail_mode)
    results = {}
    for name, unit in zip(unique_names(units), units, strict=True):
        unit_calls = calls[id(unit.layer)]
        if not unit_calls:
            continue
        try:
            results[name] = build(unit, unit_calls)
        except Exception as error:
            if fail_mode == "error":
                raise
            if fail_mode == "warn":
                warnings.warn(
                    f"keras-fim leaves layer {unit.layer.name!r} out of the "
                    "measurement: its rule failed "
                    f"({type(error).__name__}: {error}). The spectrum is "
                    "that of the other layers' weights; fail_mode='error' "
                    "makes this an error.",
                    stacklevel=2,
                )
    if not results and any(calls[id(unit.layer)] for unit in units):
        raise ValueError(
            "keras-fim could measure no layer: every layer's rule failed "
            f"(fail_mode={fail_mode!r})."
        )
    return results


def check_memory_budget(memory_budget) -> float:
    """`memory_budget` in bytes (`DEFAULT_MEMORY_BUDGET` for `None`);
    `ValueError` naming it unless a positive number (inf: no bound)."""
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    return check_real(
        "memory_budget", memory_budget, 0, include_low=False, allow_inf=True
    )


def per_variable_gradients(units, calls, examples, variables=None) -> list:
    """Each example's contribution per variable: one ``(examples,
    *variable.shape)`` tensor for each of `variables` (zeros for one no unit
    holds), or for every variable the units hold (in order) if `None`."""
    by_variable = {}
    for layer, rule in units:
        for call in calls[id(layer)]:
            grads = rule.per_example(layer, call, examples)
            for v, g in zip(layer.trainable_variables, grads, strict=True):
                g = tf.cast(g, v.dtype)
                by_variable[id(v)] = (
                    by_variable[id(v)] + g if id(v) in by_variable else g
                )
    if variables is None:
        return list(by_variable.values())
    return [
        by_variable.get(id(v), tf.zeros([examples, *v.shape], v.dtype))
        for v in variables
    ]


def gram_from_gradients(gradients: list) -> tf.Tensor:
    """The Gram matrix ``J J^T`` of per-example gradients, summed per
    variable, in float64 (`gram_of`)."""
    return tf.add_n([gram_of(g) for g in gradients])


def _shares_weights(units) -> bool:
    owners = [id(v) for layer, _ in units for v in layer.trainable_variables]
    return len(owners) != len(set(owners))


def unique_names(units) -> list[str]:
    """The units' layer names, with ``_1``, ``_2``... for repeated ones:
    the keys of `grams_from_calls` and `payloads_from_calls`."""
    names, seen = [], {}
    for layer, _ in units:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        names.append(layer.name if count == 0 else f"{layer.name}_{count}")
    return names


def grams_from_calls(units, calls, examples, memory_budget=None, fail_mode="error"):
    """Per-unit Gram blocks from recorded calls: ``(blocks, plans)``.

    `blocks` maps unit names to ``(examples, examples)`` float64 blocks
    summing to ``J J^T`` (over the measured layers: see `FAIL_MODES`). When
    units share a weight, their contributions must be added before the
    product, so the whole model is then one block, ``"model"``.
    """
    budget = check_memory_budget(memory_budget)
    if _shares_weights(units):
        grads = per_variable_gradients(units, calls, examples)
        return {"model": gram_from_gradients(grads)}, []
    shared = SharedBlocks() if SharedBlocks.enabled() else None
    built = _per_unit(
        units,
        calls,
        fail_mode,
        lambda unit, unit_calls: unit_gram(unit, unit_calls, examples, budget, shared),
    )
    blocks = {name: block for name, (block, _) in built.items()}
    return blocks, [plan for _, plan in built.values()]


def payloads_from_calls(units, calls, examples, fail_mode="error") -> dict:
    """Per-unit `Payload`s from recorded calls: what a replica all-gathers
    so that every replica forms the global batch's blocks
    (`keras_fim.engine.distribute`). Keys as `grams_from_calls`."""
    if _shares_weights(units):
        grads = per_variable_gradients(units, calls, examples)
        return {"model": gradients_payload("model", grads)}
    return _per_unit(
        units,
        calls,
        fail_mode,
        lambda unit, unit_calls: unit_payload(unit, unit_calls, examples),
    )


def sum_blocks(blocks: dict) -> tf.Tensor:
    """The sum of Gram blocks: ``J J^T``."""
    return tf.add_n(list(blocks.values()))
