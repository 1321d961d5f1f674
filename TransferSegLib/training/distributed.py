"""torchrun: this process's place among the WORLD_SIZE processes of a job, for training and batch inference.

torchrun starts one process per GPU (or per share of the CPU) and sets WORLD_SIZE, RANK and
LOCAL_RANK in each.  :class:`Processes` joins their process group (gloo on CPU, nccl on CUDA,
one GPU per local rank); the trainer (DistributedDataParallel) and :func:`processes` (a batch
of volumes, each rank taking its share) both use it.  Outside torchrun it is rank 0 of 1 and
joins nothing.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..devices import resolve_device

__all__ = ["Processes", "processes", "torchrun_world_size"]


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Processes:
    """One process, or one of WORLD_SIZE processes started by torchrun.

    ``rank`` and ``world`` say which; ``device`` is ``cuda:LOCAL_RANK`` under torchrun when CUDA
    is available and ``device_spec`` is not ``cpu``, else the CPU; outside torchrun it is
    ``device_spec`` resolved (:func:`~TransferSegLib.devices.resolve_device`).  Under torchrun
    the process group is joined here (gloo on CPU, nccl on CUDA) unless it is up already, and
    :meth:`close` leaves it only if it was joined here.
    """

    def __init__(self, device_spec: str = "auto"):
        self.world = torchrun_world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        cuda = torch.cuda.is_available() and device_spec != "cpu"
        if self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.device = resolve_device(device_spec)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the files every rank shares."""
        return self.rank == 0

    def mean(self, value) -> float:
        """A tensor's value averaged over every rank (the value itself outside torchrun)."""
        value = value.detach().clone()
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if it was joined here."""
        if self.owns_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def processes(device: str = "auto"):
    """A :class:`Processes` for a block: on leaving it, every rank waits for the others, then the
    process group is left.  Outside torchrun: rank 0 of 1, ``device`` resolved."""
    procs = Processes(str(device))
    try:
        yield procs
        procs.barrier()
    finally:
        procs.close()
