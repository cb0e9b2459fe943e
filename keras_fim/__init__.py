"""keras-fim: the approximate Fisher information of training batches, in Keras.

Measures, during `model.fit`, the spectrum of the approximate Fisher
information matrix of sampled mini-batches and the running measurements of
Liao, Drummond, Reid and Carneiro (TPAMI 2020), and logs them to TensorBoard.
"""

from keras_fim.callback import FisherCallback
from keras_fim.engine import fisher_gram
from keras_fim.engine import measure
from keras_fim.engine import per_example_gradients
from keras_fim.engine.rules import register_rule
from keras_fim.measurements import FisherMeasurement
from keras_fim.model import FisherModel
from keras_fim.state import FisherState

__version__ = "0.1.0"

__all__ = [
    "FisherCallback",
    "FisherMeasurement",
    "FisherModel",
    "FisherState",
    "fisher_gram",
    "measure",
    "per_example_gradients",
    "register_rule",
]
