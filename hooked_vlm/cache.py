"""`ActivationCache`: the activations of one forward, by hook name, with TransformerLens's conveniences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from .positions import Positions

if TYPE_CHECKING:
    from .models.base import HookedVLM

# short names accepted in cache[tower, layer, short], tried in this order inside block `layer`
_BLOCK_PREFIXES = ("", "attn.", "mlp.")


class ActivationCache:
    """Maps hook names to activations.

    Index it by full name (`cache["text_encoder.blocks.3.attn.hook_pattern"]`) or by a shorthand naming tower,
    layer and hook: `cache["text_encoder", 3, "pattern"]`, `cache["lm", -1, "resid_post"]`,
    `cache["text_decoder", 0, "cross_attn.z"]`, `cache["vision", "embed"]` (tower-level hooks).
    `cache.positions` tells where things are in the prompt, per example.
    """

    def __init__(self, store: dict[str, Tensor], model: "HookedVLM | None" = None,
                 positions: Positions | None = None, has_batch_dim: bool = True):
        self.store = store  # shared with run_with_cache: gradients land here when backward runs
        self.tower_outputs: dict[str, Tensor] = {}  # filled by run_with_cache(tower_outputs=True)
        self.model = model
        self.positions = positions
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: str | tuple) -> Tensor:
        return self.store[self.resolve(key)]

    def __contains__(self, key: object) -> bool:
        try:
            return self.resolve(key) in self.store  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.store)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def keys(self):
        return self.store.keys()

    def values(self):
        return self.store.values()

    def items(self):
        return self.store.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.store)} activations, {self.nbytes / 2**20:.1f} MiB)"

    def resolve(self, key: str | tuple) -> str:
        """The full hook name a key stands for (see the class docstring for the shorthands)."""
        if isinstance(key, str):
            if key in self.store:
                return key
            raise KeyError(self._missing(key))
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise KeyError(f"cache key {key!r}: use a hook name or (tower, layer, hook) / (tower, hook)")
        if len(key) == 2 and isinstance(key[1], str):
            tower, short = key
            name = f"{tower}.{short}" if short.startswith(("hook_", "ln")) or "." in short else f"{tower}.hook_{short}"
            if name in self.store:
                return name
            raise KeyError(self._missing(name))
        if len(key) != 3:
            raise KeyError(f"cache key {key!r}: use (tower, layer, hook) or (tower, hook)")
        tower, layer, short = key
        layer = self._layer_index(tower, layer)
        base = f"{tower}.blocks.{layer}."
        if "." in short:  # "cross_attn.z", "ln1.scale"
            module, leaf = short.rsplit(".", 1)
            leaf = leaf if leaf.startswith("hook_") else f"hook_{leaf}"
            candidates = [f"{base}{module}.{leaf}"]
        else:
            leaf = short if short.startswith("hook_") else f"hook_{short}"
            candidates = [f"{base}{p}{leaf}" for p in _BLOCK_PREFIXES]
        for name in candidates:
            if name in self.store:
                return name
        raise KeyError(self._missing(candidates[0]))

    def _layer_index(self, tower: str, layer: int) -> int:
        if layer >= 0:
            return layer
        n_layers = 1 + max((int(k.split(".")[2]) for k in self.store if k.startswith(f"{tower}.blocks.")),
                           default=-1)
        if self.model is not None:
            n_layers = self.model.tower_info(tower).n_layers
        return n_layers + layer

    def _missing(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, self.store.keys(), n=5, cutoff=0.5)
        return (f"{name!r} is not in the cache" + (f"; closest cached names: {', '.join(close)}" if close else "")
                + " (run_with_cache's names_filter selects what is cached)")

    # ------------------------------------------------------------------ whole-cache operations
    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def to(self, device: torch.device | str) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.store.items()}, self.model, self.positions,
                               self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        """For a cache of a single example: drop the batch dimension of every activation."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.store.values()}
        if sizes != {1}:
            raise ValueError(f"remove_batch_dim needs a batch of one example; the cache holds batch sizes {sizes}")
        return ActivationCache({k: v[0] for k, v in self.store.items()}, self.model, self.positions, False)

    # ------------------------------------------------------------------ residual stream views
    def _info(self, tower: str):
        if self.model is None:
            raise ValueError("this cache has no model attached; it cannot tell the towers' layouts")
        return self.model.tower_info(tower)

    def accumulated_resid(self, tower: str, layer: int | None = None, *, incl_mid: bool = False,
                          return_labels: bool = False) -> Float[Tensor, "n_states *B T D"] | tuple[Tensor, list[str]]:
        """The stream entering each block up to `layer` (exclusive; None: all blocks, plus the last block's
        output), stacked: [n_states, B, T, D]. With `incl_mid`, the stream after each attention too."""
        info = self._info(tower)
        layer = info.n_layers if layer is None else self._layer_bound(tower, layer, info.n_layers)
        states, labels = [], []
        for i in range(layer):
            states.append(self[tower, i, "resid_pre"])
            labels.append(f"{i}_pre")
            if incl_mid:
                states.append(self[tower, i, "resid_mid"])
                labels.append(f"{i}_mid")
                if info.has_cross_attn[i] and f"{tower}.blocks.{i}.hook_resid_mid_cross" in self.store:
                    states.append(self[tower, i, "resid_mid_cross"])
                    labels.append(f"{i}_mid_cross")
        if layer == info.n_layers:
            states.append(self[tower, layer - 1, "resid_post"])
            labels.append("final_post")
        stack = torch.stack(states)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, tower: str, layer: int | None = None, *, return_labels: bool = False
                        ) -> Float[Tensor, "n_components *B T D"] | tuple[Tensor, list[str]]:
        """The stream entering `layer` (None: the last block's output) as the sum of its parts: the embeddings, then
        each earlier attention, cross-attention and MLP output. Only pre-LN towers (ViT, CLIP, Llama, T5) are a
        sum; in a post-LN tower (BLIP text, Q-Former) each add is followed by a norm, so this raises."""
        info = self._info(tower)
        if info.layout != "pre":
            raise ValueError(f"tower {tower!r} is post-LN: its stream is re-normalised after every sub-layer, so it "
                             "is not a sum of components; use accumulated_resid or the sub-layer outputs")
        layer = info.n_layers if layer is None else self._layer_bound(tower, layer, info.n_layers, low=0)
        parts, labels = [], []
        embed_names = [n for n in (f"{tower}.hook_embed", f"{tower}.hook_pos_embed", f"{tower}.hook_inputs_embeds")
                       if n in self.store]
        first = self[tower, 0, "resid_pre"]
        # the stream at block 0 is the embedding (after CLIP's ln_pre or LLaVA's image write-in): take it whole
        parts.append(first)
        labels.append("embed" if not embed_names else "+".join(n.rsplit(".", 1)[1] for n in embed_names))
        for i in range(layer):
            for short, label in (("attn_out", "attn"), ("cross_attn_out", "cross_attn"), ("mlp_out", "mlp")):
                if short == "cross_attn_out" and f"{tower}.blocks.{i}.hook_cross_attn_out" not in self.store:
                    continue
                parts.append(self[tower, i, short])
                labels.append(f"{i}_{label}")
        stack = torch.stack(parts)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, tower: str, layer: int | None = None, *, attention: str = "attn",
                           return_labels: bool = False) -> Float[Tensor, "n_heads_total *B T D"] | tuple:
        """Per-head outputs in model space of every head of blocks 0..layer-1 (None: all), stacked
        [n_layers * n_heads, B, T, D], labels `L{l}H{h}`. Taken from `hook_result` when cached, otherwise computed
        from `hook_z` and the model's W_O."""
        info = self._info(tower)
        if attention not in ("attn", "cross_attn"):
            raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
        if attention == "cross_attn" and not any(info.has_cross_attn):
            raise ValueError(f"tower {tower!r} has no cross-attention: use attention='attn'")
        layer = info.n_layers if layer is None else self._layer_bound(tower, layer, info.n_layers)
        results, labels = [], []
        for i in range(layer):
            if attention == "cross_attn" and not info.has_cross_attn[i]:
                continue
            name = f"{tower}.blocks.{i}.{attention}.hook_result"
            if name in self.store:
                result = self.store[name]
            else:
                z = self[tower, i, f"{attention}.z"]
                W_O = getattr(self.model.tower(tower).blocks[i], attention).W_O.detach().to(z.device, z.dtype)
                result = torch.einsum("...thd,hdm->...thm", z, W_O)
            results.append(result.movedim(-2, 0))
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        if not results:
            raise ValueError(f"no layer of {tower!r} below layer {layer} has {attention}: pass a larger layer "
                             "(None for all)")
        stack = torch.cat(results)
        return (stack, labels) if return_labels else stack

    def _layer_bound(self, tower: str, layer: int, n_layers: int, low: int = 1) -> int:
        """An exclusive upper layer bound in low..n_layers (negative counts from the end), checked."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer={layer!r} is not an int: pass a layer number or None for all")
        bound = self._layer_index(tower, layer)
        if not low <= bound <= n_layers:
            raise ValueError(f"layer={layer} is out of range for tower {tower!r} with {n_layers} layers: pass "
                             f"{low}..{n_layers} (the blocks below it are used) or None for all")
        return bound
