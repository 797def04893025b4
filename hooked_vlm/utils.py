"""TransformerLens's `utils` helpers that name and slice activations: `get_act_name` and `Slice`.

`get_act_name` expands TransformerLens's short names ("pattern", "resid_pre", "scale" with "ln1", ...) by TL's own
table, then puts the result behind a tower, since every hooked_vlm name starts with one (docs/hooks.md):

    get_act_name("pattern", 3, tower="lm")                            'lm.blocks.3.attn.hook_pattern'
    get_act_name("k6", tower="vision")                                'vision.blocks.6.attn.hook_k'
    get_act_name("pattern", 2, "cross_attn", tower="text_decoder")    'text_decoder.blocks.2.cross_attn.hook_pattern'
    get_act_name("scale", tower="lm")                                 'lm.ln_final.hook_scale'

Where hooked_vlm has no tensor for a TL name (`mlp.hook_mid`, `hook_attn_in`, ...) the error names what to hook
instead; where TL would return a string that names no hook (a block-level name without a layer, a negative layer)
hooked_vlm raises, since its names go straight into `run_with_hooks` and `names_filter`.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from . import names

SliceInput = Union[None, int, tuple, slice, Sequence[int], Tensor, np.ndarray]


class Slice:
    """TransformerLens's `utils.Slice`: one way to select along a dimension, built from an int (one index, the
    dimension dropped), a tuple (`slice(*t)`), a slice, a list / 1-d tensor / array of indices, or None (all).

    `Slice.unwrap` is what TL's `pos_slice` arguments go through: an int becomes a one-element list there, so that
    `pos_slice=-1` keeps the position dimension (length 1) instead of dropping it."""

    def __init__(self, input_slice: SliceInput = None) -> None:
        if isinstance(input_slice, bool):  # an int to Python, but surely not meant as position 0 or 1
            raise TypeError(f"a slice must be None, an int, a tuple, a slice or a list of indices, got {input_slice!r}")
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            index = np.asarray(input_slice.detach().cpu() if isinstance(input_slice, Tensor) else input_slice)
            if index.ndim != 1 or not (index.dtype.kind in "iub" or index.size == 0):
                raise TypeError(f"a list of indices must be one-dimensional integers (or booleans), got "
                                f"{index.dtype} of shape {index.shape}")
            self.slice, self.mode = index.astype(bool if index.dtype.kind == "b" else np.int64), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise TypeError(f"a slice must be None, an int, a tuple, a slice or a list of indices, got "
                            f"{type(input_slice).__name__} {input_slice!r:.60}")

    @classmethod
    def unwrap(cls, slice_input: "Slice | SliceInput") -> "Slice":
        """A `Slice` from a Slice-like input; an int keeps its dimension (`-1` selects `[-1]`)."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int) and not isinstance(slice_input, bool):
            slice_input = [slice_input]
        return cls(slice_input)

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """`tensor` selected along `dim` (negative counts from the end)."""
        index = self.slice
        if self.mode == "array":
            index = torch.as_tensor(index, device=tensor.device)
        return tensor[(slice(None),) * (operator.index(dim) % tensor.ndim) + (index,)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices this slice selects from an axis of length `max_ctx` (needed unless it is an int)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx is needed to list the indices of a slice that is not an int")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    @property
    def is_identity(self) -> bool:
        return self.mode == "identity"

    def __repr__(self) -> str:
        return f"Slice({self.slice!r}, mode={self.mode!r})"


# ------------------------------------------------------------------------------------------------ get_act_name
# TransformerLens's tables (transformer_lens.utils.get_act_name), and where hooked_vlm's names go further.
_NAME_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                 "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPE_ALIASES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": "",
                       # hooked_vlm's: the per-head q/k norms by their own names (TL's layer_type is "attn.q_norm")
                       "q_norm": "attn.q_norm", "k_norm": "attn.k_norm"}
