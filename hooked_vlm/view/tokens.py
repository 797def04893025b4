"""What each position of a tower's sequence is, for the views: its label and, for an image token, its patch.

The prompt tower's labels are `model.to_str_tokens`'s (LLaVA's image tokens `<image 0:r,c>`), its patches come
from `cache.positions`' image spans; the other towers `Positions.towers` describes are labelled from their ids
(InstructBLIP's Q-Former: its learned queries `query q`); a vision tower's sequence (its length is the patch grid's,
with or without a class token first) is labelled by patch row and column. Nothing here knows a family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..positions import Positions


@dataclass
class TokenAxis:
    """One sequence: per position a label, the image it shows (-1: none) and its patch row and column (-1: not a
    patch), and whether it is a real (non-pad) token."""

    labels: list[str]
    image: list[int]
    rows: list[int]
    cols: list[int]
    real: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.real = self.real or [True] * n
        if not len(self.image) == len(self.rows) == len(self.cols) == len(self.real) == n:
            raise ValueError(f"a token axis needs one image, row, column and mask entry per label ({n})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_patch(self) -> list[bool]:
        """Positions showing a patch of image 0, the image the views draw."""
        return [i == 0 and r >= 0 for i, r in zip(self.image, self.rows)]

    def drawing(self, image: int) -> "TokenAxis":
        """The same tokens with image `image` numbered 0 (the image the views draw) and image 0 numbered `image`."""
        swap = {image: 0, 0: image}
        return TokenAxis(self.labels, [swap.get(i, i) for i in self.image], self.rows, self.cols, self.real)

    def subset(self, idx: Sequence[int]) -> "TokenAxis":
        return TokenAxis(*([getattr(self, f)[i] for i in idx] for f in ("labels", "image", "rows", "cols", "real")))

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "image": self.image, "rows": self.rows, "cols": self.cols, "real": self.real}

    @classmethod
    def plain(cls, n: int, prefix: str = "") -> "TokenAxis":
        """n positions with no more known of them than their index."""
        return cls([f"{prefix}{i}" for i in range(n)], [-1] * n, [-1] * n, [-1] * n)

    @classmethod
    def patches(cls, n: int, grid: int) -> "TokenAxis":
        """A vision tower's sequence: the class token (if n = grid^2 + 1) first, then the patches row-major."""
        first = n - grid * grid
        if first not in (0, 1):
            raise ValueError(f"{n} tokens are not a {grid}x{grid} patch grid with or without a class token")
        rows = [-1] * first + [p // grid for p in range(grid * grid)]
        cols = [-1] * first + [p % grid for p in range(grid * grid)]
        labels = ["<cls>"] * first + [f"<patch {r},{c}>" for r, c in zip(rows[first:], cols[first:])]
        return cls(labels, [-1] * first + [0] * grid * grid, rows, cols)


def grid_size(model: Any) -> int | None:
    """The side of the model's square patch grid (its vision config's `grid`), or None where it has none (a grid
    that varies with the image: then only the image spans' rows and columns tell it)."""
    grid = getattr(getattr(getattr(model, "cfg", None), "vision", None), "grid", None)
    return int(grid) if isinstance(grid, int) else None


def image_grid(axes: Sequence[TokenAxis], model: Any) -> list[int] | None:
    """[rows, cols] of the patch grid the views draw: as far as image 0's tokens reach in `axes`, else the model's
    square grid, else None (no image grid)."""
    cells = [(r, c) for axis in axes for i, r, c in zip(axis.image, axis.rows, axis.cols) if i == 0 and r >= 0]
    if cells:
        return [max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1]
    grid = grid_size(model)
    return [grid, grid] if grid else None


def prompt_axis(model: Any, positions: Positions, example: int) -> TokenAxis:
    """The prompt tower's sequence of example `example`: `to_str_tokens` labels and the image spans' patches."""
    ids = positions.input_ids[example].cpu()
    labels = list(model.to_str_tokens(ids))
    n = len(labels)
    image, rows, cols = [-1] * n, [-1] * n, [-1] * n
    for k, span in enumerate(positions.image[example] if positions.image else []):
        for offset, (r, c) in enumerate(zip(span.rows.tolist(), span.cols.tolist())):
            image[span.start + offset], rows[span.start + offset], cols[span.start + offset] = k, r, c
    return TokenAxis(labels, image, rows, cols, [bool(m) for m in positions.attention_mask[example].tolist()])


def other_axis(model: Any, tower: str, positions: Positions, example: int) -> TokenAxis:
    """Another tower's sequence from `positions.towers[tower]`: ids decoded with the processor's tokenizer for that
    tower (`{tower}_tokenizer`, e.g. InstructBLIP's `qformer_tokenizer`) or the model's, -1 ids (learned queries)
    labelled by their place in the tower's image span."""
    ids = positions.input_ids[example].tolist()
    tokenizer = getattr(model.processor, f"{tower}_tokenizer", None) or model.tokenizer
    labels = [tokenizer.decode([i], clean_up_tokenization_spaces=False) if i >= 0 else "" for i in ids]
    n = len(ids)
    image, rows, cols = [-1] * n, [-1] * n, [-1] * n
    for k, span in enumerate(positions.image[example] if positions.image else []):
        for offset, (r, c) in enumerate(zip(span.rows.tolist(), span.cols.tolist())):
            p = span.start + offset
            image[p], rows[p], cols[p] = k, r, c
            if ids[p] < 0:
                labels[p] = f"<query {offset}>" if r < 0 else f"<image {k}:{r},{c}>"
    return TokenAxis(labels, image, rows, cols, [bool(m) for m in positions.attention_mask[example].tolist()])


def tower_axes(model: Any, positions: Positions | None, lengths: dict[str, int], example: int,
               rows: dict[str, int] | None = None) -> dict[str, TokenAxis]:
    """A `TokenAxis` for every tower whose sequence length `lengths` gives (read off the cached patterns), for
    example `example`; `rows`: a tower's row where it is not `example` (a tower whose rows are the images)."""
    grid = grid_size(model)
    axes: dict[str, TokenAxis] = {}
    for tower, n in lengths.items():
        described = positions is not None and (tower == model.prompt_tower or tower in positions.towers)
        if described and tower == model.prompt_tower:  # a length that differs: not its tokens (e.g. groups)
            axes[tower] = prompt_axis(model, positions, example) if positions.input_ids.shape[1] == n \
                else TokenAxis.plain(n)
        elif described:
            axes[tower] = other_axis(model, tower, positions.towers[tower], (rows or {}).get(tower, example)) \
                if positions.towers[tower].input_ids.shape[1] == n else TokenAxis.plain(n)
        elif grid and n - grid * grid in (0, 1):
            axes[tower] = TokenAxis.patches(n, grid)
        else:
            axes[tower] = TokenAxis.plain(n)
    return axes


def key_axis(model: Any, tower: str, n_keys: int, axes: dict[str, TokenAxis], order: Sequence[str]) -> TokenAxis:
    """The keys of `tower`'s cross-attention: the sequence of the nearest tower before it of that length (BLIP's
    question encoder reads the vision tower, its answer decoder the question encoder; T5's decoder its encoder), or
    the patch grid (with or without a class token) when no cached tower matches."""
    before = list(order[:list(order).index(tower)]) if tower in order else list(order)
    for other in reversed(before):
        if other in axes and len(axes[other]) == n_keys:
            return axes[other]
    grid = grid_size(model)
    if grid and n_keys - grid * grid in (0, 1):
        return TokenAxis.patches(n_keys, grid)
    return TokenAxis.plain(n_keys, "k")


def query_axis(axis: TokenAxis, n_queries: int) -> TokenAxis:
    """The queries of an attention that reads only part of its tower's sequence (the Q-Former's cross-attention:
    its learned queries, the tower's image span): those positions if they number `n_queries`, else the first."""
    if n_queries == len(axis):
        return axis
    span = [i for i, img in enumerate(axis.image) if img >= 0]
    return axis.subset(span if len(span) == n_queries else range(n_queries))
