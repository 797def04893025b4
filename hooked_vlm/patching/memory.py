"""How much memory a sweep needs, and the largest `batch_size` that fits a budget.

A sweep splits its examples into chunks of at most `batch_size` and runs forwards of at most `batch_size` rows
(cells x examples of the chunk). What it holds at its peak is, for a chunk of `e = min(batch_size, B)` examples,

    e x cached_per_example      the clean and corrupted runs it caches for the chunk (exact)
  + batch_size x per_row        the activations of one forward (an estimate, an upper bound)

`memory_estimate` measures both on a forward of the first example, and `choose_batch_size` solves for the largest
`batch_size` within `memory_budget` bytes (`batch_size="auto"` in every sweep).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import names
from ..arguments import strict
from ..corruption.noise import Corruption, gaussian
from ..models.base import HookedVLM
from .engine import (HEAD_ACTIVATIONS, STREAM_HOOKS, TRACE_KINDS, Corrupt, Direction, _batch_size, _check_corrupt,
                     _check_inputs, _require_leaf, _select, _site_hook, _target_wanted, head_leaf)

SWEEPS = ("patch_resid", "patch_heads", "causal_trace", "ablation_sweep", "attribution_patch_resid",
          "attribution_patch_heads")
# the share of free CUDA memory a default budget leaves out: the allocator's fragmentation and what the per-row
# estimate does not see (kernels' workspaces)
CUDA_MARGIN = 0.1
# the share of the CPU's available memory a default budget takes: the rest is left to the other processes
CPU_SHARE = 0.5


@dataclass(frozen=True)
class MemoryEstimate:
    """A sweep's memory per example and per forward row, in bytes.

    `cached_per_example` is exact: the sum of `nbytes` of every activation (and tower output) the sweep caches for
    one example of this batch (the clean and corrupted runs of a chunk hold `e` times that).

    `per_row` estimates the activations one forward row holds at its peak, from the sizes of every hook point of a
    forward of the first example (`parts`):
      block   2 x the largest block's hook points summed (everything a block makes, counted once, plus as much
              again for the temporaries no hook sees: the fused path's copies, rearranged heads, a patch's clone);
              for an attribution sweep, whose backward keeps every block's activations, 2 x all blocks' summed
      towers  every hook point outside the blocks (embeddings, final norms, projector), summed
      kv      the keys and values of every block of the swept tower (a resumed run's prefix), when it is causal
      logits  the output row, plus two float32 vocabulary rows (a metric's softmax)
      inputs  the example's input tensors, and the stream and tower outputs a resumed run is given
    """

    cached_per_example: int
    per_row: int
    parts: dict[str, int] = field(default_factory=dict)
    cache_on_budget: bool = True

    def peak(self, batch_size: int, n_examples: int) -> int:
        """The bytes a sweep of `n_examples` with `batch_size` holds at its peak (by this estimate): the chunk's
        caches (when they live on the budget's device) and one forward."""
        examples = min(batch_size, n_examples)
        cached = examples * self.cached_per_example if self.cache_on_budget else 0
        return cached + batch_size * self.per_row

    def batch_size(self, budget: int, n_examples: int) -> int:
        """The largest `batch_size` whose `peak` fits `budget` bytes; a ValueError saying what to lower when not
        even one example fits."""
        cached = self.cached_per_example if self.cache_on_budget else 0
        one = cached + self.per_row
        if budget < one:
            raise ValueError(
                f"memory_budget={budget} bytes does not hold one example: it caches {self.cached_per_example} bytes"
                f"{'' if self.cache_on_budget else ' (off the budget, on cache_device)'} and a forward row needs about "
                f"{self.per_row} ({', '.join(f'{k} {v}' for k, v in self.parts.items())}); raise memory_budget, pass "
                "cache_device='cpu' (the caches then leave the accelerator), load the model in float16/bfloat16, or "
                "sweep a shorter prompt")
        whole = (budget - n_examples * cached) // self.per_row  # every example in one chunk
        if whole >= n_examples:
            return int(whole)
        return int(min(budget // one, n_examples))


def default_budget(model: HookedVLM) -> int:
    """The memory a sweep may use by default: on CUDA, the free memory of the model's device less `CUDA_MARGIN`
    of the card; on the CPU, `CPU_SHARE` of the available memory (`MemAvailable` in /proc/meminfo, else the free
    pages)."""
    device = model.device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(free - CUDA_MARGIN * total))
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(CPU_SHARE * available)


def _sizes(model: HookedVLM, inputs: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int], Any]:
    """One forward of `inputs`: the bytes of every hook point's activation, of every tower's output, and the
    logits; nothing is kept."""
    sizes: dict[str, int] = {}

    def record(t: Any, hook: Any) -> None:
        if isinstance(t, torch.Tensor):
            sizes[hook.name] = t.nbytes

    with torch.no_grad(), model.hooks([(lambda name: True, record)]):
        # the cache is for the towers' outputs; it must name a hook, so it keeps the first (not counted)
        logits, cache = model.run_with_cache(**inputs, tower_outputs=True, names_filter=next(iter(model.hook_dict)))
    return sizes, {k: v.nbytes for k, v in cache.tower_outputs.items()}, logits


def estimate(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt | None, tower: str, leaves: list[str],
             direction: Direction = "denoise", *, attribution: bool = False,
             cache_device: torch.device | None = None) -> MemoryEstimate:
    """`MemoryEstimate` of a sweep patching `leaves` of `tower` (the engine's view: `memory_estimate` takes the
    sweep's own arguments). `corrupt=None`: an ablation sweep (one cached run)."""
    one = _select(clean, torch.arange(1))
    sizes, outputs, logits = _sizes(model, one)
    other = sizes
    if isinstance(corrupt, Mapping):
        other = _sizes(model, _select(corrupt, torch.arange(1)))[0]
    wanted = names.in_blocks(tower, *leaves)
    target_wanted = _target_wanted(model, tower, leaves)
    in_outputs = sum(outputs.values())

    def cached(run: dict[str, int], keep: Any, tower_outputs: bool) -> int:
        return sum(b for name, b in run.items() if keep(name)) + (in_outputs if tower_outputs else 0)

    if attribution:  # the source run's leaves (a Corruption: the clean run holds the site too)
        site = _site_hook(model, corrupt, tower) if isinstance(corrupt, Corruption) else None
        if isinstance(corrupt, Corruption):
            total = cached(sizes, lambda n: wanted(n) or n == site, False)
            if direction == "noise":
                total += cached(sizes, wanted, False)
        else:
            total = cached(other if direction == "noise" else sizes, wanted, False)
    elif corrupt is None:  # the one run is target and source
        total = cached(sizes, target_wanted, True)
    elif isinstance(corrupt, Corruption):  # the clean run (with the site) and one corrupted run
        site = _site_hook(model, corrupt, tower)
        total = cached(sizes, lambda n: target_wanted(n) or n == site, True)
        total += cached(sizes, target_wanted, True) if direction == "denoise" else cached(sizes, wanted, False)
    else:
        source, target = (sizes, other) if direction == "denoise" else (other, sizes)
        total = cached(source, wanted, False) + cached(target, target_wanted, True)

    blocks: dict[tuple[str, int], int] = {}
    outside = 0
    for name, b in sizes.items():
        parsed = names.parse(name)
        if parsed.layer is None:
            outside += b
        else:
            blocks[(parsed.tower, parsed.layer)] = blocks.get((parsed.tower, parsed.layer), 0) + b
    kv_names = set(model.prefix_hook_names(tower)) if model.towers()[tower].prefix_resumable else set()
    vocab = logits.shape[-1]
    inputs = sum(v.nbytes for v in one.values() if isinstance(v, torch.Tensor))
    stream = sizes.get(names.resid(tower, 0, "pre"), 0)
    parts = {
        "block": 2 * (sum(blocks.values()) if attribution else max(blocks.values(), default=0)),
        "towers": outside,
        "kv": sum(b for name, b in sizes.items() if name in kv_names),
        "logits": logits.nbytes + 2 * 4 * vocab,
        "inputs": inputs + stream + in_outputs,
    }
    on_budget = cache_device is None or torch.device(cache_device) == model.device
    return MemoryEstimate(int(total), int(sum(parts.values())), parts, on_budget)


def choose_batch_size(batch_size: int | str, memory_budget: int | None, model: HookedVLM,
                      clean: Mapping[str, Any], corrupt: Corrupt | None, tower: str, leaves: list[str],
                      direction: Direction = "denoise", *, attribution: bool = False,
                      cache_device: torch.device | None = None) -> int:
    """`batch_size` as an int: itself, or for "auto" the largest that fits `memory_budget` bytes (None:
    `default_budget`) by `estimate`."""
    if batch_size != "auto":
        if memory_budget is not None:
            raise ValueError(f"memory_budget={memory_budget} goes with batch_size='auto' (which it sizes), not with "
                             f"batch_size={batch_size!r}")
        return batch_size
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget={memory_budget!r}: pass a number of bytes (an int >= 1), or None for the "
                         "free memory of the model's device")
    budget = default_budget(model) if memory_budget is None else memory_budget
    est = estimate(model, clean, corrupt, tower, leaves, direction, attribution=attribution,
                   cache_device=cache_device)
    return est.batch_size(budget, _batch_size(clean))


@strict
def memory_estimate(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt | None = None, *, tower: str,
                    sweep: Literal["patch_resid", "patch_heads", "causal_trace", "ablation_sweep",
                                   "attribution_patch_resid", "attribution_patch_heads"] = "patch_resid",
                    hook: str = "resid_pre", attention: Literal["attn", "cross_attn"] = "attn",
                    activation: Literal["z", "q", "k", "v", "pattern"] = "z",
                    kind: Literal["resid", "resid_mid", "resid_mid_cross", "attn", "mlp", "cross_attn"] = "resid",
                    direction: Direction = "denoise", cache_device: torch.device | str | None = None
                    ) -> MemoryEstimate:
    """The memory a sweep needs per example and per forward row (`MemoryEstimate`), measured on a forward of the
    first example of `clean` (and of `corrupt`, for corrupted inputs).

    `sweep` names the sweep; `hook` (patch_resid and attribution_patch_resid), `attention` and `activation`
    (patch_heads, attribution_patch_heads, ablation_sweep: attention only), `kind` (causal_trace), `direction` and
    `cache_device` are its arguments of the same names. `corrupt`: the corrupted inputs or a `Corruption` (None for
    ablation_sweep; causal_trace's default is its Gaussian noise on the image). With `cache_device` off the model's
    device, the caches are not counted against the model's memory (`MemoryEstimate.cache_on_budget`).

        est = patching.memory_estimate(model, clean, corrupt, tower="lm", sweep="patch_heads")
        est.cached_per_example, est.per_row, est.batch_size(20 * 2**30, n_examples)
    """
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}, got {sweep!r}")
    if sweep in ("patch_resid", "attribution_patch_resid"):
        if hook not in STREAM_HOOKS:
            raise ValueError(f"hook must be one of {', '.join(STREAM_HOOKS)}, got {hook!r}")
        leaf = names.leaf(hook)
        _require_leaf(model, tower, leaf)
    elif sweep == "causal_trace":
        if kind not in TRACE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(TRACE_KINDS)}, got {kind!r}")
        leaf = TRACE_KINDS[kind]
        _require_leaf(model, tower, leaf, f"kind={kind!r}")
    else:
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(HEAD_ACTIVATIONS)}, got {activation!r}")
        leaf = head_leaf(model, tower, attention, "z" if sweep == "ablation_sweep" else activation)
    if sweep == "ablation_sweep":
        if corrupt is not None:
            raise ValueError("ablation_sweep corrupts nothing: pass corrupt=None")
        _check_inputs(model, clean, clean)
    else:
        if corrupt is None:
            if sweep != "causal_trace":
                raise ValueError(f"{sweep} needs corrupt=: the corrupted inputs or a Corruption")
            corrupt = gaussian(3.0, site="image")  # causal_trace's default
        _check_corrupt(model, clean, corrupt)
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    device = None if cache_device is None else torch.device(cache_device)
    return estimate(model, clean, corrupt, tower, [leaf], direction, attribution=sweep.startswith("attribution"),
                    cache_device=device)
