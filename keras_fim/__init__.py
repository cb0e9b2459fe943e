"""keras-fim: the approximate Fisher information of training batches, in Keras.

Measures, during `model.fit`, the spectrum of the approximate Fisher
information matrix of sampled mini-batches and the running measurements of
Liao, Drummond, Reid and Carneiro (TPAMI 2020), and logs them to TensorBoard; `DynamicSampling` grows the mini-batch inside
one `fit`, by schedule or from those measurements.

It needs Keras's TensorFlow backend: importing it on another raises
`ImportError`, naming the backend.
"""

# First, and on import: another Keras backend raises ImportError here.
from keras_fim import _backend  # noqa: F401  isort: skip
from keras_fim import schedules
from keras_fim.callback import FisherCallback
from keras_fim.engine import (
    fisher_gram,
    layer_grams,
    measure,
    per_example_gradients,
)
from keras_fim.engine.rules import register_rule
from keras_fim.measurements import FisherMeasurement
from keras_fim.model import FisherModel
from keras_fim.sampling import DynamicSampling
from keras_fim.schedules import SamplingContext
from keras_fim.state import FisherState, SamplingState

__version__ = "0.2.0"

__all__ = [
    "DynamicSampling",
    "FisherCallback",
    "FisherMeasurement",
    "FisherModel",
    "FisherState",
    "SamplingContext",
    "SamplingState",
    "fisher_gram",
    "layer_grams",
    "measure",
    "per_example_gradients",
    "register_rule",
    "schedules",
]
