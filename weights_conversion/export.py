"""hooked_vlm -> transformers: the conversion plan run backwards, so that weights edited in a hooked model (a head
rescaling folded into W_O, say) run in any HF tool. HF -> hooked -> HF is exact: every plan step is a copy, a
concatenation or a reshape, and the HF tensors hooked_vlm does not use travel in `model.hf_origin.unused`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import converter_for
from .state_dict import ConversionPlan

# transformers is imported in the functions that export: `import hooked_vlm` does not load it (half a second)


def _origin(model: Any):
    origin = getattr(model, "hf_origin", None)
    if origin is None:
        raise ValueError(f"this {type(model).__name__} was not converted from transformers (no HF config is known): "
                         "load it with HookedVLM.from_pretrained or from_hf to export it")
    return origin


def hf_config(model: Any):
    """The HF config the model was converted from, rebuilt from its stored dict."""
    from transformers import CONFIG_MAPPING

    config = _origin(model).config
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def _plan(model: Any, config: Any) -> ConversionPlan:
    import transformers

    origin = _origin(model)
    with torch.device("meta"):  # only the names and shapes of the HF model are needed
        empty = getattr(transformers, origin.hf_class)._from_config(config)
    return converter_for(origin.hf_class).plan(empty.state_dict(), model.cfg)


def hf_state_dict(model: Any) -> dict[str, Tensor]:
    """The HF state dict (every key, tied aliases included) of the model's current weights; tensors are views of
    the hooked parameters where no reshape was needed."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    metas = [k for k, v in state.items() if v.is_meta]
    if metas:
        raise ValueError(f"{metas[0]} is offloaded (on the meta device): export a model loaded without a device map")
    return _plan(model, hf_config(model)).invert(state, _origin(model).unused)


def to_hf(model: Any):
    """A transformers model with the hooked model's weights, built by transformers' own loader, in eval mode."""
    import transformers

    cls = getattr(transformers, _origin(model).hf_class)
    return cls.from_pretrained(None, config=hf_config(model), state_dict=hf_state_dict(model),
                               dtype=model.dtype).eval()
