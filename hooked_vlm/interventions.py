"""Interventions as hook lists: pass them to `run_with_hooks`, `hooks()` or `generate(fwd_hooks=...)`.

Head interventions act on the per-head values `hook_z` ([B, T, H, d_head], before the output projection), in the
self- (`attention="attn"`) or cross-attention of any tower.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import names
from .arguments import strict
from .hooks import HookSpec
from .models.base import HookedVLM
from .positions import ImageSpan
from .spatial import patch_positions

Head = tuple[int, int]  # (layer, head)
AblationMode = Literal["zero", "mean", "mean_of_others", "resample"]


def _z_name(model: HookedVLM, tower: str, attention: str, layer: int) -> str:
    name = names.block(tower, layer, names.leaf(attention, "z"))
    model.hook_names(name)  # raises with the closest names if the tower, layer or attention does not exist
    return name


def _n_heads(model: HookedVLM, tower: str, attention: str, layer: int) -> int:
    """How many heads the `attention` of block `layer` has (after `_z_name` has checked that it exists)."""
    return getattr(model.tower(tower).blocks[layer], attention).W_O.shape[0]


def _by_layer(model: HookedVLM, heads: Iterable[Head], tower: str, attention: str) -> dict[int, list[int]]:
    """{layer: [heads]}, every (layer, head) checked to exist before any hook is made."""
    layers: dict[int, list[int]] = {}
    n_layers = model.tower_info(tower).n_layers  # raises for an unknown tower, naming the towers
    for pair in heads:
        try:
            layer, head = (operator.index(i) for i in pair if not isinstance(i, bool))
        except (TypeError, ValueError):
            raise TypeError(f"head {pair!r} is not a (layer, head) pair of ints: pass e.g. [(3, 1), (5, 0)]") from None
        if layer < 0:  # hook names have no negative layers
            raise ValueError(f"head {pair!r}: layer {layer} is negative; tower {tower!r} has layers 0..{n_layers - 1}")
        _z_name(model, tower, attention, layer)  # the layer and its attention exist (a KeyError names the closest)
        n_heads = _n_heads(model, tower, attention, layer)
        if not 0 <= head < n_heads:
            raise ValueError(f"head {pair!r}: head {head} is out of range; layer {layer} of {tower!r} has heads "
                             f"0..{n_heads - 1}")
        layers.setdefault(layer, []).append(head)
    if not layers:
        raise ValueError("no heads given: pass at least one (layer, head) pair (an empty selection would change "
                         "nothing)")
    return layers


@strict
def ablate_heads(model: HookedVLM, heads: Iterable[Head], *, mode: AblationMode = "zero", tower: str = "lm",
                 attention: Literal["attn", "cross_attn"] = "attn", means: Mapping[str, Tensor] | None = None,
                 seed: int = 0) -> list[HookSpec]:
    """Hooks that replace the given heads' values at every position.

    Modes:
        zero: by 0.
        mean: by a dataset mean of that head's values, from `means[hook name]` ([H, d_head], or [T, H, d_head] per
            position), as `analysis.mean_activation` computes it.
        mean_of_others: by the mean of the other heads of the same layer at the same position (V-SEAM's "mean").
        resample: by the values of another example of the batch (a seeded permutation without fixed points).
    """
    if mode not in ("zero", "mean", "mean_of_others", "resample"):
        raise ValueError(f"mode must be zero, mean, mean_of_others or resample, got {mode!r}")
    hooks = []
    for layer, idx in _by_layer(model, heads, tower, attention).items():
        name = _z_name(model, tower, attention, layer)
        if mode == "mean":
            if means is None or name not in means:
                raise ValueError(f"mode='mean' needs means[{name!r}]: compute it with analysis.mean_activation")
        hooks.append((name, _ablation_hook(idx, mode, None if means is None else means.get(name), seed)))
    return hooks


def _ablation_hook(idx: list[int], mode: str, mean: Tensor | None, seed: int):
    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        if mode == "zero":
            z[:, :, idx] = 0
        elif mode == "mean":
            m = mean.to(z.device, z.dtype)
            z[:, :, idx] = (m[idx] if m.ndim == 2 else m[: z.shape[1], idx]).expand_as(z[:, :, idx])
        elif mode == "mean_of_others":
            H = z.shape[2]
            if H < 2:
                raise ValueError("mean_of_others needs at least two heads")
            total = z.sum(dim=2, keepdim=True)
            z[:, :, idx] = (total - z[:, :, idx]) / (H - 1)
        else:  # resample
            B = z.shape[0]
            if B < 2:
                raise ValueError("resample needs a batch of at least two examples to draw from")
            generator = torch.Generator().manual_seed(seed)
            perm = (torch.arange(B) + torch.randint(1, B, (1,), generator=generator)) % B  # no fixed point
            z[:, :, idx] = z[perm.to(z.device)][:, :, idx]
        return z

    return hook


@strict
def scale_heads(model: HookedVLM, factors: Mapping[Head, float], *, tower: str = "lm",
                attention: Literal["attn", "cross_attn"] = "attn") -> list[HookSpec]:
    """Hooks that multiply the given heads' values by their factors (V-SEAM's rescaling)."""
    if not isinstance(factors, Mapping):
        raise TypeError(f"factors is a {type(factors).__name__}: pass a dict {{(layer, head): factor}}")
    _by_layer(model, factors, tower, attention)  # checks every (layer, head)
    by_layer: dict[int, dict[int, float]] = {}
    for (layer, head), factor in factors.items():
        try:
            value = float(factor)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(factor, bool) or not math.isfinite(value):
            raise ValueError(f"factor {factor!r} for head {(layer, head)} is not a finite number: pass a float")
        by_layer.setdefault(int(layer), {})[int(head)] = value
    hooks = []
    for layer, head_factors in by_layer.items():
        name = _z_name(model, tower, attention, layer)

        def hook(z: Tensor, hook: Any, head_factors: dict[int, float] = head_factors) -> Tensor:
            scale = torch.ones(z.shape[2], dtype=z.dtype, device=z.device)
            scale[list(head_factors)] = torch.tensor(list(head_factors.values()), dtype=z.dtype, device=z.device)
            return z * scale[:, None]

        hooks.append((name, hook))
    return hooks


Positions = Sequence[int] | Sequence[Sequence[int]] | Tensor


def position_mask(positions: Positions, batch: int, length: int, device: torch.device) -> Tensor:
    """[batch, length] bool from shared positions, per-example lists, or a [batch, P] tensor. Negative positions
    count from the end; positions past the end (a prompt position while the sequence is still shorter) mark
    nothing."""
    def mark(row: Tensor, p: Any) -> None:
        p = torch.as_tensor(p, dtype=torch.long, device=device).flatten()
        p = torch.where(p < 0, p + length, p)
        row[p[(p >= 0) & (p < length)]] = True

    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.ndim == 2 or (
            not isinstance(positions, Tensor) and len(positions) and not isinstance(positions[0], int)):
        if len(positions) != batch:
            raise ValueError(f"positions are given for {len(positions)} examples, but the batch has {batch}")
        for b, row in enumerate(positions):
            mark(mask[b], row)
    else:
        for b in range(batch):
            mark(mask[b], positions)
    return mask


@strict
def attention_knockout(model: HookedVLM, from_positions: Positions, to_positions: Positions,
                       layers: Iterable[int], *, tower: str = "lm", attention: Literal["attn", "cross_attn"] = "attn",
                       heads: Iterable[int] | None = None) -> list[HookSpec]:
    """Hooks that stop queries at `from_positions` from attending to keys at `to_positions` in `layers` (for
    example a window such as range(5, 15)): those pre-softmax scores become minus infinity, so the blocked pattern
    entries are exactly 0 and the rest renormalise, whatever the padding.

    Positions are absolute in the tower's sequence (queries) and in the attended sequence (keys; for a
    cross-attention, the image or encoder tokens): shared lists, one list per example, or [B, P] tensors. While
    generating, the new tokens' positions continue the prompt's (`Tower.position_offset`). Hooking the scores runs
    these layers' attention on the explicit path; results do not depend on `set_fast_attention`. A query must keep
    at least one key.

    Naming: here `from_positions` are the queries (the tokens that read) and `to_positions` the keys (the tokens
    read). Geva et al. (2023) and Neo et al.'s code name the other way round, by the flow of information: their
    "from" is the source, i.e. our keys, and their "to" the destination, i.e. our queries (Neo et al.'s
    `block_attention` sets `attention_mask[:, :, to, from] = False`). Their "object patches -> last token" is
    `attention_knockout(model, from_positions=[last], to_positions=object_patches, ...)`.
    """
    head_index = None if heads is None else list(heads)
    target = model.tower(tower)
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: pass the layers to knock attention out in, e.g. range(5, 15)")
    if head_index is not None and not head_index:
        raise ValueError("heads is empty: pass the heads to knock out, or heads=None for all")
    hooks = []
    for layer in layers:
        name = names.block(tower, layer, names.leaf(attention, "attn_scores"))
        model.hook_names(name)
        n_heads = _n_heads(model, tower, attention, layer)
        if head_index is not None and not all(isinstance(h, int) and -n_heads <= h < n_heads for h in head_index):
            raise ValueError(f"heads {head_index} are out of range: layer {layer} of {tower!r} has heads "
                             f"0..{n_heads - 1}")

        def hook(scores: Tensor, hook: Any) -> Tensor:
            B, H, T, S = scores.shape
            offset = target.position_offset  # the queries are this tower's tokens, also in a cross-attention
            queries = position_mask(from_positions, B, offset + T, scores.device)[:, offset:]
            keys = position_mask(to_positions, B, S, scores.device)
            blocked = queries[:, None, :, None] & keys[:, None, None, :]  # [B, 1, T, S]
            if head_index is not None:
                only = torch.zeros(H, dtype=torch.bool, device=scores.device)
                only[head_index] = True
                blocked = blocked & only[None, :, None, None]
            return scores.masked_fill(blocked, float("-inf"))

        hooks.append((name, hook))
    return hooks


@strict
def replace_positions(model: HookedVLM, hook_name: str, positions: Positions, value: Tensor | float = 0.0, *,
                      prefill_only: bool = False) -> HookSpec:
    """A hook setting the activation of `hook_name` ([B, T, ...], a stream or embedding hook) at `positions` to
    `value`: a vector broadcast over them (a dataset mean from `analysis.mean_activation` for mean ablation, as
    Neo et al. ablate visual tokens) or a number.

    Positions are absolute in the hook's tower sequence (shared, one list per example, or [B, P]; negative from the
    end). While generating, each new token has the next position; with `prefill_only` only the prompt's forward is
    edited, not the generation steps after it.
    """
    model.hook_names(hook_name)
    tower = model.tower(model.hook_dict[hook_name].tower)

    def hook(t: Tensor, hook: Any) -> Tensor | None:
        offset = tower.position_offset
        if prefill_only and offset > 0:
            return None
        where = position_mask(positions, t.shape[0], offset + t.shape[1], t.device)[:, offset:]
        where = where.reshape(*where.shape, *([1] * (t.ndim - 2)))
        return torch.where(where, torch.as_tensor(value, dtype=t.dtype, device=t.device), t)

    return hook_name, hook


# ------------------------------------------------------------------------------------------ Neo et al.'s knockouts
# Neo et al.'s layer windows of LLaVA-1.5-7B's 32 LM layers (attention_experiment_curate.py): early range(10),
# early-mid range(5, 15), mid range(11, 21), mid-late range(15, 25), late range(21, 32), all range(32). Layer 10 is in
# no window but early_mid and all (as in their code).
NEO_LAYER_WINDOWS: dict[str, tuple[int, int]] = {"early": (0, 10), "early_mid": (5, 15), "mid": (11, 21),
                                                 "mid_late": (15, 25), "late": (21, 32), "all": (0, 32)}


@strict
def layer_windows(n_layers: int, windows: Mapping[str, tuple[int, int]] = NEO_LAYER_WINDOWS, *,
                  reference_layers: int = 32) -> dict[str, range]:
    """Layer windows [start, stop) given for a `reference_layers`-layer model, scaled to `n_layers` layers: each
    bound becomes floor(bound * n_layers / reference_layers + 1/2), and an emptied window keeps one layer
    (range(start, start + 1), moved back to the last layer if needed). For n_layers == reference_layers they are the
    windows themselves; for 4 layers Neo et al.'s become early range(0, 1), early_mid range(1, 2), mid range(1, 3),
    mid_late range(2, 3), late range(3, 4), all range(0, 4)."""
    if isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers={n_layers!r}: pass the tower's number of layers (>= 1)")
    out = {}
    for name, (start, stop) in windows.items():
        if not 0 <= start < stop <= reference_layers:
            raise ValueError(f"window {name!r} = ({start}, {stop}) is not inside 0..{reference_layers}")
        lo, hi = (math.floor(v * n_layers / reference_layers + 0.5) for v in (start, stop))
        lo = min(lo, n_layers - 1)
        out[name] = range(lo, max(hi, lo + 1))
    return out


# Neo et al.'s token sets (attention_experiment_curate.py), as (queries, keys) = the tokens that may not read, the
# tokens they may not read. Their names: PATCH_TO_LAST_TOK, PATCH_PLUS_ONE_TO_LAST_TOK, PATCH_PLUS_TWO_TO_LAST_TOK,
# ALL_MINUS_PATCH (image minus object+1 -> last token), PATCH_PLUS_ONE_TO_LAST_ROW, PATCH_TO_LAST_ROW (image minus
# its last row -> last row).
NEO_TOKEN_SETS = ("object->last", "object+1->last", "object+2->last", "image-object+1->last",
                  "object+1->last_row", "image-last_row->last_row")


def neo_token_sets(span: ImageSpan, objects: Mapping[int, Tensor], last: int) -> dict[str, tuple[list[int], list[int]]]:
    """Neo et al.'s knockout token sets for one example, as {name: (queries, keys)} in sequence positions, for
    `attention_knockout(model, queries, keys, layers)`.

    Args:
        span: the example's `ImageSpan` (from `model.positions(**inputs).image[b][0]`); its last row is the image
            tokens of the patch grid's last row.
        objects: {buffer: patch mask [rows, cols] bool (or row-major patch indices)} for buffers 0, 1 and 2 (from
            `spatial.object_patches(..., buffer=b)`).
        last: the position of the example's last token (`positions.last[b]`).
    """
    missing = {0, 1, 2} - set(objects)
    if missing:
        raise ValueError(f"objects needs the patch sets of buffers 0, 1 and 2; missing {sorted(missing)}")
    obj = {b: patch_positions(span, objects[b]).tolist() for b in (0, 1, 2)}
    is_patch = span.rows >= 0
    image = span.indices[is_patch].tolist()
    last_row = span.indices[is_patch & (span.rows == int(span.rows.max()))].tolist()
    plus_one, in_last_row = set(obj[1]), set(last_row)
    return {
        "object->last": ([last], obj[0]),
        "object+1->last": ([last], obj[1]),
        "object+2->last": ([last], obj[2]),
        "image-object+1->last": ([last], [p for p in image if p not in plus_one]),
        "object+1->last_row": (last_row, obj[1]),
        "image-last_row->last_row": (last_row, [p for p in image if p not in in_last_row]),
    }
