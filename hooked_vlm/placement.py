"""Spreading a model over several devices with accelerate's device maps (an existing engine, not a home-made
splitter), for checkpoints larger than one GPU.

A device map is {module name: device}, e.g. {"vision": 0, "projector": 0, "lm.embed": 0, "lm.blocks.0": 0, ...,
"lm.blocks.31": 1, "lm.ln_final": 1, "lm.unembed": 1}; a device is a GPU index, "cpu" (kept in CPU memory, run on the
first GPU when there is one) or "disk" (kept in `offload_dir`, loaded for each forward). `"auto"` (or "balanced",
"balanced_low_0", "sequential") lets accelerate fill the GPUs, then the CPU, then the disk. A transformer block is
never split: each block, with its hook points, runs on one device, so every activation lives on one device
(a cache can still stream to the CPU with `run_with_cache(device="cpu")`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .components import Block

# accelerate is imported in the functions that place a model: only device maps need it
AUTO_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def unsplittable(model: nn.Module) -> dict[str, str]:
    """{module name: class} of the modules a device map must place whole: blocks (their sub-layers and hooks run
    together) and modules with parameters of their own, which their forward mixes with their children's outputs
    (the vision tower's class embedding, the Q-Former's query tokens)."""
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, Block) or (name and next(m.parameters(recurse=False), None) is not None)}


def resolve_device_map(model: nn.Module, device_map: str | dict[str, Any], *, dtype: torch.dtype | None = None,
                       max_memory: dict[Any, int | str] | None = None) -> dict[str, Any]:
    """A complete device map for `model` (built on the meta device): `device_map` checked, or inferred from a
    strategy name."""
    from accelerate.utils import check_device_map, get_balanced_memory, infer_auto_device_map

    whole = unsplittable(model)
    if isinstance(device_map, str):
        if device_map not in AUTO_STRATEGIES:
            raise ValueError(f"device_map must be a dict or one of {', '.join(AUTO_STRATEGIES)}, got {device_map!r}")
        no_split = sorted(set(whole.values()))
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                                dtype=dtype))
        if "" in device_map:  # the whole model on one device: name its towers (accelerate offloads no root)
            device = device_map.pop("")
            device_map.update({name: device for name, _ in model.named_children()})
        return device_map
    names = dict(model.named_modules())
    unknown = [k for k in device_map if k and k not in names]
    if unknown:
        raise ValueError(f"the device map names modules the model does not have: {unknown[:5]}; module names are "
                         "hook-name prefixes such as 'vision', 'lm.blocks.3', 'lm.unembed'")
    for inner in device_map:
        outer = next((w for w in whole if inner.startswith(w + ".")), None)
        if outer is not None:
            raise ValueError(f"the device map places {inner!r} apart from the rest of {outer!r} ({whole[outer]}), "
                             f"which must stay on one device; place {outer!r} whole")
    check_device_map(model, device_map)  # every parameter placed
    return dict(device_map)


def dispatch(model: nn.Module, device_map: dict[str, Any], *, offload_dir: str | os.PathLike | None = None
             ) -> nn.Module:
    """Attach accelerate's hooks that move each placed module's inputs to its device (and load offloaded weights
    before it runs); the model's output comes back on the device of its inputs."""
    from accelerate import dispatch_model

    devices = [d for d in device_map.values() if d not in ("cpu", "disk")]
    main = devices[0] if devices else "cpu"
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("the device map offloads modules to 'disk': pass offload_dir= (a folder for their weights)")
    model = dispatch_model(model, device_map, main_device=main, offload_dir=offload_dir)
    model.device_map = device_map
    return model


def device_for(name: str, device_map: dict[str, Any]) -> Any:
    """Where a tensor is loaded: the device of the longest device-map prefix of its name. Tensors offloaded to
    disk wait on the CPU (`dispatch` writes them to the offload folder)."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        device = device_map.get(".".join(parts[:n]))
        if device is not None:
            return "cpu" if device == "disk" else device
    raise ValueError(f"the device map places no module holding {name}")
