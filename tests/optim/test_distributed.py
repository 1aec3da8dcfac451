"""The curvature optimizers under torch.distributed: they do not synchronise curvature across ranks, so a model
wrapped in DistributedDataParallel is refused and a process group of several ranks is warned of."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

# Two gloo ranks; each writes what building each optimizer did to OUT/rank{r}.txt. Run as a script file: spawn
# imports the worker from it.
_RANKS = """
import sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from dreidel.layers import LinearWHT
from dreidel.optim import DiagonalNewton, KFAC

def outcome(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build()
        except ValueError as error:
            return "ValueError: " + str(error)
    return " | ".join("warning: " + str(w.message) for w in caught) or "built"

def worker(rank, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    model = nn.Sequential(LinearWHT(32, 64, activation="relu"), nn.Linear(64, 4))
    wrapped = DistributedDataParallel(model)
    lines = [outcome(lambda: KFAC(wrapped)), outcome(lambda: DiagonalNewton(wrapped)),
             outcome(lambda: KFAC(model)), outcome(lambda: DiagonalNewton(model))]
    from torch.distributed.fsdp import fully_shard
    sharded = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    fully_shard(sharded)  # FSDP2: an FSDPModule, not a FullyShardedDataParallel
    lines.append(outcome(lambda: KFAC(sharded)))
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.txt", "w") as file:
        file.write("\\n".join(lines))

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
"""


def test_ddp_models_are_refused_and_a_process_group_is_warned_of(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=240)
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        kfac_ddp, newton_ddp, kfac_plain, newton_plain, kfac_fsdp2 = lines
        for line, name in ((kfac_ddp, "KFAC"), (newton_ddp, "DiagonalNewton")):
            assert line.startswith(f"ValueError: {name}: the model is wrapped in DistributedDataParallel, but {name} "
                                   "estimates the curvature from each process's own batch"), line
        assert kfac_fsdp2.startswith("ValueError: KFAC: the model is wrapped in FSDPSequential"), kfac_fsdp2
        for line, name in ((kfac_plain, "KFAC"), (newton_plain, "DiagonalNewton")):
            assert f"warning: {name}: a process group of 2 ranks is active" in line, line


def test_a_one_rank_process_group_keeps_ddp_models_trainable(tmp_path):
    """`torchrun --nproc_per_node=1` around a script that always wraps in DDP: one rank, nothing to drift from."""
    import warnings

    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from dreidel.optim import KFAC, DiagonalNewton

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for optimizer in (KFAC(model, lr=0.1), DiagonalNewton(model, lr=0.1)):
                x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
                closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
                optimizer.zero_grad()
                closure().backward()
                optimizer.step(closure)
                optimizer.remove_hooks()
    finally:
        torch.distributed.destroy_process_group()
