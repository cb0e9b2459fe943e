"""A training job for the persistence test: run as a separate process, killable.

python tests/persistence_job.py OUT_DIR [KILL_AT_STEP]

Trains a small dense classifier on 320 digits for 4 epochs of 20 steps: the
batches (16 examples) come from `DynamicSampling`, so an epoch is one pass
over the data and where the pass stands is part of the backed-up state; a
`FisherCallback` measures every 3rd step and writes TensorBoard events to
OUT_DIR/logs; `BackupAndRestore` saves to OUT_DIR/backup every 7 steps,
inside epochs. At the end it writes OUT_DIR/result.npz. With KILL_AT_STEP the
process kills itself (SIGKILL: nothing is flushed or saved on the way out)
just before that 0-based step.

(Every 7 steps never falls on the last step of a pass; a backup there is
tests/test_sampling_resume.py's.)
"""

import os
import signal
import sys


def main(out_dir: str, kill_at_step: int | None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_fim
    from keras_fim.datasets import load_digits

    tf.config.experimental.enable_op_determinism()
    # One thread: the test runs two of these processes side by side.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    (x, y), _ = load_digits()
    x, y = x[:320], y[:320]
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    first_step = []

    class Kill(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            step = int(model.optimizer.iterations.numpy())
            if not first_step:  # after BackupAndRestore restored the weights
                first_step.append(step)
            if step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    fisher = keras_fim.FisherCallback(
        log_dir=os.path.join(out_dir, "logs"), every_n_steps=3
    )
    sampling = keras_fim.DynamicSampling((x, y), schedule=16)
    callbacks = [
        sampling,
        fisher,
        keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"), save_freq=7),
        Kill(),
    ]
    model.fit(sampling.dataset, epochs=4, callbacks=callbacks, verbose=0)
    state = model.fisher_state
    np.savez(
        os.path.join(out_dir, "result.npz"),
        weights=np.concatenate([w.ravel() for w in model.get_weights()]),
        C_K_bar=float(state.condition_mean),
        iterations=int(model.optimizer.iterations),
        first_step=first_step[0],
        **{v.name: v.numpy() for v in state.variables},
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
