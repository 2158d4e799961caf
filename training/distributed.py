"""The processes of a run: torchrun's environment, the device each process uses, and the one
bucketed all-reduce that averages gradients across processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lanit_rt.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start a process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", cuda_index(device_pref, local_rank if world > 1 else None))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local_rank), device


def cuda_index(device_pref: str, local_rank: int | None) -> int:
    """The GPU index for `device_pref` ("auto", "cuda" or "cuda:N"); torchrun's LOCAL_RANK wins when
    given. Raises ConfigError when PyTorch sees no such GPU. Always an explicit index: set_device
    rejects a bare "cuda"."""
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device_pref} needs a CUDA GPU, but PyTorch sees none "
                          "(torch.cuda.is_available() is False); use --set device=cpu or device=auto")
    _, _, given = device_pref.partition(":")
    index = local_rank if local_rank is not None else int(given) if given else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device cuda:{index} does not exist: PyTorch sees {count} GPU(s)")
    return index


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average .grad across processes with one flat all-reduce (what DDP's buckets do).

    The GAN step runs G three or four times before each backward, which DistributedDataParallel's
    one-forward-per-backward contract does not allow without extra machinery; averaging the
    gradients explicitly gives the same update.
    """
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
