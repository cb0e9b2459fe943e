"""Train a small CIFAR-style ResNet on the bundled digits with FisherCallback.

Prints C_K bar and L_K after every epoch and where the TensorBoard logs are.
Runs offline in about a minute on 2 CPU cores:

    python examples/train_digits.py --epochs 5 --log-dir logs/digits
    tensorboard --logdir logs/digits
"""

from __future__ import annotations

import argparse

import keras

import keras_fim
from keras_fim.datasets import load_digits
from keras_fim.models import cifar_resnet, compile_like_the_paper


class PrintFisher(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        print(
            f"epoch {epoch + 1}: C_K_bar={logs['C_K_bar']:.4g} "
            f"L_K={logs['L_K']:.4g} loss={logs['loss']:.4f} "
            f"val_accuracy={logs.get('val_accuracy', float('nan')):.4f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--every-n-steps", type=int, default=5)
    parser.add_argument("--log-dir", default="logs/digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=args.seed)
    model = cifar_resnet(x_train.shape[1:], num_classes=10)
    compile_like_the_paper(model, args.learning_rate)
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=0,
        callbacks=[
            keras_fim.FisherCallback(
                log_dir=args.log_dir, every_n_steps=args.every_n_steps
            ),
            keras.callbacks.TensorBoard(args.log_dir),
            PrintFisher(),
        ],
    )
    state = model.fisher_state
    print(
        f"measured {int(state.measurements)} of {int(state.step)} steps; "
        f"final C_K_bar={float(state.condition_mean):.4g}, "
        f"L_K={float(state.energy_sum):.4g}"
    )
    print(f"TensorBoard logs: {args.log_dir}  (tensorboard --logdir {args.log_dir})")


if __name__ == "__main__":
    main()
