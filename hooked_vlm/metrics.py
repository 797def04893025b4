"""Metrics for patching sweeps: logits -> one value per example, so that the variants of a sweep can share a batch.

A metric is called as `metric(logits, examples)`: `logits` [N, T, V] (or [N, V]) holds N rows, and `examples` [N]
says which example of the caller's batch each row belongs to (a sweep stacks several variants of every example),
so per-example token ids and positions are looked up per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

Metric = Callable[[Tensor, Tensor], Tensor]
TokenIds = int | Sequence[int] | Tensor
Position = int | Sequence[int] | Tensor


def _per_row(value: TokenIds | Position, examples: Int[Tensor, "N"]) -> Int[Tensor, "N"]:
    """An int for every example, or one per example (indexed by `examples`)."""
    t = torch.as_tensor(value, device=examples.device)
    if t.ndim == 0:
        return t.expand(examples.shape[0])
    if t.ndim != 1:
        raise ValueError(f"expected an int or one int per example, got shape {tuple(t.shape)}")
    if int(examples.max()) >= t.shape[0]:
        raise ValueError(f"{t.shape[0]} values given, but the batch has {int(examples.max()) + 1} examples")
    return t[examples]


def _select(logits: Tensor, position: Position, examples: Tensor) -> Float[Tensor, "N V"]:
    """The logits at the given position of every row ([N, V] logits have no position: taken as they are)."""
    if logits.ndim == 2:
        return logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, _per_row(position, examples)]


def logit_diff(correct: TokenIds, incorrect: TokenIds, position: Position = -1) -> Metric:
    """logit(correct) - logit(incorrect) at `position` (-1: the last one; BLIP-VQA's first answer token, or the last
    prompt token of a left-padded LM batch; for right padding pass `positions.last`)."""

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        at = _select(logits, position, examples).float()
        rows = torch.arange(at.shape[0], device=at.device)
        return at[rows, _per_row(correct, examples)] - at[rows, _per_row(incorrect, examples)]

    return metric


def log_prob(token: TokenIds, position: Position = -1) -> Metric:
    """log P(token) at `position`."""

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        at = _select(logits, position, examples).float().log_softmax(-1)
        return at[torch.arange(at.shape[0], device=at.device), _per_row(token, examples)]

    return metric


def prob(token: TokenIds, position: Position = -1) -> Metric:
    """P(token) at `position`."""
    lp = log_prob(token, position)
    return lambda logits, examples: lp(logits, examples).exp()


def normalized(value: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """(m - m_corrupt) / (m_clean - m_corrupt): 0 at the corrupted run, 1 at the clean one."""
    return (value - corrupt) / (clean - corrupt)
