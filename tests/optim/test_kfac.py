"""K-FAC against explicit oracles: factors by brute force, the damped Kronecker solve in float64, and
the exact natural gradient of a single linear layer with a Gaussian likelihood."""

from __future__ import annotations

import copy
import logging
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _optim_helpers import resumed_copy, train_step
from dreidel.layers import Conv2dSpectral, LinearWHT
from dreidel.optim import KFAC
from dreidel.optim._kfac_blocks import robust_eigh




def mse(out, y):
    return F.mse_loss(out, y)


def plain_kfac(model, **kwargs):
    """K-FAC whose step is exactly ``p <- p - precond``: no KL clip, fixed damping, plain SGD lr 1."""
    options = dict(lr=1.0, momentum=0.0, kl_clip=None, adapt_damping=False, damping=1e-2, damping_mode="exact")
    return KFAC(model, **{**options, **kwargs})


def output_grad(model, layer, x, y, loss_fn):
    """dL/d(layer output) by autograd, independent of the optimizer's hooks."""
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.update(out=o))
    loss = loss_fn(model(x), y)
    handle.remove()
    return torch.autograd.grad(loss, kept["out"])[0]


def conv_patches_by_loops(x, conv: nn.Conv2d):
    """Patch rows ``(B * Ho * Wo, C * kh * kw)`` by explicit slicing of the zero-padded input."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for b in range(x.shape[0]):
        for i in range(0, padded.shape[2] - kh + 1, sh):
            for j in range(0, padded.shape[3] - kw + 1, sw):
                rows.append(padded[b, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("input_shape", [(6, 5), (3, 4, 5)], ids=["2d", "sequence"])
def test_linear_factors_equal_definitions(input_shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(input_shape), torch.randn(*input_shape[:-1], 3)
    opt = plain_kfac(model)
    g = output_grad(model, model[0], x, y, mse).reshape(-1, 4)
    train_step(model, opt, mse, x, y)  # factors from the step's (empirical) backward, before the update
    a = torch.cat([x.reshape(-1, 5), torch.ones(g.shape[0], 1)], dim=1)
    state = opt.state[model[0].weight]
    torch.testing.assert_close(state["A"], a.t() @ a / a.shape[0])
    torch.testing.assert_close(state["G"], g.shape[0] * g.t() @ g)  # scaled by the mean loss's B or B * T terms


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv2d_factors_equal_definitions(stride, padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 2, 5, 5)
    y = torch.randn_like(model(x))
    opt = plain_kfac(model)
    g = output_grad(model, conv, x, y, mse)  # (B, out, Ho, Wo)
    train_step(model, opt, mse, x, y)
    patches = conv_patches_by_loops(x, conv)
    a = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
    g_rows = g.permute(0, 2, 3, 1).reshape(-1, 3)
    state = opt.state[conv.weight]
    torch.testing.assert_close(state["A"], a.t() @ a / a.shape[0])
    torch.testing.assert_close(state["G"], x.shape[0] * g_rows.t() @ g_rows)


def test_conv1d_factors_equal_definitions():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 2, 6)
    y = torch.randn_like(model(x))
    opt = plain_kfac(model)
    g = output_grad(model, conv, x, y, mse)
    train_step(model, opt, mse, x, y)
    padded = F.pad(x, (1, 1))
    a = torch.stack([padded[b, :, t : t + 3].reshape(-1) for b in range(2) for t in range(6)])
    g_rows = g.permute(0, 2, 1).reshape(-1, 3)
    torch.testing.assert_close(opt.state[conv.weight]["A"], a.t() @ a / a.shape[0])
    torch.testing.assert_close(opt.state[conv.weight]["G"], 2 * g_rows.t() @ g_rows)


def test_embedding_factors_and_step_equal_explicit_solve():
    torch.manual_seed(3)
    emb = nn.Embedding(7, 4)
    model = nn.Sequential(emb, nn.Flatten())
    idx = torch.tensor([[1, 2], [2, 5], [1, 1]])
    y = torch.randn(3, 8)
    opt = plain_kfac(model, damping=0.05)
    g = output_grad(model, emb, idx, y, mse).reshape(-1, 4)
    before = emb.weight.detach().clone()
    model.zero_grad()
    mse(model(idx), y).backward()
    grad = emb.weight.grad.clone()
    train_step(model, opt, mse, idx, y)
    counts = torch.bincount(idx.reshape(-1), minlength=7).double() / idx.numel()
    gg = 3 * g.t() @ g
    torch.testing.assert_close(opt.state[emb.weight]["A_diag"], counts)
    torch.testing.assert_close(opt.state[emb.weight]["G"], gg)
    absolute = 0.05
    fisher = torch.kron(torch.diag(counts), gg) + absolute * torch.eye(28)  # row-major vec of (7, 4)
    expected = torch.linalg.solve(fisher, grad.reshape(-1)).reshape(7, 4)
    torch.testing.assert_close(before - emb.weight.detach(), expected)


@pytest.mark.parametrize("bias", [True, False])
def test_step_equals_explicit_damped_kronecker_solve(bias):
    """p_new = p - (G ⊗ A + lambda I)^{-1} vec([grad_W, grad_b]) with the Kronecker matrix in float64."""
    torch.manual_seed(4)
    layer = nn.Linear(4, 3, bias=bias)
    model = nn.Sequential(layer)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    damping = 0.03
    opt = plain_kfac(model, damping=damping)
    model.zero_grad()
    mse(model(x), y).backward()
    grads = [layer.weight.grad.clone()] + ([layer.bias.grad.clone().unsqueeze(1)] if bias else [])
    gamma = torch.cat(grads, dim=1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, mse, x, y)
    state = opt.state[layer.weight]
    absolute = damping
    kron = torch.kron(state["G"], state["A"]) + absolute * torch.eye(gamma.numel())
    expected = torch.linalg.solve(kron, gamma.reshape(-1)).reshape(gamma.shape)
    torch.testing.assert_close(before[0] - layer.weight.detach(), expected[:, :4])
    if bias:
        torch.testing.assert_close(before[1] - layer.bias.detach(), expected[:, 4])


def test_factored_damping_step_equals_explicit_kronecker_of_damped_factors():
    """damping_mode="factored": p_new = p - ((G + sqrt(l)/pi I) ⊗ (A + pi sqrt(l) I))^{-1} vec(Gamma)."""
    torch.manual_seed(12)
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    damping = 0.03
    opt = plain_kfac(model, damping=damping, damping_mode="factored")
    model.zero_grad()
    mse(model(x), y).backward()
    gamma = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], dim=1).clone()
    before = layer.weight.detach().clone()
    train_step(model, opt, mse, x, y)
    a, g = opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]
    pi = ((a.trace() / 5) / (g.trace() / 3)).sqrt()
    root = damping**0.5
    kron = torch.kron(g + root / pi * torch.eye(3), a + pi * root * torch.eye(5))
    expected = torch.linalg.solve(kron, gamma.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(before - layer.weight.detach(), expected[:, :4])


def test_single_linear_gaussian_step_is_exact_natural_gradient():
    """One linear layer, Gaussian likelihood (MSE): F = G ⊗ A exactly (G = (2/out) I, A = E[a a^T]), so
    the K-FAC step is the exact natural-gradient step (F + lambda I)^{-1} g, F the loss Hessian (= GN).
    G comes from sampled outputs: equal up to Monte-Carlo error, here ~1% with 24k sampled rows."""
    torch.manual_seed(5)
    layer = nn.Linear(3, 2)
    model = nn.Sequential(layer)
    base_x = torch.randn(12, 3) + 0.5
    x = base_x.repeat(2000, 1)
    y = torch.randn(12, 2).repeat(2000, 1)
    opt = plain_kfac(model, likelihood="gaussian", damping=1e-3, seed=0)
    theta = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1).reshape(-1)

    def loss_of(flat):
        w = flat.reshape(2, 4)
        return F.mse_loss(x @ w[:, :3].t() + w[:, 3], y)

    flat = theta.clone().requires_grad_()
    grad = torch.autograd.grad(loss_of(flat), flat)[0]
    hessian = torch.autograd.functional.hessian(loss_of, theta)
    train_step(model, opt, mse, x, y)
    damping = opt.damping
    expected = torch.linalg.solve(hessian + damping * torch.eye(8), grad)
    after = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1).reshape(-1)
    torch.testing.assert_close(theta - after, expected, rtol=0.05, atol=1e-3 * expected.abs().max())


@pytest.mark.parametrize("kind", ["layernorm", "linear_wht"])
def test_diagonal_factor_equals_per_sample_fisher(kind):
    """LayerNorm and PerSampleGradients layers: diag = B * sum_i (per-sample grad)^2, by a loop."""
    from _optim_helpers import brute_force_per_sample_grads

    torch.manual_seed(6)
    layer = nn.LayerNorm(8) if kind == "layernorm" else LinearWHT(8, 8, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    opt = plain_kfac(model)
    params = list(layer.parameters())
    per_sample = brute_force_per_sample_grads(model, mse, x, y, params)
    train_step(model, opt, mse, x, y)
    state = opt.state[params[0]]
    for i, grads in enumerate(per_sample):
        torch.testing.assert_close(state[f"diag{i}"], 6 * (grads**2).sum(0))


def test_mixed_model_trains_with_every_block_kind():
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Embedding(10, 6), nn.LayerNorm(6), nn.Flatten(), nn.Unflatten(1, (1, 4, 6)),
        nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(48, 8), LinearWHT(8, 8, dtype=torch.float64),
        nn.Linear(8, 3),
    )
    opt = KFAC(model, lr=0.05, likelihood="categorical", factor_every=1, inverse_every=2)
    kinds = sorted({type(b).__name__ for b in opt.blocks})
    assert kinds == ["DiagonalBlock", "EmbeddingBlock", "KroneckerBlock"]
    x, y = torch.randint(0, 10, (16, 4)), torch.randint(0, 3, (16,))
    losses = [train_step(model, opt, F.cross_entropy, x, y) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unsupported_layers_logged_once_and_left_to_base(caplog):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with caplog.at_level(logging.INFO, logger="dreidel.optim"):
        opt = KFAC(model, lr=0.1)
        before = model[1].weight.detach().clone()
        for _ in range(3):
            train_step(model, opt, mse, x, y)
    messages = [r.getMessage() for r in caplog.records if "no curvature factors" in r.getMessage()]
    assert len(messages) == 1 and "PReLU" in messages[0]
    assert not torch.equal(before, model[1].weight.detach())


@pytest.mark.parametrize("make, named", [
    (lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten()), "0 (Conv3d)"),
    (lambda: nn.GRU(4, 4), "<root> (GRU)"),
    (lambda: nn.MultiheadAttention(8, 2), "out_proj (NonDynamicallyQuantizableLinear inside MultiheadAttention)"),
])
def test_weight_matrices_left_to_the_base_optimizer_are_a_warning(make, named, caplog):
    """They were named only at INFO level, so a user who chose K-FAC for a recurrent or attention model was not
    told its weights got plain steps (a user audit). Scales and shifts alone (BatchNorm, PReLU) stay in the
    log: leaving them to the base optimizer is the usual choice."""
    with pytest.warns(UserWarning, match="no curvature factors for the weights of .*" + re.escape(named)):
        KFAC(make())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="dreidel.optim"):
            KFAC(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.PReLU(), nn.Linear(4, 2)))
            # dreidel's own layers: Conv2dSpectral's depthwise kernel takes plain steps by design
            KFAC(nn.Sequential(Conv2dSpectral(3, 8, 3), nn.Flatten()))
    assert "1 (BatchNorm1d), 2 (PReLU)" in caplog.text and "0 (Conv2dSpectral)" in caplog.text


def test_failed_decomposition_retries_with_jitter(monkeypatch, caplog):
    calls = {"n": 0}
    real_eigh = torch.linalg.eigh

    def flaky(matrix):
        calls["n"] += 1
        if calls["n"] <= 3:  # the plain, the small-jitter and the float64 attempts fail
            raise torch.linalg.LinAlgError("simulated failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    matrix = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        values, vectors = robust_eigh(matrix, "test factor")
    # the successful attempt added a jitter of 1e-4 x the mean diagonal
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.t(), matrix, atol=3e-4, rtol=0)
    assert any("jitter" in r.getMessage() for r in caplog.records)
    assert values.dtype == matrix.dtype


@pytest.mark.parametrize(
    "mode,rank,message",
    [("exact", None, "identity"), ("factored", 1, "low-rank")],  # low rank: A is 4 wide > 2 * rank
    ids=["exact", "low_rank"],
)
def test_nan_factor_falls_back_and_never_nan_weights(caplog, mode, rank, message):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    opt = plain_kfac(model, damping_mode=mode, factor_rank=rank)
    train_step(model, opt, mse, x, y)
    opt.state[model[0].weight]["A"].fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        for block in opt.blocks:
            block.refresh_inverse(opt.state[block.params[0]], opt.block_damping(block), mode, rank, opt.generator)
        train_step(model, opt, mse, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(message in r.getMessage() for r in caplog.records)


def test_non_finite_loss_skips_step(caplog):
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.full((4, 2), float("nan"))
    opt = KFAC(model)
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        train_step(model, opt, mse, x, y)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert any("non-finite gradient" in r.getMessage() for r in caplog.records)


def test_kl_clip_bounds_predicted_change():
    """Clipped step nu*u with lr^2 nu^2 g^T u = kl_clip, u the unclipped preconditioned gradient."""
    torch.manual_seed(9)
    x, y = torch.randn(16, 4), 100 * torch.randn(16, 3)
    kl_clip, lr = 1e-4, 0.5
    steps = {}
    for clip in (None, kl_clip):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(4, 3))
        opt = KFAC(model, lr=lr, momentum=0.0, kl_clip=clip, adapt_damping=False)
        model.zero_grad()
        mse(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, mse, x, y)
        steps[clip] = [(b - p.detach()) / lr for b, p in zip(before, model.parameters())]
    unclipped = lr * lr * sum(float((g * u).sum()) for g, u in zip(grads, steps[None]))
    assert unclipped > kl_clip
    nu = float(steps[kl_clip][0].norm() / steps[None][0].norm())
    torch.testing.assert_close(steps[kl_clip][1], nu * steps[None][1])
    assert nu * nu * unclipped == pytest.approx(kl_clip, rel=1e-6)


def test_adaptive_damping_moves_and_stays_in_bounds():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = KFAC(model, lr=0.1, damping=1e-2, damping_every=1, min_damping=1e-4, max_damping=1.0)
    for _ in range(20):
        train_step(model, opt, mse, x, y)
    assert opt.damping != 1e-2 and 1e-4 <= opt.damping <= 1.0


@pytest.mark.parametrize("worse_after", [1.0, 10.0], ids=["good-steps", "bad-steps"])
def test_adaptive_damping_follows_the_reduction_ratio(worse_after):
    """Levenberg-Marquardt (Martens & Grosse 2015, Sec. 6.5) on an exactly quadratic loss (linear least squares):
    small steps reduce it as the model predicts (rho near 1), so the damping falls; a closure that reports the
    loss after each step ten times worse (rho < 0) must make it rise. Only 'moved and stayed in bounds' used to be
    checked: the rule inverted passed (a review's mutation)."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    opt = KFAC(model, lr=0.05, momentum=0.0, damping=1e-2, damping_every=1, kl_clip=None, min_damping=1e-8,
               max_damping=1e4)
    for _ in range(5):
        evaluations = []

        def closure():  # before the step (loss0), then after it (loss1)
            evaluations.append(None)
            return mse(model(x), y) * (worse_after if len(evaluations) == 2 else 1.0)

        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(closure)
        assert len(evaluations) == 2
    assert opt.damping < 1e-2 if worse_after == 1.0 else opt.damping > 1e-2


