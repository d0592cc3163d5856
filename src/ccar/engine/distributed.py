"""torch.distributed plumbing for ``torchrun``: NCCL on GPUs, gloo on CPU; a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def gather_in_order(ctx: DistContext, values: torch.Tensor, targets: torch.Tensor, batches):
    """Every rank's rows of a split (``batches``: its evaluation loader) gathered back into the split's order."""
    if not ctx.enabled:
        return values, targets
    n = len(batches.targets) if hasattr(batches, "targets") else len(batches.dataset)
    values, targets = ctx.all_gather_cat(values), ctx.all_gather_cat(targets)
    # DeviceLoader/DistributedSampler stride the (padded) order over ranks: undo the interleaving, drop padding.
    per = len(values) // ctx.world_size
    order = torch.arange(per * ctx.world_size, device=values.device).view(ctx.world_size, per).t().reshape(-1)
    return values[order][:n], targets[order][:n]


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        backend = "nccl" if use_cuda else "gloo"
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return DistContext(rank, world, local)


def _attempt_store(world: int):
    """The store of this attempt of a one-node torchrun job: the agent's store (``TORCHELASTIC_USE_AGENT_STORE``)
    with a prefix per restart, or None (the ``env://`` default) elsewhere.

    torchrun keeps one store for every attempt of a job and its workers write their process-group keys (gloo's
    listening addresses, NCCL's unique id) without a per-attempt prefix: a worker of a restarted group may read
    its peer's key of the *previous*, dead attempt before the peer has overwritten it, and its connection is
    refused or hangs (6 of 9 restarts here; pytorch/pytorch#135712). A prefix per ``TORCHELASTIC_RESTART_COUNT``
    gives each attempt its own keys. Only on one node: there one agent counts the restarts of every worker,
    while the agents of several nodes may count differently (a healthy node restarts without counting)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("LOCAL_WORLD_SIZE") != str(world):
        return None
    from datetime import timedelta

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"ccar/attempt_{attempt}/", client)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
