"""Behaviour shared by both curvature optimizers and ``build_optimizer``: state-dict round trips,
mismatch errors, parameters without gradients, the closure contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _optim_helpers import train_step
from dreidel.optim import KFAC, OPTIMIZER_NAMES, CurvatureOptimizer, DiagonalNewton, build_optimizer

CONFIGS = {
    "dn_gauss_newton_sampled": lambda m: DiagonalNewton(m, likelihood="categorical", curvature_every=2),
    "dn_hutchinson": lambda m: DiagonalNewton(m, curvature="hutchinson", curvature_every=3),
    "dn_empirical": lambda m: DiagonalNewton(m, curvature_every=2),
    "kfac_sampled": lambda m: KFAC(m, likelihood="categorical", inverse_every=3, damping_every=2),
    "kfac_empirical": lambda m: KFAC(m, inverse_every=3),
    "kfac_low_rank": lambda m: KFAC(m, likelihood="categorical", inverse_every=3, factor_rank=1),
}


# Optimizers whose hooks record no layer input, only the model's output.
REMOVAL_CONFIGS = {
    "dn_gnb": lambda m: DiagonalNewton(m, curvature="gnb"),
    "conv_dn_default": lambda m: DiagonalNewton(m),
}


def _conv_model() -> nn.Module:
    """Takes ``batches``' (8, 4) inputs through a convolution only: no layer DiagonalNewton records."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 3, 4), nn.Flatten())


def make_model(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.LayerNorm(width), nn.Linear(width, 3))


def batches(n: int):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_round_trip_continues_identically(name):
    data = batches(10)
    model = make_model()
    opt = CONFIGS[name](model)
    for x, y in data[:5]:
        train_step(model, opt, F.cross_entropy, x, y)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as if written to disk
    for x, y in data[5:]:
        train_step(model, opt, F.cross_entropy, x, y)

    resumed = make_model(seed=99)
    resumed.load_state_dict(saved_model)
    resumed_opt = CONFIGS[name](resumed)
    resumed_opt.load_state_dict(saved_opt)
    for x, y in data[5:]:
        train_step(resumed, resumed_opt, F.cross_entropy, x, y)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


