"""Additive attention masks, built once per tower forward and shared by its blocks.

Masked entries hold the dtype's most negative finite value, as HF's eager attention does. Pad positions are never
meaningful outputs; compare only real tokens.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    # A query that may attend to nothing (a left pad under a causal mask) is let attend to everything instead: its
    # output is never used, and in half precision a row of finfo.min plus negative scores overflows to -inf,
    # whose softmax is NaN, and 0 * NaN would then spread into real rows through the values.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def padding_mask(attention_mask: Int[Tensor, "B S"], dtype: torch.dtype) -> Float[Tensor, "B 1 1 S"]:
    """Bidirectional attention: every query may attend to every non-pad key."""
    return _additive(attention_mask[:, None, None, :].bool(), dtype)


def causal_mask(attention_mask: Int[Tensor, "B S"], n_queries: int, dtype: torch.dtype,
                window: int | None = None) -> Float[Tensor, "B 1 T S"]:
    """Causal attention for the last `n_queries` positions of a sequence of S keys (S - T of them from earlier
    generation steps): query i may attend to non-pad keys at or before its own position, and with a sliding `window`
    only to the last `window` of them (Mistral: key j > i - window, pads counted, as HF's sliding_window_overlay)."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - n_queries, S, device=attention_mask.device)
    k_pos = torch.arange(S, device=attention_mask.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    return _additive(allowed, dtype)


def generation_positions(attention_mask: Int[Tensor, "B T"]) -> Int[Tensor, "B T"]:
    """Position ids from the attention mask, as HF's generate numbers a prompt: `cumsum(mask) - 1`, pads 0. A
    left-padded row then gets the positions of the same prompt alone."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def group_mask(groups: Int[Tensor, "B S"], dtype: torch.dtype) -> Float[Tensor, "B 1 S S"]:
    """Bidirectional attention within groups: a query may attend to the keys of its own group; -1 marks pads
    (Qwen2.5-VL's vision windows, HF's `cu_window_seqlens`, as a mask over one row per image)."""
    allowed = (groups[:, :, None] == groups[:, None, :]) & (groups[:, None, :] >= 0)
    return _additive(allowed[:, None], dtype)
