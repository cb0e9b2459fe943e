"""Dynamic sampling: a mini-batch size that changes inside one `model.fit`.

How it works, and why this way (see docs/sampling.md):

* The examples are held in memory (in `tf.Variable`s) and the batches are
  gathered from a per-pass permutation, or, for a `tf.data` pipeline that
  should not be frozen (random ops, unknown or endless length, too large),
  streamed: the pipeline runs afresh every pass, its examples prefetched,
  and only stacking them into the planned size waits for the step. Which examples the next batches hold
  is decided in Python before every execution of the train function and
  handed to the pipeline through small variables; the pipeline has no
  prefetch, so the batch trained is always the batch decided (prefetch would
  make the size change a timing-dependent number of steps later, and a
  resumed run could not repeat it). Under a `tf.distribute` strategy, whose
  input Keras reads ahead of the step, the batches are planned ahead of it
  instead (a schedule that reads no measurements answers the same then).
* An epoch is one pass over the data. The callback ends it by raising
  `OutOfRangeError` before the first step of the next pass, the signal Keras
  itself uses for a dataset that ran out, so no phantom step is run. The
  dataset declares a large cardinality, which keeps Keras from fixing the
  number of steps per epoch after the first one.
* The callback is Keras's progress bar too (a `ProgbarLogger`, which `fit`
  then does not add a second time), so the bar counts this epoch's steps.
* The learning-rate coupling multiplies whatever rate the optimizer gives
  (a float, a schedule, one changed by other callbacks) by a gain computed
  inside the compiled step from the size of the batch actually trained.

The parts:

* `dataset`: the examples in memory and the pipeline that gathers the
  planned batches (`InMemoryExamples`), or the rebatched stream
  (`StreamedExamples`), and the choice between them (`choose_mode`).
* `planner`: which rows of which permutation the next batches take, and
  where a pass ends (`SamplingPlanner`; plain Python, no TensorFlow).
* `driver`: when the schedule is asked, what it sees and what its answers
  do to the pass and the counters (`SamplingDriver`; plain Python, driven
  by hand in the tests).
* `learning_rate`: the gain on the optimizer's rate
  (`learning_rate_gain`, a pure function).
* `dynamic_sampling`: the callback, `DynamicSampling`, which keeps the
  lifecycle inside `fit`: it reads the state from Keras, feeds the
  pipeline, wraps the step and draws the bar. Its TensorBoard tags are
  written by `keras_fim.summaries`.
"""

from keras_fim.sampling.dynamic_sampling import DynamicSampling
from keras_fim.sampling.learning_rate import LEARNING_RATE_SCALINGS, learning_rate_gain
from keras_fim.sampling.planner import ExecutionPlan, SamplingPlanner

__all__ = [
    "LEARNING_RATE_SCALINGS",
    "DynamicSampling",
    "ExecutionPlan",
    "SamplingPlanner",
    "learning_rate_gain",
]
