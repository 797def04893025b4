"""The attention view: every cached attention pattern of a model, by tower, layer and head, from a chosen query
token over the image's patches and the text (NOTICE's overlays, for every head at once)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from .. import names
from ..cache import ActivationCache
from ..hooks import NameFilter
from ..models.base import HookedVLM
from ..patching.engine import _row_examples
from .page import View
from .payload import PRECISIONS, encode, encoded_size, image_data_uri, image_from_pixels, quantize_rows
from .tokens import TokenAxis, image_grid, key_axis, query_axis, tower_axes

ATTENTIONS = ("attn", "cross_attn")
MAX_BYTES = 32 * 2**20  # the default cap on a view's attention data: a 7B LLaVA's 32 x 32 heads fit as uint8


@dataclass
class HeadSet:
    """The patterns of one attention of one tower that a view embeds: `patterns` [layers, heads, queries, keys]
    for the query positions `queries`, and what each query and key position is."""

    tower: str
    attention: str
    layers: list[int]
    patterns: Float[Tensor, "L H Q S"]
    queries: list[int]
    q_axis: TokenAxis
    k_axis: TokenAxis

    @property
    def name(self) -> str:
        return f"{self.tower} {'cross-attention' if self.attention == 'cross_attn' else 'self-attention'}"

    def __post_init__(self) -> None:
        L, H, Q, S = self.patterns.shape
        if (L, Q, S) != (len(self.layers), len(self.queries), len(self.k_axis)):
            raise ValueError(f"{self.name}: patterns of shape {tuple(self.patterns.shape)} do not match {len(self.layers)} "
                             f"layers, {len(self.queries)} queries and {len(self.k_axis)} keys")
        bad = [q for q in self.queries if not 0 <= q < len(self.q_axis)]
        if bad:
            raise ValueError(f"{self.name}: query positions {bad} are outside its {len(self.q_axis)} tokens")


def attention_names(model: HookedVLM, towers: Sequence[str] | None = None) -> NameFilter:
    """The `names_filter` caching what `attention` shows: the self- and cross-attention patterns of every block of
    `towers` (None: every tower with blocks)."""
    wanted = None if towers is None else set(towers)

    def keep(name: str) -> bool:
        try:
            parsed = names.parse(name)
        except ValueError:
            return False
        return ((wanted is None or parsed.tower in wanted) and parsed.layer is not None
                and parsed.leaf in (names.leaf(a, "pattern") for a in ATTENTIONS))

    return keep


def sets_payload(sets: Sequence[HeadSet], precision: str) -> dict[str, Any]:
    """The head sets as the page reads them: float16 (or float32) values, or uint8 codes with two scales per row."""
    out = []
    for s in sets:
        entry = {"name": s.name, "tower": s.tower, "attention": s.attention, "layers": s.layers,
                 "n_heads": int(s.patterns.shape[1]), "queries": s.queries, "q_axis": s.q_axis.to_json(),
                 "k_axis": s.k_axis.to_json(), "precision": precision, "scales": None}
        if precision == "uint8":
            codes, scales = quantize_rows(s.patterns, torch.tensor(s.k_axis.is_patch))
            entry["values"], entry["scales"] = encode(codes, "uint8"), encode(scales, "float32")
        else:
            entry["values"] = encode(s.patterns.float(), precision)
        out.append(entry)
    # the page opens on the prompt tower's cross-attention (BLIP, the Q-Former's reading of the image) or else on
    # the self-attention of the last tower (the LM reading the image tokens)
    default = next((i for i, s in enumerate(sets) if s.attention == "cross_attn"), len(sets) - 1)
    return {"sets": out, "default_set": default}


def sets_size(sets: Sequence[HeadSet], precision: str, queries: Sequence[Sequence[int]] | None = None) -> int:
    """The encoded bytes of the head sets' values in `precision` (with other queries, if given)."""
    itemsize = {"float32": 4, "float16": 2, "uint8": 1}[precision]
    total = 0
    for i, s in enumerate(sets):
        L, H, Q, S = s.patterns.shape
        Q = len(queries[i]) if queries is not None else Q
        total += encoded_size(L * H * Q * S, itemsize) + (encoded_size(L * H * Q * 2, 4) if precision == "uint8" else 0)
    return total


