"""Does the model still name the object? Generation- and first-token-based evaluation in left-padded batches, with
interventions built per batch from its own positions (Neo et al.'s E2/E5 metrics).

An `Edit` makes the hooks of one batch: `edit(positions, rows)` gets the batch's `model.positions(**inputs)` (its
padding, image spans and last tokens) and the indices of its examples in the caller's lists, and returns hooks for
`run_with_hooks` / `generate(fwd_hooks=...)`. So token sets are given per example, in a form that survives
padding (image-token indices or patch masks), and turned into positions inside each batch.

Word matching follows Neo et al.'s code (clemneo/llava-interp):
- generative: the class name is a case-sensitive substring of the description (`class_name in answer`: "dog"
  matches "dogs" and "hotdog", not "Dog"; no plural or synonym handling);
- polling: "yes" is a substring of the lower-cased answer (`"yes" in answer.lower()`, so "eyes" counts too);
- VQA first token: the greedy next token after "... ASSISTANT: It is a", decoded and stripped, is a prefix of the
  class name's first sub-word (`first_token.lower().startswith(generated.lower())`); an empty decoded token
  counts as correct there ("x".startswith("") is True): `empty_counts`.
They decode the whole sequence (prompt included) for the first two; here only the new tokens are matched (the
prompts "Describe this image." and "Is there a {class} in this image?" contain neither the class name alone in a
description nor "yes", so the verdicts are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import interventions
from .data.collate import InputBatch, collate
from .hooks import HookSpec
from .models.base import HookedVLM
from .positions import ImageSpan, Positions
from .spatial import patch_positions

__all__ = ["Edit", "Generated", "Identification", "FirstToken", "prompt", "generate", "mentions", "says_yes",
           "class_token", "first_token_correct", "identification", "first_token", "replace_image_tokens",
           "knockout", "combine"]

Edit = Callable[[Positions, list[int]], list[HookSpec]]


def prompt(model: HookedVLM, question: str, suffix: str = "") -> str:
    """The family's chat prompt around `question` (`model.prompt_template`), then `suffix` (Neo et al.'s VQA
    prompt ends in " It is a"). Qwen2-VL's is its chat format with the image first, "<|im_start|>user\n
    <|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n" (no newline
    after "user\n"; the processor expands `<|image_pad|>` into the image's tokens), and a suffix continues the
    assistant's turn."""
    return model.prompt_template.format(question=question) + suffix


