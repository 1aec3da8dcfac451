"""Adam vs SGD+momentum vs DiagonalNewton vs K-FAC on three real-data problems (issue 5's evidence).

1. MNIST-5k MLP, dense and spectral (LinearWHT hidden layers): steps and seconds to a fixed validation
   accuracy, final accuracy.
2. A deep autoencoder on MNIST-5k (the classic K-FAC problem): test reconstruction MSE vs steps / seconds.
3. Fitting a DeepSpectralLinear (depth 2) to a fixed dense 256->256 teacher on real activations
   (tanh of a fixed random projection of MNIST pixels): held-out MSE vs steps / seconds.

Same models, data, batches and seeds for every optimizer; one torch thread. The clock is the training
thread's CPU time (evaluation excluded): with one thread it is the time the run takes on a core of its own,
and time the OS gives other jobs on a shared machine does not count. A seed fixes the initial weights, the
order of the batches, the curvature optimizers' sampling and, for problem 3, the teacher and the
projection (each from its own stream); the MNIST train/test split is the same for every seed. `--tune` runs a grid
per (problem, optimizer) on a validation split of the training rows, on the tuning seeds, with the
comparison's budget rule (see `tune`), and stores the best in results/optimizers_tuned.json; the
default run reads that file and reports on other seeds and the test rows. The time cut hides what a
setting does after it: tuning passes over a winner that diverges over the full step count, and the report
continues each run past Adam's wall-clock to the full step count and says which diverged. `--quick` is a
smoke run (few steps, no plots, no section).

Run: .venv/bin/python benchmarks/optimizers.py [--tune] [--seeds 0 1 2] [--repeats N] [--problems ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import markdown_table, write_section  # noqa: E402

from dreidel._system import cpu_model  # noqa: E402
from dreidel.data import load_mnist  # noqa: E402
from dreidel.layers import DeepSpectralLinear, LinearWHT  # noqa: E402
from dreidel.optim import KFAC, CurvatureOptimizer, DiagonalNewton  # noqa: E402

OPTIMIZERS = ("adam", "sgd", "diagonal_newton", "kfac")
# Curvature optimizers are tuned over (step size, damping): their damping is absolute, in units of the
# mean loss's curvature, which is ~1e-7..1e-3 for a mean-reduced MSE over 784 outputs but ~1e-2..1 for
# cross-entropy over 10 classes, so a single damping cannot serve every problem. K-FAC's step is
# min(lr, sqrt(kl_clip / (g^T F^-1 g))) * F^-1 g: with lr 1 the KL clip sets the step length.
# K-FAC's refresh cadence: every 10 steps, no warm-up (a previous tuning pass also tried the library
# default -- every 5 steps after a 20-step warm-up with factors on every step -- and this cheaper one won
# on all four problems); inverses refreshed every 20 steps (the library default) or on every factor step,
# dense or rank 32 (factor_rank; factors wider than 64 only).
KFAC_CADENCE = {"factor_every": 10, "damping_every": 10, "factor_warmup": 0}
KFAC_RANKS = (None, 32)
KFAC_INVERSE_EVERY = (20, 10)
# K-FAC's initial damping by likelihood. Since the KL clip no longer lowers the damping (770ae2e), the
# initial damping is what the run keeps while the clip binds; the autoencoder had done best from the old
# grid's corner (1e-5) drifting down to ~5e-7, hence 1e-6 and 3e-6 for the MSE problems, where 0.1 (plain
# SGD there) never came near the best.
KFAC_DAMPINGS = {"categorical": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "gaussian": (1e-6, 3e-6, 1e-5, 1e-4, 1e-3, 1e-2)}


def grid(opt_name: str, likelihood: str) -> list[dict]:
    """The tuning grid of ``opt_name`` for a problem whose curvature optimizers use ``likelihood``."""
    if opt_name == "adam":
        return [{"lr": v, "beta1": b} for b in (0.5, 0.9) for v in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)]
    if opt_name == "sgd":
        return [{"lr": v, "momentum": m} for m in (0.5, 0.9) for v in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)]
    if opt_name == "diagonal_newton":
        return [{"lr": v, "damping": d, "beta1": b} for b in (0.5, 0.9) for d in (1e-6, 1e-4)
                for v in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)]
    return [{"lr": 1.0, "kl_clip": k, "damping": d, "momentum": 0.5, "factor_rank": r, "inverse_every": t,
             **KFAC_CADENCE}
            for t in KFAC_INVERSE_EVERY for r in KFAC_RANKS for d in KFAC_DAMPINGS[likelihood]
            for k in (1e-5, 1e-4, 1e-3, 1e-2)]


DEFAULT = {"adam": {"lr": 1e-3}, "sgd": {"lr": 0.03, "momentum": 0.9}, "diagonal_newton": {"lr": 0.1}, "kfac": {"lr": 0.1}}
TUNED_PATH = HERE / "results" / "optimizers_tuned.json"
PLOTS = HERE / "plots"
DATA_SEED = 0  # the MNIST shuffle and 4,000 / 1,000 split, fixed so the test rows are never tuned on
TUNING_SEEDS = (100, 101)
STABILITY_CHECKS = 10  # how many of a grid's best settings tune() tries over the full step budget
REPORT_SEEDS = (0, 1, 2)
PROBLEMS = ("mlp_dense", "mlp_spectral", "autoencoder", "distill")  # as problems() builds them


@dataclass
class Problem:
    name: str
    title: str
    seed: int
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    likelihood: str  # for the curvature optimizers' sampled Fisher
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    steps: int
    batch_size: int
    eval_every: int
    classification: bool = False
    target_accuracy: float = 0.0


@dataclass
class Trace:
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    budget_end: int | None = None  # a run continued past its time budget: how many entries lie within it

    def within_budget(self) -> Trace:
        """The run as it stood when the clock passed its time budget (all of it if it never did)."""
        if self.budget_end is None:
            return self
        end = self.budget_end
        return Trace(self.steps[:end], self.seconds[:end], self.loss[:end], self.accuracy[:end])


def stream(seed: int, purpose: int) -> int:
    """The generator seed for one use of a problem's ``seed``: each seed has its own streams (seed 1's initial
    weights are not seed 0's projection)."""
    return seed * 1000 + purpose