def describe_sets(sets: Sequence[HeadSet], precision: str) -> str:
    """What the head sets hold, in words (the file header's)."""
    parts = []
    for s in sets:
        L, H, Q, S = s.patterns.shape
        parts.append(f"{s.name}: {L} layers x {H} heads, {Q} of {len(s.q_axis)} query tokens x {S} keys")
    how = {"float16": "float16", "float32": "float32",
           "uint8": "uint8 codes with two scales per row (the image-patch keys and the others, each within 1/510 of "
                    "its maximum)"}[precision]
    return "the attention patterns of " + "; ".join(parts) + f", as {how}"


def image_payload(model: HookedVLM, image: Image.Image | None, inputs: Mapping[str, Any] | None,
                  example: int, row: int | None = None) -> dict[str, Any] | None:
    """The image the grid is drawn on: `image`, or the one the model saw (un-normalised `pixel_values`, row `row`:
    the image's, where the rows are images (`Positions.image_examples`; None: `example`'s first image, found from
    the inputs' positions); -1: none, a text-only example)."""
    if row is None:
        pixels = inputs.get("pixel_values") if image is None and inputs is not None else None
        found = (image_row(model, model.positions(**inputs), example)
                 if isinstance(pixels, Tensor) and pixels.ndim >= 4 and "input_ids" in inputs else None)
        row = example if found is None else found
    if image is None and inputs is not None and "pixel_values" in inputs and inputs["pixel_values"].ndim < 4:
        # not [B, 3, H, W] (Qwen2-VL's flattened patches of every image): no image to un-normalise per example
        warnings.warn(f"pixel_values of shape {tuple(inputs['pixel_values'].shape)} are not images [B, 3, H, W]: "
                      "the view draws the patch grid on grey; pass image= (the image as the model sees it) to draw it")
    elif image is None and inputs is not None and "pixel_values" in inputs and row >= 0:
        pixels = inputs["pixel_values"][row]
        while pixels.ndim > 3:  # several images per example: the first, the one the grids show
            pixels = pixels[0]
        image = image_from_pixels(pixels, model.processor)
    if image is None:
        return None
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    uri, (w, h) = image_data_uri(image)
    return {"uri": uri, "width": w, "height": h}


def page_common(model: HookedVLM, image: Image.Image | None, inputs: Mapping[str, Any] | None, example: int,
                axes: Sequence[TokenAxis] = (), row: int | None = None) -> tuple[dict[str, Any], str]:
    """The grid (as far as the image tokens of `axes` reach, else the model's) and the image every view draws on
    (`row` as in `image_payload`), and their description."""
    grid = image_grid(axes, model)
    img = image_payload(model, image, inputs, example, row)
    holds = (f"the {grid[0]}x{grid[1]} patch grid" if grid else "no patch grid") + (
        f" and the image ({img['width']}x{img['height']} px)" if img else "")
    return {"grid": grid, "image": img}, holds


def _layers_of(cache: ActivationCache, towers: Sequence[str] | None) -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for name in cache.keys():
        try:
            parsed = names.parse(name)
        except ValueError:
            continue
        for attention in ATTENTIONS:
            if parsed.layer is not None and parsed.leaf == names.leaf(attention, "pattern") and (
                    towers is None or parsed.tower in towers):
                found.setdefault((parsed.tower, attention), []).append(parsed.layer)
    return {key: sorted(layers) for key, layers in found.items()}


def image_row(model: HookedVLM, positions: Any, example: int, image_index: int = 0) -> int | None:
    """The row of image `image_index` of example `example` in the towers whose rows are the images
    (`Positions.image_examples`); -1 for an example without an image; None where the rows are the examples."""
    rows = None if positions is None else _row_examples(model, model.tower_names[0], positions)
    if rows is None:
        if image_index:
            raise ValueError(f"image_index={image_index}: this model's inputs hold one image per example; pass 0")
        return None
    mine = torch.nonzero(rows == example).flatten().tolist()
    if image_index and not 0 <= image_index < len(mine):
        raise ValueError(f"image_index={image_index}: example {example} holds {len(mine)} image(s); pass 0.."
                         f"{max(len(mine) - 1, 0)}")
    return mine[image_index] if mine else -1


