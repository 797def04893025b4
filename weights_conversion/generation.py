"""Token ids that HF's `generate` uses, read once at conversion so hooked generation stops and pads as HF's does."""

from __future__ import annotations

from typing import Any


def generation_tokens(hf: Any) -> dict[str, Any]:
    """The token ids HF's generate uses (its generation config is built from the model config)."""
    from transformers import GenerationConfig  # here: `import hooked_vlm` does not load transformers

    gen = GenerationConfig.from_model_config(hf)
    tc = hf.text_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(tc, "eos_token_id", None)
    pad = gen.pad_token_id if gen.pad_token_id is not None else getattr(hf, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos  # HF's generate pads with eos when it has no pad token
    return {"bos_token_id": gen.bos_token_id if gen.bos_token_id is not None else getattr(tc, "bos_token_id", None),
            "eos_token_id": eos, "pad_token_id": pad}
