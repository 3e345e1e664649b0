"""Many processes through torchrun: DistributedDataParallel, nothing home-made.

`torchrun --nproc_per_node=8 -m fastresnet.train ...` sets RANK, WORLD_SIZE,
LOCAL_RANK (and MASTER_ADDR/PORT); each process takes cuda:LOCAL_RANK and
joins an NCCL group (gloo on CPUs). Only rank 0 writes files and prints;
metrics are summed across ranks before they are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastresnet.training.config import check_device


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(preference)
    device = torch.device(preference)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(device_preference: str, backend: str) -> tuple[ProcessInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device."""
    if not launched_by_torchrun():
        return ProcessInfo(), pick_device(device_preference, 0)
    info = ProcessInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = pick_device(device_preference, info.local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                store=attempt_store(info), **kwargs)
    return info, device


def attempt_store(info: ProcessInfo) -> dist.Store | None:
    """The key-value store for this attempt's process group: None (torch's env:// default) unless
    the workers share their elastic agents' store.

    That store outlives a restart of the worker group, and the process group's keys (each rank's
    address) are not kept apart by attempt, so a restarted worker would read the address of a worker
    that died and fail to connect. The restart count cannot keep them apart: each agent counts its
    own, and an agent whose workers were restarted for another node's failure counts none. What every
    rank does count alike is its own starts, since a restart starts every rank once."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timedelta(minutes=30))
    attempt = store.add(f"fastresnet/starts/rank{info.rank}", 1)
    return dist.PrefixStore(f"fastresnet/attempt{attempt}", store)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (a host sync; used at logging time only)."""
    if not is_active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank0_choice(value):
    """Rank 0's value (any picklable object) on every rank: a choice that all must follow."""
    if not is_active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    if not is_active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if is_active():
        dist.barrier()


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Average BN running statistics across ranks (before evaluating or saving).

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last
    step every rank holds its own batch's update; averaging makes them identical and
    uses every rank's data.
    """
    if not is_active():
        return
    world = dist.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        else:  # num_batches_tracked: the same count on every rank; take rank 0's
            dist.broadcast(buffer, src=0)
