"""The logit-lens view (as Neo et al.'s per-patch viewer): per layer, the image grid with each image token's top-1
decoded token written on its patch, the top-k on hover, and the text positions beside it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ..analysis import LogitLens
from ..cache import ActivationCache
from ..models.base import HookedVLM
from .attention import page_common
from .page import View
from .payload import encode
from .tokens import TokenAxis, other_axis, prompt_axis


def _axis(model: HookedVLM, tower: str, cache: ActivationCache | None, inputs: Mapping[str, Any] | None,
          example: int, n_min: int) -> TokenAxis:
    positions = cache.positions if cache is not None and cache.positions is not None else (
        model.positions(**inputs) if inputs is not None else None)
    if positions is not None and tower == model.prompt_tower and positions.input_ids.shape[1] >= n_min:
        return prompt_axis(model, positions, example)
    if positions is not None and tower in positions.towers and positions.towers[tower].input_ids.shape[1] >= n_min:
        return other_axis(model, tower, positions.towers[tower], example)
    return TokenAxis.plain(n_min)


def lens(model: HookedVLM, result: LogitLens, path: str | os.PathLike | None = None, *,
         inputs: Mapping[str, Any] | None = None, cache: ActivationCache | None = None,
         image: Image.Image | None = None, example: int = 0, tower: str | None = None,
         token_names: Sequence[str] | None = None, title: str | None = None) -> View:
    """An interactive logit lens of example `example`: pick a layer and see, on each image patch, the top-1 token
    the lens decodes there (the top-k with probabilities on hover), and the same for the text positions. Written to
    `path` (.html) if given; in Jupyter the returned `View` displays inline.

    `result`: `analysis.logit_lens(model, ..., tower=tower)` (`tower`: default the model's output tower). `inputs`
    (the processor's output it ran on) or a `cache` of that run give the positions their labels and patches, and
    `inputs` the image (or pass `image`). With `logit_lens(tokens=...)`, the patches can also be coloured by the
    probability of each asked token (`token_names`: their labels).
    """
    if not isinstance(result, LogitLens):
        raise TypeError(f"lens takes an analysis.LogitLens (logit_lens's result), got {type(result).__name__}")
    tower = tower or model.output_tower
    if not tower:
        raise ValueError(f"{type(model).__name__} has no output tower; pass tower= the lens read")
    L, B, P, k = result.ids.shape
    if not 0 <= example < B:
        raise ValueError(f"example {example} is out of range for a lens of {B} examples")
    pos = [int(p) for p in result.positions[example].tolist()]
    axis = _axis(model, tower, cache, inputs, example, max(pos) + 1)
    table: dict[str, int] = {}
    strings = result.tokens or [[[[str(i) for i in row] for row in ex] for ex in layer]
                                for layer in result.ids.tolist()]
    index = torch.tensor([[[table.setdefault(s, len(table)) for s in strings[l][example][p]] for p in range(P)]
                          for l in range(L)], dtype=torch.int32)
    payload: dict[str, Any] = {
        "tower": tower, "hook": result.hook, "positions": pos, "axis": axis.to_json(), "vocab": list(table),
        "top": encode(index, "int32"), "top_ids": encode(result.ids[:, example].to(torch.int32), "int32"),
        "probs": encode(result.probs[:, example].float(), "float16"),
        "layer_labels": ["embed"] if result.hook == "embed" else [str(l) for l in range(L)],
        "token_probs": None, "token_names": None}
    holds = (f"the logit lens of {tower} (hook {result.hook}): {L} layer(s) x {P} positions, the top {k} tokens each "
             f"(indices into a table of {len(table)} token strings, and their ids) with their probabilities as "
             "float16")
    if result.token_probs is not None:
        n = result.token_probs.shape[-1]
        names = [str(t) for t in token_names] if token_names is not None else [f"token {j}" for j in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} token_names for the lens's {n} asked tokens: pass one per token")
        payload.update(token_probs=encode(result.token_probs[:, example].float(), "float16"), token_names=names)
        holds += f", and P of {n} asked token(s) per layer and position"
    common, holds_common = page_common(model, image, inputs, example, [axis])
    payload.update(common)
    view = View("lens", payload, f"{holds}; the token labels; {holds_common}",
                title or f"Logit lens of {type(model).__name__} ({tower}), example {example}")
    if path is not None:
        view.save(path)
    return view