def least_squares(seed: int):
    """A Linear(4, 2) and 64 random rows: an exactly quadratic loss under ``mse``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 2)), torch.randn(64, 4), torch.randn(64, 2)


@pytest.mark.parametrize("after", ["rose", "fell"])
def test_a_step_the_damped_model_predicts_no_decrease_for_raises_the_damping_if_the_loss_rose(after):
    """lr 3 in exact mode, factors and inverses fresh at every step: the step is -3 (F + l I)^{-1} g, for which the
    damped model predicts 3 (3/2 - 1) g^T (F + l I)^{-1} g > 0 whatever the damping, so rho's sign is inverted. A
    loss reported higher after the step must raise the damping by 1/omega at each step, as rho < 1/4 does
    (Martens & Grosse 2015, Sec. 6.5); it used to stay where it was, and an overshooting lr diverged. A loss
    reported lower is no evidence either way: the damping stays."""
    model, x, y = least_squares(seed=10)
    opt = KFAC(model, lr=3.0, momentum=0.0, damping=1e-2, damping_every=1, kl_clip=None, damping_mode="exact",
               factor_every=1, inverse_every=1)
    for _ in range(5):
        evaluations = []

        def closure():  # before the step (loss0), then after it: 10 loss0 or loss0 / 2
            if not evaluations:
                evaluations.append(mse(model(x), y))
            else:
                evaluations.append(evaluations[0] * (10.0 if after == "rose" else 0.5))
            return evaluations[-1]

        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(closure)
        assert len(evaluations) == 2
    assert opt.damping == pytest.approx(1e-2 * (20 / 19) ** 5 if after == "rose" else 1e-2, rel=1e-12)


def test_an_overshooting_lr_raises_the_damping_until_least_squares_converges():
    """Least squares with lr 3, past the damped model's minimum: the loss rises at first (to ~280), the rises raise
    the damping, which shortens the step, and training reaches the least-squares optimum. With the damping left
    alone on such steps it stayed at 1e-2 and the loss was 256 after these 150 steps."""
    model, x, y = least_squares(seed=0)
    inputs = torch.cat([x, torch.ones(64, 1)], dim=1)
    optimum = float(mse(inputs @ torch.linalg.lstsq(inputs, y).solution, y))
    opt = KFAC(model, lr=3.0, momentum=0.0, damping=1e-2, damping_every=1, kl_clip=None)
    losses = [train_step(model, opt, mse, x, y) for _ in range(150)]
    assert max(losses) > 100 * losses[0]  # it did overshoot
    assert losses[-1] == pytest.approx(optimum, rel=1e-4)
    assert 1e-2 < opt.damping < 1.0


def test_a_well_tuned_lr_lowers_the_damping_at_every_step():
    """lr 0.5 on least squares: every step is one the damped model predicts a decrease for and the loss falls about
    as predicted (rho > 3/4), so the damping falls by omega at each step, whatever the rule for the other steps."""
    model, x, y = least_squares(seed=0)
    opt = KFAC(model, lr=0.5, momentum=0.0, damping=1e-2, damping_every=1, kl_clip=None)
    for step in range(1, 11):
        train_step(model, opt, mse, x, y)
        assert opt.damping == pytest.approx(1e-2 * 0.95**step, rel=1e-12)


@pytest.mark.parametrize("after", ["as-predicted", "worse"])
def test_a_step_the_kl_clip_shortened_does_not_lower_the_damping(after):
    """lr 0.5 on least squares lowers the damping by omega at every step when the KL clip leaves the step whole
    (the test above). A clip of 1e-9 shortens every step, whose quadratic term is then negligible: rho is ~1
    whatever the damping and is no evidence for a lower one, so the damping stays (Nocedal & Wright 2006,
    Alg. 4.1: a trust region grows only after a step that reached it). A loss reported ten times higher after the
    step (rho < 1/4) still raises it by 1/omega each step."""
    model, x, y = least_squares(seed=0)
    opt = KFAC(model, lr=0.5, momentum=0.0, damping=1e-2, damping_every=1, kl_clip=1e-9)
    for _ in range(5):
        evaluations = []

        def closure():  # before the step (loss0), then after it
            evaluations.append(None)
            return mse(model(x), y) * (10.0 if after == "worse" and len(evaluations) == 2 else 1.0)

        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(closure)
        assert len(evaluations) == 2
    assert opt.damping == pytest.approx(1e-2 if after == "as-predicted" else 1e-2 * (20 / 19) ** 5, rel=1e-12)


def rare_feature_classes(generator: torch.Generator, rows: int = 1024, common: int = 32, rare: int = 32):
    """``(rows, common + rare)`` nonnegative inputs and 10 classes from a linear teacher on the common features; each
    rare feature is nonzero in ~0.5% of the rows (like MNIST's border pixels)."""
    x = torch.relu(torch.randn(rows, common + rare, generator=generator))
    x[:, common:] *= 3.0 * (torch.rand(rows, rare, generator=generator) < 0.005)
    teacher = torch.randn(common, 10, generator=generator)
    return x, (x[:, :common] @ teacher).argmax(1)


def test_a_spectral_mlp_with_rare_inputs_trains_without_blowing_up_under_a_binding_kl_clip():
    """benchmarks/optimizers.py's tuned K-FAC for the LinearWHT MLP (lr 1, KL clip 1e-4, damping 1e-2, cadence 10)
    on inputs with rare features. The clip binds at every step; when clipped steps lowered the damping it reached
    min_damping (1e-8) by step ~270, the input scales of the rare features (Fisher diagonal ~0) took steps of
    several units, and the batch loss went back above its start after step 100: to 88 here, to 13-316 on each of
    seeds 0-11. The damping now stays at 1e-2 and no batch loss after step 100 exceeds 1.9 on those seeds."""
    gen = torch.Generator().manual_seed(0)
    x, y = rare_feature_classes(gen)
    torch.manual_seed(0)  # nn.Linear's initialisation
    model = nn.Sequential(LinearWHT(64, 64, activation="relu", generator=gen),
                          LinearWHT(64, 64, activation="relu", generator=gen), nn.Linear(64, 10))
    opt = KFAC(model, lr=1.0, momentum=0.5, kl_clip=1e-4, damping=1e-2, factor_every=10, damping_every=10,
               factor_warmup=0, likelihood="categorical")
    order = torch.randperm(x.shape[0], generator=gen)
    losses = [train_step(model, opt, F.cross_entropy, x[rows], y[rows]) for rows in order.repeat(38).split(64)[:600]]
    assert max(losses[100:]) < losses[0]
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < losses[0] / 2


def test_damped_inverse_matches_explicit_inverse_and_survives_non_pd(caplog):
    from dreidel.optim._kfac_blocks import damped_inverse

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 3, generator=gen)
    factor = m @ m.t()  # rank 3: PSD, singular
    torch.testing.assert_close(damped_inverse(factor, 0.1, "f"), torch.linalg.inv(factor + 0.1 * torch.eye(5)))
    indefinite = torch.diag(torch.tensor([1.0, -5.0, 2.0]))
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        inverse = damped_inverse(indefinite, 0.1, "bad")
    torch.testing.assert_close(inverse, torch.diag(torch.tensor([1 / 1.1, 1 / 0.1, 1 / 2.1])))
    assert any("Cholesky" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "likelihood,warmup,expected",
    [
        ("gaussian", 0, [2, 0, 0, 0, 0] * 2),  # sampled backward (= loss before) + loss after
        ("empirical", 0, [2, 0, 0, 0, 0] * 2),  # loss before + loss after
        ("gaussian", 3, [2, 1, 1, 0, 0, 2, 0, 0, 0, 0]),  # warm-up: a sampled backward on every step
    ],
)
def test_closure_calls_follow_factor_and_damping_schedule(likelihood, warmup, expected):
    """Damping adaptation at steps 0, 5, ... in phase with the factor steps, so a sampled factor step's
    forward doubles as the loss before the step; factors on every step during ``factor_warmup``."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = KFAC(model, likelihood=likelihood, factor_every=5, damping_every=5, factor_warmup=warmup)
    calls = []
    for step in range(10):
        count = [0]

        def closure():
            count[0] += 1
            return mse(model(x), y)

        opt.zero_grad()
        mse(model(x), y).backward()
        assert opt.closure_required(step) == (expected[step] > 0)
        opt.step(closure)
        calls.append(count[0])
    assert calls == expected


def eigen_truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Oracle of the low-rank factor in float64: top ``rank`` eigenpairs kept, the rest set to their mean."""
    values, vectors = torch.linalg.eigh(matrix.double())
    tail = values[:-rank].mean()
    kept = torch.cat([torch.full_like(values[:-rank], float(tail)), values[-rank:]])
    return (vectors * kept) @ vectors.t()


