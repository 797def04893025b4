"""Positions and groups of positions: what one cell of a sweep patches, and the patch functions that write it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..models.base import HookedVLM
from ..positions import Positions

GROUP_NAMES = ("all", "text", "image", "last")

# (activation, source activation, variant, example, offset): the activation may cover only the positions from
# `offset` on (a run resumed on a suffix); the source always covers the whole sequence
Patch = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class ImagePatches:
    """A group: the tokens of image `image` (its span index in `Positions.image`) that show patch-grid rows
    `rows` and columns `cols` (`ImageSpan.patches`), looked up per example in the swept sequence's `Positions`: an
    object's patches, with no hard-coded offset."""

    rows: Sequence[int]
    cols: Sequence[int]
    image: int = 0

    def __call__(self, positions: Positions) -> list[Tensor]:
        out = []
        for b, spans in enumerate(positions.image or [[]] * positions.input_ids.shape[0]):
            if len(spans) <= self.image:
                raise ValueError(f"example {b} has {len(spans)} image span(s) in this sequence: there is no image "
                                 f"{self.image} to take patches from")
            out.append(spans[self.image].patches(self.rows, self.cols))
        return out

    @property
    def label(self) -> str:
        return f"image{self.image} rows {list(self.rows)} cols {list(self.cols)}"


def resolve_groups(groups: Any, positions: Positions | None, batch: int, length: int
                   ) -> tuple[list[str], list[list[Tensor]]]:
    """`groups` as names and, per group, one tensor of positions per example (each in 0..length-1, sorted, no
    repeats; may be empty for some examples, not for all).

    `groups` is a Mapping {name: group} or a sequence of groups (named by themselves: "image", ..., else
    "group{i}"); a group is: "all" (every position), "text" (the real non-image tokens), "image" (every image
    token), "last" (the last real token) - these from `positions`, the sequence's `Positions` (`cache.positions`);
    an `ImagePatches(rows, cols)` or any function of `positions` giving one list per example; an int or a list of
    ints shared by every example (negative counts from the end); one list (or tensor) of positions per example,
    ragged; or a [B, P] tensor."""
    if isinstance(groups, (str, ImagePatches, int)) or callable(groups) and not isinstance(groups, Sequence):
        groups = [groups]
    if isinstance(groups, Mapping):
        items = [(str(k), v) for k, v in groups.items()]
    elif isinstance(groups, (Sequence, Tensor)) and not isinstance(groups, str):
        items = [(_group_name(g, i), g) for i, g in enumerate(groups)]
    else:
        raise TypeError(f"groups={groups!r:.80} is not a list or a mapping of groups")
    if not items:
        raise ValueError("groups is empty: pass at least one group of positions")
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise ValueError(f"two groups are named {name!r}: name them with a mapping {{name: group}}")
        seen.add(name)
    return [n for n, _ in items], [_group(g, n, positions, batch, length) for n, g in items]


def _group_name(group: Any, i: int) -> str:
    if isinstance(group, str):
        return group
    if isinstance(group, ImagePatches):
        return group.label
    name = getattr(group, "__name__", None)
    return name if name and name != "<lambda>" else f"group{i}"


def _group(spec: Any, name: str, pos: Positions | None, B: int, T: int) -> list[Tensor]:
    if isinstance(spec, str):
        if spec == "all":
            return [torch.arange(T)] * B
        if spec not in GROUP_NAMES:
            raise ValueError(f"group {spec!r} is not one of {', '.join(GROUP_NAMES)}; pass positions for others")
        if pos is None:
            raise ValueError(f"group {spec!r} comes from the positions of the prompt's sequence (cache.positions), "
                             "which this tower does not read: pass positions (a list, or one per example) instead")
        if spec == "text":
            members = pos.text
        elif spec == "last":
            members = [p.reshape(1) for p in pos.last]
        else:
            members = [torch.cat([span.indices for span in spans]) if spans else torch.zeros(0, dtype=torch.long)
                       for spans in (pos.image or [[]] * B)]
            if not any(m.numel() for m in members):
                raise ValueError("group 'image': this sequence holds no image tokens (BLIP's image enters by "
                                 "cross-attention: sweep tower='vision' with groups=['all'] or positions of its "
                                 "patches)")
        return _members(members, name, B, T)
    if callable(spec) and not isinstance(spec, Tensor):
        if pos is None:
            raise ValueError(f"group {name!r} is a function of the sequence's Positions, which this tower has none "
                             "of: pass positions instead")
        spec = spec(pos)
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, Tensor):
        if spec.ndim == 2:
            return _members(list(spec), name, B, T)
        if spec.ndim > 2:
            raise ValueError(f"group {name!r}: a tensor of positions is [P] (shared) or [B, P], got "
                             f"{tuple(spec.shape)}")
        return _members([spec] * B, name, B, T)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
            if not spec:
                raise ValueError(f"group {name!r} is empty: give it at least one position")
            return _members([torch.tensor(list(spec))] * B, name, B, T)
        return _members(list(spec), name, B, T)
    raise TypeError(f"group {name!r} = {spec!r:.80} is not a name, positions or a function of Positions")


