"""Text corruptions: symmetric token replacement (NOTICE's STR)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def symmetric_token_replacement(tokenizer_or_processor: Any, text: str, replacements: Mapping[str, str], *,
                                images: Any = None, **processor_kwargs: Any) -> tuple[dict, dict]:
    """Clean and corrupted inputs for STR (NOTICE): `text`, and `text` with each word of `replacements` swapped
    for its replacement, tokenized alike so that every position lines up.

    Raises if a replacement changes the token count (naming it and both tokenizations), since position-wise
    patching would then pair unrelated tokens. With a processor and `images`, both inputs carry the same images.
    """
    corrupted = text
    for old, new in replacements.items():
        if old not in corrupted:
            raise ValueError(f"{old!r} does not occur in {text!r}")
        corrupted = corrupted.replace(old, new)
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    for old, new in replacements.items():
        a = tokenizer(" " + old, add_special_tokens=False)["input_ids"]
        b = tokenizer(" " + new, add_special_tokens=False)["input_ids"]
        if len(a) != len(b):
            raise ValueError(f"replacing {old!r} ({len(a)} tokens: {tokenizer.convert_ids_to_tokens(a)}) by {new!r} "
                             f"({len(b)} tokens: {tokenizer.convert_ids_to_tokens(b)}) changes the token count; "
                             "choose a replacement of the same length")

    def encode(t: str) -> dict:
        if images is not None:
            return dict(tokenizer_or_processor(images=images, text=t, return_tensors="pt", **processor_kwargs))
        return dict(tokenizer_or_processor(t, return_tensors="pt", **processor_kwargs))

    clean, corrupt = encode(text), encode(corrupted)
    if clean["input_ids"].shape != corrupt["input_ids"].shape:
        raise ValueError(f"{text!r} and {corrupted!r} tokenize to {clean['input_ids'].shape[-1]} and "
                         f"{corrupt['input_ids'].shape[-1]} tokens; choose replacements of the same length")
    return clean, corrupt