def test_low_rank_damped_inverse_equals_inverse_of_truncated_factor():
    from dreidel.optim._kfac_blocks import inverse_times, low_rank_damped_inverse, times_inverse

    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    factor = (q * 2.0 ** -torch.arange(40.0, dtype=torch.float64)) @ q.t()  # decaying spectrum
    shift, rank = 1e-3, 6
    inverse = low_rank_damped_inverse(factor, shift, rank, "f", torch.Generator().manual_seed(0))
    expected = torch.linalg.inv(eigen_truncated(factor, rank) + shift * torch.eye(40, dtype=torch.float64))
    m = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    tolerance = dict(rtol=1e-5, atol=1e-6 * float((expected @ m).abs().max()))
    torch.testing.assert_close(inverse_times(inverse, m), expected @ m, **tolerance)
    torch.testing.assert_close(times_inverse(m.t(), inverse), m.t() @ expected, **tolerance)
    basis, correction, identity = inverse
    assert basis.shape == (40, rank) and correction.shape == (rank,) and identity.dim() == 0


def test_low_rank_step_equals_explicit_kronecker_of_truncated_factors():
    """factor_rank=k: A (13 wide > 2k) is replaced by its rank-k truncation with the tail at its mean;
    G (3 wide <= 2k) stays dense; then the step is the factored-damping Kronecker solve."""
    torch.manual_seed(14)
    layer = nn.Linear(12, 3)
    model = nn.Sequential(layer)
    scales = 2.0 ** -torch.arange(12.0)  # inputs with a decaying covariance spectrum
    x, y = torch.randn(64, 12) * scales, torch.randn(64, 3)
    damping, rank = 0.03, 2
    opt = plain_kfac(model, damping=damping, damping_mode="factored", factor_rank=rank)
    model.zero_grad()
    mse(model(x), y).backward()
    gamma = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], dim=1).double()
    before = layer.weight.detach().clone()
    train_step(model, opt, mse, x, y)
    state = opt.state[layer.weight]
    assert isinstance(state["inv_A"], tuple) and isinstance(state["inv_G"], torch.Tensor)
    a, g = state["A"].double(), state["G"].double()
    pi = ((a.trace() / 13) / (g.trace() / 3)).sqrt()
    root = damping**0.5
    a_hat = eigen_truncated(a, rank)
    kron = torch.kron(g + root / pi * torch.eye(3, dtype=torch.float64), a_hat + pi * root * torch.eye(13, dtype=torch.float64))
    expected = torch.linalg.solve(kron, gamma.reshape(-1)).reshape(3, 13)
    torch.testing.assert_close((before - layer.weight.detach()).double(), expected[:, :12], rtol=2e-3, atol=1e-5)


