"""Where things are in a model's input sequence, per example, so that no analysis hard-codes an offset."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor


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