class _DataParallelLike(nn.Module):
    """Names its model's parameters ``module.*``, as DistributedDataParallel and DataParallel do."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")  # names its model's parameters '_orig_mod.*'


def _with_a_compiled_layer(model: nn.Sequential) -> nn.Module:
    return nn.Sequential(_compiled(model[0]), *model[1:])  # the same layers, the first compiled


@pytest.mark.parametrize("wrap_saved, wrap_loaded", [
    (_compiled, lambda m: m),
    (lambda m: m, _DataParallelLike),
    (lambda m: _DataParallelLike(_compiled(m)), _compiled),
    (_with_a_compiled_layer, lambda m: m),  # '0._orig_mod.weight'
], ids=["compiled-to-plain", "plain-to-ddp", "ddp-of-compiled-to-compiled", "compiled-layer-to-plain"])
@pytest.mark.parametrize("name", ["dn_empirical", "kfac_sampled"])
def test_a_state_saved_over_a_wrapped_model_loads_over_the_model(name, wrap_saved, wrap_loaded):
    """The parameters' names were compared whole, so a state saved by an optimizer over torch.compile(model)
    was refused by one over model ("'0.weight' ... the saved state has '_orig_mod.0.weight'"), where torch's
    optimizers load it (a user audit). The wrappers' prefixes are now left out of the comparison."""
    data = batches(8)
    model = make_model()
    wrapped = wrap_saved(model)
    opt = CONFIGS[name](wrapped)
    for x, y in data[:4]:
        train_step(wrapped, opt, F.cross_entropy, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in data[4:]:
        train_step(wrapped, opt, F.cross_entropy, x, y)
    resumed = make_model(seed=99)
    resumed.load_state_dict(saved_model)
    resumed_wrapped = wrap_loaded(resumed)
    resumed_opt = CONFIGS[name](resumed_wrapped)
    resumed_opt.load_state_dict(saved_opt)
    for x, y in data[4:]:
        train_step(resumed_wrapped, resumed_opt, F.cross_entropy, x, y)
    torch._dynamo.reset()  # what was compiled here, with the optimizers' hooks, is not for later tests
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loading_state_of_another_model_names_the_parameter(name):
    model = make_model()
    opt = CONFIGS[name](model)
    x, y = batches(1)[0]
    train_step(model, opt, F.cross_entropy, x, y)
    other = make_model(width=7)
    other_opt = CONFIGS[name](other)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        other_opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_without_grad_are_skipped(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    unused = nn.Linear(2, 2)
    model.add_module("unused", unused)  # never called: its grads stay None
    frozen = model[0].bias
    frozen.requires_grad_(False)

    def forward(x):
        return model[2](model[1](model[0](x)))

    holder = nn.Module()
    holder.net = model
    holder.forward = forward
    opt = CONFIGS[name](holder)
    before = (unused.weight.detach().clone(), frozen.detach().clone(), model[2].weight.detach().clone())
    for x, y in batches(3):
        train_step(holder, opt, F.cross_entropy, x, y)
    assert torch.equal(before[0], unused.weight) and torch.equal(before[1], frozen)
    assert not torch.equal(before[2], model[2].weight)


@pytest.mark.parametrize("name", ["dn_gauss_newton_sampled", "dn_hutchinson", "kfac_sampled"])
def test_closure_free_step_where_required_raises(name):
    model = make_model()
    opt = CONFIGS[name](model)
    assert opt.closure_required(0)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_empirical_diagonal_newton_needs_no_closure():
    model = make_model()
    opt = DiagonalNewton(model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert not opt.closure_required(0)
    opt.step()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_build_optimizer_by_name_trains(name):
    model = make_model()
    opt = build_optimizer(name, model, lr=0.05)
    x, y = batches(1)[0]
    losses = [train_step(model, opt, F.cross_entropy, x, y) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert isinstance(opt, CurvatureOptimizer) == (name in ("diagonal_newton", "kfac"))


def test_build_optimizer_defaults_and_passthrough():
    model = make_model()
    sgd = build_optimizer("sgd", model)
    assert sgd.param_groups[0]["momentum"] == 0.9
    instance = torch.optim.Adam(model.parameters())
    assert build_optimizer(instance, model) is instance
    made = build_optimizer(lambda m: torch.optim.SGD(m.parameters(), lr=0.3), model)
    assert made.param_groups[0]["lr"] == 0.3


def test_build_optimizer_names_an_optimizer_class_given_for_an_instance():
    """torch.optim.Adam itself was called as a factory on the model: "optimizer can only optimize Tensors"."""
    with pytest.raises(TypeError, match=r"spec: got the class Adam, not an optimizer; .*lambda model: "
                                        r"Adam\(model.parameters\(\), ...\)"):
        build_optimizer(torch.optim.Adam, make_model())


def test_build_optimizer_unknown_name_lists_names():
    with pytest.raises(ValueError, match="diagonal_newton") as info:
        build_optimizer("lbfgs", make_model())
    assert "lbfgs" in str(info.value) and "kfac" in str(info.value)


def test_build_optimizer_refuses_lazy_parameters():
    with pytest.raises(ValueError, match="lazy"):
        build_optimizer("adam", nn.LazyLinear(3))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_non_finite_gradient_skips_the_step(name, caplog):
    model = make_model()
    opt = CONFIGS[name](model)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    bad_loss = lambda out, t: F.cross_entropy(out, t) * float("nan")  # noqa: E731
    with caplog.at_level("WARNING", logger="dreidel.optim"):
        train_step(model, opt, bad_loss, x, y)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert any("non-finite gradient" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_returns_the_loss_whenever_it_evaluated_the_closure(name):
    model = make_model()
    opt = CONFIGS[name](model)
    for x, y in batches(6):
        losses = []

        def closure():
            losses.append(F.cross_entropy(model(x), y))
            return losses[-1]

        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        returned = opt.step(closure)
        if losses:
            assert returned is not None and torch.equal(returned, losses[0].detach())
        else:
            assert returned is None


def lbfgs_style_closure(opt, model, x, y):
    """torch's LBFGS convention: the closure itself zeroes the gradients and calls backward."""

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lbfgs_style_closure_without_backward_raises(name):
    """torch's LBFGS convention (zero_grad + backward inside the closure, none before step) is refused."""
    model = make_model()
    opt = CONFIGS[name](model)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.raises(ValueError, match="backward before step"):
        opt.step(lbfgs_style_closure(opt, model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"dn_empirical"}))  # it never evaluates a closure
def test_closure_that_calls_backward_after_a_normal_backward_raises(name):
    """The same LBFGS-style closure after a proper backward: it would rewrite the gradients mid-step."""
    model = make_model()
    opt = CONFIGS[name](model)
    for x, y in batches(12):
        closure = lbfgs_style_closure(opt, model, x, y)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if not opt.closure_required(opt.steps_taken if hasattr(opt, "steps_taken") else 0):
            opt.step(closure)  # a step that does not evaluate the closure is unaffected
            continue
        with pytest.raises(ValueError, match="closure: it changed the parameters' gradients"):
            opt.step(closure)
        return
    pytest.fail(f"{name} evaluated no closure within 12 steps")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_internal_closure_calls_leave_batchnorm_statistics_alone(name):
    """Only the training step's own forward counts: running stats as after exactly one forward per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model[1])
    opt = CONFIGS[name](model)
    calls = []
    for x, y in batches(4):
        h = model[0](x).detach()
        reference(h)  # the oracle: one BatchNorm update per step, with the pre-step weights

        def closure():
            calls.append(1)
            return F.cross_entropy(model(x), y)

        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(closure)
    assert calls or name == "dn_empirical"  # the others evaluate the closure at least once
    for (key, value), ours in zip(reference.named_buffers(), model[1].buffers()):
        torch.testing.assert_close(ours, value, msg=key)


@pytest.mark.parametrize("precision", ["bfloat16_params", "autocast_bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_low_precision_trains_with_float32_curvature(name, precision):
    """bfloat16 parameters or torch.autocast(bfloat16): curvature in float32, parameters keep their dtype,
    and a state round trip keeps the float32 factors (torch casts loaded state to the parameter dtype)."""
    dtype = torch.bfloat16 if precision == "bfloat16_params" else torch.float32
    model = make_model().to(dtype)
    opt = CONFIGS[name](model)
    x, y = batches(1)[0]
    data = [(x.to(dtype), y)] * 8

    def loss_fn(out, y):
        return F.cross_entropy(out.float(), y)

    def forward_loss(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast_bfloat16"):
            return loss_fn(model(x), y)

    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = forward_loss(x, y)
        loss.backward()
        opt.step(lambda: forward_loss(x, y))
        losses.append(float(loss.detach()))
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    curvature = [v for s in opt.state.values() for k, v in s.items()
                 if torch.is_tensor(v) and k in ("A", "G", "diag0", "diag1", "curvature")]
    assert curvature and all(v.dtype in (torch.float32, dtype) for v in curvature)
    if isinstance(opt, KFAC):
        assert all(v.dtype == torch.float32 for v in curvature)
        resumed = CONFIGS[name](model)
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        loaded = [v for s in resumed.state.values() for k, v in s.items() if k in ("A", "G", "diag0")]
        assert loaded and all(v.dtype == torch.float32 for v in loaded)
        x, y = data[0]
        opt.zero_grad()
        forward_loss(x, y).backward()
        resumed.step(lambda: forward_loss(x, y))


class DictOutput(nn.Module):
    """Returns a dict (as Hugging Face models do): the batch size must come from the input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "aux": (self.net(x[:1]).detach(),)}


@pytest.mark.parametrize("name", ["dn_empirical", "kfac_empirical"])
def test_batch_size_comes_from_the_input_when_the_output_is_a_dict(name):
    """Same curvature state as the plain model (whose curvature the oracle tests check)."""
    x, y = batches(1)[0]
    states = []
    for wrap in (False, True):
        net = make_model()
        model = DictOutput(net) if wrap else net
        opt = CONFIGS[name](model)
        loss_fn = (lambda out, t: F.cross_entropy(out["logits"], t)) if wrap else F.cross_entropy
        train_step(model, opt, loss_fn, x, y)
        states.append([opt.state[p] for p in net.parameters()])
    for plain, wrapped in zip(*states):
        for key in ("curvature", "A", "G", "diag0"):
            if key in plain:
                torch.testing.assert_close(wrapped[key], plain[key], msg=key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_add_param_group_trains_and_round_trips(name):
    """A group added later (as torch's fine-tuning recipes do) trains at its own lr and survives a state
    round trip; K-FAC's new group gets the base optimizer's defaults (momentum, ...)."""
    data = batches(6)
    states = []
    for resume in (False, True):
        model = make_model()
        head = nn.Linear(3, 3)
        full = nn.Sequential(model, head)
        for p in head.parameters():
            p.requires_grad_(False)  # frozen while the optimizer is built, as in a warm-up
        opt = CONFIGS[name](full)
        extra = nn.Parameter(torch.ones(3))
        opt.add_param_group({"params": [extra], "lr": 0.01})
        assert opt.param_groups[-1]["lr"] == 0.01
        if isinstance(opt, KFAC):
            assert opt.param_groups[-1]["momentum"] == opt.base.defaults["momentum"]
        for p in head.parameters():
            p.requires_grad_(True)
        head_before = head.weight.detach().clone()

        def loss_fn(out, y, extra=extra):
            return F.cross_entropy(out * extra, y)

        for step, (x, y) in enumerate(data):
            train_step(full, opt, loss_fn, x, y)
            if resume and step == 2:
                saved = copy.deepcopy(opt.state_dict())
                head.requires_grad_(False)  # rebuilt as it was built (K-FAC gives a frozen layer no block)
                opt = CONFIGS[name](full)
                head.requires_grad_(True)
                opt.add_param_group({"params": [extra], "lr": 0.01})
                opt.load_state_dict(saved)
        assert not torch.equal(extra.detach(), torch.ones(3))
        assert not torch.equal(head.weight.detach(), head_before)  # frozen when built, trains once unfrozen
        states.append([p.detach().clone() for p in [*full.parameters(), extra]])
    for a, b in zip(*states):
        assert torch.equal(a, b)


def test_kfac_defaults_are_the_base_optimizers_for_schedulers():
    opt = KFAC(make_model())
    assert opt.defaults is opt.base.defaults and "momentum" in opt.defaults
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycles momentum
    x, y = batches(1)[0]
    train_step(opt.model, opt, F.cross_entropy, x, y)
    scheduler.step()
    assert opt.base.param_groups[0]["lr"] == scheduler.get_last_lr()[0]


def trained_state(make):
    model = make_model()
    opt = make(model)
    for x, y in batches(3):
        train_step(model, opt, F.cross_entropy, x, y)
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "source,target,match",
    [(lambda m: KFAC(m), lambda m: DiagonalNewton(m), "KFAC"),
     (lambda m: DiagonalNewton(m), lambda m: KFAC(m), "DiagonalNewton"),
     (lambda m: KFAC(m), lambda m: KFAC(m, damping_mode="exact"), "damping_mode"),
     (lambda m: KFAC(m, factor_rank=1), lambda m: KFAC(m), "factor_rank")],
    ids=["kfac_into_dn", "dn_into_kfac", "factored_into_exact", "low_rank_into_dense"],
)
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "old_state"])
def test_loading_another_optimizers_state_names_the_mismatch(source, target, match, recorded):
    state = trained_state(source)
    if not recorded:  # saved before the record existed: type mismatches are still caught by their keys
        state.pop("optimizer")
        if match in ("damping_mode", "factor_rank"):
            return  # covered by test_old_factored_state_loads_into_exact_mode_with_fresh_inverses
        match = "KFAC|missing"
    with pytest.raises(ValueError, match=match):
        target(make_model()).load_state_dict(state)


@pytest.mark.parametrize("target", [lambda m: KFAC(m), lambda m: DiagonalNewton(m)], ids=["kfac", "dn"])
def test_loading_a_torch_optimizer_state_is_a_clear_error(target):
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    adam.step()
    with pytest.raises(ValueError, match="not saved by"):
        target(make_model()).load_state_dict(adam.state_dict())


def test_old_factored_state_loads_into_exact_mode_with_fresh_inverses():
    """No record to compare: the factored inverses are dropped and the exact eigenbasis rebuilt from the
    saved factors, so the next step is the exact damped Kronecker solve (float64 oracle)."""
    state = trained_state(lambda m: KFAC(m, kl_clip=None, adapt_damping=False, lr=1.0, momentum=0.0))
    state.pop("optimizer")
    model = make_model()
    opt = KFAC(model, damping_mode="exact", kl_clip=None, adapt_damping=False, lr=1.0, momentum=0.0)
    opt.load_state_dict(state)
    layer = model[0]
    factors = opt.state[layer.weight]
    assert "inv_A" not in factors and "eig_A" in factors
    opt.progress["step"] = 21  # neither a factor nor an inverse step: the loaded factors are used as they are
    opt._arm_capture()
    x, y = batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gamma = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], dim=1)
    before = layer.weight.detach().clone()
    opt.step()
    kron = torch.kron(factors["G"], factors["A"]) + opt.damping * torch.eye(gamma.numel())
    expected = torch.linalg.solve(kron, gamma.reshape(-1)).reshape(gamma.shape)
    torch.testing.assert_close(before - layer.weight.detach(), expected[:, :4])


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hooks_go_with_the_optimizer(name):
    import gc

    model = make_model()
    optimizer = CONFIGS[name](model)
    assert _forward_hooks(model) > 0
    optimizer.remove_hooks()
    assert _forward_hooks(model) == 0
    for _ in range(5):
        CONFIGS[name](model)  # dropped at once
    gc.collect()
    assert _forward_hooks(model) == 0