def test_low_rank_state_loads_with_weights_only(tmp_path):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = KFAC(model, factor_rank=2, inverse_every=1)
    x, y = torch.randn(16, 10), torch.randn(16, 2)
    train_step(model, opt, mse, x, y)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    resumed = KFAC(model, factor_rank=2, inverse_every=1)
    resumed.load_state_dict(state)
    assert isinstance(resumed.state[model[0].weight]["inv_A"], tuple)


@pytest.mark.parametrize("kwargs, error", [({"factor_rank": 0}, ValueError), ({"factor_rank": 2.5}, TypeError),
                                           ({"factor_rank": True}, TypeError),
                                           ({"factor_rank": 4, "damping_mode": "exact"}, ValueError)])
def test_bad_factor_rank_names_the_argument(kwargs, error):
    with pytest.raises(error, match="factor_rank"):
        KFAC(nn.Sequential(nn.Linear(3, 2)), **kwargs)


@pytest.mark.parametrize("kwargs, error", [({"seed": 2**64}, ValueError), ({"seed": -(2**63) - 1}, ValueError),
                                           ({"momentum": 5.0}, ValueError), ({"momentum": 1.0}, ValueError),
                                           ({"min_damping": 0.0, "damping": 1e-3}, ValueError)])
def test_out_of_range_arguments_name_the_argument(kwargs, error):
    """A seed beyond torch.Generator's range used to fail inside it ("Overflow when unpacking long long"); a
    momentum of 1 or more diverges; a damping floor of 0 lets the damping reach 0, which "x10" never raises."""
    with pytest.raises(error, match=next(iter(kwargs))):
        KFAC(nn.Sequential(nn.Linear(3, 2)), **kwargs)


