"""An HF checkpoint folder read tensor by tensor, under the names of the live transformers model.

Checkpoints on the hub store their tensors under older names than the live 5.x models use (LLaVA:
`language_model.model.*` for `model.language_model.*`), omit tied aliases (BLIP's decoder weight, T5's
`embed_tokens`), and may keep buffers that are no longer saved (`position_ids`). The HF model is built on the meta
device (no memory) to learn its live names, shapes and ties; file names are mapped to live names with transformers'
own renaming rules (`conversion_mapping`), as its `from_pretrained` does. Tensors are then read one at a time from
the safetensors shards, so a conversion plan runs without loading the checkpoint whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hooked_vlm.shards import ShardReader, inside

from .registry import Converter, converter_for
from .state_dict import Recipe

# transformers and huggingface_hub are imported in the functions that read an HF checkpoint: `import hooked_vlm`
# loads neither (transformers alone takes about half a second, its model classes seconds)

# what a hub download takes: configs, safetensors shards, processor and tokenizer files (never pickles)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class NoSafetensors(Exception):
    """The checkpoint has no safetensors weights (pickles, or weights this reader cannot rename): it can be loaded
    through transformers' own (safe) loader only."""


def hf_class(config: Any, source: str) -> type:
    import transformers

    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{source}: its config names no transformers architecture this version knows ({arch!r})")
    return cls


def resolve(source: str | os.PathLike, *, local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
            revision: str | None = None) -> Path:
    """A local folder for `source`: the folder itself, or a hub id's snapshot (downloaded, or from the local HF
    cache; without network the cache is tried after the hub). `cache_dir` and `revision` are hub options: with a
    local folder they are refused, not ignored."""
    if os.path.isdir(source):
        given = [f"{k}={v!r}" for k, v in (("cache_dir", cache_dir), ("revision", revision)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies to hub ids only, and {source} is a local folder: drop it")
        return Path(source)
    if os.path.exists(source):
        raise NotADirectoryError(f"{source} is a file: pass the checkpoint folder that holds it")
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(source))
        is_repo_id = not isinstance(source, os.PathLike)
    except errors.HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise FileNotFoundError(f"no folder {source}: pass an existing checkpoint folder or a hub id ('org/name')")
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

    def fetch(local_only: bool) -> Path:
        return Path(snapshot_download(str(source), allow_patterns=HUB_PATTERNS, cache_dir=cache_dir,
                                      revision=revision, local_files_only=local_only))

    try:
        try:
            return fetch(offline)
        except errors.LocalEntryNotFoundError:
            raise
        except OSError:
            if offline:
                raise
            return fetch(True)  # no network: the local cache may still have it
    except errors.LocalEntryNotFoundError:
        where = f"the HF cache ({cache_dir})" if cache_dir is not None else "the local HF cache"
        why = ("local_files_only=True (or HF_HUB_OFFLINE) keeps the hub out: allow it once to download" if offline
               else "the hub cannot be reached: download it once with network")
        raise FileNotFoundError(f"{source} is neither a local folder nor in {where}, and {why}, or pass the path of "
                                "a downloaded folder") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{source} has no revision {revision!r} on the hub: pass an existing branch, tag or "
                                "commit") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {source} on the hub (or it is private or gated: log in with `hf auth "
                                "login`), and no local folder of that name") from None


class HFCheckpoint:
    """An HF checkpoint folder: its config, converter, and tensors by live name (`read`), with `shapes` for plans."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.hf_class = hf_class(self.config, str(folder))
        self.converter: Converter = converter_for(self.hf_class.__name__)  # fails before reading any weights
        files = _safetensors_files(self.folder)
        with torch.device("meta"):
            self.meta_model = self.hf_class._from_config(self.config)
        live = self.meta_model.state_dict()
        self.reader = ShardReader(files)
        try:
            self.location = self._live_names(live)  # live name -> stored name
            wrong = [f"{k}: stored {tuple(self.reader.meta(s).shape)}, the model has {tuple(live[k].shape)}"
                     for k, s in self.location.items() if self.reader.meta(s).shape != live[k].shape]
            if wrong:
                raise ValueError(f"{self.folder}: tensors of the wrong shape for its config: {wrong[:3]}")
        except BaseException:
            self.reader.close()
            raise

    def _live_names(self, live: dict[str, Tensor]) -> dict[str, str]:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        model = self.meta_model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        location, unexpected = {}, []
        not_saved = {n for n, _ in model.named_buffers()} - set(live)  # non-persistent buffers (position_ids)
        for stored in self.reader.keys():
            name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, live)
            if converted is not None:
                raise NoSafetensors(f"{stored} needs transformers' weight conversion ops; loading through "
                                    "transformers instead")
            if name in live:
                location[name] = stored
            elif name not in not_saved:
                unexpected.append(stored)
        if unexpected:
            raise ValueError(f"{self.folder}: tensors its {self.hf_class.__name__} does not have: {unexpected[:5]}")
        # a tied alias the file omits is read from the member of its group that the file holds
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            stored = next((location[n] for n in names if n in location), None)
            for n in names:
                if n not in location and stored is not None:
                    location[n] = stored
        missing = sorted(set(live) - set(location))
        if missing:
            raise ValueError(f"{self.folder}: the checkpoint lacks tensors {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        return location

    def shapes(self) -> dict[str, Tensor]:
        """Meta tensors of the live names: what a conversion plan reads."""
        return {name: self.reader.meta(stored) for name, stored in self.location.items()}

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        return self.reader.read(self.location[name], dtype, device)

    def build(self, recipe: Recipe, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """A hooked tensor made by its recipe from the stored tensors (released once copied)."""
        return self.reader.combine([self.location[n] for n in recipe.sources],
                                   lambda view: recipe.build(lambda n: view(self.location[n])), dtype, device)

    def release(self, names: list[str]) -> None:
        """Drop the pages of stored tensors from memory once their converted copies are written."""
        for name in names:
            self.reader.release(self.location[name])

    def same_tensor(self, a: str, b: str) -> bool:
        return self.location[a] == self.location[b]

    def default_dtype(self) -> torch.dtype:
        """The dtype transformers' `from_pretrained(dtype="auto")` picks: the config's, else the first floating
        tensor's."""
        dtype = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            return dtype
        dtypes = (self.reader.meta(k).dtype for k in self.reader.keys())
        return next((d for d in dtypes if d.is_floating_point), torch.float32)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a shard index ({type(e).__name__}: {e}); download the checkpoint "
                             "again") from None
        return [inside(folder, f, str(index)) for f in files]
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))  # not its variants (model.fp16)
    if not files:  # pickle weights (a hub download fetches safetensors only) or none: transformers will tell
        raise NoSafetensors(f"{folder} has no safetensors weights")
    return files
