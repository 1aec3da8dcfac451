"""Per-layer curvature blocks of K-FAC: Kronecker factors for Linear/Conv, diagonal ones elsewhere.

Conventions. A layer's gradient is viewed as a matrix ``Gamma`` of shape ``(d_out, d_in)`` (a bias is
an extra input column fed by a constant 1). Its per-sample gradient is ``sum_rows g a^T``, so for the
row-major ``vec(Gamma)`` the Fisher is approximated by ``G ⊗ A`` (Martens & Grosse 2015,
arXiv:1503.05671) with

    A = mean over rows of a a^T            (rows = batch x positions; conv rows are unfolded patches,
                                            Grosse & Martens 2016, arXiv:1602.01407)
    G = scale * sum over rows of g g^T     (g: gradient at the layer output; scale = 1 for sampled
                                            output vectors; for the empirical Fisher, the number
                                            of terms of the mean loss: B, or B·T for a (B, T, C)
                                            output, as the sampled vectors assume)

Two damping modes for the Kronecker blocks:

- ``"exact"``: with ``A = Q_A diag(l_A) Q_A^T``, ``G = Q_G diag(l_G) Q_G^T``,
  ``(G ⊗ A + lambda I)^{-1} vec(Gamma) = vec(Q_G [(Q_G^T Gamma Q_A) / (l_G l_A^T + lambda)] Q_A^T)``
  (the eigenbasis of George et al. 2018, arXiv:1806.03884): four matrix products per step.
- ``"factored"``: ``(G + sqrt(lambda)/pi I)^{-1} Gamma (A + pi sqrt(lambda) I)^{-1}`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (M&G 2015, Sec. 6.3): the inverses are formed by
  Cholesky at refresh time (with the damping of that moment), so a step costs two matrix products. It equals
  ``((G + sqrt(lambda)/pi I) ⊗ (A + pi sqrt(lambda) I))^{-1}``, which differs from the exact damping
  by the cross terms.

In the factored mode a wide factor can be inverted in low rank (``factor_rank=k``): its top-k
eigenpairs from a randomized subspace iteration (Halko, Martinsson & Tropp 2011, arXiv:0909.4061,
Alg. 4.4) and the remaining ``n - k`` eigenvalues replaced by their mean, so the approximation keeps the
factor's trace (and with it ``pi``). Then ``(M + s I)^{-1} = c I + U diag(1/(l + s) - c) U^T`` with
``c = 1/(tail mean + s)``: applying it costs ``2 n k`` per gradient row instead of ``n^2``. Randomized
K-FAC (Puiu 2022, arXiv:2206.15397) keeps only the damping for the tail; the mean keeps the scale of the
discarded directions. Stored as a tuple ``(U, 1/(l + s) - c, c)`` of tensors (dense inverses as one
tensor), so optimizer state dicts stay plain tensors.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dreidel.layers._curvature import PerSampleGradients
from dreidel.optim._base import tensor_shape_problem
from dreidel.optim._capture import LayerRecord, curvature_dtype, parameter_owners, squared_grad_sums

logger = logging.getLogger("dreidel.optim")


def robust_eigh(matrix: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor, returned in ``matrix``'s dtype.

    Attempts, in order: as given; with a jitter of 1e-6 of the mean diagonal (reported at INFO:
    float32 ``eigh`` often fails to converge on rank-deficient factors such as raw-pixel covariances);
    in float64; in float64 with jitters 1e-4 and 1e-2 (warnings); finally the identity (warning).
    """
    dtype = matrix.dtype
    matrix = 0.5 * (matrix + matrix.t())
    scale = float(matrix.diagonal().abs().mean().clamp_min(1e-12))
    attempts = [(dtype, 0.0), (dtype, 1e-6), (torch.float64, 0.0), (torch.float64, 1e-4), (torch.float64, 1e-2)]
    for number, (work_dtype, relative_jitter) in enumerate(attempts):
        work = matrix.to(work_dtype)
        jitter = relative_jitter * scale
        try:
            values, vectors = torch.linalg.eigh(work + jitter * torch.eye(work.shape[0], dtype=work_dtype, device=work.device))
            if torch.isfinite(values).all() and torch.isfinite(vectors).all():
                if number:
                    log = logger.info if number < 3 else logger.warning
                    log("K-FAC: eigendecomposition of %s needed %s with jitter %.3g", name, work_dtype, jitter)
                return values.clamp_min(0.0).to(dtype), vectors.to(dtype)
        except (RuntimeError, torch.linalg.LinAlgError):
            pass
        if number >= 2:
            logger.warning("K-FAC: eigendecomposition of %s failed (attempt %d); retrying", name, number + 1)
    logger.warning("K-FAC: %s could not be decomposed; using the identity", name)
    return (torch.ones(matrix.shape[0], dtype=dtype, device=matrix.device),
            torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device))