def test_numpy_integers_are_taken_where_ints_are():
    import numpy as np

    model = nn.Sequential(nn.Linear(8, 6))
    KFAC(model, seed=np.int64(3), factor_rank=np.int64(2), factor_warmup=np.int64(1))


class TiedLM(nn.Module):
    """GPT-2-style tied embedding and output head, plus an untied Linear that keeps its block."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class TwoLinearsOneWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["tied_lm", "two_linears"])
def test_shared_weights_are_left_to_the_base_optimizer(kind):
    """A weight owned by two modules gets no factors (never mixed, never a crash): its step is plain SGD."""
    torch.manual_seed(0)
    if kind == "tied_lm":
        model, shared, owners = TiedLM(), None, ("emb", "head")
        x, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4, 3))
        loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, 7), t.reshape(-1))  # noqa: E731
        shared = model.emb.weight
    else:
        model, owners = TwoLinearsOneWeight(), ("a", "b")
        x, y = torch.randn(6, 4), torch.randn(6, 4)
        loss_fn, shared = mse, model.a.weight
    with pytest.warns(UserWarning, match="no curvature factors") as warned:  # weight matrices: a warning
        opt = plain_kfac(model)
    assert not {b.name for b in opt.blocks} & set(owners)
    message = next(str(w.message) for w in warned if "no curvature factors" in str(w.message))
    assert all(message.count(f"{name} (") == 1 for name in owners)
    before = shared.detach().clone()
    grad = torch.autograd.grad(loss_fn(model(x), y), shared)[0]
    train_step(model, opt, loss_fn, x, y)
    torch.testing.assert_close(shared.detach(), before - grad)
    assert "A" not in opt.state[shared] and "A_diag" not in opt.state[shared]
    if kind == "tied_lm":
        assert "mix" in {b.name for b in opt.blocks} and "A" in opt.state[model.mix.weight]


@pytest.mark.parametrize(
    "kwargs,error,name",
    [({"lr": float("nan")}, ValueError, "lr"), ({"lr": "0.1"}, TypeError, "lr"), ({"momentum": -1.0}, ValueError, "momentum"),
     ({"weight_decay": -1.0}, ValueError, "weight_decay"), ({"damping": 0.0}, ValueError, "damping"),
     ({"damping": float("inf")}, ValueError, "damping"), ({"factor_decay": 1.0}, ValueError, "factor_decay"),
     ({"factor_every": 2.5}, TypeError, "factor_every"), ({"inverse_every": 0}, ValueError, "inverse_every"),
     ({"damping_every": True}, TypeError, "damping_every"), ({"factor_warmup": -1}, ValueError, "factor_warmup"),
     ({"kl_clip": float("nan")}, ValueError, "kl_clip"), ({"min_damping": -1.0}, ValueError, "min_damping"),
     ({"min_damping": 10.0, "max_damping": 1.0, "damping": 5.0}, ValueError, "min_damping"),
     ({"max_damping": float("inf")}, ValueError, "max_damping"), ({"damping": 1e6}, ValueError, "damping"),
     ({"damping": 1e-9, "min_damping": 1e-8}, ValueError, "damping"), ({"adapt_damping": "yes"}, TypeError, "adapt_damping"),
     ({"base": 3}, TypeError, "base"), ({"base": lambda params: 5}, TypeError, "base"),
     ({"lr": 0.5, "base": lambda params: torch.optim.Adam(params)}, ValueError, "lr"),
     ({"momentum": 0.0, "base": lambda params: torch.optim.Adam(params)}, ValueError, "momentum"),
     ({"weight_decay": 0.1, "base": lambda params: torch.optim.Adam(params)}, ValueError, "weight_decay")],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        KFAC(nn.Sequential(nn.Linear(3, 2)), **kwargs)


def test_default_sgd_options_and_base_factory():
    model = nn.Sequential(nn.Linear(3, 2))
    group = KFAC(model).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 0.0)
    opt = KFAC(model, base=lambda params: torch.optim.Adam(params, lr=1e-3))
    assert isinstance(opt.base, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3


def test_sparse_embedding_and_attention_projections_are_left_to_the_base():
    """A sparse Embedding has no dense gradient to precondition; MultiheadAttention uses out_proj's weight
    without calling it (no factors would ever come): both listed once, both stepped by plain SGD."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 6, sparse=True)
            self.att = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, tokens):
            h = self.emb(tokens)
            return self.head(self.att(h, h, h)[0].mean(1))

    torch.manual_seed(0)
    model = Model()
    x, y = torch.randint(0, 7, (4, 5)), torch.randn(4, 2)
    with pytest.warns(UserWarning, match="no curvature factors") as warned:  # weight matrices: a warning
        opt = plain_kfac(model)
    assert [b.name for b in opt.blocks] == ["head"]
    message = next(str(w.message) for w in warned if "no curvature factors" in str(w.message))
    assert "emb (Embedding)" in message and "att.out_proj (" in message
    loss = mse(model(x), y)
    grad_emb, grad_out = torch.autograd.grad(loss, [model.emb.weight, model.att.out_proj.weight])
    before = model.emb.weight.detach().clone(), model.att.out_proj.weight.detach().clone()
    train_step(model, opt, mse, x, y)
    torch.testing.assert_close(model.emb.weight.detach(), before[0] - grad_emb.to_dense())
    torch.testing.assert_close(model.att.out_proj.weight.detach(), before[1] - grad_out)


