"""Where things are in a model's input sequence, per example, so that no analysis hard-codes an offset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .tokens import BOUNDARY_PIECES


@dataclass
class ImageSpan:
    """The tokens of one image in a sequence: `start` to `stop` (exclusive); token i of the span shows patch
    (`rows[i]`, `cols[i]`) of the image's patch grid (-1 for tokens that are not a patch, such as a class token)."""

    start: int
    stop: int
    rows: Tensor
    cols: Tensor

    @property
    def indices(self) -> Tensor:
        return torch.arange(self.start, self.stop)

    def patches(self, rows: range | list[int], cols: range | list[int]) -> Tensor:
        """Sequence positions of the tokens showing the given patch rows and columns."""
        keep = torch.isin(self.rows, torch.as_tensor(list(rows))) & torch.isin(self.cols, torch.as_tensor(list(cols)))
        return self.indices[keep]


def image_spans(is_image: Bool[Tensor, "B T"], tokens_per_image: int, rows: Int[Tensor, "N"] | None = None,
                cols: Int[Tensor, "N"] | None = None) -> list[list[ImageSpan]]:
    """Per example, the spans of its images' tokens in a sequence whose placeholders `is_image` marks.

    Images fill the placeholders in order, `tokens_per_image` each, as HF's `masked_scatter` writes them (LLaVA:
    its patches; InstructBLIP: its queries); so adjacent images, one run of placeholders, are cut apart by count,
    and an image whose placeholders are not consecutive gets one span per consecutive run. `rows` and `cols`
    [tokens_per_image]: each image token's patch-grid row and column (None: -1, not a patch).
    """
    not_patch = torch.full((tokens_per_image,), -1)
    rows = not_patch if rows is None else rows
    cols = not_patch if cols is None else cols
    out = []
    for row in is_image.cpu():  # one transfer; spans are Python ints
        idx = torch.nonzero(row).flatten().tolist()
        spans = []
        for first in range(0, len(idx), tokens_per_image):
            image = idx[first:first + tokens_per_image]
            run = 0  # the image token where the current consecutive run starts
            for k in range(1, len(image) + 1):
                if k == len(image) or image[k] != image[k - 1] + 1:
                    spans.append(ImageSpan(image[run], image[k - 1] + 1, rows[run:k], cols[run:k]))
                    run = k
        out.append(spans)
    return out