_ATTN = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")  # inside attn (or cross_attn)
_MLP = ("pre", "pre_linear", "post")  # inside mlp (or the Q-Former's mlp_text)
_NORM = ("scale", "normalized")  # inside a norm: layer_type names it; ln_final without a layer
_IN_BLOCK = ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post", "attn_out", "cross_attn_out", "mlp_out")
_TOWER_LEVEL = ("embed", "pos_embed", "inputs_embeds", "query_tokens")
# the modules each kind of name may sit in: TL's, then hooked_vlm's own (cross-attention, the Q-Former's text MLP,
# post-LN towers' norms, vision towers' ln_pre / ln_post, BERT's embedding norm); the attention's per-head q/k norms
# (Phi-2's qk_layernorm) are where TL puts its own (Qwen3 / Gemma-3 `use_qk_norm`): attn.q_norm, attn.k_norm
_ATTN_MODULES = ("attn", "cross_attn")
_MLP_MODULES = ("mlp", "mlp_text")
_BLOCK_NORMS = ("ln1", "ln2", "ln_cross", "ln_attn", "ln_mlp", "ln_mlp_text", "attn.q_norm", "attn.k_norm")
_TOWER_NORMS = ("ln_final", "ln_pre", "ln_post", "ln_embed")
# TransformerLens hooks that hooked_vlm does not have, and what to hook instead
_ABSENT = {
    "mid": "hooked_vlm's MLPs have no mlp.hook_mid (TransformerLens's SoLU norm); an MLP's hooks are mlp.hook_pre, "
           "mlp.hook_pre_linear (gated MLPs) and mlp.hook_post",
    "attn_in": "hooked_vlm has no hook_attn_in (TransformerLens's use_attn_in); the attention reads "
               "ln1.hook_normalized in pre-LN towers and hook_resid_pre in post-LN ones",
    "q_input": "hooked_vlm has no hook_q_input (TransformerLens's use_split_qkv_input); the attention reads "
               "ln1.hook_normalized in pre-LN towers and hook_resid_pre in post-LN ones",
    "mlp_in": "hooked_vlm has no hook_mlp_in (TransformerLens's use_hook_mlp_in); the MLP reads ln2.hook_normalized in "
              "pre-LN towers and hook_resid_mid (hook_resid_mid_cross after cross-attention) in post-LN ones",
    "tokens": "hooked_vlm has no hook_tokens: the token ids are the input_ids you pass; hook the tower's hook_embed",
}
_ABSENT["k_input"] = _ABSENT["v_input"] = _ABSENT["q_input"].replace("hook_q_input", "hook_k_input / hook_v_input")
_ABSENT_LEAVES = {"mlp.hook_mid": "mid", "hook_attn_in": "attn_in", "hook_q_input": "q_input",
                  "hook_k_input": "k_input", "hook_v_input": "v_input", "hook_mlp_in": "mlp_in",
                  "hook_tokens": "tokens"}