def damped_inverse(matrix: torch.Tensor, shift: float, name: str) -> torch.Tensor:
    """``(matrix + shift I)^{-1}`` of a symmetric PSD factor by Cholesky (~10x cheaper than ``eigh`` on
    CPU); if the factorisation fails (not numerically PD), through ``robust_eigh`` (reported)."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    damped = 0.5 * (matrix + matrix.t()) + shift * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0 and torch.isfinite(factor).all():
        return torch.cholesky_inverse(factor)
    logger.warning("K-FAC: Cholesky of damped %s failed; inverting through its eigendecomposition", name)
    values, vectors = robust_eigh(matrix, name)
    return (vectors / (values + max(shift, 1e-12))) @ vectors.t()


def low_rank_damped_inverse(
    matrix: torch.Tensor, shift: float, rank: int, name: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """``(matrix + shift I)^{-1}`` of a symmetric PSD ``(n, n)`` factor as ``(U, d, c)``: ``c I + U diag(d) U^T``
    with ``U`` ``(n, rank)`` its top eigenvectors, the other eigenvalues set to their mean (module docstring).

    Subspace iteration with 8 oversampling columns and two power steps (Halko et al. 2011, Alg. 4.4).
    Falls back to the dense ``damped_inverse`` (reported) when the iteration fails or yields non-finite
    values (a factor with NaN, say).
    """
    n = matrix.shape[0]
    symmetric = 0.5 * (matrix + matrix.t())
    # Drawn where the generator lives (the CPU), then moved: a CPU generator cannot draw on another device.
    probe = torch.randn(n, min(rank + 8, n), generator=generator, dtype=matrix.dtype).to(matrix.device)
    try:
        basis, _ = torch.linalg.qr(symmetric @ probe)
        for _ in range(2):
            basis, _ = torch.linalg.qr(symmetric @ basis)
        values, vectors = torch.linalg.eigh(basis.t() @ symmetric @ basis)
        values, vectors = values[-rank:].clamp_min(0.0), basis @ vectors[:, -rank:]
        usable = bool(torch.isfinite(values).all() and torch.isfinite(vectors).all())
    except (RuntimeError, torch.linalg.LinAlgError):
        usable = False
    if not usable:
        logger.warning("K-FAC: low-rank eigendecomposition of %s failed; inverting it densely", name)
        return damped_inverse(matrix, shift, name)
    tail_mean = max(float(symmetric.diagonal().sum() - values.sum()), 0.0) / max(n - rank, 1)
    shift = max(shift, 1e-30)
    identity = 1.0 / (tail_mean + shift)
    return vectors, 1.0 / (values + shift) - identity, torch.tensor(identity, dtype=matrix.dtype, device=matrix.device)


def inverse_times(inverse: torch.Tensor | tuple, m: torch.Tensor) -> torch.Tensor:
    """``inverse @ m`` for a dense inverse or a low-rank ``(U, d, c)`` one."""
    if isinstance(inverse, torch.Tensor):
        return inverse @ m
    basis, correction, identity = inverse
    return torch.addmm(m, basis, correction[:, None] * (basis.t() @ m), beta=float(identity))


def times_inverse(m: torch.Tensor, inverse: torch.Tensor | tuple) -> torch.Tensor:
    """``m @ inverse`` for a dense inverse or a low-rank ``(U, d, c)`` one."""
    if isinstance(inverse, torch.Tensor):
        return m @ inverse
    basis, correction, identity = inverse
    return torch.addmm(m, (m @ basis) * correction, basis.t(), beta=float(identity))


def running_average(old: torch.Tensor | None, new: torch.Tensor, decay: float, updates: int) -> torch.Tensor:
    """EMA with decay min(decay, 1 - 1/(n+1)): an exact mean for the first updates (M&G 2015, Sec. 5)."""
    if old is None:
        return new
    rate = min(decay, 1.0 - 1.0 / (updates + 1))
    return old.mul(rate).add_(new, alpha=1.0 - rate)


class Block:
    """A layer K-FAC preconditions: its parameters, running factors (in ``state``) and the solve."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.params = [p for p in module.parameters(recurse=True) if p.requires_grad]

    def update_factors(self, state: dict, records: list[LayerRecord], grad_scale: float, decay: float) -> bool:
        """Fold the records' factors into the running ones; False (nothing stored) when a new factor is
        not finite (overflowing activations or gradients), which the optimizer reports."""
        raise NotImplementedError

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each running factor this layer keeps in its state."""
        raise NotImplementedError

    def saved_state_problem(self, saved: dict) -> str | None:
        """What is wrong with a saved state of this block (None: nothing found). Each factor must have its
        shape here; an inverse formed from a square ``(n, n)`` factor must be ``(n, n)`` or a low-rank
        ``(U (n, k), d (k,), c)``, an eigenbasis ``(values (n,), vectors (n, n))``."""
        for key, shape in self.factor_shapes().items():
            problem = tensor_shape_problem(saved.get(key), shape)
            if problem is not None:
                return f"{key!r} is {problem}, expected a tensor of shape {shape}"
            if len(shape) != 2:
                continue
            n = shape[0]
            inverse, eigen = saved.get(f"inv_{key}"), saved.get(f"eig_{key}")
            low_rank = isinstance(inverse, tuple) and len(inverse) == 3
            basis = inverse[0] if low_rank else None
            k = basis.shape[1] if isinstance(basis, torch.Tensor) and basis.dim() == 2 else -1
            expected = ((n, n),) if not low_rank else ((n, k), (k,), ())
            if inverse is not None and any(tensor_shape_problem(part, want) for part, want in
                                           zip(inverse if low_rank else (inverse,), expected)):
                return (f"'inv_{key}' does not have the shapes of an inverse of its ({n}, {n}) factor: a tensor "
                        f"({n}, {n}) or a low-rank (U ({n}, k), d (k,), c ())")
            if eigen is not None and (not isinstance(eigen, tuple) or len(eigen) != 2 or any(
                    tensor_shape_problem(part, want) for part, want in zip(eigen, ((n,), (n, n))))):
                return (f"'eig_{key}' is not the eigenbasis of its ({n}, {n}) factor: (values ({n},), "
                        f"vectors ({n}, {n}))")
        return None

    @staticmethod
    def _store(state: dict, factors: dict[str, torch.Tensor], decay: float) -> bool:
        """All of ``factors`` into their running averages, or (one of them not finite) none."""
        if not all(bool(torch.isfinite(f).all()) for f in factors.values()):
            return False
        n = state.get("factor_updates", 0)
        for key, factor in factors.items():
            state[key] = running_average(state.get(key), factor, decay, n)
        state["factor_updates"] = n + 1
        return True

    def refresh_inverse(self, state: dict, damping: float, mode: str, rank: int | None, generator: torch.Generator) -> None:
        """Recompute the eigendecompositions / inverses (nothing to do for diagonal blocks); ``rank``: the
        factored mode's low-rank inverse of factors wider than ``2 * rank`` (None: always dense)."""

    def inverse_keys(self, mode: str) -> tuple[str, ...]:
        """The state entries ``refresh_inverse`` writes in damping mode ``mode``."""
        return ()

    def precondition(self, state: dict, damping: float) -> dict[nn.Parameter, torch.Tensor]:
        """``(F_block + damping I)^{-1} grad`` for this block's parameters (absolute ``damping``)."""
        raise NotImplementedError

    def quadratic(self, state: dict, delta: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
        """``delta^T F_block delta`` under this block's approximation."""
        raise NotImplementedError


class KroneckerBlock(Block):
    """nn.Linear, nn.Conv1d, nn.Conv2d (groups=1, numeric padding): full A and G factors."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.weight = module.weight
        # a frozen bias is treated as no bias (its constant input column is dropped from A)
        self.bias = module.bias if module.bias is not None and module.bias.requires_grad else None

    def rows(self, record: LayerRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` rows ``(N, d_in [+1])`` and ``g`` rows ``(N, d_out)``."""
        x, g = record.inputs[0], record.grad_output
        m = self.module
        if isinstance(m, nn.Linear):
            a, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        else:
            unbatched = 2 if isinstance(m, nn.Conv1d) else 3
            if x.dim() == unbatched:  # (C, L) / (C, H, W): a batch of one
                x, g = x.unsqueeze(0), g.unsqueeze(0)
            if isinstance(m, nn.Conv1d):  # (B, C, L) as a (B, C, L, 1) image
                x, g = x.unsqueeze(-1), g.unsqueeze(-1)
                kernel, dil, pad, stride = (m.kernel_size[0], 1), (m.dilation[0], 1), (m.padding[0], 0), (m.stride[0], 1)
            else:
                kernel, dil, pad, stride = m.kernel_size, m.dilation, m.padding, m.stride
            patches = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # (B, C*k, L)
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # (B*L, out)
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a, g

    def update_factors(self, state, records, grad_scale, decay):
        if not records:
            return True
        a_sum, g_sum, n_rows = 0.0, 0.0, 0
        for record in records:
            a, g = self.rows(record)
            a_sum = a_sum + a.t() @ a
            g_sum = g_sum + g.t() @ g
            n_rows += a.shape[0]
        return self._store(state, {"A": a_sum / n_rows, "G": g_sum * grad_scale}, decay)

    def refresh_inverse(self, state, damping, mode, rank, generator) -> None:
        if "A" not in state:
            return
        if mode == "exact":
            state["eig_A"] = robust_eigh(state["A"], f"{self.name} A")
            state["eig_G"] = robust_eigh(state["G"], f"{self.name} G")
            return
        a, g = state["A"], state["G"]
        mean_a, mean_g = float(a.diagonal().mean()), float(g.diagonal().mean())
        pi = math.sqrt(max(mean_a, 1e-30) / max(mean_g, 1e-30))
        if math.isinf(pi) or pi == 0.0:  # trace ratio beyond the float range: keep the old inverses
            logger.warning("K-FAC: factor traces of %s out of range (pi = %g); inverses not refreshed", self.name, pi)
            return
        root = math.sqrt(damping)
        for key, factor, shift in (("A", a, pi * root), ("G", g, root / pi)):
            name = f"{self.name} {key}"
            low_rank = rank is not None and factor.shape[0] > 2 * rank
            state[f"inv_{key}"] = (low_rank_damped_inverse(factor, shift, rank, name, generator) if low_rank
                                   else damped_inverse(factor, shift, name))

    def inverse_keys(self, mode: str) -> tuple[str, ...]:
        return ("eig_A", "eig_G") if mode == "exact" else ("inv_A", "inv_G")

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in = math.prod(self.weight.shape[1:]) + (self.bias is not None)
        d_out = self.weight.shape[0]
        return {"A": (d_in, d_in), "G": (d_out, d_out)}

    def grad_matrix(self, tensors: dict) -> torch.Tensor:
        """``(d_out, d_in [+1])`` matrix of per-parameter tensors, in the factors' (curvature) dtype; a parameter
        without a tensor (frozen after the block was made) contributes zeros."""
        dtype = curvature_dtype(self.weight.dtype)
        weight = tensors.get(self.weight)
        w = (self.weight.new_zeros(self.weight.shape[0], math.prod(self.weight.shape[1:]), dtype=dtype) if weight is None
             else weight.reshape(self.weight.shape[0], -1).to(dtype))
        if self.bias is None:
            return w
        bias = tensors.get(self.bias)
        return torch.cat([w, w.new_zeros(w.shape[0], 1) if bias is None else bias.to(dtype).unsqueeze(1)], dim=1)

    def split(self, matrix: torch.Tensor) -> dict:
        out = {self.weight: matrix[:, : matrix.shape[1] - (self.bias is not None)].reshape(self.weight.shape)}
        if self.bias is not None:
            out[self.bias] = matrix[:, -1].contiguous()
        return out

    def precondition(self, state, damping):
        if self.weight.grad is None:
            return {}
        grad = self.grad_matrix({p: p.grad for p in self.params if p.grad is not None})
        if "inv_A" in state:
            update = self.split(times_inverse(inverse_times(state["inv_G"], grad), state["inv_A"]))
        elif "eig_A" in state:
            (l_a, q_a), (l_g, q_g) = state["eig_A"], state["eig_G"]
            rotated = q_g.t() @ grad @ q_a
            update = self.split(q_g @ (rotated / (l_g[:, None] * l_a[None, :] + damping)) @ q_a.t())
        else:
            return {}
        return {p: u for p, u in update.items() if p.grad is not None}

    def quadratic(self, state, delta):
        if "A" not in state:
            return torch.zeros(())
        d = self.grad_matrix(delta)
        return (d * (state["G"] @ d @ state["A"])).sum()


class EmbeddingBlock(Block):
    """nn.Embedding: A is diagonal (token frequencies, exact for one-hot inputs), G is full."""

    def update_factors(self, state, records, grad_scale, decay):
        if not records:
            return True
        m: nn.Embedding = self.module
        counts = m.weight.new_zeros(m.num_embeddings, dtype=curvature_dtype(m.weight.dtype))
        g_sum, n_rows = 0.0, 0
        for record in records:
            idx = record.inputs[0].reshape(-1)
            g = record.grad_output.reshape(-1, m.embedding_dim)
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
            g_sum = g_sum + g.t() @ g
            n_rows += idx.numel()
        return self._store(state, {"A_diag": counts / n_rows, "G": g_sum * grad_scale}, decay)

    def refresh_inverse(self, state, damping, mode, rank, generator):
        if "G" in state:
            state["eig_G"] = robust_eigh(state["G"], f"{self.name} G")

    def inverse_keys(self, mode: str) -> tuple[str, ...]:
        return ("eig_G",)  # the same in both modes

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        m: nn.Embedding = self.module
        return {"A_diag": (m.num_embeddings,), "G": (m.embedding_dim, m.embedding_dim)}

    def precondition(self, state, damping):
        if "eig_G" not in state:
            return {}
        l_g, q_g = state["eig_G"]
        weight = self.module.weight
        rotated = weight.grad.to(q_g.dtype) @ q_g  # row v: (Q_G^T grad_v)^T, shape (V, D)
        scaled = rotated / (state["A_diag"][:, None] * l_g[None, :] + damping)
        return {weight: scaled @ q_g.t()}

    def quadratic(self, state, delta):
        if "G" not in state:
            return torch.zeros(())
        d = delta[self.module.weight].to(state["G"].dtype)
        return (state["A_diag"][:, None] * d * (d @ state["G"])).sum()


class DiagonalBlock(Block):
    """nn.LayerNorm and ``PerSampleGradients`` layers: the exact per-sample Fisher diagonal."""

    def update_factors(self, state, records, grad_scale, decay):
        if not records:
            return True
        sums = squared_grad_sums([(self.module, record) for record in records])
        return self._store(state, {f"diag{i}": sums[p] * grad_scale for i, p in enumerate(self.params) if p in sums}, decay)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"diag{i}": tuple(p.shape) for i, p in enumerate(self.params)}

    def precondition(self, state, damping):
        return {
            p: p.grad / (state[f"diag{i}"] + damping)
            for i, p in enumerate(self.params)
            if f"diag{i}" in state and p.grad is not None
        }

    def quadratic(self, state, delta):
        total = torch.zeros(())
        for i, p in enumerate(self.params):
            if f"diag{i}" in state and p in delta:
                total = total + (state[f"diag{i}"] * delta[p] ** 2).sum()
        return total


