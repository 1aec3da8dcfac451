"""Independent oracles for the layer tests: explicit float64 matrices assembled from a layer's parameters."""

from __future__ import annotations

import math

import torch

from dreidel.algo import hadamard_matrix


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``Q`` with ``(Q v)_j = v[perm[j]]``."""
    length = perm.numel()
    q = torch.zeros(length, length, dtype=torch.float64)
    q[torch.arange(length), perm.cpu()] = 1.0
    return q


def spectral_matrix(layer) -> torch.Tensor:
    """``(out, in)`` float64 matrix of a LinearWHT / DeepSpectralLinear, built with dense H and permutation matrices."""
    n, out, depth = layer.in_features, layer.out_features, layer.depth
    perm = layer.permutation.cpu()
    blocks, length = perm.shape[1], perm.shape[2]
    h = hadamard_matrix(length) / math.sqrt(length)
    pad = torch.zeros(length, n, dtype=torch.float64)
    pad[torch.arange(n), torch.arange(n)] = 1.0
    rows = []
    for b in range(blocks):
        m = h @ permutation_matrix(perm[0, b]) @ pad @ torch.diag(layer.in_scale[b].detach().double().cpu())
        for k in range(1, depth):
            scale = torch.diag(layer.inner_scale[k - 1, b].detach().double().cpu())
            m = h @ permutation_matrix(perm[k, b]) @ scale @ m
        rows.append(m)
    stacked = torch.cat(rows, dim=0)[:out]
    return torch.diag(layer.out_scale.detach().double().cpu()) @ stacked