def head_sets(model: HookedVLM, cache: ActivationCache, *, example: int = 0, towers: Sequence[str] | None = None,
              queries: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
              layers: Sequence[int] | None = None, image_index: int = 0) -> list[HeadSet]:
    """The cached patterns of example `example` as head sets, in the model's tower order (self-attention first),
    with every real query token (or `queries`: positions of the prompt tower, or {tower: positions}).

    A tower whose rows are the images (the vision tower and projector of LLaVA and Qwen2-VL:
    `Positions.image_examples`) shows the example's image `image_index` (its first by default), which is then the
    image the grids draw (numbered 0 in the prompt's axis); a text-only example has none: those towers' sets are
    left out."""
    if not cache.has_batch_dim:
        raise ValueError("the view reads one example of a batched cache; pass the cache run_with_cache returned "
                         "(not remove_batch_dim())")
    if towers is not None:
        unknown = [t for t in towers if t not in model.tower_names]
        if unknown:
            raise ValueError(f"towers {unknown} are not towers of this model: {', '.join(model.tower_names)}")
    found = _layers_of(cache, towers)
    if not found:
        raise ValueError("the cache holds no attention patterns" + (f" of {list(towers)}" if towers else "") +
                         ": run_with_cache(..., names_filter=view.attention_names(model)) caches them")
    positions = cache.positions
    B = positions.input_ids.shape[0] if positions is not None else next(iter(cache.values())).shape[0]
    if not 0 <= example < B:
        raise ValueError(f"example {example} is out of range for a cache of {B} examples")
    order = list(model.tower_names)
    keys = sorted(found, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), ATTENTIONS.index(k[1])))
    row = image_row(model, positions, example, image_index)
    per_image = {t for t, _ in keys if _row_examples(model, t, positions) is not None}  # rows are images
    if row == -1:  # a text-only example: the towers that read the images have no row of it
        keys = [k for k in keys if k[0] not in per_image]
        if not keys:
            raise ValueError(f"example {example} holds no image, and the cache holds only the patterns of "
                             f"{', '.join(sorted(per_image))}, whose rows are images: cache the language model's too")
    rows = {t: (row if t in per_image else example) for t, _ in keys}
    lengths: dict[str, int] = {}
    for tower, attention in keys:
        lengths.setdefault(tower, cache[names.block(tower, found[tower, attention][0],
                                                    names.leaf(attention, "pattern"))].shape[-2])
    axes = tower_axes(model, positions, lengths, example, rows)
    if image_index:  # the views draw image 0: number the chosen image 0 in the prompt's axes
        axes = {t: a if t in per_image else a.drawing(image_index) for t, a in axes.items()}
    if isinstance(queries, Mapping):
        unknown = [t for t in queries if t not in lengths]
        if unknown:
            raise ValueError(f"queries for towers {unknown}, whose patterns are not in the cache (cached: "
                             f"{', '.join(lengths)})")
    out = []
    for tower, attention in keys:
        chosen = [l for l in found[tower, attention] if layers is None or l in layers]
        if not chosen:
            continue
        first = cache[names.block(tower, chosen[0], names.leaf(attention, "pattern"))]
        S = first.shape[-1]
        k_axis = axes[tower] if attention == "attn" else key_axis(model, tower, S, axes, order)
        q_axis = query_axis(axes[tower], first.shape[-2])
        asked = queries.get(tower) if isinstance(queries, Mapping) else (
            queries if queries is not None and tower == model.prompt_tower else None)
        pos = [i for i, real in enumerate(q_axis.real) if real] if asked is None else [int(q) for q in asked]
        bad = [q for q in pos if not 0 <= q < len(q_axis)]
        if bad or not pos:
            raise ValueError(f"queries {bad or pos} of {tower}: pass positions in 0..{len(q_axis) - 1}")
        picked = torch.tensor(pos)
        patterns = torch.stack([cache[names.block(tower, l, names.leaf(attention, "pattern"))][rows[tower]][:, picked]
                                .detach().float().cpu() for l in chosen])
        out.append(HeadSet(tower, attention, chosen, patterns, pos, q_axis, k_axis))
    if not out:
        raise ValueError(f"layers={list(layers or [])}: none of them is cached for {', '.join(n for n, _ in keys)}")
    return out


