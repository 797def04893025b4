"""Greedy decoding shared by every model: the model supplies one step (new tokens, the attention mask so far and
the new tokens' positions -> next-token logits, its KV cache kept in the closure); this loop reproduces HF's greedy
search: finished rows are padded, it stops when all rows have ended or after `max_new_tokens`, and positions are
numbered as HF's generate numbers them (`cumsum(mask) - 1` with pads at 0 for the prompt, then one more than the
previous position for each new token)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..components.masks import generation_positions

__all__ = ["greedy_decode", "generation_positions"]

Step = Callable[[Int[Tensor, "B T_new"], Int[Tensor, "B S"], Int[Tensor, "B T_new"]], Float[Tensor, "B V"]]



def greedy_decode(step: Step, ids: Int[Tensor, "B T"], mask: Int[Tensor, "B T"] | None, max_new_tokens: int, *,
                  eos_token_id: int | list[int] | None, pad_token_id: int | None) -> Int[Tensor, "B T_out"]:
    """Returns the prompt followed by the generated tokens."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    mask = torch.ones_like(ids) if mask is None else mask
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=ids.device).flatten()
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new_ids, positions = ids, generation_positions(mask)
    for _ in range(max_new_tokens):
        next_token = step(new_ids, mask, positions).argmax(dim=-1).to(ids.device)  # the head may sit on another device
        if pad_token_id is not None:
            next_token = torch.where(unfinished, next_token, pad_token_id)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        new_ids, positions = next_token[:, None], positions[:, -1:] + 1
        unfinished &= ~torch.isin(next_token, eos)
        if not unfinished.any():
            break
    return ids