def test_overflowing_gradients_skip_factors_and_step_with_warnings(caplog):
    """Factors that overflow are not stored; a non-finite predicted KL skips the step and raises the damping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = KFAC(model, factor_every=1, inverse_every=1, adapt_damping=False)
    train_step(model, opt, mse, x, y)
    factors = {k: v.clone() for k, v in opt.state[model[0].weight].items() if k in ("A", "G")}
    before = [p.detach().clone() for p in model.parameters()]
    damping = opt.damping
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        train_step(model, opt, lambda out, t: 1e200 * mse(out, t), x, y)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "non-finite curvature factors" in messages and "non-finite predicted KL" in messages
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in factors.items())
    assert opt.damping == pytest.approx(10 * damping)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_unbatched_conv_input_is_a_batch_of_one(kind):
    """Factors of an unbatched (C, L) / (C, H, W) input equal those of the same input as a batch of one."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1) if kind == "conv1d" else nn.Conv2d(2, 3, 3, stride=2)
    shape = (2, 6) if isinstance(conv, nn.Conv1d) else (2, 6, 6)
    x = torch.randn(*shape)
    factors = []
    for batched in (False, True):
        model = nn.Sequential(copy.deepcopy(conv), nn.Flatten(-2 if isinstance(conv, nn.Conv1d) else -3))
        opt = plain_kfac(model)
        inp = x.unsqueeze(0) if batched else x
        out_shape = model(inp).shape
        train_step(model, opt, mse, inp, torch.zeros(out_shape))
        factors.append({k: opt.state[model[0].weight][k] for k in ("A", "G")})
    for key in ("A", "G"):
        torch.testing.assert_close(factors[0][key], factors[1][key])


def test_embedding_state_round_trip_continues_identically():
    """The factored mode keeps an Embedding's eigenbasis of G (both modes use it): a state saved between
    two inverse refreshes continues bit for bit."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 3))

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 10, (8, 3), generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(8)]
    model = make()
    options = dict(inverse_every=3, factor_every=1)
    opt = KFAC(model, **options)
    for x, y in data[:5]:  # the last inverse refresh at step 3; the factors moved at step 4
        train_step(model, opt, F.cross_entropy, x, y)
    resumed, resumed_opt = resumed_copy(make, lambda m: KFAC(m, **options), model, opt)
    for x, y in data[5:]:
        train_step(model, opt, F.cross_entropy, x, y)
        train_step(resumed, resumed_opt, F.cross_entropy, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_kl_clip_takes_each_group_s_learning_rate():
    """Per-group learning rates: the clip bounds sum_p lr_p^2 g_p . u_p (a body at 1e-4, a head at 1)."""
    torch.manual_seed(3)
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 4, (32,))
    rates, steps = (1e-4, 1.0), {}
    for clip in (None, 1e-3):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4)).double()
        params = list(model.parameters())
        opt = KFAC(model, base=lambda ps: torch.optim.SGD([{"params": ps[:2], "lr": rates[0]},
                                                           {"params": ps[2:], "lr": rates[1]}]),
                   kl_clip=clip, adapt_damping=False)
        before = [p.detach().clone() for p in params]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # the same in both runs
        train_step(model, opt, F.cross_entropy, x, y)
        lrs = [rates[0]] * 2 + [rates[1]] * 2
        steps[clip] = [(b - p.detach()) / lr for b, p, lr in zip(before, params, lrs)]  # the preconditioned grads
    predicted = sum(lr * lr * float((g * u).sum()) for lr, g, u in zip(lrs, grads, steps[None]))
    assert predicted > 1e-3
    nu = float(steps[1e-3][3].norm() / steps[None][3].norm())
    assert nu * nu * predicted == pytest.approx(1e-3, rel=1e-5)
    for clipped, unclipped in zip(steps[1e-3], steps[None]):
        torch.testing.assert_close(clipped, nu * unclipped)


def test_a_base_given_some_parameters_leaves_the_others_alone():
    """Fine-tuning the head only: the body's layer is not preconditioned (its gradient is left as it is),
    and the state saves and loads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = KFAC(model, base=lambda ps: torch.optim.SGD(ps[2:], lr=0.1))
    assert [b.module for b in opt.blocks] == [model[2]]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    body = copy.deepcopy(model[0])
    for _ in range(2):
        train_step(model, opt, F.cross_entropy, x, y)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = model[0].weight.grad.clone()
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(model[0].weight.grad, raw)
    assert torch.equal(model[0].weight, body.weight)
    again = KFAC(model, base=lambda ps: torch.optim.SGD(ps[2:], lr=0.1))
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(again.state[model[2].weight]["A"], opt.state[model[2].weight]["A"])


