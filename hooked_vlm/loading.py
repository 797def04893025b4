"""Loading and saving hooked models, every source in one place (`HookedVLM.from_hf`, `from_pretrained`,
`save_pretrained`, `hf_state_dict` and `to_hf` delegate here):

    from_hf(hf_model)            a live transformers model, converted from its state dict
    from_pretrained(source)      hooked_vlm's own folder (`serialization.py`); an HF folder, hub id or local HF cache
                                 entry: safetensors streamed tensor by tensor, pickles through transformers' loader
    save_pretrained(model, dir)  hooked_vlm's own format
    hf_state_dict(model), to_hf(model)   back to transformers (the conversion run backwards, `weights_conversion`)

Every loader builds the model on the meta device (no memory, no initialisation), makes its converted state dict and
ends in `_finish`: the names and shapes checked, the tensors assigned in place, the HF origin and the processor
attached, then the model moved or spread over devices.

Layering: the models import this module (their loading methods delegate here), this module imports the converters,
and the converters import configs only (`configs.py`), so no import goes back up. The model class of a checkpoint is
found by name among the classes registered as they are defined (`register_model`), not by importing the models.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# the package, not its submodules: importing it registers every converter
from weights_conversion import CONVERTERS, Converter, ConversionPlan, converter_for, export
from weights_conversion.checkpoint import HFCheckpoint, NoSafetensors, hf_class, resolve
from weights_conversion.streaming import plan_checkpoint

from . import serialization
from .arguments import as_dtype, keyword_names, reject_unknown
from .configs import HOOKED_CLASSES
from .placement import device_for, dispatch, resolve_device_map
from .serialization import HFOrigin

# ---------------------------------------------------------------------------------------------- model classes
# Every hooked model class by name, registered as it is defined (`HookedVLM.__init_subclass__`): the name is what a
# checkpoint stores, and `configs.HOOKED_CLASSES` names the class that runs each HF architecture.
MODEL_CLASSES: dict[str, type[nn.Module]] = {}


def register_model(cls: type[nn.Module]) -> None:
    if not cls.__name__.startswith("_"):  # a private base (`_Blip`) is no model a checkpoint may name
        MODEL_CLASSES[cls.__name__] = cls


def model_class(name: str) -> type[nn.Module]:
    """The hooked model class called `name`; a ValueError if there is none."""
    cls = MODEL_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown model class {name!r}")
    return cls


def hooked_class(converter: Converter) -> type[nn.Module]:
    """The hooked model class that runs the converter's HF architecture."""
    name = HOOKED_CLASSES.get(converter.hf_class)
    if name is None:
        raise ValueError(f"{converter.hf_class} has a converter but no hooked model class: add it to "
                         "hooked_vlm.configs.HOOKED_CLASSES")
    return model_class(name)


# ---------------------------------------------------------------------------------------------- the shared steps
def _empty(cls: type[nn.Module], cfg: Any) -> nn.Module:
    with torch.device("meta"):  # no memory, no initialisation: every tensor is assigned by `load_converted`
        return cls(cfg)


def _placement(model: nn.Module, device_map: str | dict[str, Any] | None, dtype: torch.dtype | None,
               max_memory: dict[Any, int | str] | None) -> dict[str, Any] | None:
    """The complete device map of a model still on the meta device, so that each tensor is read to its device."""
    return None if device_map is None else resolve_device_map(model, device_map, dtype=dtype, max_memory=max_memory)


