"""Converters keyed by the HF model class name (a dict lookup, never an if/elif chain)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .state_dict import ConversionPlan


@dataclass(frozen=True)
class Converter:
    hf_class: str
    model_class: type  # the hooked model class
    config: Callable[..., Any]  # (hf_config, **options) -> hooked config
    # (HF state dict, hooked config) -> the plan; only the tensors' shapes are read (meta tensors do)
    plan: Callable[[Mapping[str, Tensor], Any], ConversionPlan]

    def convert(self, state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
        """Convert an in-memory HF state dict (the hooked tensors only)."""
        return self.plan(state, cfg).apply(state)


CONVERTERS: dict[str, Converter] = {}


def register_converter(hf_class: str, model_class: type, config: Callable[..., Any]):
    """Decorator registering a conversion planner for `hf_class` (the transformers model class name)."""

    def wrap(plan):
        CONVERTERS[hf_class] = Converter(hf_class, model_class, config, plan)
        return plan

    return wrap


def converter_for(hf_model: nn.Module | str) -> Converter:
    name = hf_model if isinstance(hf_model, str) else type(hf_model).__name__
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ValueError(f"hooked_vlm cannot convert {name}; supported HF classes: {', '.join(sorted(CONVERTERS))}")
