"""Metrics for patching sweeps: logits -> one value per example, so that the variants of a sweep can share a batch.

A metric is called as `metric(logits, examples)`: `logits` [N, T, V] (or [N, V]) holds N rows, and `examples` [N]
says which example of the caller's batch each row belongs to (a sweep stacks several variants of every example),
so per-example token ids and positions are looked up per row.

A sweep that splits its examples into chunks (`batch_size` below the number of examples) passes each chunk's rows
with their indices in the whole batch (example 5 of 8 is 5 in every chunk), and says how many examples the whole
batch has while the metric runs (`evaluate(..., n_examples=8)`): `n_examples(examples)` reads it, so `per_row` and
the answer tables check a per-example list against the whole batch, not against the examples a chunk happens to
hold. Outside a sweep the count is max(examples) + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .arguments import strict
from .tokens import BOUNDARY_PIECES

Metric = Callable[[Tensor, Tensor], Tensor]
TokenIds = int | Sequence[int] | Tensor
Position = int | Sequence[int] | Tensor

# the whole batch's example count while `evaluate` runs a metric on rows of some of its examples (a context
# variable: each thread and context sees its own sweep's)
_N_EXAMPLES: ContextVar[int | None] = ContextVar("hooked_vlm_metric_n_examples", default=None)


def n_examples(examples: Int[Tensor, "N"]) -> int:
    """How many examples the batch whose rows `examples` indexes holds: inside `evaluate(..., n_examples=n)` (a
    sweep evaluating a chunk of its examples, with their global indices) that `n`; otherwise max(examples) + 1 (0
    for no rows). Per-example values given to a metric must number this many."""
    n = _N_EXAMPLES.get()
    if n is not None:
        return n
    return int(examples.max()) + 1 if examples.numel() else 0


def _word_pieces(tokenizer, word: str) -> tuple[list[int], list[str]]:
    """The ids and pieces of `word` as the model would generate it, a lone leading word-boundary piece dropped."""
    if not isinstance(word, str):
        raise TypeError(f"answer word={word!r} is a {type(word).__name__}: pass the word as a str")
    if not word.strip():
        raise ValueError(f"answer word={word!r} is empty: pass a non-empty word such as 'yes'")
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    while ids and pieces[0] in BOUNDARY_PIECES:
        ids, pieces = ids[1:], pieces[1:]
    if not ids:
        raise ValueError(f"answer word={word!r} tokenizes to word-boundary pieces only: pass a word with letters")
    return [int(i) for i in ids], pieces


@strict
def answer_token(tokenizer, word: str) -> int:
    """The token id that stands for the answer `word`: its first sub-word as the model would generate it (BLIP-VQA
    answers' first token), skipping a lone word-boundary piece. Refuses an empty word and one whose first real
    token is the tokenizer's unknown token (every unknown word would be measured as the same token)."""
    ids, pieces = _word_pieces(tokenizer, word)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"answer word={word!r} starts with the unknown token {pieces[0]!r} of this tokenizer: pass a "
                         "word in its vocabulary (its first token would be shared by every unknown word)")
    return ids[0]


@strict
def answer_tokens(tokenizer, word: str) -> list[int]:
    """Every sub-token id of the answer `word`, in order, as the model would generate it (what V-SEAM's
    `tokenizer.encode(answer, add_special_tokens=False)` gives, less a lone leading word-boundary piece, which every
    word shares). `answer_tokens(tok, w)[0] == answer_token(tok, w)`. Refuses an empty word and one with a piece
    the tokenizer does not know (its unknown token stands for every unknown word)."""
    ids, pieces = _word_pieces(tokenizer, word)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ValueError(f"answer word={word!r} holds the unknown token {pieces[ids.index(unk)]!r} of this tokenizer "
                         f"(pieces {pieces}): pass a word in its vocabulary")
    return ids


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
    range(-size, size). For writing metrics with per-example token ids or positions.

    A per-example list must hold one value per example of the whole batch, `n_examples(examples)`: inside a sweep
    that splits its examples into chunks, the rows of a chunk hold global indices (examples 4..7 of 8) and the count
    is the whole batch's (8), so a list of the wrong length is an error in every chunk, not only in the last."""
    t = torch.as_tensor(value, device=examples.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what}={value!r:.80} is not an int or one int per example ({t.dtype})")
    if t.ndim == 0:
        t = t.expand(examples.shape[0])
    else:
        if t.ndim != 1:
            raise ValueError(f"{what}: expected an int or one int per example, got shape {tuple(t.shape)}")
        n = n_examples(examples)
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


