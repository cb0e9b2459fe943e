"""Grow the mini-batch inside one `fit`: the paper's schedule, or automatically.

Trains the small CIFAR-style ResNet on the bundled digits (offline) with
`keras_fim.DynamicSampling`:

* ``--mode staged`` (default): the paper's schedule, 16 -> 32 -> 64 -> 128 ->
  256 in five equal stages, the learning rate unchanged by the growth;
* ``--mode automatic``: start at 16 and double the batch (up to 256) whenever
  the gradient noise scale B_simple measured by a `FisherCallback` exceeds
  it; the learning rate follows with AdaScale's gain.

Prints each epoch's batch sizes, then where the TensorBoard logs are:

    python examples/dynamic_sampling.py --mode staged --epochs 10
    python examples/dynamic_sampling.py --mode automatic --epochs 10
    tensorboard --logdir logs/sampling

In TensorBoard (CUSTOM SCALARS, "keras-fim: dynamic sampling"):
``sampling/batch_size`` is the size of every batch trained (x-axis: the
batch number, as Keras's own batch charts), ``sampling/learning_rate`` the
rate applied to it (the optimizer's rate times the coupling gain, shown as
``sampling/learning_rate_gain``); in automatic mode ``sampling/signal``
(B_simple / batch size at each decision) against ``sampling/threshold``: the
batch doubles when the signal is above the threshold. The ``fisher/*``
charts show C_K bar and L_K as the batch grows.
"""

from __future__ import annotations

import argparse
import os

import keras

import keras_fim
from keras_fim.datasets import load_digits
from keras_fim.models import cifar_resnet, compile_like_the_paper
from keras_fim.schedules import Automatic, Staged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("staged", "automatic"), default="staged")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--log-dir", default="logs/sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    log_dir = os.path.join(args.log_dir, args.mode)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=args.seed)
    model = cifar_resnet(x_train.shape[1:], num_classes=10)
    compile_like_the_paper(model, args.learning_rate)
    callbacks = [keras.callbacks.TensorBoard(log_dir)]
    if args.mode == "staged":
        sampling = keras_fim.DynamicSampling(
            (x_train, y_train),
            schedule=Staged([16, 32, 64, 128, 256]),
            seed=args.seed,
            log_dir=log_dir,
        )
        callbacks.append(keras_fim.FisherCallback(log_dir=log_dir, every_n_steps=10))
    else:
        sampling = keras_fim.DynamicSampling(
            (x_train, y_train),
            schedule=Automatic(16, maximum=256, min_steps=20),
            learning_rate_scaling="adascale",
            seed=args.seed,
            log_dir=log_dir,
        )
        callbacks.append(keras_fim.FisherCallback(log_dir=log_dir, every_n_steps=5))
    model.fit(
        sampling.dataset,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[*callbacks, sampling],
        shuffle=False,  # the sampling shuffles; this silences Keras's note
        verbose=2,
    )
    for epoch, sizes in enumerate(sampling.batch_sizes_per_epoch, start=1):
        print(f"epoch {epoch}: {len(sizes)} steps, batch sizes {sorted(set(sizes))}")
    print(f"TensorBoard logs: tensorboard --logdir {log_dir}")


if __name__ == "__main__":
    main()
