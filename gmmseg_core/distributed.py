"""Collectives for the GMM head; each one is a no-op when no process group is initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate, in rank order, a tensor whose first dimension differs between processes.

    The sizes are gathered first, every tensor is padded to the largest, gathered, and trimmed back.

    Parameters
    ----------
    tensor : Tensor (n_rank, ...)
        Same trailing shape and dtype on every rank.

    Returns
    -------
    Tensor (sum of n_rank, ...)
        ``tensor`` itself when not running distributed.
    """
    ranks = world_size()
    if ranks == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(ranks)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)