@pytest.mark.parametrize("name", sorted({**CONFIGS, **REMOVAL_CONFIGS}))
def test_a_step_after_remove_hooks_says_so(name):
    """It warned at every step that zero_grad() between the forward pass and backward() had dropped the records,
    and K-FAC went on as plain SGD (review). Optimizers that record no layer input (Hutchinson's, "gnb", a model
    without a Linear) went on stepping, with the batch counted as one sample once the hook on the output was
    gone: steps up to B times too long (a user audit); they raise too."""
    make = {**CONFIGS, **REMOVAL_CONFIGS}[name]
    x, y = batches(1)[0]
    model = make_model() if not name.startswith("conv") else _conv_model()
    optimizer = make(model)
    train_step(model, optimizer, F.cross_entropy, x, y)
    optimizer.remove_hooks()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"remove_hooks\(\) was called, so no layer inputs are recorded"):
        train_step(model, optimizer, F.cross_entropy, x, y)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_copying_or_pickling_an_optimizer_points_at_its_state_dict(name):
    """torch.optim.Optimizer pickles defaults, state and param_groups only: a copy lacked the model, its hooks and
    the parameter names, and failed at its first call (a user audit)."""
    import copy
    import pickle

    model = make_model()
    optimizer = CONFIGS[name](model)
    for attempt in (lambda: copy.deepcopy(optimizer), lambda: copy.deepcopy((model, optimizer)),
                    lambda: pickle.dumps(optimizer)):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled .* optimizer.state_dict\(\)"):
            attempt()
    copy.deepcopy(model)  # the model alone copies (with inert hooks)