def load_converted(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load converted weights into a model built on the meta device, checking every name and shape first.

    Nothing is ever left uninitialised: a missing, unexpected or mis-shaped tensor is an error naming it.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: converted {tuple(state[k].shape)}, model expects {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if wrong:
        problems.append(f"mis-shaped {wrong}")
    if problems:
        raise ValueError(f"converting {source}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def _finish(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, origin: HFOrigin | None,
            processor: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            device_map: dict[str, Any] | None = None, offload_dir: str | os.PathLike | None = None) -> nn.Module:
    """The tail of every loader: the state assigned (checked), origin and processor attached, eval mode, then
    spread over `device_map` (resolved already) or moved to `device` and `dtype`."""
    load_converted(model, state, source)
    model.hf_origin, model.processor = origin, processor
    model.eval()
    if device_map is not None:  # each tensor was read in its dtype already
        return dispatch(model, device_map, offload_dir=offload_dir)
    model = model.to(device=device, dtype=dtype)
    for name in float32_names(model.cfg, state, dtype):  # from the source's precision, not the float16 copy
        param = model.get_parameter(name)
        param.data = state[name].to(device=param.device, dtype=torch.float32)
    return model


def float32_names(cfg: Any, names: Iterable[str], dtype: torch.dtype | None) -> set[str]:
    """Which of `names` a load in `dtype` keeps in float32: the config's `keep_in_float32` patterns (set by the
    converter from HF's `_keep_in_fp32_modules`), for float16 only, as `PreTrainedModel._get_dtype_plan` does."""
    patterns = getattr(cfg, "keep_in_float32", ())  # families that HF keeps nothing of have no such field
    if dtype != torch.float16 or not patterns:
        return set()
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


# ---------------------------------------------------------------------------------------------- from transformers
def _convert_live(hf_model: nn.Module, converter: Converter, cfg: Any, share_weights: bool
                  ) -> tuple[nn.Module, dict[str, torch.Tensor], HFOrigin]:
    """The empty hooked model, its converted state and the HF origin of a live transformers model."""
    model = _empty(hooked_class(converter), cfg)
    hf_state = hf_model.state_dict()
    plan: ConversionPlan = converter.plan(hf_state, cfg)
    state = plan.apply(hf_state)
    unused = {k: hf_state[k].detach().to("cpu") for k in plan.unused}
    if not share_weights:
        hf_storage = {t.untyped_storage().data_ptr() for t in hf_state.values()}
        state = {k: t.clone() if t.untyped_storage().data_ptr() in hf_storage else t for k, t in state.items()}
        unused = {k: t.clone() for k, t in unused.items()}
    return model, state, HFOrigin.of(converter.hf_class, hf_model.config, unused)


def from_hf(hf_model: nn.Module, *, processor: Any = None, device: torch.device | str | None = None,
            dtype: torch.dtype | str | None = None, share_weights: bool = False, **options: Any) -> nn.Module:
    """`HookedVLM.from_hf`: convert a live transformers model (from its `state_dict()`)."""
    if not isinstance(hf_model, nn.Module):  # checked first: a class name string would find a converter
        raise TypeError(f"from_hf() takes a live transformers model ({', '.join(sorted(CONVERTERS))}), got a "
                        f"{type(hf_model).__name__}; for a hub id or a folder use HookedVLM.from_pretrained")
    converter = converter_for(hf_model)  # an unsupported class: a ValueError listing the supported ones
    dtype = as_dtype(dtype)
    # a switch this model does not have (or a typo of one of from_hf's keywords) is a TypeError naming the closest
    cfg = serialization.apply_switches(converter.config(hf_model.config), options,
                                       f"from_hf() of {converter.hf_class}",
                                       also=("processor", "device", "dtype", "share_weights"))
    model, state, origin = _convert_live(hf_model, converter, cfg, share_weights)
    return _finish(model, state, source=type(hf_model).__name__, origin=origin, processor=processor, device=device,
                   dtype=dtype)


# ---------------------------------------------------------------------------------------------- from a folder or id
def from_pretrained(name_or_path: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, device_map: str | dict[str, Any] | None = None,
                    max_memory: dict[Any, int | str] | None = None, offload_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                    revision: str | None = None, **options: Any) -> nn.Module:
    """`HookedVLM.from_pretrained`: a hooked_vlm folder, or an HF checkpoint (folder, hub id, local HF cache)."""
    where = "HookedVLM.from_pretrained()"
    # a typo is refused before any work; a switch of another family is refused once the model's config is read
    reject_unknown(options, [*serialization.MODEL_SWITCHES, *keyword_names(from_pretrained)], where)
    dtype = as_dtype(dtype)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir}
    serialization.recover(name_or_path)  # a save killed between its two renames: the old checkpoint comes back
    if serialization.is_hooked_checkpoint(name_or_path):  # hooked_vlm's own format: no transformers model
        resolve(name_or_path, cache_dir=cache_dir, revision=revision)  # refuses hub options for a folder
        return _load_hooked(Path(name_or_path), device=device, dtype=dtype, **placement, options=options,
                            where=where)
    folder = resolve(name_or_path, local_files_only=local_files_only, cache_dir=cache_dir, revision=revision)
    try:
        return _load_streamed(folder, device=device, dtype=dtype, **placement, options=options, where=where)
    except NoSafetensors:  # pickle weights: only through transformers' own (safe) loader
        pass
    source = name_or_path if not os.path.isdir(name_or_path) else folder
    return _load_pickled(source, folder, device=device, dtype=dtype, **placement, options=options, where=where,
                         local_files_only=local_files_only, cache_dir=cache_dir, revision=revision)


def _load_hooked(path: Path, *, device: torch.device | str | None, dtype: torch.dtype | None, device_map: Any,
                 max_memory: dict[Any, int | str] | None, offload_dir: str | os.PathLike | None,
                 options: dict[str, Any], where: str) -> nn.Module:
    """A folder written by `save_pretrained` or the converter: each tensor read once, straight to its device."""
    meta = serialization.read_meta(path)
    files = serialization.shard_files(path, meta)
    cls = model_class(meta["model_class"])
    cfg = serialization.apply_switches(serialization.decode_config(meta["config"]), options, where)
    model = _empty(cls, cfg)
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{path}: the shard {file.name} is missing")
    device_map = _placement(model, device_map, dtype, max_memory)

    def target(name: str) -> torch.device | str:
        return device_for(name, device_map) if device_map is not None else device or "cpu"

    kept = float32_names(cfg, model.state_dict(), dtype)
    state, unused = serialization.read_tensors(path, meta, files, None if kept else dtype, target)
    if kept:  # read as stored, so that the float32-kept tensors are not rounded through float16 first
        state = {n: t.to(torch.float32 if n in kept else dtype) for n, t in state.items()}
    origin = meta.get("hf_origin")
    origin = HFOrigin(origin["hf_class"], origin["config"], unused) if origin is not None else None
    return _finish(model, state, source=str(path), origin=origin, processor=serialization.load_processor(path),
                   device=device, device_map=device_map, offload_dir=offload_dir)


def _load_streamed(folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None, device_map: Any,
                   max_memory: dict[Any, int | str] | None, offload_dir: str | os.PathLike | None,
                   options: dict[str, Any], where: str) -> nn.Module:
    """An HF folder with safetensors weights, converted while it is read (no transformers model is built, except on
    the meta device to learn its names); `dtype` None keeps the checkpoint's, as HF's "auto". NoSafetensors if the
    folder has none."""
    with HFCheckpoint(folder) as ckpt:
        cfg, plan = plan_checkpoint(ckpt, where, **options)
        dtype = dtype or ckpt.default_dtype()
        model = _empty(hooked_class(ckpt.converter), cfg)
        device_map = _placement(model, device_map, dtype, max_memory)
        kept = float32_names(cfg, plan.recipes, dtype)
        state, viewed = {}, set()
        for name in plan.recipes:
            target = device_for(name, device_map) if device_map is not None else device
            t = ckpt.build(plan.recipes[name], torch.float32 if name in kept else dtype, target or "cpu")
            if t.device.type == "cpu":  # one stored tensor viewed by two parameters (T5's shared embedding in both
                ptr = t.untyped_storage().data_ptr()  # stacks): each parameter gets memory of its own, as in from_hf
                t = t.clone() if ptr in viewed else t
                viewed.add(ptr)
            state[name] = t
        origin = HFOrigin.of(ckpt.converter.hf_class, ckpt.config, {k: ckpt.read(k, dtype) for k in plan.unused})
    return _finish(model, state, source=str(folder), origin=origin, processor=serialization.load_processor(folder),
                   device=device, device_map=device_map, offload_dir=offload_dir)


def _load_pickled(source: str | os.PathLike, folder: Path, *, device: torch.device | str | None,
                  dtype: torch.dtype | None, device_map: Any, max_memory: dict[Any, int | str] | None,
                  offload_dir: str | os.PathLike | None, options: dict[str, Any], where: str,
                  **hub: Any) -> nn.Module:
    """An HF checkpoint with pickle weights, through transformers' own (safe) loader, then converted as `from_hf`
    with shared weights. `hub`: local_files_only, cache_dir, revision."""
    # here: `import hooked_vlm` does not load transformers (half a second), and only pickle checkpoints need its
    # auto classes
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    architecture = hf_class(config, str(source))
    converter = converter_for(architecture.__name__)
    # the switches are checked before the weights are read
    serialization.apply_switches(converter.config(config), options, where)
    try:
        hf_model = architecture.from_pretrained(source, dtype=dtype or "auto", **hub)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # a broken or refused pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder} has no safetensors weights and transformers could not load its other "
                         f"weights ({first}); convert them to model.safetensors") from e
    cfg = serialization.apply_switches(converter.config(hf_model.config), options, where)
    model, state, origin = _convert_live(hf_model.eval(), converter, cfg, share_weights=True)
    device_map = _placement(model, device_map, dtype or hf_model.dtype, max_memory)
    del hf_model
    return _finish(model, state, source=architecture.__name__, origin=origin,
                   processor=serialization.load_processor(folder), device=device, dtype=dtype,
                   device_map=device_map, offload_dir=offload_dir)


# ---------------------------------------------------------------------------------------------- saving, exporting
def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    overwrite: bool = False) -> Path:
    """`HookedVLM.save_pretrained`: hooked_vlm's own format, written atomically (`serialization.save`)."""
    return serialization.save(model, out_dir, dtype=dtype, overwrite=overwrite)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`HookedVLM.hf_state_dict`: the weights as the HF model's state dict (every key), exact."""
    return export.hf_state_dict(model)


def to_hf(model: nn.Module) -> nn.Module:
    """`HookedVLM.to_hf`: a transformers model with the model's current weights."""
    return export.to_hf(model)