def _members(members: Sequence[Any], name: str, B: int, T: int) -> list[Tensor]:
    if len(members) != B:
        raise ValueError(f"group {name!r} gives positions for {len(members)} examples, the batch has {B}: give one "
                         "list per example (or one list shared by all)")
    out = []
    for b, m in enumerate(members):
        t = torch.as_tensor(m if isinstance(m, Tensor) else list(m), dtype=torch.long).flatten().cpu()
        if t.numel() and (int(t.min()) < -T or int(t.max()) >= T):
            bad = t[(t < -T) | (t >= T)][0]
            raise ValueError(f"group {name!r}, example {b}: position {int(bad)} is out of range for {T} positions")
        out.append(torch.unique(t % T))
    if not any(t.numel() for t in out):
        raise ValueError(f"group {name!r} holds no position in any example")
    return out


@dataclass
class _Cells:
    """The cells of a sweep's layer: cell v of example b patches positions `idx[v, b, valid[v, b]]` jointly.

    Rows are padded to one length: with the row's first position (a repeat writes the same value), or, for an
    empty row, with `cut` and its own value (a no-op)."""

    idx: Tensor  # [V, B, P] long
    valid: Tensor  # [V, B, P] bool
    names: list[str] | None = None
    whole_cut: int | None = None  # the whole batch's `cut`, kept by `select` (None: these rows' own)

    @classmethod
    def single(cls, pos: Int[Tensor, "B P"]) -> "_Cells":
        idx = pos.T.cpu().contiguous()[:, :, None]  # cell v of example b: position pos[b, v]
        return cls(idx, torch.ones_like(idx, dtype=torch.bool))

    @classmethod
    def groups(cls, group_names: list[str], members: list[list[Tensor]]) -> "_Cells":
        V, B = len(members), len(members[0])
        P = max(max(t.numel() for t in group) for group in members)
        cut = min(int(t.min()) for group in members for t in group if t.numel())
        idx = torch.full((V, B, P), cut, dtype=torch.long)
        valid = torch.zeros((V, B, P), dtype=torch.bool)
        for v, group in enumerate(members):
            for b, t in enumerate(group):
                if t.numel():
                    idx[v, b] = t[0]
                    idx[v, b, :t.numel()] = t
                    valid[v, b, :t.numel()] = True
        return cls(idx, valid, group_names)

    @property
    def n(self) -> int:
        return self.idx.shape[0]

    @property
    def cut(self) -> int:
        """The first position any cell patches: the positions before it are the target run's in every cell. For
        the rows of a chunk (`select`), the whole batch's, so that every chunk resumes as the whole batch does."""
        return self.whole_cut if self.whole_cut is not None else int(self.idx[self.valid].min())

    def select(self, rows: Tensor) -> "_Cells":
        """The cells of the examples `rows` (a chunk of the batch), keeping the whole batch's `cut`."""
        return _Cells(self.idx[:, rows], self.valid[:, rows], self.names, self.cut)

    def joined(self) -> "_Cells":
        """One cell patching every cell's positions together."""
        V, B, P = self.idx.shape
        idx, valid = self.idx.permute(1, 0, 2).reshape(1, B, V * P), self.valid.permute(1, 0, 2).reshape(1, B, V * P)
        return _Cells(idx, valid, ["all"], self.whole_cut)

    def _rows(self, variant: Tensor, example: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Each row's positions [N, P] and whether it patches them [N, P] (its padding repeats its first position,
        so a row patches all its entries or, when empty, none)."""
        variant, example = variant.cpu(), example.cpu()
        keep = self.valid[variant, example].any(-1, keepdim=True).expand(-1, self.idx.shape[2])
        return self.idx[variant, example].to(device), keep.to(device)

    def patch_stream(self) -> "Patch":
        """Cell v of example b takes the source's activation at its positions."""

        def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor, offset: int) -> Tensor:
            idx, keep = self._rows(variant, example, act.device)  # [N, P]
            rows = torch.arange(act.shape[0], device=act.device)[:, None]
            new = source[example.to(source.device)[:, None], idx.to(source.device)].to(act.device, act.dtype)
            old = act[rows, idx - offset]
            act = act.clone()
            act[rows, idx - offset] = torch.where(_expand(keep, new), new, old)
            return act

        return patch

    def patch_heads(self, n_cells: int, pattern: bool) -> "Patch":
        """Variant `head * n_cells + cell`: that head's activation at the cell's positions."""

        def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor, offset: int) -> Tensor:
            act = act.clone()
            view, src = _by_head(act, pattern), _by_head(source, pattern)
            head = (variant // n_cells).to(act.device)[:, None]
            idx, keep = self._rows(variant % n_cells, example, act.device)  # [N, P]
            rows = torch.arange(act.shape[0], device=act.device)[:, None]
            new = src[example.to(src.device)[:, None], idx.to(src.device), head.to(src.device)].to(act.device,
                                                                                                  act.dtype)
            old = view[rows, idx - offset, head]
            view[rows, idx - offset, head] = torch.where(_expand(keep, new), new, old)
            return act

        return patch

    def gather_sum(self, per_position: Tensor) -> Tensor:
        """[B, T, *rest] values per position -> [B, V, *rest] summed over each cell's positions."""
        idx, keep = self.idx.to(per_position.device), self.valid.to(per_position.device)  # [V, B, P]
        B = per_position.shape[0]
        rows = torch.arange(B, device=per_position.device)[None, :, None]
        picked = per_position[rows, idx]  # [V, B, P, *rest]
        picked = torch.where(_expand(keep, picked), picked, torch.zeros_like(picked))
        return picked.sum(2).transpose(0, 1)


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(*mask.shape, *([1] * (like.ndim - mask.ndim)))


def _by_head(t: Tensor, pattern: bool) -> Tensor:
    """A view [N, positions, heads, ...] of any head activation (the pattern is [N, heads, queries, keys])."""
    return t.transpose(1, 2) if pattern else t


def _make_cells(positions: Sequence[int] | Tensor | None, groups: Any, pos: Positions | None, B: int,
                length: int) -> _Cells:
    if groups is not None:
        if positions is not None:
            raise ValueError("pass positions (one position per cell) or groups (one group of positions per cell), "
                             "not both")
        return _Cells.groups(*resolve_groups(groups, pos, B, length))
    return _Cells.single(example_positions(positions, B, length))


def _tower_positions(model: HookedVLM, tower: str | None, positions: Positions | None) -> Positions | None:
    """The `Positions` of `tower`'s sequence, from the prompt's (`cache.positions`), where known."""
    if positions is None or tower is None:
        return None
    if tower == model.prompt_tower:
        return positions
    return positions.towers.get(tower)


def example_positions(positions: Sequence[int] | Tensor | None, B: int, length: int) -> Int[Tensor, "B P"]:
    """The `positions` argument of the sweeps as positions per example [B, P] in 0..length-1: None (every
    position), a list shared by the B examples, or a [B, P] tensor; negative positions count from the end. Raises a
    one-line error for an empty, non-integer, misshapen or out-of-range argument."""
    if positions is None:
        return torch.arange(length).expand(B, length)
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        pos = None
    if pos is not None and not pos.numel():
        raise ValueError("positions is empty: pass at least one position (or None for every position)")
    if pos is None or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"positions={positions!r:.80} are not integer positions: pass a list of ints or a [B, P] "
                        "integer tensor")
    pos = pos.long()
    pos = pos.expand(B, -1) if pos.ndim == 1 else pos
    if pos.ndim != 2 or pos.shape[0] != B:
        raise ValueError(f"positions must be a list or a [batch={B}, P] tensor, got shape {tuple(pos.shape)}")
    if pos.min() < -length or pos.max() >= length:
        bad = pos[(pos < -length) | (pos >= length)][0]
        raise ValueError(f"position {int(bad)} is out of range for {length} positions (valid: {-length}..{length - 1})")
    return pos % length
