"""Choosing heads from per-head scores of a sweep: the heads that stand out (NOTICE's mean + k std), and the heads
that stand out in every task and modality (NOTICE's "universal" heads)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .arguments import strict

Head = tuple[int, int]  # (layer, head)


@strict
def select_heads(scores: Float[Tensor, "*examples n_layers n_heads"], k_std: float = 2.0,
                 std: Literal["population", "sample"] = "population") -> list[Head]:
    """Heads whose mean |score| (over leading example dimensions) is at least mean + k_std * std over all heads
    (NOTICE's selection of important heads), as (layer, head), strongest first.

    `std="population"` (the default) divides by the number of heads, as NumPy's `np.std`, which NOTICE's
    `circuit_analysis.ipynb` uses; `"sample"` divides by one less (torch's default `Tensor.std`).
    """
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' (np.std, NOTICE) or 'sample' (torch.std), got {std!r}")
    if not isinstance(scores, Tensor) or scores.ndim < 2 or not scores.numel():
        raise ValueError(f"scores must be a non-empty [..., n_layers, n_heads] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~torch.isfinite(scores)).sum())} NaN or infinite values: select from "
                         "finite scores (layers without that attention are NaN; drop them or use torch.nan_to_num)")
    magnitude = scores.abs()
    while magnitude.ndim > 2:
        magnitude = magnitude.mean(0)
    if magnitude.numel() < 2 or bool((magnitude == magnitude.flatten()[0]).all()):
        raise ValueError(f"every head has the same mean |score| ({magnitude.flatten()[0].item():.6g}), so none "
                         "stands out: check that the sweep measured an effect (scores.std() is 0)")
    threshold = magnitude.mean() + k_std * magnitude.std(correction=0 if std == "population" else 1)
    layers, heads = torch.nonzero(magnitude >= threshold, as_tuple=True)
    order = magnitude[layers, heads].argsort(descending=True, stable=True)
    return [(int(layers[i]), int(heads[i])) for i in order]


@dataclass
class UniversalHeads:
    """What `universal_heads` found.

    Args:
        heads: the heads selected in every set (in at least `min_sets`, where given), by layer then head.
        counts: for every head selected in at least one set, in how many sets it was selected; most first.
        selected: each set's selected heads, by set name.
    """

    heads: list[Head]
    counts: dict[Head, int]
    selected: dict[str, list[Head]]


@strict
def universal_heads(score_sets: Mapping[str, Tensor | Sequence[Head]], k_std: float = 2.0,
                    std: Literal["population", "sample"] = "population", min_sets: int | None = None
                    ) -> UniversalHeads:
    """The heads selected in every one of several sets (NOTICE's universal heads: common to every task and
    modality), with per-head counts of how many sets selected them.

    `score_sets` maps a name ("SIP svo_probes", "STR mit_states", ...) to that set's scores ([examples, n_layers,
    n_heads] or [n_layers, n_heads], selected with `select_heads(scores, k_std, std)`) or to its already selected
    heads (a list of (layer, head)). `min_sets`: keep the heads selected in at least that many sets instead of in
    all of them.
    """
    if not isinstance(score_sets, Mapping) or not score_sets:
        raise ValueError("score_sets must be a non-empty mapping name -> scores or heads, e.g. {'SIP': sip_scores, "
                         "'STR': str_scores}")
    need = len(score_sets) if min_sets is None else min_sets
    if not 1 <= need <= len(score_sets):
        raise ValueError(f"min_sets={min_sets} must lie in 1..{len(score_sets)} (the number of sets)")
    shapes = {name: tuple(s.shape[-2:]) for name, s in score_sets.items() if isinstance(s, Tensor)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the score sets have different [n_layers, n_heads] shapes: {shapes}; compare the same "
                         "model's heads")
    selected = {}
    for name, value in score_sets.items():
        if isinstance(value, Tensor):
            selected[name] = select_heads(value, k_std, std)
        else:
            heads = [tuple(h) for h in value]
            if not all(len(h) == 2 and all(isinstance(i, int) and i >= 0 for i in h) for h in heads):
                raise ValueError(f"set {name!r}: heads must be (layer, head) pairs of non-negative ints, got {value!r}")
            selected[name] = list(dict.fromkeys(heads))  # each head once, in the given order
    counted = Counter(h for heads in selected.values() for h in heads)
    counts = dict(sorted(counted.items(), key=lambda item: (-item[1], item[0])))
    return UniversalHeads(sorted(h for h, n in counts.items() if n >= need), counts, selected)
