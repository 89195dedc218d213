"""torch.distributed set-up for torchrun (NCCL on GPUs, gloo on the CPU) and the few collectives training uses."""
from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    A device this machine does not have is a ConfigError naming --device."""
    from .settings import resolve_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    """Wait for every rank, in a Python loop: a stop request (a signal handler raising) can end the wait,
    where a blocking barrier would hold the signal until the slowest rank arrives."""
    if not dist.is_initialized():
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        time.sleep(0.02)
    work.wait()  # raises if a rank failed


class AsyncMax:
    """The element-wise max over all ranks of a few integers, one round per exchange() call on every rank,
    each call returning the previous round's result (zeros for the first). An asynchronous all-reduce on a
    CPU (gloo) group of its own: a round costs no host-device sync, has a whole step to arrive, and never
    queues behind the gradients. Construct it on every rank at the same point (it creates the group)."""

    def __init__(self, n: int):
        self.n = n
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending = None

    def exchange(self, values: list[int]) -> list[int]:
        if self.group is None:
            return [int(v) for v in values]
        result = [0] * self.n
        if self._pending is not None:
            work, box = self._pending
            work.wait()
            result = [int(v) for v in box.tolist()]
        box = torch.tensor([int(v) for v in values], dtype=torch.int64)
        self._pending = (dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group, async_op=True), box)
        return result


def short_reason(e: BaseException) -> str:
    """The gist of a collective's error: its first sentence, without the source location."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ")[0]


def peer_lost(e: BaseException) -> bool:
    """Whether an exception says another rank is gone (crashed, killed, or stopped without us)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
        "Broken pipe", "ProcessGroupGloo", "ProcessGroupNCCL"))