# ------------------------------------------------------------------------------------------ answers of several tokens
# An answer as sub-tokens: one list of ids per example (`answer_tokens` of each word), or, as for the metrics above,
# one id shared by every example or one id per example (a one-token answer each).
AnswerIds = TokenIds | Sequence[Sequence[int]] | Sequence[Tensor]
ANSWER_POLICIES = ("first", "last", "sum", "sequence")
LOGIT_POLICIES = ("first", "last", "mean")


class AnswerTable:
    """Answers of one or more sub-tokens, one row per example: `ids` [B, K] padded, `mask` [B, K] True at each
    example's real ids, `unique` [B, K] True at the first occurrence of each id (a sum over the answer's tokens counts
    a token once), `lengths` [B]. `shared`: one answer for every example (B = 1). Built by `answer_table`."""

    def __init__(self, ids: Tensor, mask: Tensor, shared: bool):
        self.ids, self.mask, self.shared = ids, mask, shared
        earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(-1)  # [j, i]: i before j
        repeated = ((ids[:, :, None] == ids[:, None, :]) & mask[:, None, :] & earlier).any(-1)
        self.unique = mask & ~repeated
        self.lengths = mask.sum(1)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, examples: Int[Tensor, "N"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids, mask, unique, lengths) of each row of a stacked batch (row -> example, as a metric receives it)."""
        if self.shared:
            n = examples.shape[0]
            pick = lambda t: t.to(examples.device).expand(n, *t.shape[1:])  # noqa: E731
        else:
            n = n_examples(examples)
            if n != len(self):
                raise ValueError(f"answers: {len(self)} given, but the batch has {n} examples; give one per "
                                 "example (or a single answer for all)")
            pick = lambda t: t.to(examples.device)[examples]  # noqa: E731
        return pick(self.ids), pick(self.mask), pick(self.unique), pick(self.lengths)


def answer_table(answers: AnswerIds | AnswerTable, what: str = "answers") -> AnswerTable:
    """`answers` as an `AnswerTable`, checked once, when a metric is made: an int (one token for every example), one
    int per example (a list or 1-d integer tensor), one list of sub-token ids per example (ragged; e.g.
    `[metrics.answer_tokens(tok, w) for w in words]`) or a [B, K] integer tensor. Words are refused with a hint."""
    if isinstance(answers, AnswerTable):
        return answers
    if isinstance(answers, (str, bytes)) or (isinstance(answers, Sequence) and answers
                                             and isinstance(answers[0], (str, bytes))):
        raise TypeError(f"{what}={answers!r:.80} are words, not token ids: pass their sub-token ids, e.g. "
                        f"[metrics.answer_tokens(tokenizer, w) for w in words] (or metrics.answer_token for the first)")
    nested = (isinstance(answers, Tensor) and answers.ndim == 2) or (
        isinstance(answers, Sequence) and len(answers) and isinstance(answers[0], (Sequence, Tensor))
        and not (isinstance(answers[0], Tensor) and answers[0].ndim == 0))
    if not nested:
        t = torch.as_tensor(_ids(answers, what))
        shared = t.ndim == 0
        t = t.reshape(-1, 1).long()
        return AnswerTable(t, torch.ones_like(t, dtype=torch.bool), shared)
    rows = []
    for i, row in enumerate(answers):
        if isinstance(row, (Sequence, Tensor)) and not len(row):
            raise ValueError(f"{what}[{i}] is empty: every answer needs at least one token id")
        try:
            r = torch.as_tensor(row)
        except (TypeError, ValueError, RuntimeError):
            r = None
        if r is None or r.ndim != 1 or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise TypeError(f"{what}[{i}]={row!r:.80} is not a list of token ids: pass one list of sub-token ids per "
                            "example")
        rows.append(r.long())
    if not rows:
        raise ValueError(f"{what} is empty: pass one answer per example")
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], batch_first=True)
    return AnswerTable(ids, mask, shared=False)


def _check_vocab(ids: Tensor, mask: Tensor, V: int, what: str) -> None:
    real = ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
        bad = real[(real < 0) | (real >= V)][0]
        raise ValueError(f"{what}: token id {int(bad)} is out of range for a vocabulary of {V}")


@strict
def answer_prob(answers: AnswerIds | AnswerTable, policy: str = "first", position: Position = -1) -> Metric:
    """P(answer) at `position` under an explicit answer-token policy, for answers of one or more sub-tokens
    (`answers`: see `answer_table`; one list of `answer_tokens` per example):

        first: P of the answer's first sub-token (V-SEAM's head scores, ablations and rescaling; BLIP-VQA).
        last: P of its last sub-token (NOTICE's LLaVA answers).
        sum: the sum of P over its distinct sub-tokens, all read at `position` (V-SEAM's patching metric).
        sequence: P of the whole sequence, teacher-forced: the inputs must hold the answer's tokens right after
            the prompt, `position` is the prompt's last token, and sub-token j is read at position + j.
    """
    if policy not in ANSWER_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(ANSWER_POLICIES)}, got {policy!r}")
    table, position = answer_table(answers), _ids(position, "position")

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        examples = examples.to(logits.device)
        ids, mask, unique, lengths = table.rows(examples)
        rows = torch.arange(ids.shape[0], device=ids.device)
        if policy == "sequence":
            if logits.ndim != 3:
                raise ValueError("policy='sequence' reads one position per answer token: pass [N, T, V] logits")
            T = logits.shape[1]
            start = per_row(position, examples, "position", T) % T
            at = start[:, None] + torch.arange(ids.shape[1], device=ids.device)  # [N, K]
            if int(torch.where(mask, at, 0).max()) >= T:
                raise ValueError(f"policy='sequence': the answer's tokens run past the {T} positions of the inputs; "
                                 "append each answer to its prompt and pass the prompt's last position")
            lp = logits[rows[:, None], at.clamp(max=T - 1)].float().log_softmax(-1)  # [N, K, V]
            _check_vocab(ids, mask, lp.shape[-1], "answers")
            picked = lp.gather(-1, ids[..., None])[..., 0]
            return torch.where(mask, picked, 0.0).sum(1).exp()
        p = logits_at(logits, position, examples).float().softmax(-1)  # [N, V]
        _check_vocab(ids, mask, p.shape[-1], "answers")
        if policy == "first":
            return p[rows, ids[:, 0]]
        if policy == "last":
            return p[rows, ids[rows, lengths - 1]]
        return torch.where(unique, p.gather(1, ids), 0.0).sum(1)

    return metric


@strict
def answer_logit(answers: AnswerIds | AnswerTable, policy: str = "mean", position: Position = -1) -> Metric:
    """The logit of the answer at `position`: of its first or last sub-token, or the mean over its distinct
    sub-tokens (`mean`, V-SEAM's second patching metric)."""
    if policy not in LOGIT_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(LOGIT_POLICIES)}, got {policy!r}")
    table, position = answer_table(answers), _ids(position, "position")

    def metric(logits: Tensor, examples: Tensor) -> Tensor:
        examples = examples.to(logits.device)
        ids, mask, unique, lengths = table.rows(examples)
        rows = torch.arange(ids.shape[0], device=ids.device)
        at = logits_at(logits, position, examples).float()
        _check_vocab(ids, mask, at.shape[-1], "answers")
        if policy == "first":
            return at[rows, ids[:, 0]]
        if policy == "last":
            return at[rows, ids[rows, lengths - 1]]
        return torch.where(unique, at.gather(1, ids), 0.0).sum(1) / unique.sum(1)

    return metric


@strict
def correct(logits: Float[Tensor, "B *T V"], answers: AnswerIds | AnswerTable, position: Position = -1) -> Bool[Tensor, "B"]:
    """Per example, whether the model's top token at `position` is one of its answer's sub-tokens (V-SEAM's
    correctness: `argmax in tokenizer.encode(answer)`); with one id per example, whether it is that id."""
    table, position = answer_table(answers), _ids(position, "position")
    examples = torch.arange(logits.shape[0], device=logits.device)
    ids, mask, _, _ = table.rows(examples)
    top = logits_at(logits, position, examples).argmax(-1)
    return ((ids == top[:, None]) & mask).any(1)


def evaluate(metric: Metric, logits: Tensor, examples: Int[Tensor, "N"], where: str,
             n_examples: int | None = None) -> Float[Tensor, "N"]:
    """`metric(logits, examples)`, checked to be one number per row (the sweeps stack variants along the batch).

    `n_examples`: the whole batch's example count when the rows hold only some of its examples (a chunk of a
    sweep; `examples` are then indices in the whole batch): `n_examples(examples)` and so `per_row` read it while
    the metric runs."""
    if n_examples is None:
        values = metric(logits, examples)
    else:
        if examples.numel() and not 0 <= int(examples.min()) <= int(examples.max()) < n_examples:
            raise ValueError(f"rows of examples {int(examples.min())}..{int(examples.max())} are not examples of a "
                             f"batch of {n_examples}")
        token = _N_EXAMPLES.set(n_examples)
        try:
            values = metric(logits, examples)
        finally:
            _N_EXAMPLES.reset(token)
    n = examples.shape[0]
    if not isinstance(values, Tensor):
        raise TypeError(f"the metric of {where} returned a {type(values).__name__}: it must return a tensor with "
                        f"one value per row, shape [{n}]")
    if values.shape != (n,):
        raise ValueError(f"the metric of {where} returned shape {tuple(values.shape)} for {n} rows: it must return one "
                         f"value per row, shape [{n}] (reduce over positions and vocabulary, not over the batch)")
    return values


def check_finite(values: Tensor, what: str, examples: Tensor | None = None) -> None:
    """Raise if a metric came out NaN or infinite (a half-precision overflow, a log of 0): averaged into a sweep, it
    would turn the result into NaN with no word of why. `examples`: the index of each value's example in the whole
    batch, for the message (None: its position in `values`)."""
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = bad.nonzero().flatten()
        rows = (rows if examples is None else examples.cpu()[rows.cpu()]).tolist()
        raise ValueError(f"the metric is {values[bad][0].item()} for {what} {rows[:8]}: check the model's dtype "
                         "(float16 overflows; try float32) and the metric (a log of a zero probability)")


def check_normalizable(clean: Float[Tensor, "B"], corrupt: Float[Tensor, "B"], examples: Tensor | None = None
                       ) -> None:
    """Raise if some example's clean and corrupted metrics are equal (within rounding): normalising divides by
    their difference, which would give +-inf or NaN for that example. `examples`: each value's index in the whole
    batch, for the message (None: its position)."""
    clean, corrupt = clean.float(), corrupt.float()
    tol = 1e-6 * torch.maximum(clean.abs(), corrupt.abs()).clamp(min=1e-30)
    equal = ((clean - corrupt).abs() <= tol).nonzero().flatten().tolist()
    if equal:
        named = equal if examples is None else examples.cpu()[equal].tolist()
        raise ValueError(f"normalize=True, but examples {named[:8]} have equal clean and corrupted metrics "
                         f"({clean[equal[0]].item():.6g}), so their normalised effect is undefined: drop those "
                         "examples (the corruption does not change the metric) or pass normalize=False")


@strict
def normalized(value: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """(m - m_corrupt) / (m_clean - m_corrupt): 0 at the corrupted run, 1 at the clean one. Raises where the clean
    and corrupted metrics are equal (see `check_normalizable`)."""
    check_normalizable(clean.flatten(), corrupt.flatten())
    return (value - corrupt) / (clean - corrupt)
