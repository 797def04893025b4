"""Converters keyed by the HF model class name (a dict lookup, never an if/elif chain). A converter knows configs
only: which hooked model class runs a config is hooked_vlm's choice (`hooked_vlm.configs.HOOKED_CLASSES`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .state_dict import ConversionPlan


@dataclass(frozen=True)
class Converter:
    hf_class: str
    config: Callable[..., Any]  # (hf_config, **options) -> hooked config
    # (HF state dict, hooked config) -> the plan; only the tensors' shapes are read (meta tensors do)
    plan: Callable[[Mapping[str, Tensor], Any], ConversionPlan]

    def convert(self, state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
        """Convert an in-memory HF state dict (the hooked tensors only)."""
        return self.plan(state, cfg).apply(state)


CONVERTERS: dict[str, Converter] = {}


def register_converter(hf_class: str, config: Callable[..., Any]):
    """Decorator registering a conversion planner for `hf_class` (the transformers model class name), with `config`
    building the hooked config from the HF one."""

    def wrap(plan):
        CONVERTERS[hf_class] = Converter(hf_class, config, plan)
        return plan

    return wrap


def converter_for(hf_model: nn.Module | str) -> Converter:
    name = hf_model if isinstance(hf_model, str) else type(hf_model).__name__
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ValueError(f"hooked_vlm cannot convert {name}; supported HF classes: {', '.join(sorted(CONVERTERS))}")


# ---------------------------------------------------------------------------------------------- what converts
# A converter reproduces a sub-model's forward only for the types and config values it implements; anything else
# would convert without a word and run with wrong logits (Gemma scales its embeddings, Granite multiplies its
# residuals). These checks run in `Converter.config`, before a weight is read, so every loading path refuses.
def require_type(sub_config: Any, supported: tuple[str, ...], what: str) -> str:
    """The sub-config's model_type, if it is one of `supported`; else a ValueError naming it and the supported ones."""
    kind = getattr(sub_config, "model_type", None)
    if kind not in supported:
        raise ValueError(f"the {what} is {kind!r} ({type(sub_config).__name__}), whose forward hooked_vlm does not "
                         f"reproduce; supported {what} types: {', '.join(supported)}")
    return kind


def refuse(what: str, field: str, value: Any, supported: str) -> None:
    """A config value of a supported type that the hooked forward does not implement."""
    raise ValueError(f"the {what}'s {field}={value!r} is not supported by hooked_vlm (its forward would differ "
                     f"from transformers'); supported: {supported}")
