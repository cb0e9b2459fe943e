"""The Fisher engine: per-example gradient contributions and their Gram matrix.

Each example's contribution to the mini-batch gradient (METHOD.md) is the
gradient of its own loss for models whose examples never interact, and its
share of the batch backward pass for batch-coupled layers such as
BatchNormalization in training mode; they sum to ``|B|`` times the gradient
of the compiled loss (without regularisation). The modules, in the order a
measurement uses them:

* `units`: the layers whose calls are recorded, each with its rule;
* `capture`, `record`, `probes`: the recorded batch pass (a pass of its own,
  or the training step's own) as a typed `RecordedPass`;
* `losses`, `scaling`: per-example losses, reductions, and the factor
  Keras's step scales them by;
* `rules`: per-example rules and factored forms, per layer family, in a
  `RuleRegistry`;
* `gram`: the Gram blocks ``J J^T`` per unit, in float64;
* `distribute`: the global batch's blocks under `tf.distribute`;
* `noise`: the gradient noise scale's components;
* `pipeline`: one measurement from a recorded pass;
* `api`: the public functions for one batch by hand.

This package only re-exports.
"""

from keras_fim.engine.api import (
    fisher_gram,
    layer_grams,
    measure,
    per_example_gradients,
)
from keras_fim.engine.gram import (
    gram_from_gradients,
    grams_from_calls,
    payloads_from_calls,
    sum_blocks,
)
from keras_fim.engine.noise import (
    gradient_noise_components,
    noise_components_from_gram,
    noise_components_from_groups,
)
from keras_fim.engine.pipeline import Measured, measure_pass
from keras_fim.engine.probes import ProbedPass, reuses_training_pass
from keras_fim.engine.record import RecordedPass, record_pass
from keras_fim.engine.rules import LayerRule, RuleRegistry, register_rule

__all__ = [
    "LayerRule",
    "Measured",
    "ProbedPass",
    "RecordedPass",
    "RuleRegistry",
    "fisher_gram",
    "gradient_noise_components",
    "gram_from_gradients",
    "grams_from_calls",
    "layer_grams",
    "measure",
    "measure_pass",
    "noise_components_from_gram",
    "noise_components_from_groups",
    "payloads_from_calls",
    "per_example_gradients",
    "record_pass",
    "register_rule",
    "reuses_training_pass",
    "sum_blocks",
]
