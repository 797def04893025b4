"""Decoding shared by every model: the model supplies one step (new tokens, the attention mask so far and the new
tokens' positions -> next-token logits, its KV cache kept in the closure) and a rule that picks the next token from
the logits (`greedy`, or a `Sampler`); this loop reproduces HF's greedy search and multinomial sampling: finished
rows are padded, it stops when all rows have ended or after `max_new_tokens`, and positions are numbered as HF's
generate numbers them (`cumsum(mask) - 1` with pads at 0 for the prompt, then one more than the previous position
for each new token).

`decoding_step` builds the step of every tower that decodes (BLIP's text decoder, Llama, the T5 decoder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.kv_cache import KVCache
from ..components.masks import generation_positions

__all__ = ["Step", "Pick", "Sampler", "decoding_step", "decode", "greedy", "sampling_rule", "generation_positions"]

Step = Callable[[Int[Tensor, "B T_new"], Int[Tensor, "B S"], Int[Tensor, "B T_new"]], Float[Tensor, "B V"]]
Pick = Callable[[Float[Tensor, "B V"]], Int[Tensor, "B"]]  # next-token logits -> the chosen tokens


def greedy(logits: Float[Tensor, "B V"]) -> Int[Tensor, "B"]:
    """HF's greedy search: the most likely token (the first of ties)."""
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class Sampler:
    """HF's multinomial sampling (`GenerationMixin._sample` with its logits warpers, transformers 5.x): the logits in
    float32, divided by `temperature`, then top-k, then top-p (nucleus) filtering, a softmax and one
    `torch.multinomial(probs, 1)` draw over the whole batch per step (finished rows draw too, then get the pad),
    so that the same random state gives the same tokens as HF's `generate(do_sample=True, ...)`.

    Args:
        temperature: > 0; the logits are divided by it (1.0: unchanged; HF then skips the warper, a no-op).
        top_k: keep the `top_k` most likely tokens (and every token tied with the k-th, as HF's `<` comparison
            does); 0 or None: no top-k filtering.
        top_p: keep the smallest set of most likely tokens whose probability reaches `top_p` (always at least
            one, HF's `min_tokens_to_keep=1` outside beam search); 1.0: no filtering.
        generator: the random state the draws come from; None: torch's global one (what HF's generate uses, so
            `torch.manual_seed(s)` before each call gives both the same tokens). It must be on the device of the
            generated ids.
    """

    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            hint = " (for greedy decoding pass do_sample=False)" if t == 0 else ""
            raise ValueError(f"temperature must be a number > 0, got {t!r}{hint}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k filtering), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"top_p must be a number in [0, 1] (1: no top-p filtering), got {p!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    def warp(self, logits: Float[Tensor, "B V"]) -> Float[Tensor, "B V"]:
        """The filtered, tempered scores whose softmax is sampled: -inf where a token is filtered out."""
        scores = logits.float()  # as HF: the warpers and the softmax run in float32 whatever the model's dtype
        if self.temperature != 1.0:  # HF leaves out the temperature warper at 1.0
            scores = scores / self.temperature
        if self.top_k:  # HF's TopKLogitsWarper: below the k-th largest score is removed (ties with it are kept)
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:  # HF's TopPLogitsWarper: drop the least likely tokens holding at most 1 - top_p
            ascending, order = torch.sort(scores, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1:] = False  # min_tokens_to_keep=1: the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def __call__(self, logits: Float[Tensor, "B V"]) -> Int[Tensor, "B"]:
        probs = self.warp(logits).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def sampling_rule(do_sample: bool, *, temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Pick:
    """`generate`'s choice of the next token: `greedy`, or a `Sampler` with `do_sample=True`. A sampling option
    given without `do_sample=True` is an error (HF ignores it with a warning: the user meant to sample)."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample:
        return Sampler(temperature, top_k, top_p, generator)
    given = {"temperature": temperature != 1.0, "top_k": top_k != 50, "top_p": top_p != 1.0,
             "generator": generator is not None}
    for name, differs in given.items():
        if differs:
            raise ValueError(f"{name}= applies only to sampling and generation is greedy: pass do_sample=True too, "
                             f"or drop {name}=")
    return greedy


def decoding_step(tower: nn.Module, *, prompt_embeds: Float[Tensor, "B T D"] | None = None,
                  position_key: str | None = None, **fixed: Any) -> Step:
    """A step for `decode` that runs `tower` (a decoding tower: `forward(input_ids, attention_mask, ...,
    past=)` and `logits`) on the new tokens with a KV cache of its own, and returns the last position's logits.

    Args:
        tower: the tower that decodes.
        prompt_embeds: read on the first call instead of the prompt's ids (the prompt with the image written in).
        position_key: the keyword under which the tower takes the new tokens' positions (None: it numbers them
            itself, as T5's relative positions do).
        fixed: passed on every call, e.g. what the tower cross-attends to (`kv_input`, `kv_mask`).
    """
    past = KVCache.for_tower(tower)

    def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        new = ({"inputs_embeds": prompt_embeds} if prompt_embeds is not None and past.length == 0
               else {"input_ids": new_ids})
        if position_key is not None:
            new[position_key] = positions
        resid = tower(attention_mask=mask, past=past, **new, **fixed)
        return tower.logits(resid[:, -1:])[:, -1]

    return step


def decode(step: Step, ids: Int[Tensor, "B T"], mask: Int[Tensor, "B T"] | None, max_new_tokens: int, *,
           eos_token_id: int | list[int] | None, pad_token_id: int | None, pick: Pick = greedy
           ) -> Int[Tensor, "B T_out"]:
    """Returns the prompt followed by the generated tokens; `pick` chooses each next token from the logits."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    mask = torch.ones_like(ids) if mask is None else mask
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=ids.device).flatten()
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new_ids, positions = ids, generation_positions(mask)
    for _ in range(max_new_tokens):
        logits = step(new_ids, mask, positions).to(ids.device)  # the head may sit on another device (HF moves too)
        next_token = pick(logits)
        if pad_token_id is not None:
            next_token = torch.where(unfinished, next_token, pad_token_id)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        new_ids, positions = next_token[:, None], positions[:, -1:] + 1
        unfinished &= ~torch.isin(next_token, eos)
        if not unfinished.any():
            break
    return ids
