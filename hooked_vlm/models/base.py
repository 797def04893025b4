"""`HookedVLM`: the root class of every hooked model, and its loaders."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cache import ActivationCache
from ..components import Attention, Block
from ..components.kv_cache import KVCache
from ..hooks import HookedRootModule, HookSpec, PerCall
from ..positions import Positions
from ..towers.base import Tower


@dataclass(frozen=True)
class TowerInfo:
    """What the cache and the analyses need to know of a tower, without reaching into it."""

    name: str
    n_layers: int
    layout: str  # "pre" or "post"
    n_heads: int
    has_cross_attn: tuple[bool, ...]  # per layer


class HookedVLM(HookedRootModule):
    """A vision-language model whose every residual stream, attention pattern and head is a named hook point.

    Load one with `HookedVLM.from_pretrained(name_or_path)` or `HookedVLM.from_hf(hf_model)`; call it with the HF
    processor's output as keyword arguments. Subclasses define the towers and `forward`.
    """

    tower_names: tuple[str, ...] = ()
    processor: Any = None
    # where the last forward's prompt put its tokens; per thread (`PerCall`), so that a cache is never labelled with
    # the positions of another thread's prompt
    last_positions: PerCall[Positions | None] = PerCall(None)
    image_embeddings_hook: str = ""  # where the image enters the text side (causal tracing noises it)
    prompt_tower: str = ""  # the tower reading the prompt's tokens: the sequence `last_positions` describes
    output_tower: str = ""  # the tower whose head predicts tokens (logit lens), if any
    prompt_template: str = "{question}"  # how the family's checkpoints expect a question (the CLI applies it)
    hf_origin: Any = None  # serialization.HFOrigin: the HF class, config and unused tensors, for `to_hf`

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
        from weights_conversion import CONVERTERS, converter_for

        from ..arguments import as_dtype
        from ..serialization import HFOrigin, apply_switches

        if not isinstance(hf_model, nn.Module):  # checked first: a class name string would find a converter
            raise TypeError(f"from_hf() takes a live transformers model ({', '.join(sorted(CONVERTERS))}), got a "
                            f"{type(hf_model).__name__}; for a hub id or a folder use HookedVLM.from_pretrained")
        converter = converter_for(hf_model)  # an unsupported class: a ValueError listing the supported ones
        dtype = as_dtype(dtype)
        # a switch this model does not have (or a typo of one of from_hf's keywords) is a TypeError naming the closest
        cfg = apply_switches(converter.config(hf_model.config), options, f"from_hf() of {converter.hf_class}",
                             also=("processor", "device", "dtype", "share_weights"))
        with torch.device("meta"):
            model = converter.model_class(cfg)
        hf_state = hf_model.state_dict()
        plan = converter.plan(hf_state, cfg)
        state = plan.apply(hf_state)
        unused = {k: hf_state[k].detach().to("cpu") for k in plan.unused}
        if not share_weights:
            hf_storage = {t.untyped_storage().data_ptr() for t in hf_state.values()}
            state = {k: t.clone() if t.untyped_storage().data_ptr() in hf_storage else t for k, t in state.items()}
            unused = {k: t.clone() for k, t in unused.items()}
        load_converted(model, state, source=type(hf_model).__name__)
        model.hf_origin = HFOrigin.of(converter.hf_class, hf_model.config, unused)
        model.processor = processor
        return model.to(device=device, dtype=dtype).eval()

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
        from weights_conversion.checkpoint import NoSafetensors, hf_class, resolve
        from weights_conversion.streaming import load_checkpoint

        from .. import serialization
        from ..arguments import as_dtype, keyword_names, reject_unknown
        from ..placement import dispatch, resolve_device_map

        where = "HookedVLM.from_pretrained()"
        # a typo is refused before any work; a switch of another family is refused once the model's config is read
        reject_unknown(options, [*serialization.MODEL_SWITCHES, *keyword_names(cls.from_pretrained)], where)
        dtype = as_dtype(dtype)
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir}
        serialization.recover(name_or_path)  # a save killed between its two renames: the old checkpoint comes back
        if serialization.is_hooked_checkpoint(name_or_path):  # hooked_vlm's own format: no transformers model
            resolve(name_or_path, cache_dir=cache_dir, revision=revision)  # refuses hub options for a folder
            return serialization.load(name_or_path, device=device, dtype=dtype, **placement, options=options,
                                      where=where)
        folder = resolve(name_or_path, local_files_only=local_files_only, cache_dir=cache_dir, revision=revision)
        try:
            return load_checkpoint(folder, dtype=dtype, device=device, **placement, where=where, **options)
        except NoSafetensors:  # pickle weights: only through transformers' own (safe) loader
            pass
        from transformers import AutoConfig

        from weights_conversion import converter_for

        config = AutoConfig.from_pretrained(folder)
        architecture = hf_class(config, str(name_or_path))
        # the switches are checked before the weights are read (from_hf would check them only after)
        serialization.apply_switches(converter_for(architecture.__name__).config(config), options, where)
        kw = {"local_files_only": local_files_only, "cache_dir": cache_dir, "revision": revision}
        try:
            hf_model = architecture.from_pretrained(name_or_path if not os.path.isdir(name_or_path) else folder,
                                                    dtype=dtype or "auto", **kw)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # a broken or refused pickle
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{folder} has no safetensors weights and transformers could not load its other "
                             f"weights ({first}); convert them to model.safetensors") from e
        model = cls.from_hf(hf_model.eval(), processor=serialization.load_processor(folder),
                            device=None if device_map else device, dtype=dtype, share_weights=True, **options)
        del hf_model
        if device_map is None:
            return model
        device_map = resolve_device_map(model, device_map, dtype=model.dtype, max_memory=max_memory)
        return dispatch(model, device_map, offload_dir=offload_dir)

    def save_pretrained(self, out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        overwrite: bool = False):
        """Write hooked_vlm's own format (safetensors shards, the config, the processor), atomically;
        `HookedVLM.from_pretrained(out_dir)` loads it without transformers' model classes. `dtype`: a floating
        torch dtype or its name (None: as the model is). `overwrite=True` replaces an empty folder or a hooked_vlm
        checkpoint holding only what hooked_vlm wrote, and nothing else (never the working or home folder); the
        new folder is written beside the old and swapped in, so `out_dir` is never left without a whole checkpoint."""
        from .. import serialization

        return serialization.save(self, out_dir, dtype=dtype, overwrite=overwrite)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as the HF model's state dict (every key): the conversion run backwards, exact."""
        from weights_conversion.export import hf_state_dict

        return hf_state_dict(self)

    def to_hf(self):
        """A transformers model with this model's current weights (edits included), for use in any HF tool.
        HF -> hooked -> HF gives back the original weights bit for bit."""
        from weights_conversion.export import to_hf

        return to_hf(self)

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
        returned (what the towers after it read) in `cache.tower_outputs`, for `resume`."""
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
    @torch.no_grad()
    def generate(self, *, max_new_tokens: int = 20, do_sample: bool = False, fwd_hooks: Iterable[HookSpec] = (),
                 **inputs: Any) -> torch.Tensor:
        """Greedy generation with a KV cache; `fwd_hooks` are active at every step (the prompt's forward and each
        new token's). Inputs are never modified.

        `inputs` are the processor's output, and `eos_token_id` / `pad_token_id` to override the model's. Sampling
        and beam options (temperature=, num_beams=, ...) and unknown keywords are a TypeError.
        """
        from ..arguments import keyword_names
        from .inputs import check_generate_keywords

        if type(self)._generate is HookedVLM._generate:
            raise TypeError(f"{type(self).__name__} does not generate text")
        check_generate_keywords(inputs, ("max_new_tokens", "do_sample", "fwd_hooks", *keyword_names(self._generate)))
        if do_sample:
            raise ValueError("hooked_vlm generates greedily: pass do_sample=False (sampling is not supported)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        with self.hooks(fwd_hooks):
            return self._generate(max_new_tokens=max_new_tokens, **inputs)

    def _generate(self, *, max_new_tokens: int, **inputs: Any) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not generate text")


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