# first parts of a TransformerLens full name (no tower): "blocks.3.attn.hook_z", "ln_final.hook_scale", ...
_NOT_A_TOWER = frozenset({names.BLOCKS, *_ATTN_MODULES, *_MLP_MODULES, *_BLOCK_NORMS, *_TOWER_NORMS})
_SHORT = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")  # TL's: "k6" -> ("k", "6", ""), "scale4ln1" -> ("scale", "4", "ln1")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None, *,
                 tower: str | None = None) -> str:
    """The full hook name for TransformerLens's shorthand `name` (with `layer` and `layer_type`), in `tower`.

    TL's rules: `name` may carry the layer and layer type ("k6" is ("k", 6), "scale4ln1" is ("scale", 4, "ln1"));
    aliases "attn" -> "pattern", "attn_logits" -> "attn_scores", "key"/"query"/"value" -> "k"/"q"/"v",
    "mlp_pre"/"mlp_post" -> "pre"/"post"; layer types "a"/"attention" -> "attn", "m" -> "mlp", "b"/"block" -> none;
    q, k, v, rot_q, rot_k, attn_scores, pattern, z, result are in `attn`; pre, pre_linear, post in `mlp`; "scale"
    and "normalized" are in the norm `layer_type` names (ln1, ln2, ...), `ln_final` when there is no layer. A
    full name (with a "." or starting with "hook_") is returned as it is.

    hooked_vlm's names start with a tower, so `tower` is required (a keyword), except for a name that is already a
    hooked_vlm name ("lm.blocks.3.attn.hook_z"); a TransformerLens full name ("blocks.3.attn.hook_z",
    "hook_embed") gets `tower` put in front. Beyond TL's table: layer_type "cross_attn" for cross-attention
    (`get_act_name("pattern", 2, "cross_attn", tower="text_decoder")`), "mlp_text" for the Q-Former's text MLP,
    the post-LN norms (ln_attn, ln_cross, ln_mlp) and tower norms (ln_post for vision towers, ln_pre, ln_embed);
    the in-block names resid_mid_cross and cross_attn_out; the tower-level inputs_embeds and query_tokens. The
    attention's per-head q/k norms (Phi-2 with qk_layernorm) are TL's layer_type "attn.q_norm" / "attn.k_norm", or
    "q_norm" / "k_norm" for short: `get_act_name("scale", 0, "q_norm", tower="lm")` is
    'lm.blocks.0.attn.q_norm.hook_scale'.

    Unlike TL, which builds any string, a name hooked_vlm has no hook for is a ValueError saying what to hook
    instead, and so is a block-level name without a layer, a tower-level one with a layer, or a negative layer
    (count from the end with the tower's n_layers). Whether the tower has the hook (rot_q only in rotary towers,
    cross_attn only where it cross-attends) is checked where the name is used: `model.hook_dict` lists them.
    """
    if not isinstance(name, str):
        raise TypeError(f"get_act_name: name must be a str, got {type(name).__name__} {name!r:.60}")
    if tower is not None:
        names.check_tower(tower)
    if "." in name or name.startswith(names.HOOK):
        if layer is not None or layer_type is not None:
            raise ValueError(f"get_act_name({name!r}, ...): a full name takes no layer or layer_type; pass a short "
                             f"name such as 'pattern' with them, or the full name alone")
        return _full_name(name, tower)
    match = _SHORT.fullmatch(name)
    if match is not None:
        if layer is not None or layer_type is not None:
            raise ValueError(f"get_act_name({name!r}, {layer!r}, {layer_type!r}): {name!r} already holds a layer "
                             f"({match.group(2)}); pass it there or as `layer`, not both")
        name, layer, layer_type = match.group(1), match.group(2), match.group(3) or None
    name = _NAME_ALIASES.get(name, name)
    leaf, in_block = _leaf(name, _layer_type(layer_type), layer is not None)
    if tower is None:
        example = f"get_act_name({name!r}{'' if layer is None else f', {layer!r}'}, tower='lm')"
        raise TypeError(f"get_act_name needs tower=: hooked_vlm's names start with their tower, e.g. {example}; the "
                        "model's towers are model.tower_names")
    if not in_block:
        if layer is not None:
            raise ValueError(f"get_act_name({name!r}, {layer!r}): {leaf} is a tower-level hook, in no block; drop "
                             "the layer")
        return names.tower_hook(tower, leaf)
    if layer is None:
        raise ValueError(f"get_act_name({name!r}) needs a layer: {leaf} is in every block (for a filter over all "
                         f"blocks use hooked_vlm.names.in_blocks({tower!r}, {leaf!r}))")
    return names.block(tower, _layer(layer), leaf)