@dataclass
class Positions:
    """Positions in the token sequence of a model's prompt (BLIP: the text the text tower reads; LLaVA and
    InstructBLIP: the language model's input), per example.

    `attention_mask` marks real tokens; `image[b]` lists the image spans of example b (empty for BLIP, whose image
    enters by cross-attention).
    """

    input_ids: Int[Tensor, "B T"]
    attention_mask: Int[Tensor, "B T"]
    image: list[list[ImageSpan]] = field(default_factory=list)
    # positions in the sequences of other towers, by tower name (InstructBLIP: "qformer", whose learned queries are
    # its image span and whose input_ids hold -1 there; T5: "lm_decoder")
    towers: dict[str, "Positions"] = field(default_factory=dict)

    @property
    def last(self) -> Int[Tensor, "B"]:
        """Index of the last real (non-pad) token of each example."""
        T = self.attention_mask.shape[1]
        idx = torch.arange(T, device=self.attention_mask.device).expand_as(self.attention_mask)
        return torch.where(self.attention_mask.bool(), idx, -1).max(dim=1).values

    @property
    def image_mask(self) -> Bool[Tensor, "B T"]:
        """True at the positions of every image span (on the CPU)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for b, spans in enumerate(self.image):
            for span in spans:
                mask[b, span.start:span.stop] = True
        return mask

    @property
    def image_examples(self) -> Int[Tensor, "n_images"]:
        """The example each image of the batch belongs to, image by image in the order the inputs hold them (the
        image spans in order, example by example): row i of a tower with one row per image (the vision tower and
        projector of LLaVA and Qwen2-VL) belongs to example `image_examples[i]`. Several images in one prompt give
        that example several rows; a text-only example has none. Each image is one span here, as every model's
        `positions` gives them (a model whose images enter by cross-attention, such as BLIP, has no spans: empty)."""
        return torch.tensor([b for b, spans in enumerate(self.image) for _ in spans], dtype=torch.long)

    @property
    def text(self) -> list[Tensor]:
        """Per example, the positions of real tokens that are not image tokens."""
        out = []
        for b in range(self.attention_mask.shape[0]):
            keep = self.attention_mask[b].bool().clone()
            for span in self.image[b] if self.image else []:
                keep[span.start:span.stop] = False
            out.append(torch.nonzero(keep).flatten())
        return out

    def find(self, tokenizer, phrase: str, example: int = 0, occurrence: int = 0) -> Tensor:
        """Positions of the tokens that spell `phrase` in example `example`'s prompt (its `occurrence`-th match).

        Tries the phrase's own tokens first (as inside a sentence, with a leading space, then without); if the
        tokenizer merged it with its neighbours ("picture?" as one token), the tokens whose text overlaps the
        phrase in the decoded prompt. An error lists the prompt's tokens if it is not there.
        """
        ids = self.input_ids[example].tolist()
        for variant in (" " + phrase.strip(), phrase.strip()):
            target = tokenizer(variant, add_special_tokens=False)["input_ids"]
            matches = [i for i in range(len(ids) - len(target) + 1) if target and ids[i:i + len(target)] == target]
            if len(matches) > occurrence:
                return torch.arange(matches[occurrence], matches[occurrence] + len(target))
        # character level: where each token's text ends in the decoded prompt
        ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
        text = tokenizer.decode(ids)
        start = -1
        for _ in range(occurrence + 1):
            start = text.find(phrase.strip(), start + 1)
            if start < 0:
                break
        if start >= 0:
            stop = start + len(phrase.strip())
            begins = [0] + ends[:-1]
            hits = [i for i, (b, e) in enumerate(zip(begins, ends)) if b < stop and e > start]
            if hits:
                return torch.tensor(hits)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{phrase!r} does not occur {occurrence + 1} time(s) in example {example}, whose tokens "
                         f"are {tokens}")

    def find_each(self, tokenizer, words: str | Sequence[str], *, sub_token: Literal["first", "last"],
                  occurrence: int = 0) -> Int[Tensor, "B"]:
        """Per example, the position of one sub-token of a whole word of its prompt: `words[b]` (or one word for
        all) at its `occurrence`-th whole-word match in example b, its first or last sub-token (`sub_token`, no
        default: NOTICE's BLIP code reads the first wordpiece of the answer word, its LLaVA code the last).

        Whole words only: "cat" is not found inside "cats", nor "at" inside "cat"; a word-boundary piece alone
        (sentencepiece's "▁" before "b l u e") is not a sub-token of the word. The result [B] indexes the
        sequence this object describes (image tokens included), e.g. `patch_heads(..., positions=toi[:, None],
        by_position=True)` patches one head at each example's token of interest. An error lists the prompt's
        tokens when a word is not there.
        """
        if sub_token not in ("first", "last"):
            raise ValueError(f"sub_token must be 'first' or 'last', got {sub_token!r}")
        B = self.input_ids.shape[0]
        words = [words] * B if isinstance(words, str) else list(words)
        if len(words) != B:
            raise ValueError(f"{len(words)} words for {B} examples: pass one word per example (or one str for all)")
        out = []
        for b, word in enumerate(words):
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"example {b}: the word must be a non-empty str, got {word!r}")
            ids = self.input_ids[b][self.attention_mask[b].bool()].tolist()
            offset = int(torch.nonzero(self.attention_mask[b]).flatten()[0]) if ids else 0  # left padding
            matches = _whole_word_matches(tokenizer, ids, word.strip())
            if len(matches) <= occurrence:
                raise ValueError(f"{word!r} does not occur {occurrence + 1} time(s) as a whole word in example {b}, "
                                 f"whose tokens are {tokenizer.convert_ids_to_tokens(ids)}")
            start, stop = matches[occurrence]
            out.append(offset + (start if sub_token == "first" else stop - 1))
        return torch.tensor(out, dtype=torch.long)


def _whole_word_matches(tokenizer, ids: list[int], word: str) -> list[tuple[int, int]]:
    """[start, stop) of each run of `ids` that spells `word` as a whole word (nothing glued on either side), in
    order, without a leading word-boundary piece."""
    found: dict[int, int] = {}
    for variant in (" " + word, word):
        target = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
        pieces = tokenizer.convert_ids_to_tokens(target)
        while target and pieces[0] in BOUNDARY_PIECES:  # "▁" "b" "l" "u" "e": the word is "b" .. "e"
            target, pieces = target[1:], pieces[1:]
        n = len(target)
        for i in range(len(ids) - n + 1 if n else 0):
            if i not in found and ids[i:i + n] == target and not _glued(tokenizer, ids, i, i + n):
                found[i] = i + n
    return sorted(found.items())


def _glued(tokenizer, ids: list[int], start: int, stop: int) -> bool:
    """Whether the token before `start` or the one at `stop` continues the word (decoded, the characters meet
    without a space: "cat" + "##s", "▁ca" + "t")."""
    def joins(a: list[int], b: list[int]) -> bool:
        left, both = tokenizer.decode(a), tokenizer.decode(a + b)
        rest = both[len(left):] if both.startswith(left) else " "
        return bool(left) and left[-1].isalnum() and rest[:1].isalnum()

    return (start > 0 and joins(ids[start - 1:start], ids[start:stop])) or (
        stop < len(ids) and joins(ids[start:stop], ids[stop:stop + 1]))