INIT, DATA, OPTIMIZER, BATCHES = 0, 1, 3, 7  # the purposes


def mlp(kind: str, seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(stream(seed, INIT))
        gen = torch.Generator().manual_seed(stream(seed, INIT))
        if kind == "dense":
            hidden = [nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()]
        else:
            hidden = [LinearWHT(784, 256, activation="relu", generator=gen),
                      LinearWHT(256, 256, activation="relu", generator=gen)]
        return nn.Sequential(*hidden, nn.Linear(256, 10))

    return make


def autoencoder(seed: int) -> nn.Module:
    torch.manual_seed(stream(seed, INIT))
    widths = [784, 256, 128, 30, 128, 256, 784]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 and b != 30:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers, nn.Sigmoid())


def distillation_student(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(stream(seed, INIT))
    return nn.Sequential(DeepSpectralLinear(256, 256, depth=2, generator=gen))


def distillation_data(seed: int) -> tuple[tuple, tuple]:
    """Real activations: tanh of a random projection of MNIST pixels; targets from a random dense teacher
    (both drawn from ``seed``); the pixels centred on the training rows' mean."""
    gen = torch.Generator().manual_seed(stream(seed, DATA))
    projection = torch.randn(784, 256, generator=gen) / math.sqrt(784 * 0.1)
    teacher = nn.Linear(256, 256)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(256, 256, generator=gen) / math.sqrt(256))
        teacher.bias.copy_(0.1 * torch.randn(256, generator=gen))
    out = []
    mean = load_mnist("train", seed=DATA_SEED)[0].mean()
    for split in ("train", "test"):
        pixels, _ = load_mnist(split, seed=DATA_SEED)
        features = torch.tanh((pixels - mean) @ projection)
        with torch.no_grad():
            out.append((features, teacher(features)))
    return out[0], out[1]


def problems(quick: bool, seed: int) -> list[Problem]:
    train, test = load_mnist("train", seed=DATA_SEED), load_mnist("test", seed=DATA_SEED)
    scale = 0.1 if quick else 1.0
    distill_train, distill_test = distillation_data(seed)
    ae = (train[0], train[0]), (test[0], test[0])
    return [
        Problem("mlp_dense", "MNIST-5k MLP 784-256-256-10, dense", seed, mlp("dense", seed), F.cross_entropy,
                "categorical", train, test, int(300 * scale), 128, 10, True, 0.92),
        Problem("mlp_spectral", "MNIST-5k MLP 784-256-256-10, LinearWHT hidden", seed, mlp("spectral", seed),
                F.cross_entropy, "categorical", train, test, int(300 * scale), 128, 10, True, 0.90),
        Problem("autoencoder", "MNIST-5k autoencoder 784-256-128-30-128-256-784 (tanh, sigmoid out)", seed,
                lambda: autoencoder(seed), F.mse_loss, "gaussian", ae[0], ae[1], int(250 * scale), 500, 5),
        Problem("distill", "DeepSpectralLinear(256, depth 2) fit to a dense 256x256 teacher", seed,
                lambda: distillation_student(seed), F.mse_loss, "gaussian", distill_train, distill_test,
                int(400 * scale), 250, 5),
    ]


