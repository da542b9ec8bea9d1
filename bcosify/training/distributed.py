"""Distributed data parallel runs with PyTorch's own engine: ``torchrun`` starts the processes, each one joins
the process group (NCCL on GPUs, gloo on CPU), and rank 0 alone writes files."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process as ``torchrun`` sets them (``(0, 1, 0)`` alone)."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process writes files and progress (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Join the process group ``torchrun`` prepared (nothing for a single process), and leave it after.

    GPUs use NCCL with one GPU per local rank; CPUs use gloo.
    """
    rank, world_size, local_rank = world()
    if world_size == 1 or is_distributed():
        yield
        return
    cuda = str(device) != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_sum(*values: float) -> list[float]:
    """The sums of ``values`` over all processes (the values themselves in a single process)."""
    if not is_distributed():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def each_process(value: float) -> list[float]:
    """The ``value`` of every process, by rank (``[value]`` alone)."""
    if not is_distributed():
        return [value]
    values = [0.0] * dist.get_world_size()
    values[dist.get_rank()] = value
    return all_sum(*values)


def gather(value: T) -> list[T]:
    """``value`` of every process, by rank (``[value]`` alone)."""
    if not is_distributed():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone and handed to every process (its exception raised in every process):
    for files only rank 0 may see, such as the checkpoints of a run over several machines."""
    if not is_distributed():
        return compute()
    box: list = [None]
    if is_main():
        try:
            box = [(True, compute())]
        except Exception as e:  # every process raises it, none waits for the others
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
