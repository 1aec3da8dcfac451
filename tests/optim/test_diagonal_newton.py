"""DiagonalNewton against oracles: Newton's step on a separable quadratic, Hutchinson's estimator
against the true Hessian diagonal, and the Gauss-Newton diagonal against per-sample loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _optim_helpers import brute_force_per_sample_grads, resumed_copy, train_step
from dreidel.layers import LinearWHT
from dreidel.optim import DiagonalNewton


class Quadratic(nn.Module):
    """L(p) = 0.5 (p - c)^T Q (p - c); forward returns L (the 'model output' is the loss)."""

    def __init__(self, hessian: torch.Tensor, centre: torch.Tensor) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(centre.shape[0]))
        self.register_buffer("hessian", hessian)
        self.register_buffer("centre", centre)

    def forward(self, _x=None) -> torch.Tensor:
        d = self.p - self.centre
        return 0.5 * d @ self.hessian @ d


def quadratic_step(model, opt):
    opt.zero_grad()
    model().backward()
    opt.step(lambda: model())


def test_newton_step_on_separable_quadratic():
    """Diagonal Hessian: z*(Hz) = diag(H) exactly for Rademacher z, so one unclipped lr=1 step lands on c."""
    h = torch.tensor([0.5, 2.0, 10.0, 0.1])
    centre = torch.tensor([1.0, -2.0, 0.3, 0.05])
    model = Quadratic(torch.diag(h), centre)
    opt = DiagonalNewton(model, lr=1.0, betas=(0.0, 0.0), damping=0.0, clip=1e9, curvature="hutchinson")
    quadratic_step(model, opt)
    torch.testing.assert_close(model.p.detach(), centre)
    torch.testing.assert_close(opt.state[model.p]["curvature"], h)


def test_clipping_bounds_each_coordinate():
    h = torch.tensor([0.5, 2.0, 1e-3])
    centre = torch.tensor([3.0, -0.01, 1.0])
    model = Quadratic(torch.diag(h), centre)
    opt = DiagonalNewton(model, lr=0.1, betas=(0.0, 0.0), damping=0.0, clip=1.0, curvature="hutchinson")
    quadratic_step(model, opt)
    newton = centre  # the full Newton step from p = 0
    expected = 0.1 * newton.clamp(-1.0, 1.0)
    torch.testing.assert_close(model.p.detach(), expected)


def test_hutchinson_estimate_converges_to_hessian_diagonal():
    """Mean of z*(Qz) over n draws: unbiased, standard error sqrt(sum_{j!=i} Q_ij^2 / n)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen)
    hessian = m @ m.t()
    model = Quadratic(hessian, torch.randn(6, generator=gen))
    opt = DiagonalNewton(model, curvature="hutchinson", seed=3)
    draws = 1500
    total = torch.zeros(6)
    for _ in range(draws):
        total += opt._hutchinson(lambda: model(), [model.p])[model.p]
    estimate = total / draws
    off_diagonal = (hessian**2).sum(1) - hessian.diagonal() ** 2
    standard_error = (off_diagonal / draws).sqrt()
    assert ((estimate - hessian.diagonal()).abs() < 4 * standard_error).all()
    assert ((estimate - hessian.diagonal()).abs() > 0).any()  # a real estimate, not the exact diagonal


def cross_entropy(out, y):
    return F.cross_entropy(out, y)


