"""The sweep view: a [layers, heads] or [layers, positions] result of `patch_heads`, `patch_resid` or
`causal_trace` as a heatmap with token labels and values on hover; a click on a cell shows that head's attention
pattern over the image (heads), or that layer's scores over the image grid and the text (positions)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from ..cache import ActivationCache
from ..models.base import HookedVLM
from .attention import describe_sets, fit, head_sets, page_common, sets_payload
from .page import View
from .payload import encode
from .tokens import TokenAxis, tower_axes


def _axis(model: HookedVLM | None, cache: ActivationCache | None, inputs: Mapping[str, Any] | None, tower: str | None,
          example: int, n: int) -> TokenAxis | None:
    """The tower's token axis if it has n positions (what a positions sweep's columns are)."""
    if model is None or tower is None:
        return None
    positions = cache.positions if cache is not None and cache.positions is not None else (
        model.positions(**inputs) if inputs is not None else None)
    if positions is None:
        return None
    axis = tower_axes(model, positions, {tower: n}, example)[tower]
    return axis if axis.labels != TokenAxis.plain(n).labels else None


def sweep(scores: Float[Tensor, "n_layers n_cols"], path: str | os.PathLike | None = None, *,
          kind: Literal["heads", "positions"], model: HookedVLM | None = None, cache: ActivationCache | None = None,
          inputs: Mapping[str, Any] | None = None, image: Image.Image | None = None, example: int = 0,
          tower: str | None = None, attention: Literal["attn", "cross_attn"] = "attn", query: int | None = None,
          labels: Sequence[str] | None = None, centered: bool = True, title: str | None = None) -> View:
    """An interactive heatmap of a sweep's result (`scores`, [layers, heads] with `kind="heads"`, [layers,
    positions] with `kind="positions"`), hover for values, click a cell for its detail. Written to `path` (.html)
    if given; in Jupyter the returned `View` displays inline.

    `model`, `tower` and `inputs` (or a `cache` of the clean run, whose positions label the prompt) give the
    columns their token labels and the image; `labels` overrides them (one per column). With `kind="heads"`, a
    `cache` holding `tower`'s `attention` patterns (`names_filter=view.attention_names(model, [tower])`) lets a
    click show that head's pattern from `query` (a position of the tower; default its last real token) over the
    image and the text. `centered`: colours symmetric around 0. NaN cells (layers without that hook) are hatched.
    """
    values = torch.as_tensor(scores).detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"sweep takes a 2-d result [layers, heads] or [layers, positions], got shape "
                         f"{tuple(values.shape)}; for patch_heads(by_position=True) pick one position: scores[:, :, p]")
    if kind not in ("heads", "positions"):
        raise ValueError(f"kind must be 'heads' or 'positions', got {kind!r}")
    if tower is not None and model is None:
        raise ValueError("tower= needs model=: the tower's tokens and patterns are read from the model")
    if model is not None and tower is None:
        tower = model.prompt_tower
    L, C = values.shape
    if model is not None:
        n_layers = model.tower_info(tower).n_layers
        if L != n_layers:
            raise ValueError(f"scores have {L} rows but {tower!r} has {n_layers} layers: pass tower= the sweep ran on")
        if kind == "heads" and C != model.tower_info(tower).n_heads:
            raise ValueError(f"kind='heads': scores have {C} columns but {tower!r} has "
                             f"{model.tower_info(tower).n_heads} heads")
    axis = _axis(model, cache, inputs, tower, example, C) if kind == "positions" else None
    if labels is not None:
        if len(labels) != C:
            raise ValueError(f"{len(labels)} labels for {C} columns: pass one per column")
        col_labels = [str(x) for x in labels]
    elif axis is not None:
        col_labels = axis.labels
    else:
        col_labels = [f"H{c}" if kind == "heads" else str(c) for c in range(C)]
    payload: dict[str, Any] = {"mode": kind, "scores": encode(values, "float32"), "row_labels": [str(l) for l in range(L)],
                               "col_labels": col_labels, "centered": bool(centered),
                               "axis": axis.to_json() if axis is not None else None, "sets": [], "query": None}
    holds = f"the {L} x {C} scores (float32)"
    if kind == "heads" and cache is not None and model is not None:
        found = head_sets(model, cache, example=example, towers=[tower], layers=None,
                          queries={tower: [0]})  # the axes; the query is chosen below
        chosen = [s for s in found if s.attention == attention]
        if not chosen:
            raise ValueError(f"the cache holds no {attention} patterns of {tower!r}: run_with_cache(..., "
                             f"names_filter=view.attention_names(model, [{tower!r}]))")
        q_axis = chosen[0].q_axis
        if query is None:
            real = [i for i, r in enumerate(q_axis.real) if r]
            query = real[-1]
        sets = head_sets(model, cache, example=example, towers=[tower], queries={tower: [int(query)]})
        sets = [s for s in sets if s.attention == attention]
        sets, precision, _ = fit(sets, "float16", None, True)
        payload.update(sets_payload(sets, precision), query=int(query))
        holds += f"; {describe_sets(sets, precision)}"
    if model is not None:
        axes = ([axis] if axis is not None else []) + [a for s in payload["sets"] for a in (
            TokenAxis(**s["q_axis"]), TokenAxis(**s["k_axis"]))]
        common, holds_common = page_common(model, image, inputs, example, axes)
        payload.update(common)
        holds += f"; {holds_common}"
    else:
        payload.update(grid=None, image=None)
    view = View("sweep", payload, holds, title or f"Sweep: [layers, {kind}]" + (f" of {tower}" if tower else ""))
    if path is not None:
        view.save(path)
    return view
