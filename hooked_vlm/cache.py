"""`ActivationCache`: the activations of one forward, by hook name, with TransformerLens's conveniences.

TransformerLens's functions (`accumulated_resid`, `decompose_resid`, `stack_head_results`, `logit_attrs`, ...) keep
TL 4.x's signatures, defaults, labels and `layer` semantics, and work on one tower: `tower=` (keyword), by default
`cache.default_tower`, the tower that produces the model's logits. Those that treat the residual stream as a sum of
sub-layer outputs raise for post-LN towers (BLIP's text towers, the Q-Former), whose stream is re-normalised after
every add: there the numbers would not mean what TL's definitions say.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import names
from .positions import Positions
from .utils import Slice, SliceInput, get_act_name

if TYPE_CHECKING:
    from .models.base import HookedVLM

# modules searched for a bare short name in cache[tower, layer, short], in this order: "pattern" -> attn.hook_pattern
_BLOCK_MODULES = ((), ("attn",), ("mlp",))
_NORM_LEAVES = ("scale", "normalized")
_BLOCK_NORMS = ("ln1", "ln_attn", "ln_cross", "ln2", "ln_mlp", "ln_mlp_text")  # execution order
_FINAL_NORMS = ("ln_final", "ln_post")  # the norm between a tower's last block and its output
# the per-layer parts of the stream, in execution order: (hook, TL label suffix, attention module)
_SUBLAYERS = (("attn_out", "attn_out", "attn"), ("cross_attn_out", "cross_attn_out", "cross_attn"),
              ("mlp_out", "mlp_out", None))

Stack = Float[Tensor, "n *batch_and_pos D"]


class ActivationCache:
    """Maps hook names to activations.

    Keys, all resolved to full hook names:
    - a full name: `cache["text_encoder.blocks.3.attn.hook_pattern"]`;
    - tower first (hooked_vlm's form): `cache["text_encoder", 3, "pattern"]`, `cache["lm", -1, "resid_post"]`,
      `cache["text_decoder", 0, "cross_attn.z"]`, `cache["vision", "embed"]` (tower-level hooks);
    - TransformerLens's forms, in `default_tower`: `cache["pattern", 3]`, `cache["resid_post", -1]`,
      `cache["z", 2, "attn"]`, `cache["pattern", 0, "cross_attn"]`, `cache["scale", 1, "ln2"]`, `cache["k6"]`,
      `cache["blocks.3.hook_resid_pre"]`, `cache["hook_embed"]`. A key that could name two activations (`("scale",
      0)` in a block with three norms) is a KeyError that lists them.
    `cache.positions` tells where things are in the prompt, per example.
    """

    def __init__(self, store: dict[str, Tensor], model: "HookedVLM | None" = None,
                 positions: Positions | None = None, has_batch_dim: bool = True, default_tower: str | None = None):
        self.store = store  # shared with run_with_cache: gradients land here when backward runs
        self.tower_outputs: dict[str, Tensor] = {}  # filled by run_with_cache(tower_outputs=True)
        self.model = model
        self.positions = positions
        self.has_batch_dim = has_batch_dim
        if default_tower is None and model is not None:
            # the tower producing the logits; ITM has none: the tower reading the text
            default_tower = getattr(model, "output_tower", "") or getattr(model, "prompt_tower", "") or None
        self.default_tower = default_tower

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
        """The full hook name a key stands for (see the class docstring for the forms)."""
        if isinstance(key, str):
            if key in self.store:
                return key
            if key.split(".")[0] in self._tower_names():  # a full name that is not there
                raise KeyError(self._missing(key))
            return self._resolve_tl(key, (key,))
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise KeyError(f"cache key {key!r}: use a hook name, (tower, layer, hook) / (tower, hook), or "
                           "TransformerLens's (name, layer[, layer_type])")
        if key[0] in self._tower_names():
            return self._resolve_tower_first(key)
        return self._resolve_tl(key[0], key)

    def _tower_names(self) -> set[str]:
        towers = getattr(self.model, "tower_names", None)
        if towers:
            return set(towers)
        return {k.split(".")[0] for k in self.store}

    def _resolve_tower_first(self, key: tuple) -> str:
        if len(key) not in (2, 3) or not isinstance(key[-1], str):
            raise KeyError(f"cache key {key!r}: use (tower, layer, hook) or (tower, hook)")
        try:  # a malformed part is a key that is not there, as for a dict
            if len(key) == 2:  # "embed", "ln_final.scale": a tower-level hook
                candidates = [names.tower_hook(key[0], names.leaf(key[1]))]
            else:
                tower, layer, short = key
                layer = self._layer_index(tower, layer)
                modules = [()] if "." in short else _BLOCK_MODULES  # "cross_attn.z", "ln1.scale": the module is given
                candidates = [names.block(tower, layer, names.leaf(*module, short)) for module in modules]
        except (ValueError, TypeError) as e:
            raise KeyError(f"cache key {key!r}: {e}") from None
        for name in candidates:
            if name in self.store:
                return name
        raise KeyError(self._missing(candidates[0]))

    def _resolve_tl(self, name: str, key: tuple, tower: str | None = None) -> str:
        """TransformerLens's key `(name, layer, layer_type)` (or a TL string) in `tower` (the default tower)."""
        tower = self.default_tower if tower is None else tower
        if tower is None:
            raise KeyError(f"cache key {key!r}: this cache has no default tower to read TransformerLens's keys in; "
                           "set cache.default_tower, or use a full name or (tower, layer, hook)")
        layer = key[1] if len(key) > 1 else None
        layer_type = key[2] if len(key) > 2 else None
        if len(key) > 3:
            raise KeyError(f"cache key {key!r}: TransformerLens's keys are (name, layer, layer_type) at most")
        try:
            if layer is not None:
                layer = self._layer_index(tower, layer)
            if name in _NORM_LEAVES and layer_type is None:  # which norm? TL's would build a name that is not there
                candidates = ([names.block(tower, layer, names.leaf(n, name)) for n in _BLOCK_NORMS]
                              if layer is not None else
                              [names.tower_hook(tower, names.leaf(n, name)) for n in _FINAL_NORMS])
                found = [c for c in candidates if c in self.store]
                if len(found) > 1:
                    raise KeyError(f"cache key {key!r} is ambiguous in tower {tower!r}: it could be "
                                   f"{', '.join(found)}; name the norm, e.g. ({name!r}, {layer}, "
                                   f"{names.parse(found[0]).leaf.split('.')[0]!r})")
                full = found[0] if found else candidates[0]
            else:
                full = get_act_name(name, layer, layer_type, tower=tower)
        except (ValueError, TypeError) as e:
            raise KeyError(f"cache key {key!r} (read in the default tower {tower!r}): {e}") from None
        if full in self.store:
            return full
        raise KeyError(self._missing(full))

    def _layer_index(self, tower: str, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer {layer!r} is not an int")
        if layer >= 0:
            return layer
        if self.model is not None:
            n_layers = self.model.tower_info(tower).n_layers
        else:  # the layers the cache holds
            n_layers = 1 + max((names.layer_of(k) for k in self.store if names.in_blocks(tower)(k)), default=-1)
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
        return self._like({k: v.to(device) for k, v in self.store.items()}, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        """For a cache of a single example: drop the batch dimension of every activation."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.store.values()}
        if sizes != {1}:
            raise ValueError(f"remove_batch_dim needs a batch of one example; the cache holds batch sizes {sizes}")
        return self._like({k: v[0] for k, v in self.store.items()}, False)

    def _like(self, store: dict[str, Tensor], has_batch_dim: bool) -> "ActivationCache":
        return ActivationCache(store, self.model, self.positions, has_batch_dim, self.default_tower)

    # ------------------------------------------------------------------ what the views need to know of a tower
    def _tower(self, tower: str | None) -> str:
        if self.model is None:
            raise ValueError("this cache has no model attached; it cannot tell the towers' layouts")
        tower = self.default_tower if tower is None else tower
        if tower is None:
            raise ValueError("this model has no default tower (one producing logits): pass tower=")
        self.model.tower_info(tower)  # raises for an unknown tower or one without blocks, naming the towers
        return tower

    def _sum_of_parts(self, tower: str, what: str) -> None:
        """Raise for a post-LN tower: `what` assumes the stream is the sum of the sub-layer outputs."""
        if self.model.tower_info(tower).layout != "pre":
            raise ValueError(f"{what}: tower {tower!r} is post-LN (its stream is re-normalised after every sub-layer), "
                             "so its stream is not a sum of component outputs and TransformerLens's definition does "
                             "not apply; read the sub-layer outputs or accumulated_resid instead")

    def _n_layers(self, tower: str) -> int:
        return self.model.tower_info(tower).n_layers

    def _layer(self, tower: str, layer: int | None, what: str) -> int:
        """TransformerLens's `layer`: None or -1 is n_layers (everything, up to the unembedding), else 0..n_layers:
        the stream entering that block."""
        n = self._n_layers(tower)
        if layer is None or (layer == -1 and not isinstance(layer, bool)):
            return n
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{what}: layer={layer!r} is not an int; pass 0..{n}, or None / -1 for all")
        if not 0 <= layer <= n:
            raise ValueError(f"{what}: layer={layer} is out of range for tower {tower!r} with {n} layers: pass 0..{n} "
                             "(the stream entering that block), or None / -1 for all (TransformerLens's semantics)")
        return layer

    def _has_cross(self, tower: str, layer: int) -> bool:
        return (self.model.tower_info(tower).has_cross_attn[layer]
                and names.block(tower, layer, "hook_cross_attn_out") in self.store)

    def _block(self, tower: str, layer: int):
        return self.model.tower(tower).blocks[layer]

    def _final_norm(self, tower: str) -> str:
        module = self.model.tower(tower)
        for norm in _FINAL_NORMS:
            if hasattr(module, norm):
                return norm
        raise ValueError(f"tower {tower!r} has no final norm (ln_final or ln_post) for apply_ln at the last layer: "
                         "its output is a block's stream; pass apply_ln=False")

    def _stream_into(self, tower: str, layer: int) -> Tensor:
        """The stream entering block `layer` (n_layers: leaving the last block)."""
        n = self._n_layers(tower)
        return self[tower, layer, "resid_pre"] if layer < n else self[tower, n - 1, "resid_post"]

    def _embed_parts(self, tower: str) -> list[tuple[str, Tensor]]:
        """The stream entering block 0 as TL's "embed" (+ "pos_embed"). Where the tower changes its embeddings
        before block 0 (the image written into an LM's `hook_inputs_embeds`, CLIP's `ln_pre`), that stream is
        taken whole as "embed"."""
        module = self.model.tower(tower)
        embed, pos = (names.tower_hook(tower, leaf) for leaf in ("hook_embed", "hook_pos_embed"))
        rewritten = hasattr(module, "hook_inputs_embeds") or hasattr(module, "ln_pre")
        if not rewritten and embed in self.store and (pos in self.store or not hasattr(module, "hook_pos_embed")):
            return [("embed", self.store[embed])] + ([("pos_embed", self.store[pos])] if pos in self.store else [])
        return [("embed", self[tower, 0, "resid_pre"])]

    # ------------------------------------------------------------------ residual stream views
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Slice | SliceInput = None, mlp_input: bool = False, return_labels: bool = False,
                          *, tower: str | None = None) -> Stack | tuple[Stack, list[str]]:
        """TransformerLens's accumulated residual stream: the stream entering blocks 0..layer (`{l}_pre`; layer
        included), and with layer None / -1 / n_layers, the last block's output (`final_post`) instead of a stream
        entering block n_layers. `incl_mid`: also `{l}_mid` (and `{l}_mid_cross` after a cross-attention) for l <
        layer; `mlp_input`: also those of `layer` itself (the MLP's input). `apply_ln`: each state centred (a
        LayerNorm) and divided by the scale that `layer`'s norm (ln2 with `mlp_input`; the final norm for all
        layers) took in this run, frozen, as `apply_ln_to_stack`. Works on post-LN towers without apply_ln."""
        tower = self._tower(tower)
        n = self._n_layers(tower)
        layer = self._layer(tower, layer, "accumulated_resid")
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        states, labels = [], []
        for l in range(layer + 1):
            if l == n:
                states.append(self[tower, n - 1, "resid_post"])
                labels.append("final_post")
                continue
            states.append(self[tower, l, "resid_pre"])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                states.append(self[tower, l, "resid_mid"])
                labels.append(f"{l}_mid")
                if self._has_cross(tower, l):
                    states.append(self[tower, l, "resid_mid_cross"])
                    labels.append(f"{l}_mid_cross")
        stack = torch.stack([pos.apply(s, dim=-2) for s in states])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos,
                                           has_batch_dim=self.has_batch_dim, tower=tower)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False,
                        pos_slice: Slice | SliceInput = None, incl_embeds: bool = True, return_labels: bool = False,
                        *, tower: str | None = None) -> Stack | tuple[Stack, list[str]]:
        """TransformerLens's decomposition of the stream entering `layer` (None / -1: the last block's output) into
        "embed" (and "pos_embed"), then per earlier block `{l}_attn_out`, `{l}_cross_attn_out` (blocks that
        cross-attend) and `{l}_mlp_out`; they sum to that stream. `mlp_input`: also `layer`'s attention outputs
        (the MLP's input). `mode` "attn" keeps the embeddings and attention outputs (self and cross), "mlp" the
        embeddings and MLP outputs. Pre-LN towers only."""
        tower = self._tower(tower)
        self._sum_of_parts(tower, "decompose_resid")
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"decompose_resid: mode={mode!r}; pass 'all', 'mlp' or 'attn'")
        n = self._n_layers(tower)
        layer = self._layer(tower, layer, "decompose_resid")
        if mlp_input and layer == n:
            raise ValueError("decompose_resid: mlp_input=True needs a block's MLP: pass layer < n_layers")
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        parts: list[tuple[str, Tensor]] = list(self._embed_parts(tower)) if incl_embeds else []
        for l in range(layer + (1 if mlp_input else 0)):
            for hook, label, attention in _SUBLAYERS:
                if (attention is None and (mode == "attn" or l == layer)) or (attention is not None and mode == "mlp"):
                    continue
                if attention == "cross_attn" and not self._has_cross(tower, l):
                    continue
                parts.append((f"{l}_{label}", self[tower, l, hook]))
        if not parts:
            raise ValueError(f"decompose_resid: nothing to stack (layer={layer}, mode={mode!r}, "
                             f"incl_embeds={incl_embeds})")
        stack = torch.stack([pos.apply(t, dim=-2) for _, t in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos, tower=tower)
        labels = [label for label, _ in parts]
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ heads and neurons
    def _attention(self, tower: str, attention: str) -> None:
        if attention not in ("attn", "cross_attn"):
            raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
        if attention == "cross_attn" and not any(self.model.tower_info(tower).has_cross_attn):
            raise ValueError(f"tower {tower!r} has no cross-attention: use attention='attn'")

    def _head_result(self, tower: str, layer: int, attention: str, pos: Slice | None = None
                     ) -> Float[Tensor, "*B T H D"]:
        """Per-head outputs, positions `pos` only (sliced before the product: a [T, H, D] tensor per example is
        large for a 7B model's long prompt)."""
        pos = pos if pos is not None else Slice(None)
        name = names.block(tower, layer, names.leaf(attention, "result"))
        if name in self.store:
            return pos.apply(self.store[name], dim=-3)
        z = pos.apply(self[tower, layer, names.leaf(attention, "z")], dim=-3)
        W_O = getattr(self._block(tower, layer), attention).W_O.detach().to(z.device)
        dtype = torch.promote_types(z.dtype, W_O.dtype)
        return torch.einsum("...thd,hdm->...thm", z.to(dtype), W_O.to(dtype))

    def _attends(self, tower: str, layer: int, attention: str) -> bool:
        return attention == "attn" or self.model.tower_info(tower).has_cross_attn[layer]

    def compute_head_results(self, *, tower: str | None = None, attention: str = "attn") -> None:
        """Store every layer's `{attention}.hook_result` (per-head outputs, [B, T, H, D], no b_O) in the cache,
        computed from `hook_z` and W_O where it was not cached (TransformerLens's `compute_head_results`)."""
        tower = self._tower(tower)
        self._attention(tower, attention)
        for l in range(self._n_layers(tower)):
            name = names.block(tower, l, names.leaf(attention, "result"))
            if self._attends(tower, l, attention) and name not in self.store:
                self.store[name] = self._head_result(tower, l, attention)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Slice | SliceInput = None, apply_ln: bool = False, *, tower: str | None = None,
                           attention: Literal["attn", "cross_attn"] = "attn") -> Stack | tuple[Stack, list[str]]:
        """TransformerLens's per-head outputs in model space (no b_O) of every head in blocks 0..layer-1 (None / -1:
        all), stacked [layer * n_heads, ...], labels `L{l}H{h}` (`L{l}H{h}_cross` for `attention="cross_attn"`,
        blocks without one skipped). From `hook_result` when cached, otherwise `hook_z @ W_O`. `incl_remainder`:
        a last row, "remainder", the stream entering `layer` minus the heads (pre-LN towers). `apply_ln` as
        `apply_ln_to_stack` at `layer`."""
        tower = self._tower(tower)
        self._attention(tower, attention)
        if incl_remainder or apply_ln:
            self._sum_of_parts(tower, "stack_head_results(incl_remainder / apply_ln)")
        layer = self._layer(tower, layer, "stack_head_results")
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        suffix = "" if attention == "attn" else "_cross"
        results, labels = [], []
        for l in range(layer):
            if not self._attends(tower, l, attention):
                continue
            result = self._head_result(tower, l, attention, pos)  # [*B, T, H, D]
            results.append(result.movedim(-2, 0))
            labels += [f"L{l}H{h}{suffix}" for h in range(result.shape[-2])]
        return self._finish_stack(results, labels, tower, layer, pos, incl_remainder, apply_ln, return_labels)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, *,
                         tower: str | None = None) -> Float[Tensor, "layers ..."]:
        """TransformerLens's `stack_activation`: `cache[activation_name, l, sublayer_type]` for blocks 0..layer-1
        (None / -1: all), stacked."""
        tower = self._tower(tower)
        layer = self._layer(tower, layer, "stack_activation")
        return torch.stack([self.store[self._tl_name(tower, activation_name, l, sublayer_type)]
                            for l in range(layer)])

    def _tl_name(self, tower: str, name: str, layer: int, layer_type: str | None) -> str:
        return self._resolve_tl(name, (name, layer) if layer_type is None else (name, layer, layer_type), tower)

    def get_neuron_results(self, layer: int, neuron_slice: Slice | SliceInput = None,
                           pos_slice: Slice | SliceInput = None, *, tower: str | None = None
                           ) -> Float[Tensor, "*B T neurons D"]:
        """What each MLP neuron of block `layer` adds to the stream: `mlp.hook_post` times its row of W_out."""
        tower = self._tower(tower)
        neurons = neuron_slice if isinstance(neuron_slice, Slice) else Slice(neuron_slice)
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        post = self[tower, layer, "mlp.post"]
        W_out = self._block(tower, layer).mlp.W_out.detach().to(post.device)
        post = neurons.apply(pos.apply(post, dim=-2), dim=-1)
        dtype = torch.promote_types(post.dtype, W_out.dtype)
        return post.to(dtype)[..., None] * neurons.apply(W_out, dim=0).to(dtype)

    def stack_neuron_results(self, layer: int, pos_slice: Slice | SliceInput = None,
                             neuron_slice: Slice | SliceInput = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False, *, tower: str | None = None
                             ) -> Stack | tuple[Stack, list[str]]:
        """TransformerLens's per-neuron outputs (no MLP output bias) of blocks 0..layer-1 (None / -1: all), labels
        `L{l}N{n}`; `incl_remainder` and `apply_ln` as `stack_head_results`. Memory grows as neurons x d_model."""
        tower = self._tower(tower)
        if incl_remainder or apply_ln:
            self._sum_of_parts(tower, "stack_neuron_results(incl_remainder / apply_ln)")
        layer = self._layer(tower, layer, "stack_neuron_results")
        neurons = Slice.unwrap(neuron_slice)  # an int keeps the neuron axis: layers are concatenated along it
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        parts, labels = [], []
        for l in range(layer):
            result = self.get_neuron_results(l, neurons, pos, tower=tower)
            d_mlp = self._block(tower, l).mlp.d_mlp
            labels += [f"L{l}N{i}" for i in neurons.apply(torch.arange(d_mlp), dim=0).tolist()]
            parts.append(result.movedim(-2, 0))
        return self._finish_stack(parts, labels, tower, layer, pos, incl_remainder, apply_ln, return_labels)

    def _finish_stack(self, parts: list[Tensor], labels: list[str], tower: str, layer: int, pos: Slice,
                      incl_remainder: bool, apply_ln: bool, return_labels: bool) -> Stack | tuple[Stack, list[str]]:
        """The parts (each [n, *B, T, D]) stacked, with TransformerLens's `remainder` row (the stream entering
        `layer` minus the parts) and the frozen final norm if asked."""
        template = pos.apply(self._stream_into(tower, layer), dim=-2)
        stack = torch.cat(parts) if parts else template.new_zeros((0, *template.shape))
        if incl_remainder:
            stack = torch.cat([stack, (template - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos, tower=tower)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: Slice | SliceInput = None, return_labels: bool = False, *,
                                     tower: str | None = None) -> Stack | tuple[Stack, list[str]]:
        """TransformerLens's full decomposition of the stream entering `layer` (None / -1: the last block's
        output): every head (`L{l}H{h}`, then cross-attention heads `L{l}H{h}_cross`), every neuron (`L{l}N{n}`;
        without `expand_neurons` each MLP's output, `{l}_mlp_out`), "embed" (and "pos_embed"), and "bias": the
        attention output biases (and MLP output biases with `expand_neurons`) of those blocks. The rows sum to
        that stream. Pre-LN towers only."""
        tower = self._tower(tower)
        self._sum_of_parts(tower, "get_full_resid_decomposition")
        n = self._n_layers(tower)
        layer = self._layer(tower, layer, "get_full_resid_decomposition")
        if mlp_input and layer == n:
            raise ValueError("get_full_resid_decomposition: mlp_input=True needs a block's MLP: pass layer < n_layers")
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        attn_layers = layer + (1 if mlp_input else 0)
        stacks, labels = [], []
        for attention in ("attn", "cross_attn"):
            if attention == "cross_attn" and not any(self._has_cross(tower, l) for l in range(attn_layers)):
                continue
            heads, head_labels = self.stack_head_results(attn_layers, True, pos_slice=pos, tower=tower,
                                                         attention=attention)
            stacks.append(heads)
            labels += head_labels
        if layer > 0:
            if expand_neurons:
                mlps, mlp_labels = self.stack_neuron_results(layer, pos, return_labels=True, tower=tower)
            else:
                mlps, mlp_labels = self.decompose_resid(layer, mode="mlp", pos_slice=pos, incl_embeds=False,
                                                        return_labels=True, tower=tower)
            stacks.append(mlps)
            labels += mlp_labels
        for label, embed in self._embed_parts(tower):
            stacks.append(pos.apply(embed, dim=-2)[None])
            labels.append(label)
        bias = self._accumulated_bias(tower, layer, mlp_input, include_mlp_biases=expand_neurons)
        stacks.append(bias.to(stacks[-1].device, stacks[-1].dtype).expand_as(stacks[-1]))
        labels.append("bias")
        dtype = _common_dtype(stacks)
        stack = torch.cat([s.to(dtype) for s in stacks])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos, tower=tower)
        return (stack, labels) if return_labels else stack

    def _accumulated_bias(self, tower: str, layer: int, mlp_input: bool, include_mlp_biases: bool
                          ) -> Float[Tensor, "D"]:
        """The output biases the blocks before `layer` add to the stream (and `layer`'s attention biases with
        `mlp_input`): TransformerLens's `accumulated_bias`."""
        D = self._block(tower, 0).cfg.d_model
        total = torch.zeros(D, dtype=torch.float64)
        for l in range(layer + (1 if mlp_input else 0)):
            block = self._block(tower, l)
            biases = [block.attn.b_O]
            if self._has_cross(tower, l):
                biases.append(block.cross_attn.b_O)
            if include_mlp_biases and l < layer:
                biases.append(block.mlp.out_bias)
            for b in biases:
                if b is not None:
                    total = total + b.detach().double().cpu()
        return total

    # ------------------------------------------------------------------ norms and logits
    def apply_ln_to_stack(self, residual_stack: Stack, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Slice | SliceInput = None, batch_slice: Slice | SliceInput = None,
                          has_batch_dim: bool = True, *, tower: str | None = None
                          ) -> Float[Tensor, "n *batch_and_pos_out D"]:
        """TransformerLens's `apply_ln_to_stack`: treat each row of the stack as (part of) the input of `layer`'s
        norm (ln1; ln2 with `mlp_input`; None / -1 / n_layers: the final norm, ln_final or ln_post) and apply that
        norm as it acted in this run, its scale frozen from the cache: centred (LayerNorm only) and divided by the
        cached `hook_scale`; the norm's weight and bias are not applied (TL's convention; `logit_attrs` folds the
        weight into the token directions). `pos_slice` / `batch_slice` select the scale to match a stack already
        sliced (`batch_slice` also slices the stack's batch dimension). Pre-LN towers only."""
        tower = self._tower(tower)
        self._sum_of_parts(tower, "apply_ln_to_stack")
        n = self._n_layers(tower)
        layer = self._layer(tower, layer, "apply_ln_to_stack")
        pos = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        batch = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        if layer == n:
            if mlp_input:
                raise ValueError("apply_ln_to_stack: mlp_input=True needs a block's MLP: pass layer < n_layers")
            norm_name = self._final_norm(tower)
            scale = self[names.tower_hook(tower, names.leaf(norm_name, "scale"))]
        else:
            norm_name = "ln2" if mlp_input else "ln1"
            scale = self[tower, layer, names.leaf(norm_name, "scale")]
        if has_batch_dim:
            residual_stack = batch.apply(residual_stack, dim=1)
        if self._block(tower, 0).cfg.norm.kind == "layer":  # a LayerNorm centres; an RMSNorm does not
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = pos.apply(scale, dim=-2)
        if self.has_batch_dim:
            scale = batch.apply(scale, dim=0)
        return residual_stack / scale.to(residual_stack.device)

    def tokens_to_residual_directions(self, tokens: str | int | Int[Tensor, "..."], *, tower: str | None = None
                                      ) -> Float[Tensor, "... D"]:
        """The stream direction of each token's logit after the final norm's division (`apply_ln_to_stack`):
        the norm's weight times the token's unembedding column (T5 with `scale_outputs`: times d_model^-0.5), so
        that `apply_ln_to_stack(x) @ direction` is the token's logit. TransformerLens's, for a folded model."""
        tower = self._tower(tower)
        module = self.model.tower(tower)
        if not (hasattr(module, "unembed_directions") and hasattr(module, "unembed")):
            raise ValueError(f"tower {tower!r} has no linear map from its normalised stream to logits (it predicts "
                             "no tokens, or its head is not linear, e.g. BLIP's prediction-head transform): "
                             "logit attribution applies to the language models' towers")
        ids = self._token_ids(tokens)
        return module.unembed_directions(ids.to(module.unembed.weight.device)).detach()

    def _token_ids(self, tokens: str | int | Tensor) -> Tensor:
        if isinstance(tokens, str):
            tokenizer = getattr(self.model.processor, "tokenizer", self.model.processor)
            if tokenizer is None:
                raise ValueError(f"token {tokens!r}: this model has no tokenizer; pass token ids")
            ids = tokenizer(tokens, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{tokens!r} is {len(ids)} tokens ({ids}), not one; pass a token id")
            return torch.tensor(ids[0])
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            return torch.tensor(tokens)
        if isinstance(tokens, Tensor) and not tokens.is_floating_point():
            return tokens.long()
        raise TypeError(f"tokens must be a str, an int or an integer tensor, got {type(tokens).__name__}")

    def logit_attrs(self, residual_stack: Stack, tokens: str | int | Int[Tensor, "..."],
                    incorrect_tokens: str | int | Int[Tensor, "..."] | None = None,
                    pos_slice: Slice | SliceInput = None, batch_slice: Slice | SliceInput = None,
                    has_batch_dim: bool = True, *, tower: str | None = None) -> Float[Tensor, "n *batch_and_pos_out"]:
        """TransformerLens's `logit_attrs`: each row of the stack, through the final norm with its scale frozen
        from this run (`apply_ln_to_stack`), dotted with the direction of `tokens`' logit (minus that of
        `incorrect_tokens`): the row's direct contribution to the logit (difference). Rows that sum to the last
        block's output give attributions that sum to the model's logit (difference). `tokens`: a str or int, or a
        [batch] tensor (one token per example), or [batch, position]."""
        directions = self.tokens_to_residual_directions(tokens, tower=tower)
        if incorrect_tokens is not None:
            wrong = self.tokens_to_residual_directions(incorrect_tokens, tower=tower)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got "
                                 f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])}")
            directions = directions - wrong
        batch = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch,
                                        has_batch_dim=has_batch_dim, tower=tower)
        if (has_batch_dim and batch.mode != "int" and scaled.ndim == 4 and directions.ndim == 2
                and directions.shape[0] == scaled.shape[1]):
            directions = directions.unsqueeze(-2)  # one token per example, for every position
        directions = directions.to(scaled.device)
        dtype = torch.promote_types(scaled.dtype, directions.dtype)
        return (scaled.to(dtype) * directions.to(dtype)).sum(-1)


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