def build(name: str, model: nn.Module, hyper: dict, likelihood: str, seed: int) -> torch.optim.Optimizer:
    """The optimizer ``name`` with ``hyper``; ``beta1`` is the first beta of Adam / DiagonalNewton (the
    second keeps its default: Adam 0.999, DiagonalNewton 0.99); ``seed`` seeds the curvature optimizers'
    sampled labels and random vectors."""
    hyper = dict(hyper)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), betas=(hyper.pop("beta1", 0.9), 0.999), **hyper)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **hyper)
    if name == "diagonal_newton":
        return DiagonalNewton(model, likelihood=likelihood, betas=(hyper.pop("beta1", 0.9), 0.99), seed=seed,
                              **hyper)
    return KFAC(model, likelihood=likelihood, seed=seed, **hyper)


def describe(hyper: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in hyper.items())


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module) -> tuple[float, float]:
    x, y = problem.test
    out = model(x)
    loss = float(problem.loss_fn(out, y))
    accuracy = float((out.argmax(-1) == y).float().mean()) if problem.classification else float("nan")
    return loss, accuracy


def run(problem: Problem, opt_name: str, hyper: dict, steps: int, seconds: float = math.inf,
        past_budget: bool = False) -> Trace:
    """Train for ``steps`` steps or until the clock passes ``seconds``; held-out loss every eval_every steps and
    when the clock passes ``seconds``. With ``past_budget`` the run goes on to ``steps`` after that (the time
    budget's part is ``within_budget()``, identical to the run stopped there: the steps are the same)."""
    model = problem.make_model()
    optimizer = build(opt_name, model, hyper, problem.likelihood, stream(problem.seed, OPTIMIZER))
    x_all, y_all = problem.train
    gen = torch.Generator().manual_seed(stream(problem.seed, BATCHES))
    order = torch.randperm(x_all.shape[0], generator=gen)
    cursor, clock = 0, 0.0
    trace = Trace()
    for step in range(steps + 1):
        out_of_time = trace.budget_end is None and clock >= seconds
        if step % problem.eval_every == 0 or step == steps or out_of_time:
            loss, accuracy = evaluate(problem, model)
            trace.steps.append(step)
            trace.seconds.append(clock)
            trace.loss.append(loss if math.isfinite(loss) else float("inf"))
            trace.accuracy.append(accuracy)
            if out_of_time and past_budget:
                trace.budget_end = len(trace.steps)
            if not math.isfinite(loss):
                break
        if step == steps or (out_of_time and not past_budget):
            break
        if cursor + problem.batch_size > order.numel():
            order, cursor = torch.randperm(x_all.shape[0], generator=gen), 0
        idx = order[cursor : cursor + problem.batch_size]
        cursor += problem.batch_size
        x, y = x_all[idx], y_all[idx]
        start = time.thread_time()

        def closure() -> torch.Tensor:
            return problem.loss_fn(model(x), y)

        optimizer.zero_grad()
        closure().backward()
        if isinstance(optimizer, CurvatureOptimizer):
            optimizer.step(closure)
        else:
            optimizer.step()
        clock += time.thread_time() - start
    return trace


def first_reach(trace: Trace, good: Callable[[float, float], bool]) -> tuple[int | None, float | None]:
    for step, seconds, loss, accuracy in zip(trace.steps, trace.seconds, trace.loss, trace.accuracy):
        if good(loss, accuracy):
            return step, seconds
    return None, None