def _full_name(name: str, tower: str | None) -> str:
    parts = name.split(".")
    tl_name = parts[0] in _NOT_A_TOWER or parts[0].startswith(names.HOOK)
    if tl_name:
        leaf = ".".join(parts[2:]) if parts[0] == names.BLOCKS else name
        if leaf in _ABSENT_LEAVES:
            raise ValueError(f"get_act_name({name!r}): {_ABSENT[_ABSENT_LEAVES[leaf]]}")
        if tower is None:
            raise TypeError(f"get_act_name({name!r}): this is a TransformerLens name, without a tower; hooked_vlm's "
                            f"names start with their tower: pass tower=, e.g. get_act_name({name!r}, tower='lm')")
        if parts[0] == names.BLOCKS:
            if len(parts) < 3:
                raise ValueError(f"get_act_name({name!r}): '{names.BLOCKS}' must be followed by a layer and a leaf")
            return names.block(tower, _layer(parts[1]), leaf)
        return names.tower_hook(tower, name)
    hook = names.parse(name)  # a hooked_vlm name: checked, returned as it is
    if tower is not None and hook.tower != tower:
        raise ValueError(f"get_act_name({name!r}, tower={tower!r}): the name is in tower {hook.tower!r}; drop tower= "
                         "or pass a name without a tower")
    return name


def _layer_type(layer_type: str | None) -> str | None:
    if layer_type is None:
        return None
    if not isinstance(layer_type, str):
        raise TypeError(f"get_act_name: layer_type must be a str, got {type(layer_type).__name__} {layer_type!r:.60}")
    return _LAYER_TYPE_ALIASES.get(layer_type, layer_type) or None


def _leaf(name: str, layer_type: str | None, has_layer: bool) -> tuple[str, bool]:
    """The leaf of short name `name` in module `layer_type`, and whether it sits inside the blocks."""
    if name in _ABSENT:
        raise ValueError(f"get_act_name({name!r}): {_ABSENT[name]}")

    def module(allowed: Sequence[str], default: str | None) -> str:
        chosen = layer_type or default
        if chosen not in allowed:
            given = f"layer_type={layer_type!r}" if layer_type else "no layer_type"
            raise ValueError(f"get_act_name({name!r}): {given}; {name!r} sits in one of {', '.join(allowed)}")
        return chosen

    if name in _ATTN:
        return names.leaf(module(_ATTN_MODULES, "attn"), name), True
    if name in _MLP:
        return names.leaf(module(_MLP_MODULES, "mlp"), name), True
    if name in _NORM:  # in a block's norm (layer_type names it), or a tower's (ln_final by default, as TL)
        norm = module(_BLOCK_NORMS, None) if has_layer else module(_TOWER_NORMS, "ln_final")
        return names.leaf(norm, name), norm in _BLOCK_NORMS
    if name in _IN_BLOCK or name in _TOWER_LEVEL:
        if layer_type:
            raise ValueError(f"get_act_name({name!r}): layer_type={layer_type!r}, but {name!r} is in no module; drop "
                             "layer_type")
        return names.leaf(name), name in _IN_BLOCK
    known = sorted({*_ATTN, *_MLP, *_NORM, *_IN_BLOCK, *_TOWER_LEVEL, *_NAME_ALIASES})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"get_act_name({name!r}): not a TransformerLens short name that hooked_vlm has; {hint}short names: "
                     f"{', '.join(known)} (or pass a full hook name)")


def _layer(layer: int | str) -> int:
    """A block index from an int or TL's digit string ("6"); a negative index is refused by `names.block`."""
    if isinstance(layer, str):
        if not (layer.isascii() and layer.lstrip("-").isdigit()):
            raise ValueError(f"get_act_name: layer {layer!r} is not a block index")
        return int(layer)
    return layer  # type: ignore[return-value]  (names.block checks ints, refusing bools, floats and negatives)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool, desc: str):
    """A progress bar (total None: unknown, as over a generator), or one that shows nothing when not `enabled`."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # not loaded by `import hooked_vlm`

    return tqdm(total=total, desc=desc, leave=False)
