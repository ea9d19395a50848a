"""Worker for tests/test_distributed.py, run by torchrun with 2 CPU processes (gloo).

Every rank takes its slice of one seeded global batch, runs a DDP model and a loss that gathers across ranks, and
saves the loss, the gathered priors and the parameter gradients (after DDP averaging) to OUT/rank{r}.pt.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from monai_du.distributed import gather_no_grad, gather_with_grad
from monai_du.kernels import CategoricalKernel, RBFKernel
from monai_du.losses import DecoupledUniformityLoss, InfoNCELoss, YAwareInfoNCELoss


def make_problem(seed: int = 0):
    """Global batch (B=12, V=2, 5 inputs), priors (12, 2) and a small model; shared by the worker and the test."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 2, 5, generator=g, dtype=torch.float64)
    prior = torch.cat([20 + 60 * torch.rand(12, 1, generator=g), torch.randint(0, 2, (12, 1), generator=g)], 1).double()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)).double()
    return x, prior, model


def make_losses():
    kernel = RBFKernel(bandwidth=15.0, columns=[0]) * CategoricalKernel(columns=[1])
    return {
        "du": DecoupledUniformityLoss(),
        "kernel_du": DecoupledUniformityLoss(kernel=kernel, instance_weight=0.01),
        "infonce": InfoNCELoss(temperature=0.2),
        "y_aware": YAwareInfoNCELoss(kernel=kernel, temperature=0.2),
    }


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a hang fails, naming itself
    rank, world = dist.get_rank(), dist.get_world_size()
    x, prior, model = make_problem()
    # uneven shards: rank 0 gets 7 samples, rank 1 gets 5
    bounds = [0, 7, 12] if world == 2 else [round(i * 12 / world) for i in range(world + 1)]
    local = slice(bounds[rank], bounds[rank + 1])
    ddp = DistributedDataParallel(model)
    result = {"gathered_prior": gather_no_grad(prior[local]), "gathered_x": gather_with_grad(x[local]).detach()}
    for name, loss_fn in make_losses().items():
        ddp.zero_grad()
        z = ddp(x[local])
        loss = loss_fn(z, prior[local])
        loss.backward()
        result[name] = {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks leave together: a rank left alone in destroy_process_group was seen to hang
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