@pytest.mark.parametrize("kind", ["linear2d", "linear_sequence", "layernorm", "linear_wht"])
def test_empirical_gauss_newton_diagonal_equals_per_sample_loop(kind):
    """h_hat = N * sum_i (per-sample grad of the mean loss)^2, checked against a loop over samples; N is the
    number of terms of the mean loss: B, or B * T for a (B, T, C) output."""
    torch.manual_seed(0)
    if kind == "linear_wht":
        layer = LinearWHT(8, 8, dtype=torch.float64)
        model = nn.Sequential(layer, nn.Tanh(), nn.Linear(8, 3))
    elif kind == "layernorm":
        layer = nn.LayerNorm(5)
        model = nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 3))
    else:
        layer = nn.Linear(4, 5)
        model = nn.Sequential(layer, nn.Tanh(), nn.Linear(5, 3))
    batch = 6
    in_features = 8 if kind == "linear_wht" else 4
    if kind == "linear_sequence":
        x, y = torch.randn(batch, 3, in_features), torch.randint(0, 3, (batch, 3))
        loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, 3), t.reshape(-1))  # noqa: E731
    else:
        x, y = torch.randn(batch, in_features), torch.randint(0, 3, (batch,))
        loss_fn = cross_entropy
    params = list(layer.parameters())
    per_sample = brute_force_per_sample_grads(model, loss_fn, x, y, params)
    opt = DiagonalNewton(model, betas=(0.0, 0.0), likelihood="empirical")
    train_step(model, opt, loss_fn, x, y)
    terms = batch * 3 if kind == "linear_sequence" else batch
    for p, grads in zip(params, per_sample):
        torch.testing.assert_close(opt.state[p]["curvature"], terms * (grads**2).sum(0))


def test_sampled_gauss_newton_is_unbiased_for_gaussian_likelihood():
    """E[h_hat] = diag(J^T H J), H = 2/M I for F.mse_loss: mean over refreshes vs. the exact Jacobian."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    first = model[0].weight
    jac = torch.autograd.functional.jacobian(
        lambda w: torch.func.functional_call(model, {"0.weight": w}, (x,)), first.detach()
    )  # (5, 2, 4, 3)
    exact = (2.0 / 10) * (jac**2).sum((0, 1))
    opt = DiagonalNewton(model, betas=(0.0, 0.0), likelihood="gaussian", curvature_every=1, lr=1e-12, seed=2)
    total, draws = torch.zeros_like(exact), 800
    for _ in range(draws):
        train_step(model, opt, F.mse_loss, x, y)
        total += opt.state[first]["curvature"]
    torch.testing.assert_close(total / draws, exact, rtol=0.1, atol=0.02 * float(exact.max()))


@pytest.mark.parametrize("curvature", ["gauss_newton", "gnb"])
def test_sampled_curvature_is_unbiased_for_categorical_likelihood(curvature):
    """E[h_hat] = diag(J^T H J) with H = (diag p - p p^T) / B for the mean cross-entropy: the mean over refreshes
    against the exact Jacobians. Only the signs used to be checked: labels drawn uniformly instead of from
    softmax(z), or the 1/sqrt(B) scale dropped, passed every optimizer test (a review's mutations)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    first = model[0].weight
    jac = torch.autograd.functional.jacobian(
        lambda w: torch.func.functional_call(model, {"0.weight": w}, (x,)), first.detach()
    )  # (5, 3, 4, 3)
    p = torch.softmax(model(x), dim=-1).detach()
    hessian = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / 5  # (5, 3, 3)
    exact = torch.einsum("bcij,bcd,bdij->ij", jac, hessian, jac)
    opt = DiagonalNewton(model, betas=(0.0, 0.0), likelihood="categorical", curvature=curvature, curvature_every=1,
                         lr=1e-12, seed=2)
    total, draws = torch.zeros_like(exact), 1500
    for _ in range(draws):
        train_step(model, opt, cross_entropy, x, y)
        total += opt.state[first]["curvature"]
    torch.testing.assert_close(total / draws, exact, rtol=0.15, atol=0.03 * float(exact.max()))


def test_needs_model_for_gauss_newton():
    with pytest.raises(ValueError, match="model_or_params"):
        DiagonalNewton(nn.Linear(2, 2).parameters(), curvature="gauss_newton")


@pytest.mark.parametrize(
    "argument,value,error",
    [("curvature", "bfgs", ValueError), ("likelihood", "poisson", ValueError), ("lr", -1.0, ValueError),
     ("lr", float("nan"), ValueError), ("lr", float("inf"), ValueError), ("lr", "0.1", TypeError),
     ("lr", True, TypeError), ("damping", -1.0, ValueError), ("damping", float("nan"), ValueError),
     ("eps", 0.0, ValueError), ("clip", 0.0, ValueError), ("clip", float("nan"), ValueError),
     ("weight_decay", -1.0, ValueError), ("curvature_every", 0, ValueError), ("curvature_every", 2.5, TypeError),
     ("curvature_every", True, TypeError), ("seed", 1.5, TypeError), ("betas", (0.9,), ValueError),
     ("betas", 0.9, ValueError), ("betas", (1.0, 0.9), ValueError), ("betas", (0.9, float("nan")), ValueError),
     ("betas", ("0.9", 0.9), TypeError)],
)
def test_bad_arguments_name_the_argument(argument, value, error):
    with pytest.raises(error, match=argument):
        DiagonalNewton(nn.Linear(2, 2), **{argument: value})


def test_a_tensor_instead_of_parameters_is_refused():
    with pytest.raises(TypeError, match="model_or_params"):
        DiagonalNewton(torch.zeros(3, requires_grad=True), curvature="hutchinson")


def test_hutchinson_without_double_backward_raises_clear_error():
    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            out = torch.empty_like(x)
            return torch.mul(grad, 2 * x, out=out)  # out= cannot be differentiated again

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(3))

        def forward(self):
            return NoDoubleBackward.apply(self.p).sum()

    model = Model()
    opt = DiagonalNewton(model, curvature="hutchinson")
    model().backward()
    with pytest.raises(RuntimeError, match="double backward.*without calling backward"):
        opt.step(lambda: model())


class AppliedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.norm, self.out = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.inner(x)))
        return self.out(self.norm(torch.tanh(self.inner(h))))  # inner and norm run twice


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("kind", ["applied_twice", "shared_weight"])
def test_reused_parameters_get_exact_per_sample_sums(kind):
    """Per-sample gradients of every call / owner are summed before squaring: oracle, a loop over samples."""
    torch.manual_seed(0)
    model = AppliedTwice() if kind == "applied_twice" else SharedWeight()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    params = [p for p in model.parameters()]
    per_sample = brute_force_per_sample_grads(model, cross_entropy, x, y, params)
    opt = DiagonalNewton(model, betas=(0.0, 0.0))
    train_step(model, opt, cross_entropy, x, y)
    for p, grads in zip(params, per_sample):
        torch.testing.assert_close(opt.state[p]["curvature"], 6 * (grads**2).sum(0))


def test_weight_shared_with_a_module_without_per_sample_grads_gets_batch_estimate():
    """A tied embedding / output head: the Embedding has no per-sample gradients, so the weight gets B g^2."""
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 5), nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.emb(tokens)))

    model = TiedLM()
    x, y = torch.randint(0, 7, (4,)), torch.randint(0, 7, (4,))
    grad = torch.autograd.grad(cross_entropy(model(x), y), model.emb.weight)[0]
    opt = DiagonalNewton(model, betas=(0.0, 0.0))
    train_step(model, opt, cross_entropy, x, y)
    torch.testing.assert_close(opt.state[model.emb.weight]["curvature"], 4 * grad**2)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x, use_b: bool):
        return self.a(x) + (self.b(x) if use_b else 0)


