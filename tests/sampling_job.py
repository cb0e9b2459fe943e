"""A training job for the resume test: run as a separate process, killable.

python tests/sampling_job.py OUT_DIR MODE [KILL_AT_STEP|-] [SAVE_FREQ]

Trains a small classifier on digits with `DynamicSampling` (automatic mode,
AdaScale learning rate), a `FisherCallback` and `BackupAndRestore` in
OUT_DIR/backup; at the end writes OUT_DIR/result.npz (with the steps of
every epoch). MODE is `in_memory` (arrays; backups at epoch ends) or
`stream` (a tf.data pipeline of unknown length with a map; backups every 7
steps, so a resumed run starts mid-pass). SAVE_FREQ, an integer, replaces
the backup frequency (every SAVE_FREQ steps). With KILL_AT_STEP the process
kills itself (SIGKILL, no clean-up) before that 0-based step.
"""

import os
import signal
import sys


def main(
    out_dir: str, mode: str, kill_at_step: int | None, save_freq: int | None
) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_fim
    from keras_fim.datasets import load_digits

    if mode != "stream":
        # A finite stream needs tf.data's read-ahead, which this turns off
        # (DynamicSampling says so); the CPU ops here are deterministic.
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    (x, y), _ = load_digits()
    x, y = x[:600], y[:600]
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    data, default_save_freq = (x, y), "epoch"
    if mode == "stream":
        # Deterministic, so a resumed pass reads the same examples; the
        # filter hides the length, so the data ends each pass.
        data = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .map(lambda image, label: (image * 1.0, label))
            .filter(lambda image, label: True)
        )
        default_save_freq = 7
    sampling = keras_fim.DynamicSampling(
        data,
        mode=mode,
        schedule=keras_fim.schedules.Automatic(8, 128, min_steps=8),
        learning_rate_scaling="adascale",
        log_dir=os.path.join(out_dir, "logs"),
    )

    first_step = []

    class Kill(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if not first_step:  # after BackupAndRestore restored the weights
                first_step.append(int(model.optimizer.iterations.numpy()))
            if int(model.optimizer.iterations.numpy()) == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [
        keras.callbacks.BackupAndRestore(
            os.path.join(out_dir, "backup"), save_freq=save_freq or default_save_freq
        ),
        sampling,
        keras_fim.FisherCallback(every_n_steps=4),
    ]
    callbacks.append(Kill())
    model.fit(sampling.dataset, epochs=5, callbacks=callbacks, verbose=0)
    np.savez(
        os.path.join(out_dir, "result.npz"),
        weights=np.concatenate([w.ravel() for w in model.get_weights()]),
        C_K_bar=float(model.fisher_state.condition_mean),
        L_K=float(model.fisher_state.energy_sum),
        measurements=int(model.fisher_state.measurements),
        iterations=int(model.optimizer.iterations),
        first_step=first_step[0],
        # This process's epochs (a resumed one's start at the restored epoch).
        steps_per_epoch=[len(sizes) for sizes in sampling.batch_sizes_per_epoch],
        **{f"sampling_{k}": v for k, v in model.sampling_state.read().items()},
    )


if __name__ == "__main__":
    kill = sys.argv[3] if len(sys.argv) > 3 else "-"
    main(
        sys.argv[1],
        sys.argv[2],
        None if kill == "-" else int(kill),
        int(sys.argv[4]) if len(sys.argv) > 4 else None,
    )
