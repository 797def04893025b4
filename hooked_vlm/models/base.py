"""`HookedVLM`: the root class of every hooked model; its loaders delegate to `hooked_vlm.loading`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import loading
from ..arguments import keyword_names
from ..cache import ActivationCache
from ..components import Attention, Block
from ..components.kv_cache import KVCache
from ..hooks import HookedRootModule, HookSpec
from ..positions import Positions
from ..tl_config import TLConfig, tl_config
from ..tokens import TokenMethods
from ..towers.base import Tower
from .generation import sampling_rule
from .inputs import check_generate_keywords, processor_output_positional


@dataclass(frozen=True)
class TowerInfo:
    """What the cache and the analyses need to know of a tower, without reaching into it."""

    name: str
    n_layers: int
    layout: str  # "pre" or "post"
    n_heads: int
    has_cross_attn: tuple[bool, ...]  # per layer


class HookedVLM(TokenMethods, HookedRootModule):  # TokenMethods: to_tokens, to_str_tokens, ... (tokens.py)
    """A vision-language model whose every residual stream, attention pattern and head is a named hook point.

    Load one with `HookedVLM.from_pretrained(name_or_path)` or `HookedVLM.from_hf(hf_model)`; call it with the HF
    processor's output as keyword arguments. Subclasses define the towers and `forward`.
    """

    tower_names: tuple[str, ...] = ()
    processor: Any = None
    image_embeddings_hook: str = ""  # where the image enters the text side (causal tracing noises it)
    # the tower reading the prompt's tokens: the sequence `positions(**inputs)` (each model's pure function of the
    # inputs, which labels a cache as `cache.positions`) describes
    prompt_tower: str = ""
    output_tower: str = ""  # the tower whose head predicts tokens (logit lens), if any
    prompt_template: str = "{question}"  # how the family's checkpoints expect a question (the CLI applies it)
    hf_origin: Any = None  # serialization.HFOrigin: the HF class, config and unused tensors, for `to_hf`

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        loading.register_model(cls)  # a checkpoint names its class: the loader finds it without importing the models

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, processor: Any = None, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, share_weights: bool = False, **options: Any) -> "HookedVLM":
        """Convert a live transformers model (from its `state_dict()`).

        The hooked model gets its own copy of the weights, unless `share_weights=True` lets it keep views of the
        HF tensors where no reshaping was needed (saves memory; then editing one model edits the other).
        `options` are model switches: `mask_cross_attention` (BLIP), `hf_positions` (LLaVA, InstructBLIP); any
        other is a TypeError. `dtype` is a float torch dtype or its name ("bfloat16").
        """
        return loading.from_hf(hf_model, processor=processor, device=device, dtype=dtype, share_weights=share_weights,
                               **options)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, device_map: str | dict[str, Any] | None = None,
                        max_memory: dict[Any, int | str] | None = None, offload_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                        revision: str | None = None, **options: Any) -> "HookedVLM":
        """Load a hub id or a local directory of an HF checkpoint, convert it and attach its processor as
        `model.processor`; or a folder written by `save_pretrained` (hooked_vlm's own format).

        Safetensors checkpoints are converted while they are read, tensor by tensor, into a model built on the meta
        device: peak memory is about the weights in `dtype` (a torch dtype or its name; None: the checkpoint's
        own), and no transformers model is built. Pickle-only checkpoints go through transformers' own (safe) loader.

        `device_map` spreads the model over devices with accelerate: "auto" (or "balanced", "sequential") fills
        the GPUs, then the CPU (`max_memory` caps each, e.g. {0: "20GiB", "cpu": "60GiB"}), then `offload_dir`; or
        a dict {module name: device}, e.g. {"vision": 0, "lm.blocks.0": 0, ..., "lm.unembed": 1}. Each block runs
        on one device; see `hooked_vlm.placement`.

        Without network the files come from the local HF cache (`local_files_only=True` goes there directly and
        skips the hub's retries); `cache_dir` and `revision` apply to hub ids and are refused with a local folder.
        `options` are model switches, as in `from_hf`, for every source (a hooked folder's saved switches are
        replaced); a switch the model does not have is a TypeError.
        """
        return loading.from_pretrained(name_or_path, device=device, dtype=dtype, device_map=device_map,
                                       max_memory=max_memory, offload_dir=offload_dir,
                                       local_files_only=local_files_only, cache_dir=cache_dir, revision=revision,
                                       **options)

    def save_pretrained(self, out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        overwrite: bool = False):
        """Write hooked_vlm's own format (safetensors shards, the config, the processor), atomically;
        `HookedVLM.from_pretrained(out_dir)` loads it without transformers' model classes. `dtype`: a floating
        torch dtype or its name (None: as the model is). `overwrite=True` replaces an empty folder or a hooked_vlm
        checkpoint holding only what hooked_vlm wrote, and nothing else (never the working or home folder); the
        new folder is written beside the old and swapped in, so `out_dir` is never left without a whole checkpoint."""
        return loading.save_pretrained(self, out_dir, dtype=dtype, overwrite=overwrite)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as the HF model's state dict (every key): the conversion run backwards, exact."""
        return loading.hf_state_dict(self)

    def to_hf(self):
        """A transformers model with this model's current weights (edits included), for use in any HF tool.
        HF -> hooked -> HF gives back the original weights bit for bit."""
        return loading.to_hf(self)

    # ------------------------------------------------------------------ introspection
    def tower(self, name: str) -> nn.Module:
        if name not in self.tower_names:
            raise KeyError(f"this model has no tower {name!r}; its towers are {', '.join(self.tower_names)}")
        return getattr(self, name)

    def tower_info(self, name: str) -> TowerInfo:
        blocks = [b for b in getattr(self.tower(name), "blocks", []) if isinstance(b, Block)]
        if not blocks:
            raise ValueError(f"tower {name!r} has no transformer blocks")
        return TowerInfo(name, len(blocks), blocks[0].cfg.layout, blocks[0].cfg.attn.n_heads,
                         tuple(b.cfg.cross_attn is not None for b in blocks))

    def towers(self) -> dict[str, Tower]:
        return {name: getattr(self, name) for name in self.tower_names if isinstance(getattr(self, name), Tower)}

    def run_with_cache(self, *args: Any, tower_outputs: bool = False, **kwargs: Any):
        """`HookedRootModule.run_with_cache`; with `tower_outputs=True` the cache also keeps what each tower
        returned (what the towers after it read) in `cache.tower_outputs`, for `resume`; with `stop_at_hook`, only
        the towers that finished before the stop."""
        if not tower_outputs:
            return super().run_with_cache(*args, **kwargs)
        towers = self.towers()
        for tower in towers.values():
            tower.record_output, tower.recorded_output = True, None
        try:
            out, cache = super().run_with_cache(*args, **kwargs)
            cache.tower_outputs = {name: t.recorded_output.detach() for name, t in towers.items()
                                   if t.recorded_output is not None}
            return out, cache
        finally:
            for tower in towers.values():
                tower.record_output, tower.recorded_output = False, None

    @contextlib.contextmanager
    def resume(self, tower: str, layer: int, resid: torch.Tensor, given: Mapping[str, torch.Tensor] = {},
               prefix: KVCache | None = None) -> Iterator["HookedVLM"]:
        """Inside the block, a forward skips the towers named in `given` (their outputs are the given tensors),
        starts `tower` at block `layer` from `resid` (the stream entering that block, as cached at
        `{tower}.blocks.{layer}.hook_resid_pre`), and runs the rest as usual. Inputs still go in whole (masks and
        positions come from them); what a patch at block `layer` of `tower` cannot change is not recomputed.

        `prefix` (a causal tower with `prefix_resumable`): a `KVCache` holding, for blocks `layer` on, the keys and
        values of the first `prefix.length` positions (`prefix_cache` builds it from a cached run); `resid` then
        covers only the positions after them, and the tower's outputs too."""
        towers = self.towers()
        target = self._block_tower(tower, layer, "layer")
        unknown = set(given) - set(towers)
        if unknown:
            raise KeyError(f"given outputs for unknown towers {sorted(unknown)}; towers: {', '.join(towers)}")
        if prefix is not None and not target.prefix_resumable:
            raise ValueError(f"tower {tower!r} cannot resume on a suffix (it is not a causal tower with a KV cache)")
        try:
            target.resume_at, target.resume_past = (layer, resid), prefix
            for name, output in given.items():
                towers[name].given_output = output
            yield self
        finally:
            target.resume_at = target.resume_past = None
            for t in towers.values():
                t.given_output = None

    def prefix_hook_names(self, tower: str, start_layer: int = 0) -> list[str]:
        """The hooks a run must cache (`names_filter`) for `prefix_cache(tower, ..., start_layer=start_layer)`: the
        keys and values `tower`'s KV cache holds, per block from `start_layer` on (keys after rotary for a Llama)."""
        target = self._resumable(tower, start_layer)
        return [hook.name for i in range(start_layer, len(target.blocks)) for hook in target.cached_kv_hooks(i)]

    def prefix_cache(self, tower: str, cache: ActivationCache | Mapping[str, torch.Tensor], length: int, *,
                     start_layer: int = 0) -> KVCache:
        """The `prefix` for `resume(tower, start_layer, ...)`: the keys and values of the first `length` positions
        of the run cached in `cache` (which must hold `prefix_hook_names(tower, start_layer)`), so that the resumed
        run computes only the positions after them, as if the whole sequence had run with that prefix.

        A forward updates the returned cache in place: build one per resumed run (`.select(rows)` copies the rows
        of stacked variants)."""
        return self._resumable(tower, start_layer).prefix_cache(cache, length, start_layer)

    def _block_tower(self, tower: str, layer: int, what: str) -> Tower:
        """The tower named `tower`, checked to have blocks and a block `layer` (`what` names the argument)."""
        target = self.towers().get(tower)
        if target is None:
            raise KeyError(f"no tower {tower!r} with blocks; towers: {', '.join(self.towers())}")
        if not 0 <= layer < len(target.blocks):
            raise ValueError(f"{what} {layer} is not a block of {tower} (0..{len(target.blocks) - 1})")
        return target

    def _resumable(self, tower: str, start_layer: int) -> Tower:
        target = self._block_tower(tower, start_layer, "start_layer")
        if not target.prefix_resumable:
            raise ValueError(f"tower {tower!r} cannot resume on a suffix (it is not a causal tower with a KV cache)")
        return target

    def image_embeddings_mask(self, positions: Positions) -> torch.Tensor | None:
        """[B, T] positions of `image_embeddings_hook` that hold the image (None: all of them)."""
        return None

    def set_fast_attention(self, enabled: bool) -> None:
        """Use `scaled_dot_product_attention` where no hook needs the pattern (default), or always the explicit
        path (scores, softmax, value mix spelled out)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.use_fast_path = enabled

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ generation
    @processor_output_positional  # generate(inputs) as generate(**inputs)
    @torch.no_grad()
    def generate(self, *, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, generator: torch.Generator | None = None,
                 fwd_hooks: Iterable[HookSpec] = (), **inputs: Any) -> torch.Tensor:
        """Greedy search, or with `do_sample=True` multinomial sampling, with a KV cache; `fwd_hooks` are active at
        every step (the prompt's forward and each new token's). Inputs are never modified.

        Sampling is HF's (`generate(do_sample=True, ...)`, transformers 5.x), with HF's defaults: the logits divided
        by `temperature`, then top-k (`top_k`, default 50 as HF; 0 or None: off), then top-p (`top_p`, 1.0: off),
        then one draw per step from torch's global random state, or from `generator` if given. With
        `torch.manual_seed(s)` before each call, hooked_vlm and HF give the same tokens. See `generation.Sampler`.

        `inputs` are the processor's output, and `eos_token_id` / `pad_token_id` to override the model's. Beam
        search and other options (num_beams=, repetition_penalty=, ...), sampling options without
        `do_sample=True`, and unknown keywords are errors.
        """
        if type(self)._generate is HookedVLM._generate:
            raise TypeError(f"{type(self).__name__} does not generate text")
        accepted = set(keyword_names(self._generate)) - {"pick"}  # `pick` is set here, from the sampling options
        check_generate_keywords(inputs, ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "generator",
                                         "fwd_hooks", *accepted))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        pick = sampling_rule(do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        with self.hooks(fwd_hooks):
            return self._generate(max_new_tokens=max_new_tokens, pick=pick, **inputs)

    def _generate(self, *, max_new_tokens: int, **inputs: Any) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not generate text")

    # ------------------------------------------------------------------ TransformerLens views
    def cfg_of(self, tower: str) -> TLConfig:
        """Tower `tower`'s configuration in TransformerLens's names (`n_layers`, `d_model`, `n_heads`, `d_head`,
        `d_mlp`, `d_vocab`, `act_fn`, `normalization_type`, ...): a frozen `tl_config.TLConfig`. Its stacked
        weights and circuits are on the tower itself: `model.tower(tower).W_Q`, `.OV` (`hooked_vlm.weights`)."""
        target = self.towers().get(tower)
        if target is None:
            raise KeyError(f"no tower {tower!r} with blocks; towers: {', '.join(self.towers())}")
        origin = self.hf_origin
        return tl_config(target, tower, origin.hf_class if origin is not None else None)