@pytest.mark.parametrize("first_use", [0, 5, 13])
def test_parameter_first_used_mid_run_gets_its_own_counts_and_batch_estimate(first_use):
    """Its first step is m = g (bias-corrected by its own count) over h = B g^2 (refresh) or the B g^2
    fallback (between refreshes); was a sign step (h = 0, global bias correction)."""
    torch.manual_seed(0)
    model = Branchy()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = DiagonalNewton(model, lr=0.1, curvature="gnb")  # gnb, empirical: every estimate is B g^2
    for step in range(first_use + 1):
        use_b = step == first_use
        before = model.b.weight.detach().clone()
        opt.zero_grad()
        F.mse_loss(model(x, use_b), y).backward()
        grad = model.b.weight.grad
        opt.step(lambda: F.mse_loss(model(x, use_b), y))
    expected = before - 0.1 * (grad / (16 * grad**2 + 1e-4)).clamp(-1, 1)
    torch.testing.assert_close(model.b.weight.detach(), expected)
    assert opt.state[model.b.weight]["step"] == 1 and opt.state[model.a.weight]["step"] == first_use + 1


def assert_continues_alike(original, resumed, x, y, steps: int) -> None:
    """Both (model, optimizer) pairs trained ``steps`` more steps on (x, y) end with equal parameters, bit for bit."""
    for _ in range(steps):
        for model, optimizer in (original, resumed):
            train_step(model, optimizer, F.mse_loss, x, y)
    for a, b in zip(original[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)


def test_state_saved_without_per_parameter_counts_still_loads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = DiagonalNewton(model, curvature_every=2)
    for _ in range(3):
        train_step(model, opt, F.mse_loss, x, y)
    saved = copy.deepcopy(opt.state_dict())
    # The old format: the counts per parameter group, none per parameter.
    old_style = {**saved, "state": {k: {n: v for n, v in s.items() if n not in ("step", "curvature_updates")}
                                    for k, s in saved["state"].items()},
                 "param_groups": [{**g, "curvature_updates": saved["state"][g["params"][0]]["curvature_updates"]}
                                  for g in saved["param_groups"]]}
    resumed_model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    resumed_model.load_state_dict(model.state_dict())
    resumed = DiagonalNewton(resumed_model, curvature_every=2)
    resumed.load_state_dict(old_style)
    assert_continues_alike((model, opt), (resumed_model, resumed), x, y, steps=3)


@pytest.mark.parametrize("key", ["exp_avg", "curvature"])
def test_a_saved_state_of_the_wrong_shape_is_refused_before_anything_loads(key):
    """A truncated entry used to load and fail at the next step inside torch ("split_with_sizes expects ...")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = DiagonalNewton(model)
    train_step(model, opt, F.mse_loss, x, y)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][2][key] = saved["state"][2][key][:, :-1]
    fresh = DiagonalNewton(model)
    with pytest.raises(ValueError, match=rf"saved state of '2.weight': '{key}' is shape \(2, 2\), expected a tensor "
                                         r"of the parameter's shape \(2, 3\)"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_unbatched_input_is_a_batch_of_one():
    """A 1-D input to Linear/LayerNorm layers: the same curvature as that input as a batch of one."""
    torch.manual_seed(0)
    x, y = torch.randn(4), torch.randn(3)
    curvatures = []
    for batched in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        opt = DiagonalNewton(model, betas=(0.0, 0.0))
        train_step(model, opt, F.mse_loss, x.unsqueeze(0) if batched else x, y.unsqueeze(0) if batched else y)
        curvatures.append([opt.state[p]["curvature"] for p in model.parameters()])
    for a, b in zip(*curvatures):
        torch.testing.assert_close(a, b)


def test_hutchinson_parameters_without_curvature_survive_a_state_dict():
    """A loss linear in the output (a critic's score) leaves the output bias without a Hessian-vector
    product; a loaded optimizer knows it, and training continues bit for bit."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def score(model, real, fake):
        return model(fake).mean() - 0.5 * model(real).mean()

    def run(model, opt, steps):
        for s in steps:
            gen = torch.Generator().manual_seed(s)
            real, fake = torch.randn(16, 4, generator=gen) + 1, torch.randn(16, 4, generator=gen)
            opt.zero_grad()
            score(model, real, fake).backward()
            opt.step(lambda: score(model, real, fake))

    options = dict(curvature="hutchinson", lr=0.01, curvature_every=5)
    model = make()
    opt = DiagonalNewton(model, **options)
    run(model, opt, range(2))
    resumed, resumed_opt = resumed_copy(make, lambda m: DiagonalNewton(m, **options), model, opt)
    run(model, opt, range(2, 5))
    run(resumed, resumed_opt, range(2, 5))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("curvature,likelihood,message", [
    ("hutchinson", "empirical", "no autograd graph"),
    ("gauss_newton", "categorical", "no model output"),
])
def test_a_closure_run_without_gradients_is_named(curvature, likelihood, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = DiagonalNewton(model, curvature=curvature, likelihood=likelihood)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def closure():
        with torch.no_grad():
            return F.cross_entropy(model(x), y)

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=message):
        opt.step(closure)


@pytest.mark.parametrize("group,name", [({"lr": -1.0}, "lr"), ({"betas": (1.5, 0.9)}, r"betas\[0\]"),
                                        ({"damping": -5.0}, "damping")])
def test_param_group_options_are_checked(group, name):
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = DiagonalNewton(list(first.parameters()), curvature="hutchinson")
    with pytest.raises(ValueError, match=f"param group {name}"):
        opt.add_param_group({"params": list(second.parameters()), **group})
    with pytest.raises(ValueError, match=f"param group {name}"):
        DiagonalNewton([{"params": list(second.parameters()), **group}], curvature="hutchinson")


def test_a_param_group_may_be_frozen_with_lr_zero():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = DiagonalNewton(list(first.parameters()), curvature="hutchinson")
    opt.add_param_group({"params": list(second.parameters()), "lr": 0.0})
    assert opt.param_groups[1]["lr"] == 0.0


def documented_update(params, grads, state, options, batch, refresh):
    """The update in DiagonalNewton's module docstring, parameter by parameter, in float64 (the oracle); with
    curvature='gnb' and the empirical likelihood every curvature estimate is ``B g^2``."""
    beta1, beta2 = options["betas"]
    for p, g in zip(params, grads):
        s = state.setdefault(p, dict(m=torch.zeros_like(g), h=torch.zeros_like(g), step=0, updates=0))
        if refresh or s["updates"] == 0:
            s["h"] = beta2 * s["h"] + (1 - beta2) * batch * g**2
            s["updates"] += 1
        s["step"] += 1
        s["m"] = beta1 * s["m"] + (1 - beta1) * g
        m = s["m"] / (1 - beta1 ** s["step"])
        h = s["h"] / (1 - beta2 ** s["updates"])
        newton = (m / (h + options["damping"])).clamp(-options["clip"], options["clip"])
        p.mul_(1 - options["lr"] * options["weight_decay"]).sub_(options["lr"] * newton)


@pytest.mark.parametrize("widths, frozen", [([6] * 6 + [3], False), ([6, 130, 130, 3], False), ([6] * 6 + [3], True)],
                         ids=["small", "small_and_large", "a_frozen_bias"])
def test_steps_of_a_many_tensor_model_follow_the_documented_update(widths, frozen):
    """The state of a group's small parameters is updated in two flat buffers (the packed path), that of a
    weight of 130 x 130 (over 16384 values) on its own; a frozen bias in the group (no gradient, no state)
    leaves the others packed. Several steps, refreshes every third, two param groups with their own options,
    weight decay."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())][:-1])
    model[0].bias.requires_grad_(not frozen)
    x, y = torch.randn(12, widths[0]), torch.randn(12, widths[-1])
    layers = [m for m in model if isinstance(m, nn.Linear)]
    first = [p for m in layers[:len(layers) // 2] for p in m.parameters()]
    second = [p for m in layers[len(layers) // 2:] for p in m.parameters()]
    options = [dict(lr=0.05, betas=(0.9, 0.99), damping=1e-3, clip=1.0, weight_decay=0.0),
               dict(lr=0.02, betas=(0.5, 0.9), damping=1e-2, clip=0.5, weight_decay=0.1)]
    opt = DiagonalNewton(model, curvature="gnb", curvature_every=3, eps=1e-30, **options[0])
    opt.param_groups[0]["params"] = first
    opt.add_param_group(dict(params=second, **options[1]))
    oracle = [p.detach().double().clone() for p in first + second]
    state: dict = {}
    for step in range(8):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        grads = [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double() for p in first + second]
        opt.step(lambda: F.mse_loss(model(x), y))
        for group_params, group_oracle, group_grads, group_options in (
                (first, oracle[:len(first)], grads[:len(first)], options[0]),
                (second, oracle[len(first):], grads[len(first):], options[1])):
            moving = [(o, g) for o, g, p in zip(group_oracle, group_grads, group_params) if p.requires_grad]
            documented_update([o for o, _ in moving], [g for _, g in moving], state, group_options, batch=12,
                              refresh=step % 3 == 0)
        for p, expected in zip(first + second, oracle):
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
            expected.copy_(p.detach().double())  # each step from the same point: errors do not compound
    assert len(opt._packed) == 2  # both groups took the packed path


def test_packed_state_saves_loads_and_resumes_exactly(tmp_path):
    """The packed state is saved as per-parameter tensors (torch.load(weights_only=True) reads it); a resumed
    optimizer packs its loaded state again and follows the original bit for bit."""
    def make_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))

    model = make_model()
    x, y = torch.randn(10, 5), torch.randn(10, 2)
    opt = DiagonalNewton(model, curvature_every=2)
    for _ in range(3):
        train_step(model, opt, F.mse_loss, x, y)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert all(s["exp_avg"].shape == p.shape for s, p in zip(saved["state"].values(), model.parameters()))
    resumed_model = make_model()
    resumed_model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    resumed = DiagonalNewton(resumed_model, curvature_every=2)
    resumed.load_state_dict(saved)
    assert_continues_alike((model, opt), (resumed_model, resumed), x, y, steps=4)


@pytest.mark.parametrize("frozen_steps", [(1,), (1, 2, 3, 4)], ids=["missed_once", "frozen_after_a_step"])
def test_a_parameter_without_gradient_keeps_its_state_in_a_packed_group(frozen_steps):
    """Steps where one parameter has no gradient: it stays where it was, the others move, packed again from the
    next step on (without it while it has none); afterwards its count differs from theirs, and each is still
    bias-corrected by its own."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    options = dict(lr=0.1, betas=(0.9, 0.99), damping=1e-3, clip=1.0, weight_decay=0.0)
    opt = DiagonalNewton(model, curvature="gnb", eps=1e-30, **options)
    params = list(model.parameters())
    frozen = model[2].bias
    oracle = {p: p.detach().double().clone() for p in params}
    state: dict = {}
    for step in range(5):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if step in frozen_steps:
            frozen.grad = None
        moving = [p for p in params if p.grad is not None]
        grads = [p.grad.double() for p in moving]
        opt.step(lambda: F.mse_loss(model(x), y))
        keys = [oracle[p] for p in moving]
        documented_update(keys, grads, state, options, batch=6, refresh=step == 0)
        for p in params:
            torch.testing.assert_close(p.detach().double(), oracle[p], rtol=1e-5, atol=1e-6)
            oracle[p].copy_(p.detach().double())
        assert (frozen in opt._packed[0].members) == (step not in frozen_steps)  # the pack follows the gradients
    assert opt.state[frozen]["step"] == 5 - len(frozen_steps) and opt.state[params[0]]["step"] == 5


def test_a_parameter_twice_in_a_group_is_updated_once_per_occurrence():
    """A param list with a parameter twice (put there by hand; torch.optim warns against it at construction):
    as before packing, each occurrence is a full update (counts, curvature, momentum, step) in turn."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    options = dict(lr=0.1, betas=(0.9, 0.99), damping=1e-3, clip=1.0, weight_decay=0.0)
    opt = DiagonalNewton(model, curvature="gnb", eps=1e-30, **options)
    twice, once = model[0].weight, model[0].bias
    opt.param_groups[0]["params"] = [twice, once, twice]
    oracle = {p: p.detach().double().clone() for p in (twice, once)}
    state: dict = {}
    for step in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        grads = [p.grad.double() for p in (twice, once, twice)]
        opt.step(lambda: F.mse_loss(model(x), y))
        documented_update([oracle[twice], oracle[once], oracle[twice]], grads, state, options, batch=6,
                          refresh=step == 0)
        for p in (twice, once):
            torch.testing.assert_close(p.detach().double(), oracle[p], rtol=1e-5, atol=1e-6)
            oracle[p].copy_(p.detach().double())
    assert opt.state[twice]["step"] == 6


@pytest.mark.parametrize("rows", [10, 20000], ids=["small", "large"])
def test_a_sparse_embedding_gradient_is_updated_densely(rows):
    """nn.Embedding(sparse=True): the sparse gradient enters the update as the dense one would, packed
    (10 x 4 values) or on its own (20000 x 4)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(rows, 4, sparse=True), nn.Linear(4, 2))
    tokens, y = torch.tensor([1, 2, 2, 7]), torch.randn(4, 2)
    options = dict(lr=0.1, betas=(0.9, 0.99), damping=1e-3, clip=1.0, weight_decay=0.0)
    opt = DiagonalNewton(model, curvature="gnb", eps=1e-30, **options)
    params = list(model.parameters())
    oracle, state = [p.detach().double().clone() for p in params], {}
    for step in range(3):
        opt.zero_grad()
        F.mse_loss(model(tokens), y).backward()
        assert params[0].grad.is_sparse
        grads = [p.grad.to_dense().double() for p in params]
        opt.step(lambda: F.mse_loss(model(tokens), y))
        documented_update(oracle, grads, state, options, batch=4, refresh=step == 0)
        for p, expected in zip(params, oracle):
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
            expected.copy_(p.detach().double())


def test_a_float16_gradient_whose_sum_overflows_but_whose_values_are_finite_is_stepped(caplog):
    """Only NaN or Inf values skip a step: a float16 gradient of 100 x 100 values of 10 (sum 1e5, beyond float16's
    65504) is finite; the check by sums used to skip it."""
    model = nn.Sequential(nn.Linear(100, 100)).half()
    opt = DiagonalNewton(model, curvature="gnb", lr=0.1)
    before = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    assert not torch.equal(model[0].weight, before)
    assert not any("non-finite" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_in_a_packed_gradient_skips_the_step(bad, caplog):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = DiagonalNewton(model, curvature="gnb")
    for _ in range(2):
        train_step(model, opt, F.mse_loss, x, y)
    values = [p.detach().clone() for p in model.parameters()]
    states = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model[2].bias.grad[1] = bad
    opt.step(lambda: F.mse_loss(model(x), y))
    assert all(torch.equal(a, p) for a, p in zip(values, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(states, model.parameters()))
    assert any("non-finite gradient" in r.getMessage() for r in caplog.records)


def test_state_tensors_taken_after_load_state_dict_stay_the_optimizers():
    """load_state_dict packs the loaded state at once: a reference taken afterwards is the state the steps
    update, not a copy left behind at the first step."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = DiagonalNewton(model, curvature="gnb")
    train_step(model, opt, F.mse_loss, x, y)
    resumed = DiagonalNewton(model, curvature="gnb")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    weight = model[0].weight
    reference = resumed.state[weight]["exp_avg"]
    before = reference.clone()
    train_step(model, resumed, F.mse_loss, x, y)
    assert resumed.state[weight]["exp_avg"] is reference and not torch.equal(reference, before)


@pytest.mark.parametrize("settings", [{"likelihood": "categorical"}, {"likelihood": "categorical", "curvature": "gnb"},
                                      {"curvature": "hutchinson"}, {}],
                         ids=["sampled", "gnb", "hutchinson", "empirical"])
def test_a_parameter_frozen_mid_training_that_keeps_its_gradient_tensor_is_not_differentiated(settings):
    """After zero_grad(set_to_none=False) a frozen parameter keeps a (zero) gradient tensor; the sampled Fisher
    and Hutchinson's products differentiated it and failed ('does not require grad', or a message blaming the
    closure). As torch's optimizers do, it is still updated from that gradient (here: momentum alone)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    optimizer = DiagonalNewton(model, curvature_every=1, **settings)
    train_step(model, optimizer, F.cross_entropy, x, y)
    model[0].weight.requires_grad_(False)
    frozen, trained = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step(lambda: F.cross_entropy(model(x), y))
    assert not torch.equal(model[2].weight, trained) and not torch.equal(model[0].weight, frozen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _grouped_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def _weights_and_rest(model: nn.Module, **rest_options) -> list[dict]:
    """The usual split: weight matrices in one group, biases and norms (no weight decay) in another."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    return [{"params": weights}, {"params": [p for p in model.parameters() if p.dim() < 2], **rest_options}]


def test_param_groups_with_a_model_take_their_own_options():
    """With a model, its parameters could only form one group (a user audit): no way to leave biases and norms
    out of weight decay. Groups with the default options step as one group does, bit for bit; a group's own
    options apply to it alone; the state dict round trip keeps the groups."""
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    plain, grouped = _grouped_model(), _grouped_model()
    pairs = [(plain, DiagonalNewton(plain, weight_decay=0.1, curvature_every=2)),
             (grouped, DiagonalNewton(grouped, weight_decay=0.1, curvature_every=2,
                                      param_groups=_weights_and_rest(grouped)))]
    for _ in range(3):
        for model, optimizer in pairs:
            train_step(model, optimizer, F.mse_loss, x, y)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), grouped.parameters()))

    frozen = _grouped_model()
    optimizer = DiagonalNewton(frozen, param_groups=_weights_and_rest(frozen, lr=0.0))
    assert optimizer.param_groups[1]["lr"] == 0.0 and optimizer.param_groups[0]["lr"] == 0.1
    before = [p.detach().clone() for p in frozen.parameters()]
    train_step(frozen, optimizer, F.mse_loss, x, y)
    moved = [not torch.equal(a, b) for a, b in zip(before, frozen.parameters())]
    assert moved == [p.dim() == 2 for p in frozen.parameters()]  # only the weights took a step

    make = lambda model: DiagonalNewton(model, param_groups=_weights_and_rest(model, lr=0.0))  # noqa: E731
    assert_continues_alike((frozen, optimizer), resumed_copy(_grouped_model, make, frozen, optimizer), x, y, 3)


@pytest.mark.parametrize("groups, error, message", [
    (lambda m: [{"params": [nn.Parameter(torch.zeros(2))]}], ValueError, r"param_groups\[0\]: holds a parameter of "
                                                                          r"shape \(2,\) that is not one of the model's"),
    (lambda m: [{"params": [m[0].weight]}, {"params": [m[0].weight]}], ValueError, "'0.weight' is in another group"),
    (lambda m: {"params": list(m.parameters())}, TypeError, "one dict"),
    (lambda m: [list(m.parameters())], TypeError, r"param_groups\[0\]: expected a dict"),
    (lambda m: [{"params": list(m.parameters()), "lr": -1.0}], ValueError, "lr"),
])
def test_bad_param_groups_are_named(groups, error, message):
    model = _grouped_model()
    with pytest.raises(error, match=message):
        DiagonalNewton(model, param_groups=groups(model))
    with pytest.raises(ValueError, match="param_groups: give them with the model"):
        DiagonalNewton(list(model.parameters()), curvature="hutchinson", param_groups=[])
