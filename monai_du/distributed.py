"""Gathering across ranks for global-batch contrastive losses.

Every rank gathers the embeddings (keeping their gradient) and the priors of every rank, so that every rank computes
the same loss on the global batch. The backward of :func:`gather_with_grad` sums the gradient that all ranks send to
each rank's slice. With DDP averaging the parameter gradients over ``W`` ranks, the result equals the gradient of one
process on the concatenated batch. Outside an initialised process group (or with one rank) both functions return
their input unchanged. :func:`teardown_process_group` ends a distributed run (the bundles' ``finalize``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "gather_with_grad", "gather_no_grad", "teardown_process_group"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _local_sizes(x: torch.Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs across ranks; returns one unpadded tensor per rank."""
    largest = max(sizes)
    if x.shape[0] < largest:
        x = torch.cat([x, x.new_zeros(largest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return [p[:n] for p, n in zip(parts, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor. Backward: sum the incoming gradients over ranks, keep our slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = _local_sizes(x)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat(_padded_all_gather(x, sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_r, ...) from every rank in rank order into (sum_r B_r, ...), keeping the gradient.

    Ranks may hold different batch sizes. Outside a process group this returns ``x``.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_r, ...) from every rank in rank order, without gradient (priors, labels)."""
    if not is_distributed():
        return x
    with torch.no_grad():
        return torch.cat(_padded_all_gather(x.detach(), _local_sizes(x)))


def teardown_process_group() -> bool:
    """Leave the default process group at the end of a run: a barrier of all ranks, then ``destroy_process_group``.

    Call it once on every rank, after the last collective (the bundles' ``finalize``). Returns True when it tore a
    group down; outside an initialised process group it does nothing and returns False.

    The barrier is what makes a multi-node gloo run exit with 0:

    - ranks > 0 write nothing, so without it they reach the exit while rank 0 still saves its checkpoint and models;
      with it no rank leaves before every rank is done with the group (and with the store it was set up with);
    - every collective launched inside ``backward()`` (DDP's gradient all-reduce, the all-reduce of
      :func:`gather_with_grad`) carries the caller's thread-local state, in which autograd stashes a Python object.
      The gloo worker thread that ran it drops that reference when the work finishes, and needs the GIL to do so. DDP
      keeps the gloo group and its threads alive past ``destroy_process_group``, so if the main thread reaches
      interpreter finalisation first, that thread is killed while it takes the GIL, inside a ``noexcept``
      destructor, and the process aborts ("terminate called without an active exception", SIGABRT, exit -6) after
      all its work is done; torchrun then reports the node failed and the other node's agent loses the rendezvous
      store (``recvBytes``/``sendBytes`` errors). gloo starts the barrier only after all earlier work has finished,
      and ``wait()`` releases the GIL until every rank has arrived, so the threads get the GIL and drop those
      references while the interpreter is still alive; the barrier's own work, started outside autograd, holds no
      Python object.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True
