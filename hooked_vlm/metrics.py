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

from .arguments import strict

Metric = Callable[[Tensor, Tensor], Tensor]
TokenIds = int | Sequence[int] | Tensor
Position = int | Sequence[int] | Tensor


# What a tokenizer emits for a word boundary alone (sentencepiece's "▁", byte-level BPE's "Ġ"): every answer word
# shares it, so it tells none apart and is skipped when it comes first.
_BOUNDARY_PIECES = ("▁", "Ġ")


@strict
def answer_token(tokenizer, word: str) -> int:
    """The token id that stands for the answer `word`: its first sub-word as the model would generate it (BLIP-VQA
    answers' first token), skipping a lone word-boundary piece. Refuses an empty word and one whose first real
    token is the tokenizer's unknown token (every unknown word would be measured as the same token)."""
    if not isinstance(word, str):
        raise TypeError(f"answer word={word!r} is a {type(word).__name__}: pass the word as a str")
    if not word.strip():
        raise ValueError(f"answer word={word!r} is empty: pass a non-empty word such as 'yes'")
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    while ids and pieces[0] in _BOUNDARY_PIECES:
        ids, pieces = ids[1:], pieces[1:]
    if not ids:
        raise ValueError(f"answer word={word!r} tokenizes to word-boundary pieces only: pass a word with letters")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"answer word={word!r} starts with the unknown token {pieces[0]!r} of this tokenizer: pass a "
                         "word in its vocabulary (its first token would be shared by every unknown word)")
    return int(ids[0])


def _ids(value: TokenIds | Position, what: str) -> TokenIds | Position:
    """`value` checked to be an int or one int per example (a list, or an integer tensor or array), when the metric
    is made: a word passed for a token id fails at once, not inside a sweep."""
    hint = f" (e.g. metrics.answer_token(tokenizer, {value!r}))" if isinstance(value, str) else ""
    try:
        t = None if isinstance(value, (str, bytes)) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and not t.numel():
        raise ValueError(f"{what} is empty: pass an int or one int per example")
    if t is None or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.ndim > 1:
        kind = f" ({t.dtype}, shape {tuple(t.shape)})" if t is not None else ""
        raise TypeError(f"{what}={value!r:.80} is not a token id{kind}: pass an int or one integer id per "
                        f"example{hint}")
    return value


@strict
def per_row(value: TokenIds | Position, examples: Int[Tensor, "N"], what: str = "value", size: int | None = None
            ) -> Int[Tensor, "N"]:
    """`value` for each row of a stacked batch: an int (the same for every example) or one int per example,
    looked up by `examples` (row -> example, as a metric receives it). With `size`, each must lie in
    range(-size, size). For writing metrics with per-example token ids or positions."""
    t = torch.as_tensor(value, device=examples.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what}={value!r:.80} is not an int or one int per example ({t.dtype})")
    if t.ndim == 0:
        t = t.expand(examples.shape[0])
    else:
        if t.ndim != 1:
            raise ValueError(f"{what}: expected an int or one int per example, got shape {tuple(t.shape)}")
        n = int(examples.max()) + 1 if examples.numel() else 0
        if t.shape[0] != n:
            raise ValueError(f"{what}: {t.shape[0]} values given, but the batch has {n} examples; give one per "
                             "example (or a single int for all)")
        t = t[examples]
    if size is not None and t.numel() and (int(t.min()) < -size or int(t.max()) >= size):
        bad = t[(t < -size) | (t >= size)][0]
        raise ValueError(f"{what}={int(bad)} is out of range for a dimension of size {size}")
    return t


@strict
def logits_at(logits: Float[Tensor, "N *T V"], position: Position, examples: Int[Tensor, "N"]) -> Float[Tensor, "N V"]:
    """The logits of every row at `position` (an int, or one per example: see `per_row`; -1 is the last).
    [N, V] logits have no position and are returned as they are."""
    if logits.ndim == 2:
        return logits
    if logits.ndim != 3:
        raise ValueError(f"logits must be [N, T, V] or [N, V], got shape {tuple(logits.shape)}")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, per_row(position, examples, "position", logits.shape[1])]