def test_a_compiled_model_that_ran_before_the_optimizer_is_named_in_the_warning():
    """Dynamo reuses code compiled without the optimizer's hooks: K-FAC then never formed its factors, and the
    warning blamed zero_grad() alone (a user audit)."""
    x, y = batches(1)[0]
    torch._dynamo.reset()  # no code compiled by an earlier test (with hooks) to reuse
    model = torch.compile(make_model(), backend="eager")
    F.cross_entropy(model(x), y).backward()  # compiled before the optimizer existed
    optimizer = KFAC(model)
    try:
        with pytest.warns(UserWarning, match=r"torch.compile .* call torch._dynamo.reset\(\) after building it"):
            train_step(model, optimizer, F.cross_entropy, x, y)
    finally:
        torch._dynamo.reset()


def test_forward_passes_without_steps_keep_a_bounded_record(monkeypatch):
    from dreidel.optim._capture import ActivationCapture

    monkeypatch.setattr(ActivationCapture, "MAX_RECORDS", 64)  # 1024 by default; the same rule, quicker
    model = make_model()
    optimizer = KFAC(model)  # armed for its first step
    x, y = batches(1)[0]
    with pytest.warns(UserWarning, match="more than 64 calls of a layer recorded"):
        for _ in range(80):
            F.cross_entropy(model(x), y).backward()
    assert max(len(records) for records in optimizer.capture.records.values()) == 64
    capture = optimizer.capture  # nor do the rows counted per backward grow without bound
    assert max(len(capture._group_rows), len(capture._layer_rows), len(capture._groups_with_gradients)) <= 64
    layers = nn.ModuleList(make_model())  # no root pass: only the layers' rows are counted
    optimizer = KFAC(layers)
    with pytest.warns(UserWarning, match="more than 64 calls of a layer recorded"):
        for _ in range(80):
            h = x
            for layer in layers:
                h = layer(h)
            F.cross_entropy(h, y).backward()
    capture = optimizer.capture
    assert max(len(capture._group_rows), len(capture._layer_rows), len(capture._groups_with_gradients)) <= 64


def test_recompiling_a_sequential_detaches_the_old_optimizers_hooks():
    import dreidel as dr

    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model = dr.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model.compile("kfac")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    old = model.optimizer
    model.compile("diagonal_newton")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert not old.capture.records and not old.capture._handles
    assert _forward_hooks(model) == len(model.optimizer.capture._handles)


