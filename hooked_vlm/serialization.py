"""hooked_vlm's own checkpoint format: safetensors shards of the hooked state dict, the model config as JSON, and the
processor's files. Loading it needs no transformers model class (only the processor comes from transformers).

    out_dir/
      hooked_vlm_config.json      {"format": "hooked_vlm", "version": 1, "model_class": ..., "config": ...,
                                   "shards": {file: [tensor names]}}
      model-00001.safetensors ...
      processor files (as the processor's save_pretrained writes them)

Writes are atomic: everything goes to a temporary folder beside `out_dir`, renamed at the end, so an interrupted
save leaves nothing at `out_dir`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "hooked_vlm_config.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- configs as JSON
def encode_config(obj: Any) -> Any:
    """Nested config dataclasses -> JSON-able data, each dataclass tagged with its class."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: encode_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_config(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_config(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode_config(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a hooked_vlm config")


def _config_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module.startswith("hooked_vlm."):  # only our own config classes are ever instantiated from a file
        raise ValueError(f"config class {path!r} is not a hooked_vlm class")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"config class {path!r} does not exist in this version of hooked_vlm")
    return cls


def decode_config(data: Any) -> Any:
    if isinstance(data, dict) and "__class__" in data:
        cls = _config_class(data["__class__"])
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: decode_config(v) for k, v in data.items() if k != "__class__"}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}: the file is from another version")
        init = {k: v for k, v in values.items() if next(f for f in dataclasses.fields(cls) if f.name == k).init}
        return cls(**init)
    if isinstance(data, dict) and "__tuple__" in data:
        return tuple(decode_config(v) for v in data["__tuple__"])
    if isinstance(data, list):
        return [decode_config(v) for v in data]
    if isinstance(data, dict):
        return {k: decode_config(v) for k, v in data.items()}
    return data


# ---------------------------------------------------------------------------------------------- save and load
def save(model, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, shard_bytes: int = 2 * 2**30,
         overwrite: bool = False) -> Path:
    """Write `model` (a HookedVLM) to `out_dir` in hooked_vlm's format; returns the folder."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards: dict[str, list[str]] = {}
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:  # write each shard as soon as it is full: at most one shard is held in memory
            nonlocal current, size
            if current:
                file = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(current, tmp / file, metadata={"format": "pt"})
                shards[file] = list(current)
                current, size = {}, 0

        for name, tensor in model.state_dict().items():
            t = tensor.detach().to("cpu", dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)
            if size and size + t.numel() * t.element_size() > shard_bytes:
                flush()
            current[name] = t.contiguous()
            size += t.numel() * t.element_size()
        flush()
        meta = {"format": "hooked_vlm", "version": FORMAT_VERSION, "model_class": type(model).__name__,
                "config": encode_config(model.cfg), "shards": shards}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        if model.processor is not None:
            model.processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_hooked_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load(path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load a folder written by `save`: the model is built on the meta device and each tensor is read from the
    memory-mapped shards once, straight into place."""
    from . import models
    from .models.base import load_converted

    path = Path(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("format") != "hooked_vlm" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} is not a hooked_vlm checkpoint of format version {FORMAT_VERSION}")
    model_class = getattr(models, meta["model_class"], None)
    if model_class is None:
        raise ValueError(f"{path}: unknown model class {meta['model_class']!r}")
    cfg = decode_config(meta["config"])
    with torch.device("meta"):
        model = model_class(cfg)
    state = {}
    for file, names in meta["shards"].items():
        shard = path / file
        if not shard.is_file():
            raise FileNotFoundError(f"{path}: the shard {file} is missing")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                stored = set(f.keys())
                missing = [n for n in names if n not in stored]
                if missing:
                    raise ValueError(f"{shard} lacks tensors {missing[:5]}")
                for name in names:
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as e:
            raise ValueError(f"{shard} is corrupted or truncated ({e}); convert the checkpoint again") from e
    load_converted(model, state, source=str(path))
    if any(path.glob("*processor*")) or any(path.glob("tokenizer*")):
        from transformers import AutoProcessor

        model.processor = AutoProcessor.from_pretrained(path)
    return model.to(device=device).eval()
