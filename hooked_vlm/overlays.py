"""What one attention head reads of the image, as a map over the patch grid (NOTICE's head-function overlays).

NOTICE draws a universal head's cross-attention from the token of interest over BLIP's 24x24 patch grid, the class
token dropped, minus the mean of all 144 heads (12 layers x 12 heads), min-max normalised
(`BLIP/circuit_analysis.ipynb`, `visualize_crossattention`). `head_overlay` computes that map for any model,
from a cache, on the grid of the model's config; `plot.patch_overlay` draws it over the image.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import names
from .arguments import strict
from .cache import ActivationCache
from .hooks import NameFilter
from .models.base import HookedVLM


def overlay_names(model: HookedVLM, tower: str | None = None,
                  attention: Literal["cross_attn", "attn"] = "cross_attn") -> NameFilter:
    """The `names_filter` caching what `head_overlay` reads: the attention patterns of every block of `tower`
    (None: the model's prompt tower)."""
    return names.in_blocks(tower or model.prompt_tower, names.leaf(attention, "pattern"))


@strict
def head_overlay(model: HookedVLM, cache: ActivationCache, head: tuple[int, int], toi: int | Int[Tensor, "B"], *,
                 example: int = 0, tower: str | None = None, attention: Literal["cross_attn", "attn"] = "cross_attn",
                 subtract_mean: bool = True, normalize: bool = True) -> Float[Tensor, "rows cols"]:
    """The attention of `head` = (layer, head) from query position `toi` over the image's patch grid, for one
    `example` of the cache: [rows, cols], on the grid of the model's vision config.

    `attention="cross_attn"` reads the tower's cross-attention to the vision tokens (BLIP's question encoder,
    InstructBLIP's Q-Former): the keys are the class token and the patches, and the class token is dropped.
    `attention="attn"` reads the self-attention to the example's first image span (LLaVA), patches by their
    grid row and column. `subtract_mean`: minus the mean over all heads of every layer of the tower that has that
    attention (NOTICE's mean over 144 heads); `normalize`: then min-max normalised to [0, 1] (raises where the map
    is constant). `toi`: a position, or one per example (`Positions.find_each`). The cache must hold the tower's
    patterns: `run_with_cache(..., names_filter=overlay_names(model, tower, attention))`.
    """
    tower = tower or model.prompt_tower
    info = model.tower_info(tower)
    layer, h = (int(x) for x in head)
    layers = [i for i in range(info.n_layers) if attention == "attn" or info.has_cross_attn[i]]
    if layer not in layers or not 0 <= h < info.n_heads:
        raise ValueError(f"head {head} is not a {attention} head of {tower} (layers {layers}, {info.n_heads} heads)")
    q = int(toi[example]) if isinstance(toi, Tensor) and toi.ndim else int(toi)
    grid = model.cfg.vision.grid
    keys, rows, cols = _patch_keys(model, cache, tower, attention, example, grid)

    def pattern(i: int) -> Tensor:  # [H, S] from the query q
        name = names.block(tower, i, names.leaf(attention, "pattern"))
        if name not in cache:
            raise KeyError(f"{name} is not in the cache: run_with_cache(..., names_filter=overlay_names(model, "
                           f"{tower!r}, {attention!r})) caches every layer's pattern, which the mean over heads needs")
        return cache[name][example, :, q].float()

    patterns = torch.stack([pattern(i)[:, keys] for i in layers])  # [L, H, N] over the patches
    values = patterns[layers.index(layer), h]
    if subtract_mean:
        values = values - patterns.mean((0, 1))
    if normalize:
        lo, hi = values.min(), values.max()
        if not hi > lo:
            raise ValueError(f"the map of head {head} is constant ({lo.item():.6g}), so min-max normalisation is "
                             "undefined; pass normalize=False")
        values = (values - lo) / (hi - lo)
    out = torch.full((grid, grid), float("nan"), device=values.device)
    out[rows, cols] = values
    return out.cpu()


def _patch_keys(model: HookedVLM, cache: ActivationCache, tower: str, attention: str, example: int, grid: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Which key positions are patches, and each one's grid row and column."""
    if attention == "cross_attn":
        name = next((n for n in cache.keys() if n.startswith(f"{tower}.") and n.endswith("cross_attn.hook_pattern")),
                    None)
        if name is None:
            raise KeyError(f"no {tower} cross-attention pattern in the cache: run_with_cache(..., "
                           f"names_filter=overlay_names(model, {tower!r}))")
        S = cache[name].shape[-1]
        if S not in (grid * grid, grid * grid + 1):
            raise ValueError(f"{tower}'s cross-attention reads {S} keys, not the {grid}x{grid} patch grid (with or "
                             "without a class token): it does not read the image's patches")
        first = S - grid * grid  # the class token comes first
        patch = torch.arange(grid * grid)
        return torch.arange(first, S), patch // grid, patch % grid
    positions = cache.positions
    if positions is None or not positions.image or not positions.image[example]:
        raise ValueError(f"example {example} has no image span in {tower}'s sequence: attention='attn' reads "
                         "self-attention to image tokens (LLaVA); BLIP's image is read by cross_attn")
    span = positions.image[example][0]
    keep = span.rows >= 0  # the class token, where a model keeps it, is no patch
    return span.indices[keep], span.rows[keep], span.cols[keep]
