"""Conversion plans: how every hooked tensor is made from HF tensors, and how to undo it.

A converter never touches tensor data. It reads only the shapes of the HF state dict and records, for each hooked
tensor, a `Recipe`: which HF tensors, concatenated along dim 0, reshaped. That makes conversion

- streamable: a plan runs tensor by tensor from memory-mapped shards (`Recipe.build`), so converting a
  checkpoint never holds two copies of it;
- invertible: every recipe is a concatenation and a reshape, so `ConversionPlan.invert` gives back the HF state dict
  bit for bit (the export to transformers);
- checked: every HF key is used, tied to another on purpose (`aliases`) or unused by design (`unused`), so a
  checkpoint with a tensor the converter does not know is an error naming it, never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Recipe:
    """One hooked tensor: the HF tensors `sources` (of shapes `source_shapes`), concatenated along dim 0, then
    reshaped to `shape`."""

    sources: tuple[str, ...]
    source_shapes: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]

    def build(self, read: Callable[[str], Tensor]) -> Tensor:
        parts = [read(s) for s in self.sources]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return joined.reshape(self.shape)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        """The inverse of `build`: the HF tensors this hooked tensor was made of (views where possible)."""
        if len(self.sources) == 1:
            return {self.sources[0]: tensor.reshape(self.source_shapes[0])}
        joined = tensor.reshape(sum(s[0] for s in self.source_shapes), *self.source_shapes[0][1:])
        parts = joined.split([s[0] for s in self.source_shapes], dim=0)
        return {name: part.reshape(shape) for name, part, shape in zip(self.sources, parts, self.source_shapes)}


@dataclass
class ConversionPlan:
    source: str  # the HF class, for messages
    recipes: dict[str, Recipe]  # hooked name -> how to make it
    aliases: dict[str, str] = field(default_factory=dict)  # HF key -> the HF key it is tied to (equal values)
    unused: list[str] = field(default_factory=list)  # HF keys the hooked model does not use (kept for export)

    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Convert a whole in-memory HF state dict (views of it where a recipe is a plain copy)."""
        for alias, target in self.aliases.items():
            if not state[alias].is_meta and not torch.equal(state[alias], state[target]):
                raise ValueError(f"{self.source}: {alias} was expected to be tied to {target}, but they differ")
        return {name: recipe.build(state.__getitem__) for name, recipe in self.recipes.items()}

    def invert(self, hooked: Mapping[str, Tensor], unused: Mapping[str, Tensor] = {}) -> dict[str, Tensor]:
        """The HF state dict (every key, tied aliases included) that this plan converts into `hooked`.

        `unused`: the values of the HF keys the hooked model does not hold (`plan.unused`)."""
        out: dict[str, Tensor] = {}
        for name, recipe in self.recipes.items():
            for key, part in recipe.split(hooked[name]).items():
                if key in out and not torch.equal(out[key], part):
                    others = [n for n, r in self.recipes.items() if key in r.sources]
                    raise ValueError(f"{key} is held by {', '.join(others)} in the hooked model, and they now differ: "
                                     f"the HF model has one tensor for them; make the edit in all of them")
                out[key] = part
        missing = [k for k in self.unused if k not in unused]
        if missing:
            raise ValueError(f"{self.source}: the values of {missing[:3]}{' ...' if len(missing) > 3 else ''} (unused "
                             "by hooked_vlm) are not known; convert from the HF checkpoint again to export it")
        out.update({k: unused[k] for k in self.unused})
        for alias, target in self.aliases.items():
            out[alias] = out[target]
        return out


class SourceWeights:
    """Builds a `ConversionPlan` from the shapes of an HF state dict (tensors, possibly on the meta device)."""

    def __init__(self, state: Mapping[str, Tensor], source: str):
        self.state, self.source = state, source
        self.used: set[str] = set()
        self.recipes: dict[str, Recipe] = {}
        self.aliases: dict[str, str] = {}
        self.unused: list[str] = []

    def _shape(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            close = [k for k in self.state if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
            raise KeyError(f"{self.source}: the checkpoint has no tensor {key!r} (similar: {close})")
        self.used.add(key)
        return tuple(self.state[key].shape)

    def put(self, dst: str, srcs: str | list[str], shape: tuple[int, ...] | None = None) -> None:
        """`dst` is the tensor `srcs` (or several, concatenated along dim 0), reshaped to `shape` (one -1 allowed)."""
        srcs = [srcs] if isinstance(srcs, str) else srcs
        shapes = tuple(self._shape(s) for s in srcs)
        if len({s[1:] for s in shapes}) > 1:
            raise ValueError(f"{self.source}: cannot concatenate {srcs} of shapes {shapes} along dim 0")
        joined = (sum(s[0] for s in shapes), *shapes[0][1:])
        n = math.prod(joined)
        if shape is None:
            shape = joined
        elif -1 in shape:
            rest = math.prod(d for d in shape if d != -1)
            shape = tuple(n // rest if d == -1 else d for d in shape)
        if math.prod(shape) != n:
            raise ValueError(f"{self.source}: cannot reshape {srcs} ({n} elements) to {shape}")
        self.recipes[dst] = Recipe(tuple(srcs), shapes, tuple(shape))

    def copy(self, table: Mapping[str, str], dst_prefix: str = "", src_prefix: str = "") -> None:
        """Copy tensors as they are: {destination name: source name} under the two prefixes."""
        for dst, src in table.items():
            self.put(dst_prefix + dst, src_prefix + src)

    def concat(self, dst: str, srcs: list[str]) -> None:
        """Fuse tensors along the output dimension (q, k, v into one projection)."""
        self.put(dst, srcs)

    def drop(self, key: str, same_as: str) -> None:
        """`key` is an alias of the tied tensor `same_as` (checked when the plan runs)."""
        if self._shape(key) != self._shape(same_as):
            raise ValueError(f"{self.source}: {key} was expected to be tied to {same_as}, but their shapes differ")
        self.aliases[key] = same_as

    def drop_prefix(self, prefix: str) -> list[str]:
        """Mark every key under `prefix` as unused by design (say why at the call); returns them."""
        keys = [k for k in self.state if k.startswith(prefix)]
        self.used.update(keys)
        self.unused.extend(keys)
        return keys

    def finish(self) -> ConversionPlan:
        unknown = sorted(set(self.state) - self.used)
        if unknown:
            raise ValueError(f"{self.source}: the converter does not know these tensors: {unknown}")
        return ConversionPlan(self.source, self.recipes, self.aliases, self.unused)
