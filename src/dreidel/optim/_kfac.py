"""K-FAC: Kronecker-factored natural-gradient preconditioning around a base optimizer.

Martens & Grosse 2015 (arXiv:1503.05671) for dense layers, Grosse & Martens 2016 (arXiv:1602.01407)
for convolutions, KL-clipping of the update from Ba et al. 2017 (ICLR, "Distributed second-order
optimization using Kronecker-factored approximations") as used in ACKTR (Wu et al. 2017,
arXiv:1708.05144). The per-layer algebra is in ``_kfac_blocks``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch
from torch import nn

from dreidel._checks import check_count, check_number
from dreidel._warnings import warn
from dreidel.optim._base import (Closure, CurvatureOptimizer, all_finite, check_seed, check_single_process,
                                 check_torch_options, named_model_parameters)
from dreidel.optim._capture import ActivationCapture, RandomDraws, warn_no_records
from dreidel.optim._kfac_blocks import Block, find_blocks
from dreidel.optim._sampling import check_likelihood, sample_output_vector

logger = logging.getLogger("dreidel.optim")
# The options of the default SGD base that K-FAC checks in its groups (add_param_group, and at every step)
_GROUP_OPTIONS = ("lr", "momentum", "weight_decay")

BaseFactory = Callable[[list], torch.optim.Optimizer]


class KFAC(CurvatureOptimizer):
    """K-FAC preconditioner; the preconditioned gradient is handed to a base optimizer.

    Each step:

    1. every ``factor_every`` steps (every step during the first ``factor_warmup``) update the running
       factors A, G (or diagonals) from the captured layer inputs and output gradients;
    2. every ``inverse_every`` steps (and at steps 1, 4, 16, ... before that) eigendecompose them;
    3. replace ``p.grad`` by ``(F_block + damping I)^{-1} grad`` for every supported layer (other
       parameters keep their gradient);
    4. scale all preconditioned gradients by ``min(1, sqrt(kl_clip / sum lr^2 grad . precond))`` (each
       parameter with its group's ``lr``);
    5. ``base.step()``;
    6. every ``damping_every`` steps compare the loss change with the quadratic model and adapt
       ``damping`` (Levenberg-Marquardt, M&G 2015 Sec. 6.5: rho > 3/4 -> damping * omega,
       rho < 1/4 -> damping / omega, omega = (19/20)^damping_every; the model uses the blocks'
       approximations and damping; parameters without a block contribute their linear term only). A step
       the model predicts no decrease for (an lr past the model's minimum, or momentum) counts as rho < 1/4
       when the loss rose, and leaves the damping alone when it fell. A step the KL clip shortened never
       lowers the damping (rho < 1/4 still raises it): the clip, not the damping, set its length.
       The closure's calls in the step (the loss before it and after it, a sampled backward) draw from
       torch's random generators what the model's last forward pass with gradients drew (its dropout
       masks), so that they evaluate the function whose gradient is being followed; where the model's own
       forward is not called (an ``nn.ModuleList``), they draw alike from the generators' states at the
       step. Either way the step leaves the generators where it found them.

    A non-finite value in a gradient skips the step; a non-finite loss after the step reverts it, resets
    the base optimizer's state (its momentum carried the step, and would replay it) and multiplies the
    damping by 10; a non-finite preconditioned gradient falls back to the raw gradient and raises the
    damping; non-finite new factors (overflowing activations or gradients) are not folded in; a
    non-finite predicted KL change skips the step and multiplies the damping by 10; a failed
    eigendecomposition retries with jitter. After each raise of the damping the inverses are refreshed at
    the next step, so the factored damping acts at once. All are logged as warnings.

    Args:
        model: the module; its Linear/Conv1d/Conv2d (Kronecker factors), Embedding (diagonal A),
            LayerNorm and ``PerSampleGradients`` layers (exact diagonal Fisher) are preconditioned.
            Other parameters, those shared by two modules (a tied embedding and output head), sparse
            Embeddings and the projections inside ``nn.MultiheadAttention`` (it uses their weights
            without calling them) and layers with a parametrised weight (``torch.nn.utils.parametrize``:
            weight norm, orthogonal) are left to the base optimizer (listed once at INFO level).
            Inputs are batch-first, ``(B, ..., features)``: a sequence-first ``(T, B, C)`` layout (torch's
            default for ``nn.Transformer*``) takes each time step for a sample. Unbatched inputs (a 1-D
            Linear or spectral-layer input, (C, L) / (C, H, W) convolution inputs) are a batch of one.
            A layer whose parameters the base optimizer does not all update (a ``base`` factory given only
            some of them) is not preconditioned. A parameter frozen after construction (no gradient) is
            left out of its layer's update, which takes its gradient as 0.
        lr, momentum, weight_decay: of the default base optimizer, SGD with momentum (0.1, 0.9 and 0
            when not given); refused together with ``base`` (give them to its factory).
        damping: initial Tikhonov damping lambda in ``(G ⊗ A + lambda I)^{-1}``, absolute, in units of
            the mean loss's curvature. M&G 2015 start high (150 for a per-case loss summed over the
            outputs) and let the Levenberg-Marquardt rule lower it (by 0.77 per 5 steps at most, so
            ~130 steps per factor 1000, and only on steps the KL clip leaves whole: while the clip binds,
            as it does at lr 1 or early in training, it does not fall); 0.1 by default, a fit for
            cross-entropy over ~10 classes. The
            scale is problem-dependent: a mean-reduced MSE over D outputs has curvature ~2/D smaller
            per output, and on the MNIST autoencoder (D = 784) the Fisher eigenvalues are ~1e-7..1e-3,
            so a start of 0.1 swamps them and the step is plain SGD with step size lr/damping for the
            first few hundred steps (benchmarks/optimizers.py: tuned start 1e-4 there). Tune it.
            Too small a start (1e-3) amplifies the near-null directions of factors estimated from a
            few batches and diverged on the MNIST MLP without KL clipping. (A damping relative to
            each block's mean eigenvalue was tried: it made the steps of near-flat output layers far
            too large on the MNIST autoencoder.)
        factor_decay: EMA decay of the factors (M&G 2015 use 0.95).
        factor_every: update the factors every this many steps (M&G: every step; we default to 5, which keeps the
            sampled-Fisher backward and the factor products off most steps).
        inverse_every: refresh the inverses every this many steps (M&G's T3 = 20). Refreshing them with every factor
            update (``inverse_every = factor_every``) costs one more inverse per factor step; on the MNIST
            autoencoder (factor_every 10) it reached Adam's final loss in ~20% fewer steps than 20.
        factor_warmup: update the factors on every step before this one (default: ``inverse_every``), so
            that the first inverses (steps 1, 4, 16, ...) see more than one batch. Each warm-up step
            costs a factor update (and a sampled backward); 0 keeps the ``factor_every`` cadence from
            the start (on the MNIST autoencoder this reached a given loss in no more steps).
        kl_clip: bound on the predicted KL change ``lr^2 g^T F^{-1} g`` (ACKTR: 1e-3); None disables.
        adapt_damping: Levenberg-Marquardt adaptation of ``damping`` (needs the closure every
            ``damping_every`` steps, in phase with the factor steps: a forward pass after the step, plus one
            before it unless a sampled-likelihood factor step already ran the closure). M&G adapt it every T1 = 5 steps.
        min_damping, max_damping: bounds of the adapted damping.
        likelihood: ``"empirical"`` builds G from the training step's own (true-label) backward -- free,
            but the empirical Fisher, which is not the curvature (Kunstner et al. 2019,
            arXiv:1905.12558); ``"categorical"``/``"gaussian"`` sample output gradients from the model's
            predictive distribution (the true Fisher = Gauss-Newton, M&G 2015 Sec. 5) at the cost of
            one extra backward through the closure on factor steps.
        damping_mode: ``"exact"`` solves ``(G ⊗ A + damping I)`` exactly in the Kronecker eigenbasis (four
            matrix products per layer and step); ``"factored"`` uses M&G's pi-split damping with inverses
            formed every ``inverse_every`` steps (two products per step, ~2x cheaper on wide layers).
        factor_rank: factored mode only: invert factors wider than ``2 * factor_rank`` in rank
            ``factor_rank`` (top eigenpairs by randomized subspace iteration, the other eigenvalues
            replaced by their mean; ``_kfac_blocks``), so preconditioning a ``(d_out, d_in)`` gradient costs
            ``O(d_out d_in k)`` instead of ``O(d_out d_in (d_out + d_in))``. None (default): dense inverses.
            On the MNIST autoencoder (784-wide factors) rank 32 reached a given loss in as many steps as
            the dense inverses at ~30% less time per step (benchmarks/optimizers.py).
        base: ``factory(params) -> Optimizer`` replacing the default SGD.
        seed: seed of the sampled-label generator.

    Mixed precision: factors, inverses and the preconditioned gradient are computed in float32 (float64
    stays float64) for bfloat16/float16 layers or a ``torch.autocast`` forward, and the update is cast
    back to the parameter's dtype. ``torch.amp.GradScaler`` is not supported: its scaled backward
    makes G (and the damping's scale) off by the loss scale squared, which the optimizer cannot see.
    Use bfloat16 autocast without a scaler, or ``GradScaler(init_scale=1.0, growth_interval=2**31 - 1)``
    that only skips non-finite steps.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        damping: float = 0.1,
        factor_decay: float = 0.95,
        factor_every: int = 5,
        inverse_every: int = 20,
        factor_warmup: int | None = None,
        kl_clip: float | None = 1e-3,
        adapt_damping: bool = True,
        damping_every: int = 5,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
        likelihood: str = "empirical",
        damping_mode: str = "factored",
        factor_rank: int | None = None,
        base: BaseFactory | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        sgd_options = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        if base is not None:
            given = [name for name, value in sgd_options.items() if value is not None]
            if given:
                raise ValueError(f"{'/'.join(given)}: options of the default SGD, ignored with base=; "
                                 "give them to the base optimizer's factory instead")
            if not callable(base):
                raise TypeError(f"base: expected a factory(params) -> Optimizer, got {type(base).__name__}")
        lr, momentum, weight_decay = (0.1 if lr is None else lr, 0.9 if momentum is None else momentum,
                                      0.0 if weight_decay is None else weight_decay)
        check_number("lr", lr, low=0, low_open=True)
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", weight_decay, low=0)
        check_number("damping", damping, low=0, low_open=True)
        check_number("factor_decay", factor_decay, low=0, high=1, high_open=True)
        for name, value in (("factor_every", factor_every), ("inverse_every", inverse_every),
                            ("damping_every", damping_every)):
            check_count(name, value)
        if factor_warmup is not None:
            check_count("factor_warmup", factor_warmup, minimum=0)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, low=0, low_open=True)
        if not isinstance(adapt_damping, bool):
            raise TypeError(f"adapt_damping: expected a bool, got {type(adapt_damping).__name__}")
        check_number("min_damping", min_damping, low=0, low_open=True)  # 0 would stay 0 under "x10"
        check_number("max_damping", max_damping, low=0, low_open=True)
        if min_damping > max_damping:
            raise ValueError(f"min_damping/max_damping: expected min_damping <= max_damping, got {min_damping} > {max_damping}")
        if not min_damping <= damping <= max_damping:
            raise ValueError(f"damping: expected in [min_damping, max_damping] = [{min_damping}, {max_damping}], got {damping}")
        seed = check_seed(seed)
        check_likelihood(likelihood)
        if damping_mode not in ("exact", "factored"):
            raise ValueError(f"damping_mode: expected 'exact' or 'factored', got {damping_mode!r}")
        if factor_rank is not None:
            check_count("factor_rank", factor_rank)
            factor_rank = int(factor_rank)
        if factor_rank is not None and damping_mode != "factored":
            raise ValueError("factor_rank: low-rank inverses need damping_mode='factored'")
        check_single_process("KFAC", model)
        names, params = named_model_parameters(model)
        base_opt = base(params) if base is not None else torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        if not isinstance(base_opt, torch.optim.Optimizer):
            raise TypeError(f"base: the factory returned {type(base_opt).__name__}, not a torch.optim.Optimizer")
        self.base = None  # add_param_group during construction goes to this optimizer's own groups
        super().__init__(params, dict(lr=lr), names)
        self.base = base_opt
        self.param_groups = self.base.param_groups  # one set of groups: schedulers see the base's lr
        self.defaults = self.base.defaults  # add_param_group and schedulers (OneCycleLR's momentum) see them
        self.model = model
        self._model_blocks, unsupported, frozen = find_blocks(model)
        # Weight matrices and kernels left to the base optimizer are what a user chose K-FAC for: a warning. Scales
        # and shifts alone (BatchNorm) are usually left to it on purpose: a note in the log.
        matrices = [description for description, holds_matrix in unsupported if holds_matrix]
        if matrices:
            warn(f"K-FAC has no curvature factors for the weights of {', '.join(matrices)}: the base "
                 "optimizer takes plain steps on them")
        others = [description for description, holds_matrix in unsupported if not holds_matrix]
        if others:
            logger.info("K-FAC: no curvature factors for %s; the base optimizer updates them", ", ".join(others))
        if frozen:
            logger.info("K-FAC: %s frozen when the optimizer was built: no curvature factors (unfrozen later, the base "
                        "optimizer alone would train them; build KFAC after unfreezing)", ", ".join(frozen))
        self._select_blocks()
        self.capture = ActivationCapture(model, [b.module for b in self._model_blocks])
        self.hyper = dict(
            factor_decay=factor_decay, factor_every=factor_every, inverse_every=inverse_every,
            factor_warmup=inverse_every if factor_warmup is None else factor_warmup,
            kl_clip=kl_clip, adapt_damping=adapt_damping, damping_every=damping_every,
            min_damping=min_damping, max_damping=max_damping, damping_mode=damping_mode,
            factor_rank=factor_rank,
        )
        self.likelihood = likelihood
        # Saved with the state: the step count, the adapted damping, and whether the next step must rebuild the
        # inverses (set by _raise_damping; a checkpoint taken between the two resumed with stale ones).
        self.progress = {"step": 0, "damping": float(damping), "refresh_inverses": False}
        self.generator = torch.Generator().manual_seed(seed)
        self._arm_capture()

    def add_param_group(self, param_group: dict) -> None:
        """Adds the group to the base optimizer (whose groups these are), with the base's defaults. The group's
        ``lr`` (0 freezes it), ``momentum`` and ``weight_decay``, where given, are checked first (``ValueError``
        naming the option): torch's optimizers check them only when built."""
        if self.base is None:
            super().add_param_group(param_group)
            return
        if isinstance(param_group, dict):
            check_torch_options(param_group, _GROUP_OPTIONS, prefix="param group ")
        self.base.add_param_group(param_group)
        self.param_groups = self.base.param_groups
        self._name_new_parameters()
        self._select_blocks()

    def _select_blocks(self) -> None:
        """The model's blocks whose parameters the base optimizer all updates. A base given only some of the
        parameters (fine-tuning a head, say) leaves the others' gradients alone, and keeps no state for them."""
        updated = {p for group in self.param_groups for p in group["params"]}
        self.blocks = [b for b in self._model_blocks if all(p in updated for p in b.params)]
        left = [b.name for b in self._model_blocks if b not in self.blocks]
        if left:
            logger.info("K-FAC: the base optimizer does not update all parameters of %s; not preconditioned",
                        ", ".join(left))

    @property
    def damping(self) -> float:
        return self.progress["damping"]

    def _capture_or_none(self) -> ActivationCapture | None:
        return self.capture

    def _is_factor_step(self, step: int) -> bool:
        """Every ``factor_every`` steps, and every step during the warm-up (``step < factor_warmup``)."""
        return step % self.hyper["factor_every"] == 0 or step < self.hyper["factor_warmup"]

    def _is_inverse_step(self, step: int) -> bool:
        """Every ``inverse_every`` steps, and at steps 1, 4, 16, ... of the warm-up: the first factors
        come from one batch (rank <= batch size), so their inverse must not be kept for long."""
        warm_up = 0 < step < self.hyper["inverse_every"] and 4 ** round(math.log(step, 4)) == step
        return step % self.hyper["inverse_every"] == 0 or warm_up

    def _is_adapt_step(self, step: int) -> bool:
        """Every ``damping_every`` steps, in phase with the factor steps (step 0, d, 2 d, ...): with a
        sampled likelihood and d a multiple of ``factor_every``, the loss before the step then comes from the sampled
        backward's forward pass instead of an extra one."""
        return self.hyper["adapt_damping"] and step % self.hyper["damping_every"] == 0

    def closure_required(self, step: int) -> bool:
        sampled = self.likelihood != "empirical" and self._is_factor_step(step)
        return sampled or self._is_adapt_step(step)

    def _arm_capture(self) -> None:
        refresh = self._is_factor_step(self.progress["step"])
        self.capture.enabled = refresh and self.likelihood == "empirical"
        self.capture.keep_random_state = self._is_adapt_step(self.progress["step"])

    def _block_state(self, block: Block) -> dict:
        return self.state[block.params[0]]

    # -- state dict -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["base"] = self.base.state_dict()
        state["kfac"] = dict(self.progress)
        state["generator_state"] = self.generator.get_state()
        return state

    def _state_record(self) -> dict:
        return {**super()._state_record(), "damping_mode": self.hyper["damping_mode"],
                "factor_rank": self.hyper["factor_rank"], "base": type(self.base).__name__}

    def _saved_state_problem(self, p: torch.Tensor, saved: dict) -> str | None:
        """A block's state is kept under its first parameter; its factors, inverses and eigenbases must have
        this layer's shapes (a state saved with a bias that is frozen here, or a damaged file)."""
        block = next((b for b in self.blocks if b.params[0] is p), None)
        return None if block is None else block.saved_state_problem(saved)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        record = state_dict.get("optimizer")
        if record is not None and "base" not in record:  # recorded before the base optimizer's type was
            state_dict["optimizer"] = {**record, "base": type(self.base).__name__}
        self._check_state_record(state_dict)
        missing = [key for key in ("base", "kfac", "generator_state") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing {missing} (not saved by KFAC)")
        base, progress = state_dict.pop("base"), state_dict.pop("kfac")
        generator_state = state_dict.pop("generator_state")
        super().load_state_dict(state_dict)  # every block's state in its curvature dtype (_curvature_state_keys)
        self.base.load_state_dict(base)
        self.param_groups = self.base.param_groups
        self.progress.update(progress)
        self.generator.set_state(generator_state)
        self._drop_other_mode_inverses()
        self._arm_capture()

    def _drop_other_mode_inverses(self) -> None:
        """A state saved before the record (so unchecked) in the other damping mode: its inverses would be
        used stale (factored ``inv_*`` win over ``eig_*``), so they are dropped and rebuilt from the factors.
        Entries both modes use (an Embedding's ``eig_G``) are kept as saved."""
        mode = self.hyper["damping_mode"]
        other = "factored" if mode == "exact" else "exact"
        for block in self.blocks:
            stale = set(block.inverse_keys(other)) - set(block.inverse_keys(mode))
            state = self._block_state(block)
            if any(key in state for key in stale):
                for key in stale:
                    state.pop(key, None)
                block.refresh_inverse(state, self.block_damping(block), self.hyper["damping_mode"],
                                      self.hyper["factor_rank"], self.generator)

    # -- the step ---------------------------------------------------------------------------------
    def _sampled_backward(self, closure: Closure, params: list, draws: RandomDraws | None) -> torch.Tensor:
        self.capture.clear()
        self.capture.enabled = True
        try:
            with torch.enable_grad(), draws.replayed() if draws is not None else contextlib.nullcontext():
                loss = closure()
                output = self.capture.root_output
                if output is None:
                    raise ValueError("closure: no model output to sample from: the model's forward pass must return a "
                                         "tensor, and closure() must run it with gradients enabled (not under torch.no_grad())")
                v = sample_output_vector(output, self.likelihood, self.generator)
                self.capture.sampled_gradients(output, params, v)
        finally:
            self.capture.enabled = False
        return loss.detach()

    def _update_factors(self, closure: Closure | None, params: list,
                        draws: RandomDraws | None) -> torch.Tensor | None:
        loss0 = None
        if self.likelihood == "empirical":
            grad_scale = float(self.capture.output_rows or 1)
        else:
            loss0 = self._sampled_backward(closure, params, draws)
            grad_scale = 1.0
        if self.likelihood == "empirical" and self.blocks and not any(
                self.capture.complete_records(block.module) for block in self.blocks):
            warn_no_records("K-FAC", self.progress["step"])
        failed = []
        for block in self.blocks:
            records = self.capture.complete_records(block.module)
            if not block.update_factors(self._block_state(block), records, grad_scale, self.hyper["factor_decay"]):
                failed.append(block.name)
        if failed:
            logger.warning("K-FAC: non-finite curvature factors for %s at step %d (overflowing activations or "
                           "gradients); their factors were not updated", ", ".join(failed), self.progress["step"])
        return loss0

    def _preconditioned(self) -> dict:
        precond: dict = {}
        for block in self.blocks:
            if all(p.grad is None for p in block.params):
                continue
            update = block.precondition(self._block_state(block), self.block_damping(block))
            if update and not all_finite(list(update.values())):
                logger.warning("K-FAC: non-finite preconditioned gradient in %s; raw gradient used, damping x10", block.name)
                self._raise_damping()
                continue
            precond.update(update)
        return precond

    def block_damping(self, block: Block) -> float:
        """Tikhonov term of ``block`` (the same absolute ``damping`` for every block)."""
        return self.damping

    def _raise_damping(self) -> None:
        """Damping x10 after a failure (a non-finite update, predicted change or loss); the inverses are
        refreshed at the next step, so that the factored damping, which is built into them, acts at once."""
        self._set_damping(self.damping * 10)
        self.progress["refresh_inverses"] = True

    def _set_damping(self, value: float) -> None:
        self.progress["damping"] = min(max(value, self.hyper["min_damping"]), self.hyper["max_damping"])

    def _model_or_none(self) -> nn.Module | None:
        return self.model

    def _check_group_options(self) -> None:
        for index, group in enumerate(self.param_groups):  # the base optimizer's groups
            check_torch_options(group, _GROUP_OPTIONS, prefix=f"param_groups[{index}].")

    def _step(self, closure: Closure | None) -> None:
        step = self.progress["step"]
        # A frozen parameter keeps a gradient tensor after zero_grad(set_to_none=False): not differentiable.
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None and p.requires_grad]
        self._check_gradients(params, self.param_groups, closure)
        if self.closure_required(step):
            self._check_closure(closure, f"likelihood={self.likelihood!r}, adapt_damping every {self.hyper['damping_every']}")
        if not all_finite([p.grad for p in params]):
            logger.warning("K-FAC: non-finite gradient at step %d; step skipped", step)
            self.capture.clear()
            return
        loss0 = None
        adapt = self._is_adapt_step(step)
        # The closure's calls of this step draw what the model's last forward pass drew (its dropout masks), or
        # what the first of them would have: the damping's reduction ratio (Martens & Grosse 2015, Sec. 6.5)
        # compares one function before and after the step, and predicts its change from that pass's gradient.
        draws = (self.capture.random_state or RandomDraws()) if adapt else None
        if params and self._is_factor_step(step):
            loss0 = self._update_factors(closure, params, draws)
        self.capture.clear()
        if self._is_inverse_step(step) or self.progress["refresh_inverses"]:
            self.progress["refresh_inverses"] = False
            for block in self.blocks:
                state = self._block_state(block)
                block.refresh_inverse(state, self.block_damping(block), self.hyper["damping_mode"],
                                      self.hyper["factor_rank"], self.generator)
        precond = self._preconditioned()
        kl_clip = self.hyper["kl_clip"]
        clipped = False
        if kl_clip is not None and precond:
            lr = {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}
            predicted = sum(float((u * p.grad).sum()) * lr[p] ** 2 for p, u in precond.items())
            if not math.isfinite(predicted):
                logger.warning("K-FAC: non-finite predicted KL change at step %d; step skipped, damping x10", step)
                self._raise_damping()
                return
            if predicted > kl_clip:
                scale = math.sqrt(kl_clip / predicted)
                precond = {p: u * scale for p, u in precond.items()}
                clipped = True
        raw_grads = {p: p.grad.clone() for p in params} if adapt else {}
        for p, u in precond.items():
            p.grad.copy_(u)
        if adapt:
            if loss0 is None:
                with draws.replayed():
                    loss0 = closure().detach()
            old = {p: p.detach().clone() for p in params}
        self.base.step()
        if adapt:
            self._adapt_damping(closure, loss0, old, raw_grads, clipped, draws)
        self.progress["step"] = step + 1
        self._arm_capture()

    def _adapt_damping(self, closure: Closure, loss0: torch.Tensor, old: dict, raw_grads: dict,
                       clipped: bool, draws: RandomDraws) -> None:
        with draws.replayed():
            loss1 = closure().detach()
        if not torch.isfinite(loss1):
            for p, value in old.items():
                p.copy_(value)
            # The base optimizer's momentum carries the rejected step: kept, it would replay it at every later
            # step whatever the damping (a reviewer's run stayed stuck at the damping's maximum for 30 steps).
            self.base.state.clear()
            logger.warning("K-FAC: non-finite loss after step %d; step reverted, damping x10", self.progress["step"])
            self._raise_damping()
            return
        delta = {p: p.detach() - value for p, value in old.items()}
        linear = sum(float((raw_grads[p] * d).sum()) for p, d in delta.items())
        curvature = 0.0
        for block in self.blocks:
            if any(p in delta for p in block.params):
                block_delta = sum(float((delta[p] ** 2).sum()) for p in block.params if p in delta)
                curvature += float(block.quadratic(self._block_state(block), delta))
                curvature += self.block_damping(block) * block_delta
        model_change = linear + 0.5 * curvature
        omega = (19.0 / 20.0) ** self.hyper["damping_every"]
        if model_change >= 0:
            # The damped model predicts no decrease for this step (an lr past the model's minimum, or momentum), so
            # rho's sign is inverted: a loss that rose would give rho > 0, even > 3/4, and lower the damping. A rise
            # means a step too long for this damping: raise it as for rho < 1/4 (M&G 2015 Sec. 6.5), which shortens
            # the step. It used to be left alone, and an overshooting lr diverged at a fixed damping. A loss that
            # fell is no evidence either way: the damping stays.
            if loss1 > loss0:
                self._set_damping(self.damping / omega)
            return
        rho = float(loss1 - loss0) / model_change
        # A step the KL clip shortened is no evidence for a lower damping. The clip, not the damping, set its length,
        # and its model is nearly linear (quadratic term kl_clip / 2, linear term sqrt(kl_clip g^T u), u = F^-1 g:
        # their ratio is lr s / 2 for the clip's scale s, ~1e-3 here), so rho stays above 3/4 unless the curvature is
        # off by orders of magnitude, and a lower damping only turns the clipped step towards the directions the
        # factors take as flat. A trust region grows only after a step that reached its boundary (Nocedal & Wright
        # 2006, Numerical Optimization, Alg. 4.1); ACKTR (Wu et al. 2017, arXiv:1708.05144) pairs its KL clip with a
        # fixed damping. Lowered on clipped steps, the damping fell at every adaptation (x0.6 per 10 steps, 0.01 ->
        # 1e-8 in 270) on the MNIST MLP with LinearWHT hidden layers (benchmarks/optimizers.py, tuned K-FAC), until
        # the input scales of pixels nonzero in 0.1-0.4% of the images (Fisher diagonal ~0) took steps of ~80 and
        # the loss went from 0.1 to 20-170. A poor rho still raises it: the model failed even over a short step.
        if rho > 0.75 and not clipped:
            self._set_damping(self.damping * omega)
        elif rho < 0.25:
            self._set_damping(self.damping / omega)
