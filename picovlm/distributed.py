"""More than one process: `torchrun` + DistributedDataParallel, on GPUs (NCCL) or CPUs (gloo).

    torchrun --nproc_per_node 2 -m picovlm.cli train --data DIR --out runs/ddp

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; `picovlm train` sees them and
joins the process group. The batch size stays the *global* batch: every process takes its own
rows of each batch, gradients are averaged by DDP, and the loss is weighted so that a run on
N processes follows the same trajectory as one process with the same batch size (up to
BatchNorm, whose statistics are per process on CPU; on GPU it becomes SyncBatchNorm).
Rank 0 alone writes checkpoints, logs and plots. Without torchrun nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch: near-equal contiguous chunks, in rank order."""
        per, extra = divmod(batch_size, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def all_rows(self, batch_size: int) -> list[slice]:
        """Every rank's rows, in rank order (also: a batch cut into world_size micro-batches)."""
        return [DistInfo(r, self.world_size).rows(batch_size) for r in range(self.world_size)]


SINGLE_PROCESS = DistInfo()


@contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to build a cache); the others wait, then run it."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns (info, this process's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        device = f"cuda:{info.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return info, device


def wrap_model(model: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """DDP around the model (rank 0's weights are broadcast to all); the model itself otherwise."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[info.local_rank])
    return DistributedDataParallel(model)


def all_reduce_sum(values: list[float], info: DistInfo, device: str) -> list[float]:
    """Sum a few numbers over all processes (one collective call)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_bytes(data: bytes | None, info: DistInfo, device: str) -> bytes:
    """Rank 0's bytes on every process (e.g. the tokenizer it trained), without pickling."""
    if not info.enabled:
        assert data is not None
        return data
    # Gloo and NCCL move tensors, so send the length first, then the bytes as uint8.
    n = torch.tensor([len(data) if info.is_main else 0], dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    if info.is_main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy())


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (no-op in one process)."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