def _token_logits(at: Tensor, token: TokenIds, examples: Tensor, what: str) -> Float[Tensor, "N"]:
    rows = torch.arange(at.shape[0], device=at.device)
    ids = per_row(token, examples, what, at.shape[-1])
    if int(ids.min()) < 0:
        raise ValueError(f"{what}={int(ids.min())} is a negative token id: pass ids in range({at.shape[-1]})")
    return at[rows, ids]


@strict
def logit_diff(correct: TokenIds, incorrect: TokenIds, position: Position = -1) -> Metric:
    """logit(correct) - logit(incorrect) at `position` (-1: the last one; BLIP-VQA's first answer token, or the last
    prompt token of a left-padded LM batch; for right padding pass `positions.last`). Token ids, not words: get a
    word's with `answer_token`."""
    correct, incorrect = _ids(correct, "correct"), _ids(incorrect, "incorrect")
    position = _ids(position, "position")

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        at = logits_at(logits, position, examples).float()
        return _token_logits(at, correct, examples, "correct") - _token_logits(at, incorrect, examples, "incorrect")

    return metric


@strict
def log_prob(token: TokenIds, position: Position = -1) -> Metric:
    """log P(token) at `position`."""
    token, position = _ids(token, "token"), _ids(position, "position")

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        at = logits_at(logits, position, examples).float().log_softmax(-1)
        return _token_logits(at, token, examples, "token")

    return metric


@strict
def prob(token: TokenIds, position: Position = -1) -> Metric:
    """P(token) at `position`."""
    lp = log_prob(token, position)
    return lambda logits, examples: lp(logits, examples).exp()


def evaluate(metric: Metric, logits: Tensor, examples: Int[Tensor, "N"], where: str) -> Float[Tensor, "N"]:
    """`metric(logits, examples)`, checked to be one number per row (the sweeps stack variants along the batch)."""
    values = metric(logits, examples)
    n = examples.shape[0]
    if not isinstance(values, Tensor):
        raise TypeError(f"the metric of {where} returned a {type(values).__name__}: it must return a tensor with "
                        f"one value per row, shape [{n}]")
    if values.shape != (n,):
        raise ValueError(f"the metric of {where} returned shape {tuple(values.shape)} for {n} rows: it must return one "
                         f"value per row, shape [{n}] (reduce over positions and vocabulary, not over the batch)")
    return values


def check_finite(values: Tensor, what: str) -> None:
    """Raise if a metric came out NaN or infinite (a half-precision overflow, a log of 0): averaged into a sweep, it
    would turn the result into NaN with no word of why."""
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"the metric is {values[bad][0].item()} for {what} {rows[:8]}: check the model's dtype "
                         "(float16 overflows; try float32) and the metric (a log of a zero probability)")


def check_normalizable(clean: Float[Tensor, "B"], corrupt: Float[Tensor, "B"]) -> None:
    """Raise if some example's clean and corrupted metrics are equal (within rounding): normalising divides by
    their difference, which would give +-inf or NaN for that example."""
    clean, corrupt = clean.float(), corrupt.float()
    tol = 1e-6 * torch.maximum(clean.abs(), corrupt.abs()).clamp(min=1e-30)
    equal = ((clean - corrupt).abs() <= tol).nonzero().flatten().tolist()
    if equal:
        raise ValueError(f"normalize=True, but examples {equal[:8]} have equal clean and corrupted metrics "
                         f"({clean[equal[0]].item():.6g}), so their normalised effect is undefined: drop those "
                         "examples (the corruption does not change the metric) or pass normalize=False")


@strict
def normalized(value: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """(m - m_corrupt) / (m_clean - m_corrupt): 0 at the corrupted run, 1 at the clean one. Raises where the clean
    and corrupted metrics are equal (see `check_normalizable`)."""
    check_normalizable(clean.flatten(), corrupt.flatten())
    return (value - corrupt) / (clean - corrupt)