def divergence(problem: Problem, trace: Trace) -> str | None:
    """Why a run over the full step budget counts as diverged, or None: a non-finite held-out loss; one in the
    second half of the steps above the starting loss; for classification, a final accuracy more than 5 points
    below the run's best; otherwise a final loss over twice the run's lowest (not for classification, where
    the held-out cross-entropy can double while the accuracy holds: DiagonalNewton on mlp_dense's validation
    rows, 0.31 -> 0.71 at accuracy 0.926 -> 0.918). The budget rule stops most runs before their last steps,
    so a setting can win the comparison and blow up later (K-FAC on mlp_spectral before 770ae2e, from step
    ~200 of 300)."""
    if not math.isfinite(trace.loss[-1]):
        return f"non-finite loss by step {trace.steps[-1]}"
    late = [(loss, step) for step, loss in zip(trace.steps, trace.loss) if 2 * step >= problem.steps]
    worst, at = max(late)
    if worst > trace.loss[0]:
        return f"loss {worst:.3g} at step {at}, above the starting {trace.loss[0]:.3g}"
    if problem.classification:
        if trace.accuracy[-1] < max(trace.accuracy) - 0.05:
            return f"final accuracy {trace.accuracy[-1]:.3f} against the best {max(trace.accuracy):.3f}"
    elif trace.loss[-1] > 2 * min(trace.loss):
        return f"final loss {trace.loss[-1]:.3g}, over twice the lowest {min(trace.loss):.3g}"
    return None


def validation_split(problem: Problem) -> Problem:
    """The problem with its last fifth of the training rows held out as the tuning set (the test set
    is never seen while tuning)."""
    x, y = problem.train
    cut = x.shape[0] - x.shape[0] // 5
    return replace(problem, train=(x[:cut], y[:cut]), test=(x[cut:], y[cut:]))


def target_reached(problem: Problem, target_loss: float) -> Callable[[float, float], bool]:
    """What "reaching the target" means: the fixed accuracy for classification, else Adam's final loss."""
    if problem.classification:
        return lambda loss, accuracy: accuracy >= problem.target_accuracy
    return lambda loss, accuracy: loss <= target_loss


def seconds_to_target(problem: Problem, adam: Trace, trace: Trace) -> float | None:
    """When ``trace`` first reaches the target: the fixed accuracy for classification, else ``adam``'s final
    held-out loss (None: never, within its budget)."""
    return first_reach(trace, target_reached(problem, adam.loss[-1]))[1]


def time_ratio(problem: Problem, adam: Trace, trace: Trace) -> float | None:
    """Seconds ``trace`` needs to reach the target, over Adam's whole wall-clock (the bar's measure)."""
    seconds = seconds_to_target(problem, adam, trace)
    return None if seconds is None else seconds / adam.seconds[-1]


def tune(quick: bool, seeds: tuple[int, ...], names: tuple[str, ...]) -> None:
    """Same budget rule as the comparison, on a validation split of the training set, on every seed in
    ``seeds`` (kept apart from the seeds the comparison reports).

    Adam: every grid point runs the full step budget; the lowest final validation loss, averaged over the
    seeds, wins. Every other optimizer: every grid point runs the same steps, stopped at the tuned Adam's
    wall-clock on the same seed; the setting whose slowest seed reaches the target soonest, as a fraction of
    Adam's wall-clock, wins (classification: the fixed accuracy; else the tuned Adam's final validation
    loss), ties and never-reached settings ranked by mean final loss. The winner must then survive the full
    step budget without the time cut on every seed (see ``divergence``); one that does not is passed over
    for the next in rank (at most STABILITY_CHECKS settings are checked; if none survives, the first stays,
    marked). Only the problems in ``names`` are tuned; the stored settings of the others are kept.
    """
    for instances in zip(*(map(validation_split, problems(quick, seed)) for seed in seeds)):
        name = instances[0].name
        if name not in names:
            continue
        tuned: dict = {}
        adam: list[Trace] = []
        for opt_name in OPTIMIZERS:
            results = []
            for hyper in grid(opt_name, instances[0].likelihood):
                budgets = [a.seconds[-1] for a in adam] or [math.inf] * len(instances)
                results.append((hyper, [run(p, opt_name, hyper, p.steps, b) for p, b in zip(instances, budgets)]))

            def ratios(traces: list[Trace]) -> list[float | None]:
                return [time_ratio(p, a, t) for p, a, t in zip(instances, adam, traces)]

            def mean_loss(item: tuple[dict, list[Trace]]) -> float:
                return statistics.fmean(t.loss[-1] for t in item[1])

            def slowest_seed(item: tuple[dict, list[Trace]]) -> tuple[float, float]:
                return max(math.inf if r is None else r for r in ratios(item[1])), mean_loss(item)

            ranked = sorted(results, key=mean_loss if opt_name == "adam" else slowest_seed)
            passed_over = []
            for hyper, traces in ranked[:STABILITY_CHECKS]:
                # Adam's grid runs already ran every step; the others' stopped at Adam's wall-clock
                full = traces if opt_name == "adam" else [run(p, opt_name, hyper, p.steps) for p in instances]
                reasons = [divergence(p, t) for p, t in zip(instances, full)]
                if not any(reasons):
                    break
                passed_over.append([hyper, reasons])
            else:
                (hyper, traces), full = ranked[0], None  # none survived: the first stays, marked below
            if opt_name == "adam":
                adam = traces
            points = [[h, [t.loss[-1] for t in traces], ratios(traces)] for h, traces in results]
            tuned[opt_name] = {"hyper": hyper, "seeds": list(seeds), "grid": points, "passed_over": passed_over,
                               "full_budget": None if full is None else [t.loss[-1] for t in full]}
            print(name, opt_name, [(describe(h), [f"{v:.4g}" for v in losses], [fmt(r, ".2f") for r in rs])
                                   for h, losses, rs in points], "->", hyper,
                  f"(passed over as diverged: {passed_over})" if passed_over else "", flush=True)
        if not quick:  # each problem as it is done, merged into what the file holds then
            stored = json.loads(TUNED_PATH.read_text(encoding="utf-8")) if TUNED_PATH.exists() else {}
            stored[name] = tuned
            tmp = TUNED_PATH.with_suffix(".json.tmp")
            TUNED_PATH.parent.mkdir(exist_ok=True)
            tmp.write_text(json.dumps(stored, indent=1), encoding="utf-8")
            os.replace(tmp, TUNED_PATH)


