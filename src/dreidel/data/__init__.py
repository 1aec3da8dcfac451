"""dreidel.data: real data sets that ship inside installed wheels (no network), and loader helpers."""

from dreidel.data._split import as_dataloader, stratified_split
from dreidel.data.digits import load_digits
from dreidel.data.mnist import load_mnist

__all__ = ["as_dataloader", "load_digits", "load_mnist", "stratified_split"]