def fit(sets: list[HeadSet], precision: str, max_bytes: int | None, queries_given: bool
        ) -> tuple[list[HeadSet], str, str]:
    """The head sets and precision that fit `max_bytes`: float16, else uint8; without queries asked for, then the
    same without image-token queries. Also a note of what was left out."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto', {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    precisions = ["float16", "uint8"] if precision == "auto" else [precision]
    cap = float("inf") if max_bytes is None else max_bytes
    for p in precisions:
        if sets_size(sets, p) <= cap:
            return sets, p, ""
    if not queries_given:
        keep = [[q for q in s.queries if s.q_axis.rows[q] < 0] for s in sets]
        if all(keep):
            for p in precisions:
                if sets_size(sets, p, keep) <= cap:
                    slim = [HeadSet(s.tower, s.attention, s.layers, s.patterns[:, :, [s.queries.index(q) for q in k]],
                                    k, s.q_axis, s.k_axis) for s, k in zip(sets, keep)]
                    return slim, p, "; image-patch tokens as queries were left out to fit max_bytes"
    smallest = min(sets_size(sets, p) for p in precisions)
    raise ValueError(f"the attention data takes {smallest / 2**20:.1f} MiB at best ({precisions[-1]}), over max_bytes="
                     f"{cap / 2**20:.1f} MiB: choose fewer towers=, layers= or queries= (e.g. the text tokens), or "
                     "raise max_bytes")


def attention(model: HookedVLM, cache: ActivationCache, path: str | os.PathLike | None = None, *,
              inputs: Mapping[str, Any] | None = None, image: Image.Image | None = None, example: int = 0,
              towers: Sequence[str] | None = None, queries: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
              layers: Sequence[int] | None = None, precision: str = "auto", max_bytes: int | None = MAX_BYTES,
              title: str | None = None, image_index: int = 0) -> View:
    """An interactive view of the cached attention patterns of example `example`: pick a tower's self- or
    cross-attention, a layer and a head (or their mean), hover or click a query token, and see its pattern over the
    image grid and the other tokens. Written to `path` (.html) if given; in Jupyter the returned `View` displays
    inline.

    `cache`: from `run_with_cache(..., names_filter=view.attention_names(model))` (or any cache holding patterns).
    `inputs`: the processor's output the cache ran (the image is drawn from its `pixel_values`), or `image`: the
    image as the model sees it. `towers`, `layers`: only these. `queries`: the query positions embedded (prompt
    tower positions, or {tower: positions}); default every real token, and if that exceeds `max_bytes` (bytes of
    attention data; None: no cap), every token but the image patches. `precision`: "float16", "uint8" (per-row
    scaled), "float32", or "auto": float16 if it fits `max_bytes`, else uint8.

    Several images in one prompt (LLaVA, Qwen2-VL): the vision tower and projector, whose rows are the images,
    show image `image_index` of the example (default its first; `Positions.image_examples`), and the grid draws
    it. A text-only example shows no image and leaves those towers' sets out.
    """
    sets = head_sets(model, cache, example=example, towers=towers, queries=queries, layers=layers,
                     image_index=image_index)
    row = image_row(model, cache.positions, example, image_index)
    common, holds_common = page_common(model, image, inputs, example, [a for s in sets for a in (s.q_axis, s.k_axis)],
                                       row)
    view = render_attention(sets, common, holds_common, precision=precision, max_bytes=max_bytes,
                            queries_given=queries is not None,
                            title=title or f"Attention of {type(model).__name__}, example {example}")
    if path is not None:
        view.save(path)
    return view


def render_attention(sets: list[HeadSet], common: dict[str, Any], holds_common: str, *, precision: str = "auto",
                     max_bytes: int | None = MAX_BYTES, queries_given: bool = False, title: str = "Attention"
                     ) -> View:
    """The attention page of head sets, without a model: `common` is {"grid": [rows, cols], "image": None or
    {"uri", "width", "height"}} and `holds_common` says what it adds (how a real-size file's size is measured)."""
    sets, precision, note = fit(sets, precision, max_bytes, queries_given)
    holds = f"{describe_sets(sets, precision)}{note}; the token labels; {holds_common}"
    return View("attention", {**sets_payload(sets, precision), **common}, holds, title)