def test_a_bias_frozen_after_construction_leaves_the_weight_preconditioned():
    """The weight's step is its part of the factored solve with the bias gradient taken as 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, adapt_damping=False)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    train_step(model, opt, mse, x, y)  # factors and inverses of weight and bias
    model[0].bias.requires_grad_(False)
    opt.hyper["inverse_every"] = 1000  # keep the inverses of the first step
    state = opt.state[model[0].weight]
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    model.zero_grad()
    grad = torch.autograd.grad(mse(model(x), y), model[0].weight)[0]
    train_step(model, opt, mse, x, y)
    solve = state["inv_G"] @ torch.cat([grad, torch.zeros(3, 1)], dim=1) @ state["inv_A"]
    torch.testing.assert_close(weight - model[0].weight.detach(), solve[:, :4])
    assert torch.equal(model[0].bias, bias)


def test_a_weight_frozen_after_construction_with_damping_adaptation():
    """The bias still trains; the damping's quadratic model takes the weight's step as 0 (it raised KeyError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, damping_every=1)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    train_step(model, opt, mse, x, y)
    model[0].weight.requires_grad_(False)
    weight = model[0].weight.detach().clone()
    train_step(model, opt, mse, x, y)
    assert torch.equal(model[0].weight, weight)


def test_a_step_reverted_for_a_non_finite_loss_does_not_replay_through_the_momentum(caplog):
    """A log barrier makes the loss NaN once |bias| > 1, and the optimum lies against it. A step that crosses it
    is reverted; the base optimizer's momentum, which carried it, is reset, and the raised damping acts at once
    (the inverses are refreshed): training goes on. It used to replay the step from the momentum and stay
    stuck at the loss of step 6, every later step reverted, the damping at its maximum."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.full((16, 1), 5.0)
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()

    def loss_fn(out, target):
        return F.mse_loss(out, target) - 1e-3 * torch.log(1 - model[0].bias.abs()).sum()

    opt = KFAC(model, lr=0.5, momentum=0.9, kl_clip=None, damping=1e-3, damping_every=1, factor_every=1)
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        losses = [train_step(model, opt, loss_fn, x, y) for _ in range(40)]
    reverted = sum("step reverted" in r.getMessage() for r in caplog.records)
    assert 1 <= reverted <= 17  # of the 34 steps after the first
    assert abs(float(model[0].bias)) < 1 and losses[-1] < losses[7] - 0.5


def _one_step(model, optimizer, x, y, loss_fn=F.mse_loss):
    train_step(model, optimizer, loss_fn, x, y)
    return optimizer


def test_a_layer_registered_under_two_parents_is_one_block():
    """``self.shared = layer`` and ``self.enc = Sequential(layer)``: one layer, one block, one hook. It used to
    get two blocks, so each call was recorded twice (G doubled, a LayerNorm's diagonal quadrupled)."""
    class TwoPlaces(nn.Module):
        def __init__(self, shared: nn.Module) -> None:
            super().__init__()
            self.shared = shared
            self.enc = nn.Sequential(shared, nn.Tanh())

        def forward(self, x):
            return self.shared(self.enc(x))

    class OnePlace(nn.Module):
        def __init__(self, shared: nn.Module) -> None:
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(x)))

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    states = []
    for cls in (OnePlace, TwoPlaces):
        torch.manual_seed(1)
        model = cls(nn.Linear(4, 4)).double()
        optimizer = _one_step(model, KFAC(model, factor_every=1, damping_mode="exact"), x, y)
        assert [b.name for b in optimizer.blocks] == ["shared"] and len(model.shared._forward_hooks) == 1
        states.append(optimizer.state[model.shared.weight])
    torch.testing.assert_close(states[1]["A"], states[0]["A"])
    torch.testing.assert_close(states[1]["G"], states[0]["G"])


def test_a_layer_called_by_keyword_gets_its_factors():
    """``layer(input=x)`` gives a forward hook no positional argument: the factor update used to fail with an
    IndexError. The factors now equal those of the positional call."""
    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x, keyword=True):
            return self.linear(input=x) if keyword else self.linear(x)

    x, y = torch.randn(8, 4), torch.randn(8, 3)
    factors = []
    for keyword in (True, False):
        torch.manual_seed(2)
        model = ByKeyword()
        optimizer = KFAC(model, factor_every=1)
        optimizer.zero_grad()
        F.mse_loss(model(x, keyword=keyword), y).backward()
        optimizer.step(lambda: F.mse_loss(model(x, keyword=keyword), y))
        factors.append((optimizer.state[model.linear.weight]["A"], optimizer.state[model.linear.weight]["G"]))
    for ours, reference in zip(*factors):
        torch.testing.assert_close(ours, reference)


def _empirical_G(model, run, loss_fn, target):
    optimizer = KFAC(model, factor_every=1)
    optimizer.zero_grad()
    loss_fn(run(), target).backward()
    optimizer.step(lambda: loss_fn(run(), target))
    return optimizer.state[model.linear.weight]["G"]


def test_the_empirical_scale_of_a_dict_output_counts_its_logits_positions():
    """The empirical factors are scaled by the number of terms of the mean loss: for ``{"logits": (B, T, V)}``,
    B·T, as for the tensor itself (it counted B, the first input's rows)."""
    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 7)

        def forward(self, x, wrap=False):
            out = self.linear(x)
            return {"loss_terms": out.new_zeros(()), "logits": out} if wrap else out

    x, y = torch.randn(4, 5, 6), torch.randint(0, 7, (4, 5))

    def loss_fn(out, target):
        logits = out["logits"] if isinstance(out, dict) else out
        return F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))

    G = []
    for wrap in (False, True):
        torch.manual_seed(3)
        model = LanguageModel()
        G.append(_empirical_G(model, lambda: model(x, wrap=wrap), loss_fn, y))
    torch.testing.assert_close(G[1], G[0])


def test_the_empirical_scale_of_a_model_called_by_keyword_counts_its_batch():
    """A tuple output without a matrix in it falls back on the input's rows; a call by keyword (``model(x=x)``)
    had no positional input, and counted 1 instead of B."""
    class Regression(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 1)

        def forward(self, x, wrap=False):
            prediction = self.linear(x).squeeze(-1)  # (B,)
            return (prediction,) if wrap else prediction

    x, y = torch.randn(8, 6), torch.randn(8)

    def loss_fn(out, target):
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, target)

    G = []
    for keyword in (False, True):
        torch.manual_seed(3)
        model = Regression()
        G.append(_empirical_G(model, (lambda: model(x=x, wrap=True)) if keyword else (lambda: model(x)), loss_fn, y))
    torch.testing.assert_close(G[1], G[0])