def plot(problem: Problem, traces: dict[str, Trace]) -> Path:
    """Held-out accuracy or loss against steps and seconds; a run continued past its time budget is dotted
    from there on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, trace in traces.items():
        values = trace.accuracy if problem.classification else trace.loss
        end = len(trace.steps) if trace.budget_end is None else trace.budget_end
        for ax, xs in zip(axes, (trace.steps, trace.seconds)):
            (line,) = ax.plot(xs[:end], values[:end], label=name)
            ax.plot(xs[end - 1 :], values[end - 1 :], color=line.get_color(), linestyle=":")
    for ax, xlabel in zip(axes, ("steps", "seconds (1 thread, evaluation excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy" if problem.classification else "test loss (MSE)")
        if not problem.classification:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(problem.title)
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / f"optimizers_{problem.name}.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def fmt(value: float | int | None, digits: str = ".3g") -> str:
    return "not reached" if value is None else format(value, digits)


def run_every_optimizer(problem: Problem, hypers: dict[str, dict], past_budget: bool) -> dict[str, Trace]:
    """Adam first, then every other optimizer with Adam's step count and at most Adam's wall-clock (with
    ``past_budget``, continued to the full step count after that: see ``run``)."""
    traces: dict[str, Trace] = {}
    for opt_name in OPTIMIZERS:
        budget = traces["adam"].seconds[-1] if "adam" in traces else math.inf
        traces[opt_name] = trace = run(problem, opt_name, hypers[opt_name], problem.steps, budget, past_budget)
        timed = trace.within_budget()
        continued = f"(step {trace.steps[-1]}: {trace.loss[-1]:.4g})" if trace is not timed else ""
        print(problem.name, opt_name, describe(hypers[opt_name]), f"loss {timed.loss[-1]:.4g}",
              f"{timed.seconds[-1]:.1f}s", continued, flush=True)
    return traces


def problem_section(problem: Problem, hypers: dict[str, dict], untuned: set[str], traces: dict[str, Trace],
                    with_plot: bool, repeats: int) -> str:
    """One problem's table (and plot) from one timed run of every optimizer (the table from the part within
    Adam's wall-clock, the plot from all of it); ``untuned`` ran the defaults."""
    rows = []
    full, traces = traces, {name: trace.within_budget() for name, trace in traces.items()}
    adam = traces["adam"]

    def setting(opt_name: str) -> str:
        return ("not tuned: library default " if opt_name in untuned else "") + describe(hypers[opt_name])

    if problem.classification:
        headers = ["optimizer", "tuned", f"steps to {problem.target_accuracy:.0%}", f"seconds to {problem.target_accuracy:.0%}",
                   "final test acc", "steps run", "total s", "ms/step"]
        for opt_name, trace in traces.items():
            step, seconds = first_reach(trace, lambda loss, acc: acc >= problem.target_accuracy)
            rows.append([opt_name, setting(opt_name), fmt(step, "d"), fmt(seconds), f"{trace.accuracy[-1]:.4f}",
                         trace.steps[-1], f"{trace.seconds[-1]:.1f}",
                         f"{trace.seconds[-1] / max(trace.steps[-1], 1) * 1e3:.1f}"])
    else:
        headers = ["optimizer", "tuned", "final test MSE", "steps run", "total s", "ms/step", "steps to Adam's final",
                   "s to Adam's final", "time vs Adam"]
        for opt_name, trace in traces.items():
            step, seconds = first_reach(trace, target_reached(problem, adam.loss[-1]))
            rows.append([opt_name, setting(opt_name), f"{trace.loss[-1]:.4g}", trace.steps[-1],
                         f"{trace.seconds[-1]:.1f}", f"{trace.seconds[-1] / max(trace.steps[-1], 1) * 1e3:.1f}",
                         fmt(step, "d"), fmt(seconds), fmt(time_ratio(problem, adam, trace), ".2f")])
    table = markdown_table(headers, rows)
    print(table, flush=True)
    image = f"\n\n![{problem.name}](benchmarks/plots/{plot(problem, full).name})" if with_plot else ""
    return (f"### {problem.title}\n\nSeed {problem.seed}. Adam: {problem.steps} steps, batch {problem.batch_size}; "
            "every other optimizer runs the same steps but stops at Adam's wall-clock (the plot's dotted lines: "
            "the same runs continued to the full step count)"
            + ("." if problem.classification else f"; table from the first of {repeats} timed repeats.")
            + f"\n\n{table}{image}")


