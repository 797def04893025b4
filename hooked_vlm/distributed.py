"""Data sets sharded across processes with torch.distributed, for sweeps that outgrow one GPU.

Launch one process per GPU with torchrun; each loads the model, takes every `world_size`-th item of the data set
and the results are gathered on rank 0 in the data set's order:

    torchrun --nproc_per_node 4 my_sweep.py

    from hooked_vlm import distributed, patching
    distributed.setup()                                   # the process group from torchrun's environment
    model = HookedVLM.from_pretrained(..., device=distributed.device())
    scores = patching.sweep_dataset(patching.patch_heads, model, pairs, tower="lm", distributed=True)
    if distributed.rank() == 0:                           # [n_pairs, n_layers, n_heads] on rank 0, None elsewhere
        torch.save(scores, "scores.pt")

Results do not depend on the number of processes: each item is computed alone, as in one process.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def setup(backend: str | None = None) -> None:
    """Join the process group torchrun describes in the environment (NCCL with GPUs, else gloo); each process
    takes the GPU of its local rank. Does nothing when not launched by torchrun or already set up."""
    if dist.is_initialized() or "RANK" not in os.environ:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    _watch_for_crashes()
    atexit.register(_leave_at_exit)


def teardown() -> None:
    """Wait for every process to get here, then leave the process group. setup() arranges this at a normal exit;
    call it earlier to free the group sooner."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_crashed = False


def _watch_for_crashes() -> None:
    """Note an uncaught exception (Python calls sys.excepthook before the exit handlers)."""
    previous = sys.excepthook

    def hook(*exc_info: Any) -> None:
        global _crashed
        _crashed = True
        previous(*exc_info)

    sys.excepthook = hook


def _leave_at_exit() -> None:
    # A process whose group is still alive at exit, or that leaves while another still talks to it, can abort in
    # gloo's threads ("terminate called without an active exception", 1 run in 6 on two CPU processes) after its
    # results were written: leave together, at a barrier. Not after a crash, where the barrier would wait for
    # processes that are themselves waiting for this one; torchrun reports the failure and stops the rest.
    if not _crashed:
        teardown()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    """This process's device: its GPU under torchrun, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard(n_items: int) -> range:
    """The indices this process handles: every `world_size`-th from its rank."""
    return range(rank(), n_items, world_size())


def require_group() -> None:
    if not dist.is_initialized():
        raise RuntimeError("distributed=True needs a torch.distributed process group: launch with torchrun and call "
                           "hooked_vlm.distributed.setup() first")


def map_dataset(fn: Callable[[Any], T], items: Iterable[Any], *, distributed: bool = False) -> list[T] | None:
    """`[fn(item) for item in items]`; with `distributed=True` each process computes its shard and rank 0 returns
    the whole list in order (the other ranks return None). Tensors in the results are moved to the CPU. A sequence
    is indexed only at this process's items; any other iterable is walked whole by every process, each keeping
    every `world_size`-th item (so build examples lazily, in `fn`, where building is costly)."""
    if not distributed:
        return [fn(item) for item in items]
    require_group()
    if isinstance(items, Sequence):
        local = [(i, _to_cpu(fn(items[i]))) for i in shard(len(items))]
    else:
        local = [(i, _to_cpu(fn(item))) for i, item in enumerate(items) if i % world_size() == rank()]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if gathered is None:
        return None
    results: list[Any] = [None] * sum(len(part) for part in gathered)
    for part in gathered:
        for i, value in part:
            results[i] = value
    return results


def all_sum(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum {name: tensor} over the processes, every rank getting the same result; a rank may lack names (it saw no
    data for them). The partial sums are added in rank order, in float64 on the CPU."""
    require_group()
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, _to_cpu(values))
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total[name] + value if name in total else value
    return total


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