def batches(model: HookedVLM, images: Sequence[Any], texts: Sequence[str], batch_size: int
            ) -> Iterator[tuple[list[int], InputBatch]]:
    """(rows, inputs) for consecutive batches of at most `batch_size` (image, text) pairs (`data.collate`): the
    processor's output, left-padded, on the model's device, pixels in the model's dtype, with `inputs.positions`.
    `images`: PIL images or `ImageFile`s (opened batch by batch). Every forward of this module runs on one of
    these batches, so `batch_size` bounds each of them."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: pass one text per image")
    for batch in collate(model, zip(images, texts), batch_size=batch_size, side="left"):
        yield batch.index, batch


@dataclass
class Generated:
    """Greedy continuations: `texts` (new tokens decoded, special tokens skipped) and `tokens` (the new ids, pads
    dropped), one per example."""

    texts: list[str]
    tokens: list[Tensor]


@torch.no_grad()
def generate(model: HookedVLM, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 8, edit: Edit | None = None) -> Generated:
    """Greedy generation of every (image, prompt) in left-padded batches, with the hooks `edit` makes per batch
    active at every step (use `interventions.replace_positions(..., prefill_only=True)` in the edit for an edit of
    the prompt only, as Neo et al.'s `ablate_inputs`). A left-padded batch gives each example the tokens it gets
    alone."""
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    texts: list[str] = [""] * len(prompts)
    tokens: list[Tensor] = [torch.empty(0, dtype=torch.long)] * len(prompts)
    pad = getattr(tokenizer, "pad_token_id", None)
    for rows, inputs in batches(model, images, prompts, batch_size):
        hooks = edit(inputs.positions, rows) if edit is not None else []
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        for b, i in enumerate(rows):
            ids = new[b]
            if pad is not None:
                keep = ids != pad
                # pads follow an example's end; a pad id generated mid-text (when pad == eos) ends it too
                ids = ids[: int(keep.long().cumprod(0).sum())]
            tokens[i] = ids
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Generated(texts, tokens)


def mentions(text: str, word: str) -> bool:
    """Neo et al.'s generative check: `word in text`, case-sensitive substring."""
    return word in text


def says_yes(text: str) -> bool:
    """Neo et al.'s polling check: `"yes" in text.lower()`."""
    return "yes" in text.lower()


def class_token(tokenizer: Any, class_name: str) -> int:
    """The id of the class name's first sub-word as Neo et al. read its probability:
    `convert_tokens_to_ids(tokenize(class_name.lower())[0].strip())` (with the word-boundary marker, "▁dog")."""
    pieces = tokenizer.tokenize(class_name.lower())
    if not pieces:
        raise ValueError(f"class name {class_name!r} has no tokens")
    return int(tokenizer.convert_tokens_to_ids(pieces[0].strip()))


def first_token_correct(tokenizer: Any, generated: str, class_name: str, *, empty_counts: bool = True) -> bool:
    """Neo et al.'s VQA check (`format_and_compare_answers`): the generated token's text, stripped and lower-cased,
    is a prefix of the class name's first sub-word (its word-boundary marker "▁"/"Ġ" stripped), so "ca" counts for
    "car". An empty generated text (a space, a special token) is a prefix of everything: correct in their code,
    `empty_counts=False` counts it wrong."""
    text = generated.strip().lower()
    first = tokenizer.tokenize(class_name.lower())[0].strip().lstrip("Ġ▁").lower()
    if not text:
        return empty_counts
    return first.startswith(text)


@dataclass
class Identification:
    """Neo et al.'s generative and polling checks, [N] bool each, with the texts they read."""

    generative: Tensor
    polling: Tensor
    descriptions: list[str]
    answers: list[str]


def identification(model: HookedVLM, images: Sequence[Any], class_names: Sequence[str], *, edit: Edit | None = None,
                   max_new_tokens: int = 200, poll_tokens: int = 10, batch_size: int = 8,
                   describe: str = "Describe this image.", poll: str = "Is there a {name} in this image?"
                   ) -> Identification:
    """Generative: is the class named in a greedy `max_new_tokens`-token answer to `describe` (Neo et al.: 200)?
    Polling: is "yes" in a greedy `poll_tokens`-token answer to `poll` (10)? Both with the same `edit`."""
    if len(images) != len(class_names):
        raise ValueError(f"{len(images)} images but {len(class_names)} class names")
    described = generate(model, images, [prompt(model, describe)] * len(images), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, edit=edit)
    polled = generate(model, images, [prompt(model, poll.format(name=name)) for name in class_names],
                      max_new_tokens=poll_tokens, batch_size=batch_size, edit=edit)
    return Identification(torch.tensor([mentions(t, c) for t, c in zip(described.texts, class_names)]),
                          torch.tensor([says_yes(t) for t in polled.texts]), described.texts, polled.texts)


@dataclass
class FirstToken:
    """The greedy next token after the prompt, per example: `token` [N] and its `text`; `correct` [N] (Neo et
    al.'s check); `p_token` [N] its probability (their "generated_token_prob"); `p_class` [N] the probability of the
    class name's first sub-word (`class_token`); `probs` [N, V] float32 on the CPU only with `keep_probs=True`."""

    token: Tensor
    text: list[str]
    correct: Tensor
    p_token: Tensor
    p_class: Tensor
    probs: Tensor | None = None

    def p_of(self, tokens: Tensor) -> Tensor:
        """[N] the probability of one given token per example (e.g. the unedited run's `token`); needs `probs`."""
        if self.probs is None:
            raise ValueError("the probabilities were not kept: call first_token(..., keep_probs=True)")
        return self.probs[torch.arange(len(tokens)), tokens.cpu()]


@torch.no_grad()
def first_token(model: HookedVLM, images: Sequence[Any], questions: Sequence[str], class_names: Sequence[str], *,
                edit: Edit | None = None, suffix: str = " It is a", batch_size: int = 8, empty_counts: bool = True,
                keep_probs: bool = False) -> FirstToken:
    """Neo et al.'s VQA evaluation: one forward of `prompt(model, question, suffix)` per example (LLaVA: "USER:
    <image>\\n{question} ASSISTANT: It is a"), read at the last token."""
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    if not (len(images) == len(questions) == len(class_names)):
        raise ValueError(f"{len(images)} images, {len(questions)} questions, {len(class_names)} class names: pass one "
                         "of each per example")
    targets = torch.tensor([class_token(tokenizer, c) for c in class_names])
    token, p_token, p_class, probs_out = (torch.zeros(len(images), dtype=torch.long), torch.zeros(len(images)),
                                          torch.zeros(len(images)), [])
    texts = [""] * len(images)
    for rows, inputs in batches(model, images, [prompt(model, q, suffix) for q in questions], batch_size):
        positions = inputs.positions
        hooks = edit(positions, rows) if edit is not None else []
        logits = model.run_with_hooks(**inputs, fwd_hooks=hooks)
        at = logits[torch.arange(logits.shape[0], device=logits.device), positions.last.to(logits.device)]
        probs = at.float().softmax(-1).cpu()
        top = probs.argmax(-1)
        token[rows], p_token[rows] = top, probs.max(-1).values
        p_class[rows] = probs[torch.arange(len(rows)), targets[rows]]
        for b, i in enumerate(rows):
            texts[i] = tokenizer.decode([int(top[b])], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if keep_probs:
            probs_out.append(probs)
    correct = torch.tensor([first_token_correct(tokenizer, t, c, empty_counts=empty_counts)
                            for t, c in zip(texts, class_names)])
    return FirstToken(token, texts, correct, p_token, p_class, torch.cat(probs_out) if keep_probs else None)


# ------------------------------------------------------------------------------------------ edits
def _span(positions: Positions, b: int) -> ImageSpan:
    spans = positions.image[b] if positions.image else []
    if len(spans) != 1:
        raise ValueError(f"example {b} has {len(spans)} image spans; these edits take one image per example")
    return spans[0]


def _resolve(span: ImageSpan, tokens: Tensor | Sequence[int]) -> Tensor:
    """A token set in the batch's positions: a [grid, grid] bool patch mask (via the span's patch labels), or
    indices of the image's tokens (0 = the span's first token)."""
    t = torch.as_tensor(tokens)
    if t.dtype == torch.bool:
        return patch_positions(span, t)
    t = t.long().flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= span.stop - span.start):
        raise ValueError(f"image token indices {t.tolist()[:8]} are outside 0..{span.stop - span.start - 1}")
    return span.start + t


def replace_image_tokens(model: HookedVLM, token_sets: Sequence[Tensor | Sequence[int]], value: Tensor | float, *,
                         hook: str | None = None, prefill_only: bool = True) -> Edit:
    """An `Edit` replacing, in example i, the image tokens `token_sets[i]` (a [grid, grid] patch mask, e.g.
    `spatial.object_patches`, or image-token indices) at `hook` (default `model.image_embeddings_hook`: the LM's
    input embeddings) by `value` (Neo et al.'s mean visual token, or 0), on the prompt's forward only by default
    (their `ablate_inputs` skips the one-token generation steps)."""
    name = hook or model.image_embeddings_hook

    def edit(positions: Positions, rows: list[int]) -> list[HookSpec]:
        where = [_resolve(_span(positions, b), token_sets[i]).tolist() for b, i in enumerate(rows)]
        return [interventions.replace_positions(model, name, where, value, prefill_only=prefill_only)]

    return edit


def knockout(model: HookedVLM, objects: Sequence[Mapping[int, Tensor]], token_set: str, layers: Sequence[int], *,
             tower: str = "lm") -> Edit:
    """An `Edit` knocking out Neo et al.'s `token_set` (one of `interventions.NEO_TOKEN_SETS`) in `layers`, per
    example from its object patches `objects[i]` = {buffer: patch mask} for buffers 0, 1, 2 and the batch's
    positions (image span, last token)."""
    if token_set not in interventions.NEO_TOKEN_SETS:
        raise ValueError(f"token_set={token_set!r}: pass one of {', '.join(interventions.NEO_TOKEN_SETS)}")

    def edit(positions: Positions, rows: list[int]) -> list[HookSpec]:
        queries, keys = [], []
        for b, i in enumerate(rows):
            q, k = interventions.neo_token_sets(_span(positions, b), objects[i], int(positions.last[b]))[token_set]
            queries.append(q)
            keys.append(k)
        return interventions.attention_knockout(model, queries, keys, layers, tower=tower)

    return edit


def combine(*edits: Edit | None) -> Edit:
    """One `Edit` making the hooks of all of `edits` (None skipped), in order."""
    def edit(positions: Positions, rows: list[int]) -> list[HookSpec]:
        return [h for e in edits if e is not None for h in e(positions, rows)]

    return edit