def tuning_seeds_text(tuned: dict) -> str:
    """The seeds each problem's settings were tuned on, as the stored file records them."""
    by_seeds: dict[str, list[str]] = {}
    for problem in PROBLEMS:
        entries = [tuned.get(problem, {}).get(opt, {}) for opt in OPTIMIZERS]
        recorded = {tuple(entry["seeds"]) for entry in entries if "seeds" in entry}
        text = ("none recorded" if not recorded else " / ".join(", ".join(map(str, seeds)) for seeds in sorted(recorded)))
        if any("seeds" not in entry for entry in entries) and recorded:
            text += ", some settings with none recorded"
        by_seeds.setdefault(text, []).append(problem)
    return "; ".join(f"{text} ({', '.join(problems)})" for text, problems in by_seeds.items())


def grid_note(tuned: dict, likelihoods: dict[str, str]) -> str:
    """Which problems were tuned on a grid lacking points of ``grid``'s (the stored grids say), or without
    the full-step stability check; ``likelihoods`` maps each problem to its likelihood."""
    notes = []
    for problem, by_opt in tuned.items():
        lacking, unchecked = [], [opt for opt, entry in by_opt.items() if "passed_over" not in entry]
        for opt, entry in by_opt.items():
            current = grid(opt, likelihoods[problem])
            stored = [point[0] for point in entry.get("grid", ())]
            missing = sum(point not in stored for point in current)
            if missing:
                lacking.append(f"{opt} {missing} of {len(current)} grid points")
        if unchecked:
            lacking.append(f"the full-step check of {', '.join(unchecked)}")
        if lacking:
            notes.append(f"{problem} ({'; '.join(lacking)})")
    if not notes:
        return ""
    return "Tuned by an earlier version of the rule above, lacking: " + "; ".join(notes) + "."


