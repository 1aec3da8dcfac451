"""``History``: the per-epoch record that ``Sequential.fit`` returns."""

from __future__ import annotations

import os
from pathlib import Path

from dreidel._files import replaced_atomically

__all__ = ["History"]


class History:
    """Per-epoch logs: ``history.history["loss"][e]`` is the mean training loss of the ``e``-th epoch this ``fit``
    ran (0-based), whose number is ``history.epoch[e]`` (``e`` itself unless ``fit`` had an ``initial_epoch``).

    Keys are ``loss``, one per compiled metric (``accuracy``, ``top_5_accuracy``, ...), the same with a
    ``val_`` prefix when validation data was given, and ``lr`` (the first parameter group's learning rate).
    """

    def __init__(self) -> None:
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))

    def __repr__(self) -> str:
        last = {key: round(values[-1], 4) for key, values in self.history.items()}
        return f"History(epochs={len(self.epoch)}, last={last})"

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a PNG with one panel for the loss and one per metric (train and validation curves).

        Uses matplotlib's non-interactive Agg canvas (no display needed); the file is written atomically.

        Returns:
            the path of the PNG.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.epoch:
            raise ValueError("history is empty: nothing to plot (fit for at least one epoch)")
        quantities = [key for key in self.history if not key.startswith("val_") and key != "lr"]
        figure = Figure(figsize=(4.5 * len(quantities), 3.5))
        FigureCanvasAgg(figure)
        epochs = [e + 1 for e in self.epoch]
        for index, key in enumerate(quantities):
            axes = figure.add_subplot(1, len(quantities), index + 1)
            axes.plot(epochs, self.history[key], marker="o", label="train")
            if f"val_{key}" in self.history:
                axes.plot(epochs, self.history[f"val_{key}"], marker="o", label="validation")
            axes.set_xlabel("epoch")
            axes.set_title(key)
            axes.legend()
        figure.tight_layout()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(target, suffix=".png") as (handle, staging):
            os.close(handle)
            figure.savefig(staging, format="png", dpi=100)
        return target
