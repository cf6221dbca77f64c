"""Several processes under ``torchrun``: PyTorch's own process group, nothing else.

``torchrun --nproc-per-node N cli.py features|train ...`` starts N copies of the command with
RANK, WORLD_SIZE and LOCAL_RANK set (and MASTER_ADDR/PORT for the rendezvous). :func:`session`
joins them in a process group (gloo on CPU, nccl on CUDA) for the length of a command; without
torchrun it is a no-op and every helper here acts as for one process.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the command's processes: ``rank`` of ``size``, and the device
    it computes on (``cuda:LOCAL_RANK`` when the command asked for cuda)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes manifests, logs and checkpoints."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items of ``items``: every size-th one, starting at its rank."""
        return items[self.rank :: self.size]

    def share_by_size(self, items: list, sizes: list[int]) -> list:
        """This rank's items of ``items`` (``sizes``: their sizes, one each, in any unit of work),
        balanced by size: largest first, each to the rank with the least so far (ties: the lowest
        rank). The same on every rank, and in the order of ``items``. Shards of 2000, 2000, 2000,
        1000 and 1000 images give two ranks 4000 each, where every other one gives 5000 and 3000."""
        load, mine = [0] * self.size, set()
        for i in sorted(range(len(items)), key=lambda i: -sizes[i]):
            rank = load.index(min(load))
            load[rank] += sizes[i]
            if rank == self.rank:
                mine.add(i)
        return [item for i, item in enumerate(items) if i in mine]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        boxes = [None] * self.size
        dist.all_gather_object(boxes, obj)
        return boxes

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.size > 1:
            dist.barrier()


def main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch, or runs alone (and so reports)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def session(device: str = "cpu"):
    """Yield the :class:`World` of this process, in a process group for the block when started by
    torchrun (WORLD_SIZE > 1): gloo for CPU devices, nccl for CUDA, where each rank takes the GPU of
    its LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if size == 1:
        yield World(device=device)
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(rank, size, device)
        # all ranks leave together: a rank tearing gloo down while rank 0 still writes the last
        # checkpoint ended in "terminate called without an active exception" (1 run in 12)
        dist.barrier()
    finally:
        dist.destroy_process_group()
