"""TransformerLens's tokenizer conveniences on a vision-language model: `model.tokenizer`, `to_tokens`,
`to_str_tokens`, `to_string`, `to_single_token`, with TransformerLens 4.x's signatures and meanings, and the LM
prompt laid out as the family's processor lays it out.

What a VLM changes: the prompt holds image placeholders. `to_tokens` writes them as the processor does (LLaVA:
each `<image>` of the text expanded to one placeholder per image token; InstructBLIP: one per query in front of
every row, before `<s>` and the pads), so its ids are the processor's `input_ids` and one id per LM position.
`to_str_tokens` labels each placeholder with the image token it becomes, `<image i:r,c>` (image i of the row, patch
row r and column c; `<image i:cls>` for a class token) or `<image i:query q>` (InstructBLIP's queries), so that
label k is position k of the LM's sequence: `cache["lm.hook_resid_post", ...][0, k]` is the token labelled
`str_tokens[k]`. BLIP's image enters by cross-attention: its prompt has no placeholders.

A family declares its layout (`TokenLayout`) in `token_layout()`; nothing here knows which family it serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

# What a tokenizer emits for a word boundary alone (sentencepiece's "▁", byte-level BPE's "Ġ"): every answer word
# shares it, so it tells none apart and is skipped when it comes first.
BOUNDARY_PIECES = ("▁", "Ġ")

__all__ = ["TokenLayout", "TokenMethods"]


@dataclass(frozen=True)
class TokenLayout:
    """Where a family's processor puts the image placeholders in the LM prompt.

    Args:
        image_token_id: the placeholder's id (None: no placeholders, the image enters by cross-attention).
        image_labels: the label of each image token within one image (its patch "r,c", "cls", "query q"); an
            image is `len(image_labels)` placeholders.
        expand_in_text: each placeholder written in the text becomes this many (LLaVA's processor); 0: none.
        prepend: this many placeholders go in front of every row, before the special tokens and the pads
            (InstructBLIP's processor); 0: none.
        n_ctx: the prompt tower's learned positions, the length `to_tokens(truncate=True)` cuts to (None: no limit).
    """

    image_token_id: int | None = None
    image_labels: tuple[str, ...] = ()
    expand_in_text: int = 0
    prepend: int = 0
    n_ctx: int | None = None


class TokenMethods:
    """The tokenizer conveniences of `HookedVLM` (a mixin: the model supplies `processor`, `device` and
    `token_layout`)."""

    processor: Any
    device: torch.device

    def token_layout(self) -> TokenLayout:
        """Where this family's processor puts the image placeholders (the model overrides it)."""
        return TokenLayout()

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the LM prompt: the processor's (`model.processor.tokenizer`)."""
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            what = ("this model has no processor" if self.processor is None
                    else f"the model's processor ({type(self.processor).__name__}) has no tokenizer")
            raise ValueError(f"{what}; attach the checkpoint's processor: model.processor = "
                             "transformers.AutoProcessor.from_pretrained(name_or_path) (from_pretrained attaches "
                             "it; from_hf takes processor=)")
        return tokenizer

    # ------------------------------------------------------------------ text -> ids
    def to_tokens(self, input: str | list[str] | Mapping[str, Any] | Tensor, prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True, truncate: bool = True
                  ) -> Int[Tensor, "B T"]:
        """Token ids of the LM prompt [batch, pos], as the processor writes them (image placeholders included).

        Args:
            input: a string or a list of strings (a batch, padded); a processor output (its `input_ids`) or a
                tensor of ids pass through.
            prepend_bos: None or True: the tokenizer's special tokens, as the processor adds them (`<s>` for Llama,
                `[CLS]` ... `[SEP]` for BERT, `</s>` for T5); False: none.
            padding_side: "left" or "right"; None: the tokenizer's own (as the processor pads).
            move_to_device: put the ids on the model's device.
            truncate: cut to the prompt tower's learned positions (`TokenLayout.n_ctx`), where it has them.
        """
        if isinstance(input, (Mapping, Tensor)):
            ids = _ids(input, "to_tokens")
        else:
            texts = [input] if isinstance(input, str) else input
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"to_tokens takes a string, a non-empty list of strings, a processor output or a "
                                f"tensor of ids; got {_describe(input)}")
            ids = self._tokenize(texts, prepend_bos, padding_side, truncate)
        return ids.to(self.device) if move_to_device else ids

    def _tokenize(self, texts: list[str], prepend_bos: bool | None, padding_side: str | None,
                  truncate: bool) -> Int[Tensor, "B T"]:
        layout, tokenizer = self.token_layout(), self.tokenizer
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None (the tokenizer's), got {padding_side!r}")
        if layout.expand_in_text:  # as LLaVA's processor: each placeholder of the text -> one per image token
            image = tokenizer.convert_ids_to_tokens(layout.image_token_id)
            texts = [text.replace(image, image * layout.expand_in_text) for text in texts]
        limit = None if not truncate or layout.n_ctx is None else layout.n_ctx - layout.prepend
        ids = tokenizer(texts, add_special_tokens=prepend_bos is not False, padding=True, return_tensors="pt",
                        padding_side=padding_side or tokenizer.padding_side, truncation=limit is not None,
                        max_length=limit)["input_ids"]
        if layout.prepend:  # as InstructBLIP's processor: in front of the special tokens and the pads
            ids = torch.cat([ids.new_full((ids.shape[0], layout.prepend), layout.image_token_id), ids], dim=1)
        return ids

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token (no special tokens, no placeholders added); a ValueError naming the
        tokens otherwise, as TransformerLens's assertion."""
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"input string {string!r} is not a single token: it is {len(ids)} tokens {pieces}; "
                             "use model.to_tokens(..., prepend_bos=False) for several")
        return int(ids[0])

    # ------------------------------------------------------------------ ids -> text
    def to_string(self, tokens: Any) -> str | list[str]:
        """Decode ids: one string for a single id or a sequence [pos], a list of strings for a batch [batch, pos]
        (special tokens kept, tokenization spaces as they are), as TransformerLens.

        The inverse of `to_tokens`: the image placeholders are written as in the text the processor reads (LLaVA:
        one `<image>` per image, not one per image token; InstructBLIP: none, the processor puts them in front), so
        `to_tokens(to_string(ids), prepend_bos=False)` gives the ids back. `tokenizer.decode` keeps every one."""
        ids = _as_tensor(tokens, "to_string")
        if ids.ndim > 2:
            raise ValueError(f"to_string takes ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
        rows = [self._text_ids(row) for row in ids.reshape(-1, ids.shape[-1] if ids.ndim else 1)]
        if ids.ndim == 2:
            return self.tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(rows[0], clean_up_tokenization_spaces=False)

    def _text_ids(self, ids: Int[Tensor, "T"]) -> list[int]:
        """The ids of the text the processor reads: without the placeholders it adds (see `to_string`)."""
        ids, layout = ids.tolist(), self.token_layout()
        image = layout.image_token_id
        if layout.prepend and ids[:layout.prepend] == [image] * layout.prepend:
            ids = ids[layout.prepend:]
        if layout.expand_in_text:  # the k-th placeholder is token k % n of an image: keep one per image
            seen, kept = 0, []
            for token in ids:
                if token == image:
                    seen += 1
                    if (seen - 1) % layout.expand_in_text:
                        continue
                kept.append(token)
            ids = kept
        return ids

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None
                      ) -> list[str] | list[list[str]]:
        """One label per position of the LM prompt: each token's text, each image placeholder the image token it
        becomes (`<image i:r,c>`, `<image i:cls>`, `<image i:query q>`; see the module's docstring).

        `input`: a string (tokenized by `to_tokens`), a list of strings (a list of label lists, each string
        tokenized alone, as TransformerLens), ids (an int, [pos], [1, pos]; [batch, pos] gives a list per row),
        or a processor output (its `input_ids`, likewise).
        """
        if isinstance(input, str):
            return self._labels(self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0])
        if isinstance(input, list) and input and all(isinstance(x, str) for x in input):
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        ids = _ids(input, "to_str_tokens") if isinstance(input, Mapping) else _as_tensor(input, "to_str_tokens")
        if ids.ndim == 2 and ids.shape[0] > 1:
            return [self._labels(row) for row in ids]
        if ids.ndim > 2:
            raise ValueError(f"to_str_tokens takes ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
        return self._labels(ids.reshape(-1))

    def _labels(self, ids: Int[Tensor, "T"]) -> list[str]:
        ids = ids.cpu()
        labels = self.tokenizer.batch_decode(ids[:, None], clean_up_tokenization_spaces=False)  # token by token
        layout = self.token_layout()
        if layout.image_token_id is None or not layout.image_labels:
            return labels
        per_image = len(layout.image_labels)
        # images fill the placeholders in order (HF's masked_scatter), so the k-th is token k % n of image k // n
        for k, position in enumerate(torch.nonzero(ids == layout.image_token_id).flatten().tolist()):
            labels[position] = f"<image {k // per_image}:{layout.image_labels[k % per_image]}>"
        return labels


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _ids(input: Mapping[str, Any] | Tensor, where: str) -> Int[Tensor, "B T"]:
    """The ids of a processor output (`input_ids`) or a tensor, as [batch, pos]."""
    if isinstance(input, Mapping):
        if "input_ids" not in input:
            raise ValueError(f"{where}: the inputs hold no input_ids (keys: {', '.join(map(str, input))}); pass the "
                             "processor's output or the ids")
        input = input["input_ids"]
    ids = _as_tensor(input, where)
    if ids.ndim > 2:
        raise ValueError(f"{where} takes ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
    return ids.reshape(1, -1) if ids.ndim < 2 else ids


def _as_tensor(tokens: Any, where: str) -> Int[Tensor, "..."]:
    """Token ids from a tensor, a numpy array, an int or a (nested) list of ints."""
    if isinstance(tokens, Tensor):
        ids = tokens
    elif isinstance(tokens, (np.ndarray, int, np.integer)) or (isinstance(tokens, Sequence)
                                                                 and not isinstance(tokens, str)):
        try:
            ids = torch.as_tensor(np.asarray(tokens))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{where} takes token ids; got {_describe(tokens)} ({e})") from None
    else:
        raise TypeError(f"{where} takes token ids (a tensor, array, int or list of ints); got {_describe(tokens)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{where} takes integer token ids, got dtype {ids.dtype}")
    return ids
