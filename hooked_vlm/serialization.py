"""hooked_vlm's own checkpoint format: safetensors shards of the hooked state dict, the model config as JSON, and the
processor's files. Loading it needs no transformers model class (only the processor comes from transformers).

    out_dir/
      hooked_vlm_config.json      {"format": "hooked_vlm", "version": 1, "model_class": ..., "config": ...,
                                   "shards": {file: [tensor names]}, "hf_origin": {"hf_class": ..., "config": ...}}
      model-00001.safetensors ...  the hooked state dict, then the HF tensors hooked_vlm does not use (`hf_unused.*`)
      processor files (as the processor's save_pretrained writes them)

Writes are atomic: everything goes to a temporary folder beside `out_dir`, renamed at the end, so an interrupted
save leaves nothing at `out_dir`. Shards are written and read one tensor at a time (`shards.py`): saving holds
nothing beyond the model, and loading builds the model on the meta device and reads each tensor once, into place.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .shards import Entry, ShardReader, write_shards

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
UNUSED_PREFIX = "hf_unused."
DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclasses.dataclass
class HFOrigin:
    """What exporting back to transformers needs beyond the hooked weights: the HF class and config, and the HF
    tensors hooked_vlm does not use (LLaVA's vision blocks after the feature layer), kept on the CPU."""

    hf_class: str
    config: dict[str, Any]
    unused: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, hf_class: str, config: Any, unused: dict[str, torch.Tensor] | None = None) -> "HFOrigin":
        """From a transformers config object (stored whole, not as a diff to the class defaults)."""
        return cls(hf_class, json.loads(config.to_json_string(use_diff=False)), unused or {})


def write_checkpoint(out_dir: str | os.PathLike, *, model_class: str, cfg: Any, entries: Iterable[Entry],
                     hf_origin: HFOrigin | None = None, unused: Iterable[Entry] = (), processor: Any = None,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                     progress: Callable[[Entry], None] | None = None) -> Path:
    """Write a checkpoint folder atomically from entries made one at a time (`save` and the streaming converter
    both come here). `unused`: the HF tensors of `hf_origin.unused`, named without the prefix."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        prefixed = [Entry(UNUSED_PREFIX + e.name, e.dtype, e.shape, e.make, e.written) for e in unused]
        shards = write_shards([*entries, *prefixed], tmp, shard_bytes=shard_bytes, progress=progress)
        meta = {"format": "hooked_vlm", "version": FORMAT_VERSION, "model_class": model_class,
                "config": encode_config(cfg), "shards": shards}
        if hf_origin is not None:
            meta["hf_origin"] = {"hf_class": hf_origin.hf_class, "config": hf_origin.config}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        if processor is not None:
            processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tensor_entries(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> list[Entry]:
    """Entries for tensors that exist already, cast to `dtype` (floating point ones) one at a time when written."""
    def entry(name: str, t: torch.Tensor) -> Entry:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return Entry(name, target, tuple(t.shape), lambda: t.detach().to("cpu", target))

    return [entry(name, t) for name, t in tensors]


def save(model, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
         shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write `model` (a HookedVLM) to `out_dir` in hooked_vlm's format; returns the folder."""
    origin = model.hf_origin
    return write_checkpoint(out_dir, model_class=type(model).__name__, cfg=model.cfg,
                            entries=tensor_entries(model.state_dict().items(), dtype), hf_origin=origin,
                            unused=tensor_entries(origin.unused.items(), dtype) if origin else (),
                            processor=model.processor, shard_bytes=shard_bytes, overwrite=overwrite)


def is_hooked_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("format") != "hooked_vlm" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} is not a hooked_vlm checkpoint of format version {FORMAT_VERSION}")
    return meta


def build_empty(meta: dict[str, Any]):
    """The model of a checkpoint's metadata, built on the meta device (no memory, no initialisation)."""
    from . import models

    model_class = getattr(models, meta["model_class"], None)
    if model_class is None:
        raise ValueError(f"unknown model class {meta['model_class']!r}")
    with torch.device("meta"):
        return model_class(decode_config(meta["config"]))


def load_processor(folder: Path) -> Any:
    """The processor saved in a folder (tokenizer and image processor files), or None if it holds none."""
    if not (any(folder.glob("*processor*")) or any(folder.glob("tokenizer*"))):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def load(path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         device_map: Any = None, max_memory: dict[Any, int | str] | None = None,
         offload_dir: str | os.PathLike | None = None):
    """Load a folder written by `save` or by the converter: the model is built on the meta device and each tensor
    is read once, straight to its device. `device_map` (and `max_memory`, `offload_dir`) as in
    `HookedVLM.from_pretrained`."""
    from .models.base import load_converted
    from .placement import device_for, dispatch, resolve_device_map

    path = Path(path)
    meta = read_meta(path)
    model = build_empty(meta)
    files = [path / file for file in meta["shards"]]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{path}: the shard {file.name} is missing")
    if device_map is not None:
        device_map = resolve_device_map(model, device_map, dtype=dtype, max_memory=max_memory)
    state, unused = {}, {}
    with ShardReader(files) as reader:  # on the CPU as stored: views of the memory-mapped shards, no copy
        for file, names in meta["shards"].items():
            missing = [n for n in names if n not in reader.keys() or reader.file(n) != path / file]
            if missing:
                raise ValueError(f"{path / file} lacks tensors {missing[:5]}")
            for name in names:
                if name.startswith(UNUSED_PREFIX):
                    unused[name[len(UNUSED_PREFIX):]] = reader.read(name, dtype)
                else:
                    target = device_for(name, device_map) if device_map is not None else device
                    state[name] = reader.read(name, dtype, target or "cpu")
    load_converted(model, state, source=str(path))
    origin = meta.get("hf_origin")
    if origin is not None:
        model.hf_origin = HFOrigin(origin["hf_class"], origin["config"], unused)
    model.processor = load_processor(path)
    model.eval()
    if device_map is not None:
        return dispatch(model, device_map, offload_dir=offload_dir)
    return model.to(device=device)