@pytest.mark.parametrize("name", ["kfac_empirical", "kfac_sampled", "dn_hutchinson", "dn_gauss_newton_sampled"])
@pytest.mark.parametrize("bad", ["vector", "float"])
def test_a_closure_not_returning_a_scalar_loss_is_refused_before_any_update(name, bad):
    model = make_model()
    optimizer = CONFIGS[name](model)
    x, y = batches(1)[0]
    before = copy.deepcopy(model.state_dict())

    def closure():
        if bad == "float":
            return float(F.cross_entropy(model(x), y))
        return F.cross_entropy(model(x), y, reduction="none")

    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if not optimizer.closure_required(0):
        pytest.skip("this configuration calls no closure on its first step")
    with pytest.raises(ValueError, match="closure\\(\\) must return the loss as a one-element tensor"):
        optimizer.step(closure)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_diagonal_newton_takes_a_one_element_tensor_lr():
    results = []
    for lr in (0.1, torch.tensor([0.1])):
        model = make_model()
        optimizer = DiagonalNewton(model, lr=lr)
        for x, y in batches(3):
            train_step(model, optimizer, F.cross_entropy, x, y)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_diagonal_newton_keeps_a_float16_models_curvature_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200)).half()
    optimizer = DiagonalNewton(model, damping=1e-9, curvature_every=1)
    x, y = torch.randn(16, 100).half() * 0.05, torch.randn(16, 200).half() * 0.05
    optimizer.zero_grad()
    F.mse_loss(model(x).float(), y.float()).backward()
    optimizer.step()
    curvature = optimizer.state[model[0].weight]["curvature"]
    assert curvature.dtype == torch.float32 and curvature.abs().max() > 0


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_zero_grad_between_forward_and_backward_warns_that_curvature_is_lost(name):
    model = make_model()
    optimizer = CONFIGS[name](model)
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()  # drops the inputs the forward pass just recorded
    loss.backward()
    with pytest.warns(UserWarning, match="no layer inputs were recorded .* Call optimizer.zero_grad\\(\\) before"):
        optimizer.step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["dn_empirical", "kfac_empirical", "dn_gauss_newton_sampled", "kfac_sampled",
                                  "dn_hutchinson"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_with_spectral_layers_train(name, dtype):
    from dreidel.layers import LinearWHT

    torch.manual_seed(0)
    model = nn.Sequential(LinearWHT(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    optimizer = CONFIGS[name](model)
    for x, y in batches(4):
        train_step(model, optimizer, lambda out, target: F.cross_entropy(out.float(), target), x.to(dtype), y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(optimizer.state[p] for p in model[0].parameters())  # the spectral layer's curvature was kept


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_copies_and_pickles_of_the_model_do_not_feed_the_optimizer(name):
    import io

    model = make_model()
    optimizer = CONFIGS[name](model)
    torch.save(model, io.BytesIO())  # the hooks pickle (as inert ones)
    copy_of_model = copy.deepcopy(model)
    x, y = batches(1)[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    records = {m: len(r) for m, r in optimizer.capture.records.items()}
    F.cross_entropy(copy_of_model(x[:3]), y[:3]).backward()  # an evaluation or EMA copy
    assert optimizer.capture.output_rows == 8
    assert {m: len(r) for m, r in optimizer.capture.records.items()} == records


@pytest.mark.parametrize("name", ["dn_empirical", "kfac_empirical"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_curvature_comes_back_from_a_state_dict_as_saved(name, dtype, tmp_path):
    """torch.optim casts loaded state to the parameter's dtype: the float32 curvature of a bfloat16 or float16
    model came back rounded (a resumed run diverged), underflowed or, for float16, overflowed to inf. It is
    now taken as saved, and the resumed run follows the original bit for bit."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3)).to(dtype)

    def loss_fn(out, target):
        return F.cross_entropy(out.float(), target)

    model = make()
    optimizer = CONFIGS[name](model)
    data = [(x.to(dtype) * 300, y) for x, y in batches(6)]  # float16 factors beyond 65504
    for x, y in data[:3]:
        train_step(model, optimizer, loss_fn, x, y)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed_model = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed = CONFIGS[name](resumed_model)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    ours = optimizer.state[model[0].weight]
    theirs = resumed.state[resumed_model[0].weight]
    for key, value in ours.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    for x, y in data[3:]:
        train_step(model, optimizer, loss_fn, x, y)
        train_step(resumed_model, resumed, loss_fn, x, y)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def assert_same_curvature(expected, expected_model: nn.Module, optimizer, model: nn.Module) -> None:
    """``optimizer``'s curvature state for ``model``'s parameters equals ``expected``'s for ``expected_model``'s."""
    for p, q in zip(expected_model.parameters(), model.parameters()):
        for key, value in expected.state[p].items():
            if key in ("curvature", "A", "G", "diag0", "diag1"):
                torch.testing.assert_close(optimizer.state[q][key], value)


def assert_backward_passes_give_one_batchs_step(name: str, backward_passes) -> None:
    """One batch of 8 with a plain backward against a copy of the model whose gradient comes from
    ``backward_passes(model, x, y)``: the same gradient must give the same counted rows, curvature and step."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain_model = make_model()
    other_model = copy.deepcopy(plain_model)
    plain, other = CONFIGS[name](plain_model), CONFIGS[name](other_model)
    plain.zero_grad()
    F.cross_entropy(plain_model(x), y).backward()
    plain.step(lambda: F.cross_entropy(plain_model(x), y))
    other.zero_grad()
    backward_passes(other_model, x, y)
    assert other.capture.output_rows == 8
    other.step(lambda: F.cross_entropy(other_model(x), y))
    assert_same_curvature(plain, plain_model, other, other_model)
    for p, q in zip(plain_model.parameters(), other_model.parameters()):
        torch.testing.assert_close(q, p)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_accumulated_micro_batches_give_the_full_batch_curvature(name):
    """Two micro-batches of 4 (each loss halved) have the gradient of one batch of 8: the curvature is the
    same too (their samples are different samples, not one sample seen twice)."""

    def accumulated(model, x, y):
        for part in (slice(0, 4), slice(4, 8)):
            (F.cross_entropy(model(x[part]), y[part]) / 2).backward()

    assert_backward_passes_give_one_batchs_step(name, accumulated)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
@pytest.mark.parametrize("extra", ["autograd_grad_first", "autograd_grad_of_another_pass"])
def test_torch_autograd_grad_calls_do_not_feed_the_curvature(name, extra):
    """Only backward passes that accumulate into .grad feed the step, and so the curvature. A gradient
    computed with torch.autograd.grad on the same forward pass (a gradient-norm monitor, say) was added to the
    layers' output gradients (2 g: 4x the curvature); one on another forward pass counted as a micro-batch."""

    def monitored(model, x, y):
        if extra == "autograd_grad_of_another_pass":
            torch.autograd.grad(F.cross_entropy(model(x[:3]), y[:3]), list(model.parameters()))
        loss = F.cross_entropy(model(x), y)
        if extra == "autograd_grad_first":
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()

    assert_backward_passes_give_one_batchs_step(name, monitored)


class Scaled(nn.Module):
    """A model of bare parameters: no layer for the curvature hooks to watch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("setup", ["gnb", "bare_parameters", "frozen_layer_norm"])
def test_autograd_grad_calls_count_no_rows_where_no_watched_layer_tells_passes_apart(setup):
    """Without a trainable watched layer (gnb watches none, a model of bare parameters has none to watch, a
    frozen LayerNorm has no trainable parameter), the model's own parameters tell a torch.autograd.grad call
    from a backward: a review found its 3 rows counted with the batch's 8."""
    torch.manual_seed(0)
    model = Scaled() if setup == "bare_parameters" else make_model()
    if setup == "frozen_layer_norm":
        model[2].requires_grad_(False)
    optimizer = DiagonalNewton(model, curvature="gnb" if setup == "gnb" else "gauss_newton")
    optimizer.zero_grad()
    torch.autograd.grad(model(torch.randn(3, 4)).square().mean(), [p for p in model.parameters() if p.requires_grad])
    model(torch.randn(8, 4)).square().mean().backward()
    assert optimizer.capture.output_rows == 8


@pytest.mark.parametrize("name", ["kfac_sampled", "dn_gauss_newton_sampled"])
def test_a_closure_that_calls_autograd_grad_leaves_the_sampled_curvature_alone(name):
    """The optimizer's own sampled backward is a torch.autograd.grad call whose gradients count; one that the
    closure makes (an input-gradient penalty computed inside the loss) must not be added to them."""

    def penalised_loss(model, x, y):
        with torch.enable_grad():  # the penalty needs a graph even where the optimizer evaluates without one
            x = x.clone().requires_grad_(True)
            out = model(x)
            (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            return F.cross_entropy(out, y) + 0.0 * grad_x.square().sum()

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain_model = make_model()
    penalised_model = copy.deepcopy(plain_model)
    plain, penalised = CONFIGS[name](plain_model), CONFIGS[name](penalised_model)
    for model, optimizer, loss_of in ((plain_model, plain, lambda m: F.cross_entropy(m(x), y)),
                                      (penalised_model, penalised, lambda m: penalised_loss(m, x, y))):
        torch.manual_seed(1)  # the same sampled labels for both
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step(lambda: loss_of(model))
    assert_same_curvature(plain, plain_model, penalised, penalised_model)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_a_layer_applied_to_one_vector_does_not_make_the_batch_one_sample(name):
    """A learned query projected by a Linear (a 1-D input) inside a batched model: the batch is still B."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.query, self.project = nn.Linear(4, 6), nn.Parameter(torch.randn(6)), nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # (B, T, 4) -> (B, 3)
            h = self.embed(x)
            weights = torch.softmax(h @ self.project(self.query), dim=1)
            return self.head((weights.unsqueeze(-1) * h).sum(1))

    torch.manual_seed(0)
    model = Pooled()
    optimizer = CONFIGS[name](model)
    x, y = torch.randn(5, 7, 4), torch.randint(0, 3, (5,))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert optimizer.capture.output_rows == 5


class _Siamese(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, a, b):
        return self.encoder(a) - self.encoder(b)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_a_model_called_twice_for_one_backward_is_one_batch(name):
    """A shared encoder applied to both halves of a pair by the training loop (two root forward passes, one
    backward) has the curvature of the same calls inside one module's forward."""
    curvatures = []
    for wrapped in (True, False):
        encoder = make_model()
        root = _Siamese(encoder) if wrapped else encoder
        optimizer = CONFIGS[name](root)
        gen = torch.Generator().manual_seed(1)
        a, b, y = torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        F.cross_entropy(root(a, b) if wrapped else encoder(a) - encoder(b), y).backward()
        assert optimizer.capture.output_rows == 16
        optimizer.step(lambda: F.cross_entropy(encoder(a) - encoder(b), y))
        curvatures.append([optimizer.state[p][key] for p in encoder.parameters() for key in ("curvature", "G")
                           if key in optimizer.state[p]])
    for one, other in zip(*curvatures):
        torch.testing.assert_close(one, other)


def assert_an_extra_forward_changes_nothing(name: str, rows: int, before_backward: bool) -> None:
    """One step with and one without a forward of ``rows`` rows, with grad enabled, whose output no loss uses,
    run between the training forward and backward() or between backward() and the step: the same rows scale
    the curvature, and the optimizer ends in the same state."""
    states = []
    x, y = batches(1)[0]
    for extra_forward in (False, True):
        model = make_model()
        optimizer = CONFIGS[name](model)
        optimizer.zero_grad()
        out = model(x)
        if extra_forward and before_backward:
            model(torch.randn(rows, 4))
        F.cross_entropy(out, y).backward()
        if extra_forward and not before_backward:
            model(torch.randn(rows, 4))
        assert optimizer.capture.output_rows == x.shape[0]
        optimizer.step(lambda: F.cross_entropy(model(x), y))
        states.append([value for p in model.parameters() for value in optimizer.state[p].values()
                       if isinstance(value, torch.Tensor)])
    for one, other in zip(*states):
        torch.testing.assert_close(one, other)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_a_forward_with_grad_between_backward_and_step_changes_nothing(name):
    """A validation or logging forward run with grad enabled after backward(): its rows are not counted."""
    assert_an_extra_forward_changes_nothing(name, rows=32, before_backward=False)


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
@pytest.mark.parametrize("rows", [17, 64])
def test_a_forward_with_grad_between_forward_and_backward_changes_nothing(name, rows):
    """A monitoring forward with grad enabled between the training forward and backward(), whose output no loss
    uses: the batch's rows still scale the curvature (a review found them replaced by the monitoring pass's:
    the curvature scaled by 17/8 or 64/8 with this batch of 8)."""
    assert_an_extra_forward_changes_nothing(name, rows=rows, before_backward=True)


@pytest.mark.parametrize("curvature", ["gnb", "gauss_newton"])
def test_accumulated_micro_batches_count_all_rows_without_recorded_layers(curvature):
    """gnb records no layer, and a model of bare parameters has none to record: the backward reaching the
    model's output still separates the micro-batches (only the last one's rows used to count)."""
    model = Scaled() if curvature == "gauss_newton" else make_model()
    optimizer = DiagonalNewton(model, curvature=curvature)
    optimizer.zero_grad()
    for rows in (3, 5):
        out = model(torch.randn(rows, 4))
        (out.square().mean() / 2).backward()
    assert optimizer.capture.output_rows == 8


@pytest.mark.parametrize("name", ["kfac_empirical", "dn_empirical"])
def test_two_backward_passes_through_one_graph_add_their_gradients(name):
    """retain_graph: the curvature is that of the summed loss, as p.grad is (the second used to replace the first)."""
    x, y = batches(1)[0]
    states = []
    for split in (False, True):
        model = make_model()
        optimizer = CONFIGS[name](model)
        optimizer.zero_grad()
        out = model(x)
        if split:
            (F.cross_entropy(out, y) / 2).backward(retain_graph=True)
            (F.cross_entropy(out, y) / 2).backward()
        else:
            F.cross_entropy(out, y).backward()
        optimizer.step(lambda: F.cross_entropy(model(x), y))
        states.append([value for p in model.parameters() for value in optimizer.state[p].values()
                       if isinstance(value, torch.Tensor)])
    for one, other in zip(*states):
        torch.testing.assert_close(one, other)


@pytest.mark.parametrize("make, option, value, message", [
    (CONFIGS["dn_empirical"], "lr", float("nan"), r"param_groups\[0\].lr: expected a finite number, got nan"),
    (CONFIGS["dn_empirical"], "betas", (0.9, 1.5), r"param_groups\[0\].betas\[1\]: expected a number in \[0, 1\)"),
    (CONFIGS["dn_hutchinson"], "damping", -1.0, r"param_groups\[0\].damping: expected a number in \[0, inf\), got -1.0"),
    (CONFIGS["kfac_empirical"], "lr", torch.tensor(float("inf")), r"param_groups\[0\].lr: expected a finite number"),
    (CONFIGS["kfac_sampled"], "momentum", 1.0, r"param_groups\[0\].momentum: expected a number in \[0, 1\)"),
], ids=["dn_lr_nan", "dn_beta2", "dn_damping", "kfac_lr_tensor_inf", "kfac_momentum"])
def test_a_param_group_option_set_out_of_range_after_construction_stops_the_step(make, option, value, message):
    """A scheduler or a hand edit of param_groups is checked at the step, before anything changes: lr = NaN
    used to turn every parameter into NaN without a word."""
    model = make_model()
    opt = make(model)
    x, y = batches(1)[0]
    train_step(model, opt, F.cross_entropy, x, y)
    opt.param_groups[0][option] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        train_step(model, opt, F.cross_entropy, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_torch_func_transform_running_the_model_before_the_step_is_not_recorded(name):
    """Per-sample gradients by vmap(grad(functional_call(model, ...))) between backward() and step(): the hooks
    recorded the transform's wrapped tensors, and the step failed on them (review). Now the transform's calls
    are ignored: the step equals one taken without them."""
    data = batches(2)
    results = []
    for with_transform in (False, True):
        model = make_model()
        opt = CONFIGS[name](model)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if with_transform:
                params = {k: v.detach() for k, v in model.named_parameters()}

                def sample_loss(p, xi, yi):
                    return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

                torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
            opt.step(lambda: F.cross_entropy(model(x), y))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


class _LossModel(nn.Module):
    """A model that returns its loss (a 0-d output), as many training wrappers do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def _three_layer_net() -> list[nn.Module]:
    torch.manual_seed(1)
    return [nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]


@pytest.mark.parametrize("optimizer_class", [DiagonalNewton, KFAC])
def test_curvature_is_the_same_when_the_model_returns_its_loss_or_has_no_forward(optimizer_class):
    # The batch size scales the empirical Fisher; it was read off the model's output alone, so a model returning
    # its 0-d loss, or an nn.ModuleList whose layers the loop calls, got curvature 32 times too small.
    x, y = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    curvatures = {}
    for form in ("sequential", "module list", "returns its loss"):
        layers = _three_layer_net()
        model = {"sequential": lambda: nn.Sequential(*layers), "module list": lambda: nn.ModuleList(layers),
                 "returns its loss": lambda: _LossModel(nn.Sequential(*layers))}[form]()
        optimizer = optimizer_class(model, lr=0.1, **({"adapt_damping": False} if optimizer_class is KFAC else {}))
        optimizer.zero_grad()
        if form == "module list":
            h = x
            for layer in model:
                h = layer(h)
            loss = F.cross_entropy(h, y)
        else:
            loss = model(x, y) if form == "returns its loss" else F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        first = layers[0].weight
        curvatures[form] = optimizer.state[first]["curvature" if optimizer_class is DiagonalNewton else "G"].clone()
    torch.testing.assert_close(curvatures["module list"], curvatures["sequential"])
    torch.testing.assert_close(curvatures["returns its loss"], curvatures["sequential"])


@pytest.mark.parametrize("container, likelihood", [("sequential", "empirical"), ("sequential", "categorical"),
                                                   ("module list", "empirical")])  # sampling needs the root's output
def test_kfac_damping_compares_losses_with_the_forward_passs_dropout_masks(likelihood, container):
    # rho = (loss after - loss before) / (change predicted from the gradient); with a fresh dropout mask in each
    # closure call, and the gradient from yet another, rho was noise and the damping climbed to its maximum on
    # any model with dropout. The closure's calls now draw what the forward pass drew.
    masks = []

    class Dropout(nn.Module):  # nn.Dropout's draws, kept
        def forward(self, x):
            masks.append(torch.rand(x.shape) >= 0.5)
            return x * masks[-1] * 2

    torch.manual_seed(0)
    layers = [nn.Linear(10, 32), nn.ReLU(), Dropout(), nn.Linear(32, 3)]
    model = nn.Sequential(*layers) if container == "sequential" else nn.ModuleList(layers)
    x, y = torch.randn(64, 10), torch.arange(64) % 3
    optimizer = KFAC(model, lr=0.1, damping_every=1, likelihood=likelihood)

    def closure():
        if container == "sequential":
            return F.cross_entropy(model(x), y)
        h = x
        for layer in layers:
            h = layer(h)
        return F.cross_entropy(h, y)

    for _ in range(2):
        optimizer.zero_grad()
        masks.clear()
        start = torch.get_rng_state()
        closure().backward()
        after_forward = torch.get_rng_state()
        optimizer.step(closure)
        assert len(masks) == 3
        if container == "sequential":  # the root's pass is seen: every call draws the forward pass's masks
            assert all(torch.equal(mask, masks[0]) for mask in masks)
        else:  # no root pass (an nn.ModuleList): the step's calls draw alike, from where the forward left off
            assert torch.equal(masks[1], masks[2]) and not torch.equal(masks[0], masks[1])
        assert torch.equal(torch.get_rng_state(), after_forward)  # the step itself leaves the generator alone
        assert not torch.equal(start, after_forward)


@pytest.mark.parametrize("optimizer_class", [DiagonalNewton, KFAC])
def test_an_unbatched_input_to_a_spectral_layer_is_a_batch_of_one(optimizer_class):
    from dreidel.layers import LinearWHT

    states = []
    for batched in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(LinearWHT(8, 8), nn.Tanh(), nn.Linear(8, 3))
        optimizer = optimizer_class(model, lr=0.1, **({"adapt_damping": False} if optimizer_class is KFAC else {}))
        x, y = torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.tensor(1)
        optimizer.zero_grad()
        if batched:
            F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
        else:
            F.cross_entropy(model(x), y).backward()  # refused with "needs a batch dimension" before
        optimizer.step()
        states.append((copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()["state"])))
    for (name, ours), theirs in zip(states[0][0].items(), states[1][0].values()):
        torch.testing.assert_close(ours, theirs, msg=name)
    for key, ours in states[0][1].items():
        for field, value in ours.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, states[1][1][key][field], msg=f"{key}.{field}")


@pytest.mark.parametrize("optimizer_class", [DiagonalNewton, KFAC])
def test_parametrized_layers_are_left_to_the_fallback(optimizer_class):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    from dreidel.layers import LinearWHT

    class Doubled(nn.Module):
        def forward(self, scale):
            return 2 * scale

    torch.manual_seed(0)
    model = nn.Sequential(LinearWHT(8, 8), nn.Tanh(), weight_norm(nn.Linear(8, 6)), nn.Tanh(), nn.Linear(6, 3))
    parametrize.register_parametrization(model[0], "out_scale", Doubled())  # crashed both optimizers' steps
    options = {"adapt_damping": False, "momentum": 0.0} if optimizer_class is KFAC else {}
    optimizer = optimizer_class(model, lr=0.1, **options)
    x, y = torch.randn(16, 8), torch.arange(16) % 3
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    norm_weights = [p.detach().clone() for p in model[2].parametrizations.weight.parameters()]
    grads = [p.grad.clone() for p in model[2].parametrizations.weight.parameters()]
    optimizer.step()
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    if optimizer_class is KFAC:  # no block (weight norm's had factors but preconditioned nothing): plain SGD
        assert [block.name for block in optimizer.blocks] == ["4"]
        for before, grad, after in zip(norm_weights, grads, model[2].parametrizations.weight.parameters()):
            torch.testing.assert_close(after, before - 0.1 * grad)