def test_a_frozen_parameter_keeping_a_gradient_tensor_is_left_alone_by_the_sampled_fisher():
    """zero_grad(set_to_none=False) leaves a frozen parameter's gradient tensor in place; the sampled Fisher's
    backward used to differentiate it and fail ('does not require grad')."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    optimizer = KFAC(model, likelihood="categorical", factor_every=1)
    train_step(model, optimizer, F.cross_entropy, x, y)
    model[0].weight.requires_grad_(False)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_float16_gradient_whose_sum_overflows_but_whose_values_are_finite_is_stepped(caplog):
    """Only NaN or Inf values skip a step: the check by sums skipped finite float16 gradients for good."""
    model = nn.Sequential(nn.Linear(100, 100)).half()
    optimizer = KFAC(model, likelihood="empirical", adapt_damping=False)
    before = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    with caplog.at_level(logging.WARNING, logger="dreidel.optim"):
        optimizer.step()
    assert not torch.equal(model[0].weight, before)
    assert not any("non-finite gradient" in r.getMessage() for r in caplog.records)


def test_layers_frozen_when_the_optimizer_is_built_are_named_once(caplog):
    """A layer frozen at construction gets no block; unfrozen later it would train without curvature. That used
    to happen silently (gradual unfreezing); the log now names it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))
    for p in (*model[0].parameters(), *model[2].parameters()):
        p.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="dreidel.optim"):
        optimizer = KFAC(model)
    messages = [r.getMessage() for r in caplog.records if "frozen when the optimizer was built" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("K-FAC: 0, 2 frozen")
    assert [b.name for b in optimizer.blocks] == ["3"]


@pytest.mark.parametrize("group, name", [({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
                                         ({"momentum": 1.5}, "momentum"), ({"weight_decay": -0.1}, "weight_decay")])
def test_param_group_options_are_checked(group, name):
    """torch's SGD checks its options only when built: a group added later with lr=-1 used to train backwards."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = KFAC(model)
    with pytest.raises(ValueError, match=f"param group {name}"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], **group})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": 0.0})  # frozen: allowed
    assert opt.param_groups[1]["lr"] == 0.0


def _truncated(value):
    return value[:-1, :-1] if value.dim() == 2 else value[:-1]


@pytest.mark.parametrize("options, slot, key, damage, message", [
    ({}, 1, "A", _truncated, r"'A' is shape \(18, 18\), expected a tensor of shape \(19, 19\)"),
    ({}, 1, "inv_G", _truncated, r"'inv_G' does not have the shapes of an inverse of its \(3, 3\) factor"),
    ({"factor_rank": 2}, 1, "inv_A", lambda inv: (inv[0][:-1], *inv[1:]), r"'inv_A' .* low-rank"),
    ({}, 0, "A_diag", _truncated, r"'A_diag' is shape \(9,\), expected a tensor of shape \(10,\)"),
    ({}, 0, "eig_G", lambda eig: eig[0], r"'eig_G' is not the eigenbasis of its \(6, 6\) factor"),
    ({"damping_mode": "exact"}, 1, "eig_A", lambda eig: (eig[0], eig[1][:, :-1]), r"'eig_A' is not the eigenbasis"),
    ({}, 3, "diag1", lambda d: "x", r"'diag1' is str, expected a tensor of shape \(3,\)"),
], ids=["factor", "dense_inverse", "low_rank_inverse", "embedding_diagonal", "eigenbasis", "exact_eigenbasis",
        "layer_norm"])
def test_a_saved_factor_of_the_wrong_shape_is_refused_before_anything_loads(options, slot, key, damage, message):
    """A damaged factor used to load and fail at the next step inside torch ("The size of tensor a (18) must
    match ..."); every factor, inverse and eigenbasis is checked against the layer's shapes first."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 3), nn.LayerNorm(3))

    options = dict(inverse_every=1, factor_every=1, adapt_damping=False, **options)
    model = make()
    opt = KFAC(model, **options)
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
    train_step(model, opt, F.cross_entropy, x, y)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][slot][key] = damage(saved["state"][slot][key])
    fresh = KFAC(make(), **options)
    with pytest.raises(ValueError, match="state_dict: the saved state of '.*': " + message):
        fresh.load_state_dict(saved)
    assert not fresh.state
    intact = copy.deepcopy(opt.state_dict())  # the same state undamaged loads
    KFAC(make(), **options).load_state_dict(intact)


def test_a_state_saved_over_another_base_optimizer_is_refused():
    """Adam's groups used to replace SGD's, and the next step failed inside torch (KeyError 'momentum')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    saved = KFAC(model, base=lambda params: torch.optim.Adam(params, lr=1e-3))
    train_step(model, saved, F.cross_entropy, x, y)
    state = copy.deepcopy(saved.state_dict())
    with pytest.raises(ValueError, match="saved by KFAC with base='Adam', but this KFAC has base='SGD'"):
        KFAC(model).load_state_dict(state)
    older = copy.deepcopy(KFAC(model).state_dict())  # recorded before the base's type was: loads as before
    del older["optimizer"]["base"]
    KFAC(model).load_state_dict(older)


def test_a_checkpoint_taken_after_a_damping_raise_resumes_identically():
    # A non-finite loss after a step reverts it and raises the damping; the inverses are rebuilt at the next step.
    # That pending rebuild was not saved, so a resumed run kept the old inverses (review: 0.013 -> 0.19 apart).
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)

    def make_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def step(model, opt, poison_after_step=False):
        calls = []

        def closure():
            calls.append(None)
            loss = F.cross_entropy(model(x), y)
            return loss * float("nan") if poison_after_step and len(calls) == 2 else loss

        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = KFAC(model)
    for _ in range(5):
        step(model, opt)
    damping = opt.damping
    step(model, opt, poison_after_step=True)  # step 5 adapts the damping: the loss after it is NaN
    assert opt.damping == pytest.approx(10 * damping)
    resumed, resumed_opt = resumed_copy(make_model, KFAC, model, opt)
    for _ in range(3):
        for a, b in zip(step(model, opt), step(resumed, resumed_opt)):
            assert torch.equal(a, b)
