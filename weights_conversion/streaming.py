"""Conversion without a second copy: an HF checkpoint's safetensors shards are read tensor by tensor, converted by
the plan and either placed in a hooked model built on the meta device (`hooked_vlm.loading`) or written to
hooked_vlm's own format (`convert_checkpoint`). Tensors kept as stored are views of the memory-mapped shards; the
rest are made one recipe at a time, and the pages they were read from released. Peak memory is about the weights in
the target dtype when loading, and a few tensors when converting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hooked_vlm import serialization
from hooked_vlm.arguments import as_dtype
from hooked_vlm.configs import HOOKED_CLASSES
from hooked_vlm.shards import Entry

from .checkpoint import HFCheckpoint, resolve
from .state_dict import ConversionPlan


def plan_checkpoint(ckpt: HFCheckpoint, where: str = "plan_checkpoint()", **options: Any
                    ) -> tuple[Any, ConversionPlan]:
    """The hooked config (with the model switches of `options` set) and the conversion plan of a checkpoint; tied
    aliases stored twice are checked equal."""
    cfg = serialization.apply_switches(ckpt.converter.config(ckpt.config), options, where)
    plan = ckpt.converter.plan(ckpt.shapes(), cfg)
    for alias, target in plan.aliases.items():
        if not ckpt.same_tensor(alias, target) and not torch.equal(ckpt.read(alias), ckpt.read(target)):
            raise ValueError(f"{ckpt.folder}: {alias} was expected to be tied to {target}, but they differ")
    return cfg, plan


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: torch.dtype | str | None = None,
                       overwrite: bool = False, shard_bytes: int = serialization.DEFAULT_SHARD_BYTES,
                       progress: bool = False, local_files_only: bool = False,
                       cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                       **options: Any) -> Path:
    """Write hooked_vlm's format for an HF checkpoint (a hub id or a local folder) to `out_dir`, atomically, one
    tensor at a time; the hooked model is never built. Returns `out_dir`. `overwrite` replaces only what
    `serialization.check_target` allows (never the source, nor a folder containing it)."""
    dtype = as_dtype(dtype)
    folder = resolve(source, local_files_only=local_files_only, cache_dir=cache_dir, revision=revision)
    serialization.check_target(out_dir, overwrite=overwrite, sources=[folder])  # before any work
    with HFCheckpoint(folder) as ckpt:
        cfg, plan = plan_checkpoint(ckpt, "convert_checkpoint()", **options)
        dtype = dtype or ckpt.default_dtype()
        shapes = ckpt.shapes()

        def entry(name: str, sources: list[str], shape: tuple[int, ...], make) -> Entry:
            stored = shapes[sources[0]].dtype
            return Entry(name, dtype if stored.is_floating_point else stored, shape, make,
                         lambda: ckpt.release(sources))

        def built(recipe):
            return lambda: ckpt.build(recipe, dtype)

        entries = [entry(name, list(r.sources), r.shape, built(r)) for name, r in plan.recipes.items()]
        unused = [entry(k, [k], tuple(shapes[k].shape), lambda k=k: ckpt.read(k, dtype)) for k in plan.unused]
        bar = None
        if progress:
            from tqdm.auto import tqdm  # only for a progress bar: the library itself never needs tqdm

            bar = tqdm(total=sum(e.nbytes for e in entries + unused), unit="B", unit_scale=True,
                       desc=f"converting {Path(str(source)).name}")
        try:
            out = serialization.write_checkpoint(
                out_dir, model_class=HOOKED_CLASSES[ckpt.converter.hf_class], cfg=cfg, entries=entries,
                hf_origin=serialization.HFOrigin.of(ckpt.converter.hf_class, ckpt.config), unused=unused,
                processor=serialization.load_processor(folder), shard_bytes=shard_bytes, overwrite=overwrite,
                progress=(lambda e: bar.update(e.nbytes)) if bar is not None else None, sources=[folder])
        finally:
            if bar is not None:
                bar.close()
    return out