def median(values: list[float | None]) -> float | None:
    """The median, counting None (never reached) as larger than any number."""
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = ordered[len(ordered) // 2]
    return None if math.isinf(middle) else middle


def compare(quick: bool, repeats: int, seeds: tuple[int, ...], tuned: dict, names: tuple[str, ...]) -> None:
    """Every problem on every seed with the ``tuned`` settings; the MSE problems timed ``repeats`` times
    (the batches and hence the losses are identical across repeats; only the clock differs). Tables and
    plots from the first seed's first repeat; the per-seed table and the verdict from all seeds, each the
    median of its repeats. The first repeat of every run goes on past Adam's wall-clock to the full step count,
    for the stability column (``divergence``). Only the problems in ``names``; the section is written only
    when all of them ran."""
    write = not quick and set(names) == set(PROBLEMS)
    sections: list[str] = []
    titles: dict[str, str] = {}
    likelihoods: dict[str, str] = {}
    # problem -> optimizer -> per seed: the median time ratio; the full run's final metric and divergence
    ratios: dict[str, dict[str, list[float | None]]] = {}
    finals: dict[str, dict[str, list[float]]] = {}
    diverged: dict[str, dict[str, list[str | None]]] = {}
    for seed in seeds:
        for problem in (p for p in problems(quick, seed) if p.name in names):
            stored = tuned.get(problem.name, {})
            hypers = {name: stored.get(name, {}).get("hyper", DEFAULT[name]) for name in OPTIMIZERS}
            untuned = {name for name in OPTIMIZERS if "hyper" not in stored.get(name, {})}
            full = [run_every_optimizer(problem, hypers, past_budget=repeat == 0)
                    for repeat in range(1 if problem.classification else repeats)]
            timed = [{name: trace.within_budget() for name, trace in traces.items()} for traces in full]
            for opt_name in OPTIMIZERS:
                ratios.setdefault(problem.name, {}).setdefault(opt_name, []).append(
                    median([time_ratio(problem, t["adam"], t[opt_name]) for t in timed]))
                last = full[0][opt_name]
                finals.setdefault(problem.name, {}).setdefault(opt_name, []).append(
                    last.accuracy[-1] if problem.classification else last.loss[-1])
                diverged.setdefault(problem.name, {}).setdefault(opt_name, []).append(divergence(problem, last))
            titles[problem.name], likelihoods[problem.name] = problem.title, problem.likelihood
            if seed == seeds[0]:
                sections.append(problem_section(problem, hypers, untuned, full[0], write, repeats))
    if not write:
        return

    def divergences(p: str, o: str) -> str:
        return "; ".join(f"seed {s}: {why}" for s, why in zip(seeds, diverged[p][o]) if why) or "no"

    per_seed = markdown_table(
        ["problem", "optimizer", *(f"seed {s}" for s in seeds), "full steps, no time cut: final test acc / MSE",
         "diverged"],
        [[titles[p], o, *(fmt(r, ".2f") for r in rs), ", ".join(f"{v:.4g}" for v in finals[p][o]), divergences(p, o)]
         for p, by_opt in ratios.items() for o, rs in by_opt.items()])

    def meets(p: str, o: str) -> int:
        return sum(r is not None and r <= 0.5 and not why for r, why in zip(ratios[p][o], diverged[p][o]))

    verdict_lines = [f"- {p}: {o} at or under 0.5x on {meets(p, o)} of {len(rs)} seeds ("
                     + ", ".join(fmt(r, ".3f") for r in rs) + ")"
                     + ("" if divergences(p, o) == "no" else f"; diverged over the full steps: {divergences(p, o)}")
                     for p in ("autoencoder", "distill") for o, rs in ratios[p].items()
                     if o in ("diagonal_newton", "kfac")]
    met = {p: any(meets(p, o) == len(seeds) for o in ratios[p] if o in ("diagonal_newton", "kfac"))
           for p in ("autoencoder", "distill")}
    unstable = [f"{titles[p]}: {o} ({divergences(p, o)})" for p in ratios for o in ratios[p] if divergences(p, o) != "no"]
    tuned_on = {seed for by_opt in tuned.values() for entry in by_opt.values() for seed in entry.get("seeds", ())}
    also_tuned = sorted(tuned_on & set(seeds))
    bar = (f"MET on all {len(seeds)} seeds" if all(met.values()) else f"NOT MET on all {len(seeds)} seeds for "
           + " and ".join(p for p, ok in met.items() if not ok))
    if also_tuned:
        bar += f" (also tuned on: seed {', '.join(map(str, also_tuned))})"
    write_section("optimizers", "\n".join([
        "## Second-order optimizers (benchmarks/optimizers.py)",
        "",
        f"CPU: {cpu_model()}, torch threads = 1; seconds are the training thread's CPU time (evaluation "
        f"excluded): with one thread, the time a run takes on a core of its own, whatever else the machine ran; seeds {', '.join(map(str, seeds))} (a seed fixes the "
        "initial weights, the batch order, the curvature optimizers' sampling and problem 3's teacher and "
        "projection; the MNIST split is the same for all), same batches for every optimizer. Curvature optimizers use the sampled (true) Fisher: `likelihood='categorical'` for "
        "classification, `'gaussian'` for MSE; settings not tuned are the library defaults "
        "(DiagonalNewton: gauss_newton curvature refreshed every 10 steps, beta2 0.99, clip 1; "
        "K-FAC: factored (pi-split) damping with Levenberg-Marquardt adaptation, factor decay 0.95, SGD base).",
        "",
        "Tuning (`benchmarks/optimizers.py --tune`, stored in `benchmarks/results/optimizers_tuned.json`): "
        f"on a validation split (the last fifth of the training rows; the test rows are not used), on seeds "
        f"{tuning_seeds_text(tuned)}, every grid point runs the full step budget "
        "of the comparison below. Adam: lr in 1e-3..0.3 (factors of ~3) x beta1 in {0.5, 0.9}, lowest final "
        "validation loss (mean over the tuning seeds) wins. Every other optimizer runs the same steps but stops "
        "at the tuned Adam's wall-clock on the same seed (the same budget rule as the comparison) and is ranked "
        "by the time its slowest tuning seed needs to reach the target, as a fraction of Adam's wall-clock "
        "(the target: the fixed accuracy for the MLPs; the tuned Adam's final validation loss otherwise), then "
        "by mean final loss: SGD lr in 0.01..3 x momentum in {0.5, 0.9}; "
        "DiagonalNewton lr in 0.003..3 x damping in {1e-6, 1e-4} x beta1 in {0.5, 0.9}; K-FAC lr 1 (so the "
        "KL clip sets the step length) x kl_clip in {1e-5..1e-2} x initial damping in {1e-5..0.1} (MLPs) or "
        "{1e-6, 3e-6, 1e-5..1e-2} (MSE problems) x "
        "factor_rank in {dense inverses, rank 32} x inverse_every in {20, 10}, factors and damping "
        "adaptation every 10 steps, SGD "
        "momentum 0.5 (earlier tuning passes: kl_clip 1e-6..1e-3 and momentum in {0.5, 0.9} picked 0.5 on all "
        "four problems; the library-default cadence -- every 5 steps after a 20-step warm-up -- lost to "
        "every 10 steps on all four). The curvature optimizers' damping is in units of the mean loss's curvature, "
        "which differs by orders of magnitude between problems (a mean MSE over 784 outputs has Fisher "
        "eigenvalues of ~1e-7..1e-3; the old fixed damping 0.1 turned K-FAC into plain SGD on the autoencoder), "
        "hence it is tuned. A previous version tuned on a third of the steps, where every optimizer was still "
        "on the autoencoder's plateau. The winner must also survive the full step count without the time cut on "
        "every tuning seed (no divergence as defined below); one that does not is passed over for the next in "
        "rank (the stored file lists them). " + grid_note(tuned, likelihoods),
        "",
        *sections,
        "",
        "### Every seed: time to the target / Adam's wall-clock",
        "",
        "The target: the fixed accuracy for the MLPs, Adam's final test loss on the same seed otherwise; the "
        f"MSE problems' figures are medians of {repeats} timed repeats (the upper middle one for an even count). Adam's own row says when it first "
        "reached its final loss (or the accuracy). The last two columns come from the first repeat continued "
        "past Adam's wall-clock to the full step count: a run counts as diverged if its held-out loss turns "
        "non-finite or exceeds the starting loss in the second half of the steps, or if its final accuracy ends "
        "more than 5 points below its best (MLPs) or its final loss over twice its lowest (MSE problems).",
        "",
        per_seed,
        "",
        "Over the full step count: " + ("no setting diverged on any seed." if not unstable else
                                        "diverged: " + "; ".join(unstable) + "."),
        "",
        f"### Verdict: bar (K-FAC or DiagonalNewton reaches Adam's final loss in <= 0.5x Adam's wall-clock on "
        f"problems 2 and 3, on a seed where it does not diverge over the full step count): **{bar}**",
        "",
        *verdict_lines,
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10%% of the steps, no plots or section")
    parser.add_argument("--tune", action="store_true", help="run the learning-rate grid and store the best")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the MSE problems (median ratio)")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds to report (default {REPORT_SEEDS}; "
                        f"with --tune, seeds to tune on, default {TUNING_SEEDS})")
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=PROBLEMS,
                        help="only these problems (--tune keeps the stored settings of the others; a comparison of "
                             "some writes no section)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: expected >= 1")
    torch.set_num_threads(1)
    if args.tune:
        tune(args.quick, tuple(dict.fromkeys(args.seeds or TUNING_SEEDS)), tuple(args.problems))
        return
    tuned = json.loads(TUNED_PATH.read_text(encoding="utf-8")) if TUNED_PATH.exists() else {}
    seeds = tuple(dict.fromkeys(args.seeds or REPORT_SEEDS))  # each once
    compare(args.quick, args.repeats, seeds, tuned, tuple(args.problems))


if __name__ == "__main__":
    main()