def block_for(module: nn.Module, name: str) -> Block | None:
    """The K-FAC block of ``module``, or None when K-FAC has no factor for it (also for a frozen weight)."""
    if isinstance(module, PerSampleGradients):
        return DiagonalBlock(module, name) if any(p.requires_grad for p in module.parameters()) else None
    if isinstance(module, nn.LayerNorm):
        return DiagonalBlock(module, name) if module.elementwise_affine and module.weight.requires_grad else None
    if isinstance(module, nn.Linear):
        return KroneckerBlock(module, name) if module.weight.requires_grad else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        numeric_padding = not isinstance(module.padding, str) and module.padding_mode == "zeros"
        usable = module.groups == 1 and numeric_padding and module.weight.requires_grad
        return KroneckerBlock(module, name) if usable else None
    if isinstance(module, nn.Embedding):  # a sparse gradient has no dense row-space to precondition
        usable = module.max_norm is None and not module.sparse and module.weight.requires_grad
        return EmbeddingBlock(module, name) if usable else None
    return None


_FACTORED_KINDS = (PerSampleGradients, nn.LayerNorm, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _holds_matrix(params) -> bool:
    """Whether any trainable parameter has two or more dimensions (a weight matrix or kernel, not a scale)."""
    return any(p.requires_grad and p.dim() >= 2 for p in params)


def _dreidel_layer(module: nn.Module) -> bool:
    """dreidel's own layers: what they keep outside K-FAC blocks (the depthwise kernel of Conv2dSpectral, whose
    channel mixing is factored) takes plain steps by design, not worth a warning."""
    return type(module).__module__.split(".")[0] == "dreidel"


def find_blocks(model: nn.Module) -> tuple[list[Block], list[tuple[str, bool]], list[str]]:
    """K-FAC blocks of ``model`` (a matched module's children are not visited); the modules that own trainable
    parameters but have no block, each as ``(description, whether one of them is a matrix or kernel)``; and
    the names of layers of a kind K-FAC factors whose parameters are all frozen (no block either: were they
    unfrozen later, the base optimizer alone would train them)."""
    blocks: list[Block] = []
    unsupported: list[tuple[str, bool]] = []
    frozen: list[str] = []
    visited: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        # A module registered under two parents (``self.shared = layer`` and ``self.enc = Sequential(layer)``)
        # is one layer: a second block would put a second hook on it and count its factors twice.
        if id(module) in visited:
            return
        visited.add(id(module))
        if parametrize.is_parametrized(module):
            # its weight is computed from the parameters (weight norm, orthogonal, ...): a factor of the weight's
            # gradient preconditions no parameter
            if any(p.requires_grad for p in module.parameters()):
                unsupported.append((f"{name or '<root>'} ({type(module).__name__}, parametrized)",
                                    _holds_matrix(module.parameters())))
            return
        block = block_for(module, name or type(module).__name__)
        if block is not None:
            blocks.append(block)
            return
        own = list(module.parameters(recurse=False))
        if isinstance(module, _FACTORED_KINDS) and own and not any(p.requires_grad for p in own):
            frozen.append(name or type(module).__name__)
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            unsupported.append((f"{name or '<root>'} ({type(module).__name__})",
                                _holds_matrix(module.parameters(recurse=False)) and not _dreidel_layer(module)))
        if isinstance(module, nn.MultiheadAttention):
            # it uses out_proj's weight functionally, never calling the Linear: no factors would come
            for child_name, child in module.named_children():
                if any(p.requires_grad for p in child.parameters()):
                    where = f"{name}.{child_name}" if name else child_name
                    unsupported.append((f"{where} ({type(child).__name__} inside MultiheadAttention)",
                                        _holds_matrix(child.parameters())))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    # A parameter owned by two blocks, or by a block and another module (a tied embedding / output
    # head), would get two conflicting factor sets in one state slot: left to the base optimizer.
    owners = parameter_owners(model, [b.module for b in blocks])
    shared = [b for b in blocks if any(len(owners[p]) > 1 for p in b.params)]
    for block in shared:
        unsupported.append((f"{block.name} ({type(block.module).__name__}, shares a parameter with another module)",
                            _holds_matrix(block.params)))
    return [b for b in blocks if b not in shared], unsupported, frozen
