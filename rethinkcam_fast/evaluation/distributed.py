"""``torch.distributed`` plumbing for evaluation runs: ranks, devices, and agreeing on failure.

Under ``torchrun`` every rank evaluates its shard of the image ids (``ids[rank::world]``) and the
counters are summed with :meth:`CountingEvaluator.all_reduce` — integer sums, so the result is the
one-process result exactly.
"""

from __future__ import annotations

import os

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> tuple[torch.device, bool]:
    """Join the ``torchrun`` job described by the environment, if any.

    Returns ``(device, created)``: the device this rank evaluates on (``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU; NCCL or gloo accordingly) and whether a process group was created
    here (then :func:`shutdown` should destroy it).
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if not launched_by_torchrun() or dist.is_initialized():
        return device, False
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device, True


def shutdown(created: bool) -> None:
    import torch.distributed as dist

    if created and dist.is_initialized():
        dist.destroy_process_group()


def any_rank_failed(failed: bool, device: torch.device) -> bool:
    """Collective: True on every rank when any rank reports ``failed`` (no-op without a process group)."""
    return bool(_reduced(1 if failed else 0, device, "max"))


def sum_over_ranks(value: int, device: torch.device) -> int:
    """Collective: the sum of every rank's ``value`` (``value`` itself without a process group)."""
    return _reduced(value, device, "sum")


def _reduced(value: int, device: torch.device, op: str) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return int(total.item())


__all__ = ["any_rank_failed", "init_from_env", "launched_by_torchrun", "rank_and_world", "shutdown", "sum_over_ranks"]
