"""Bookkeeping for converters: every source key is used or dropped on purpose, so that a checkpoint with a tensor
the converter does not know is an error naming it, never silently ignored."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class SourceWeights:
    def __init__(self, state: Mapping[str, Tensor], source: str):
        self.state, self.source = state, source
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            close = [k for k in self.state if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
            raise KeyError(f"{self.source}: the checkpoint has no tensor {key!r} (similar: {close})")
        self.used.add(key)
        return self.state[key]

    def drop(self, key: str, same_as: str | None = None) -> None:
        """Mark a key as deliberately unused: an alias of a tied tensor (`same_as`, checked) or unused by design."""
        tensor = self.take(key)
        if same_as is not None and not tensor.is_meta and not torch.equal(tensor, self.state[same_as]):
            raise ValueError(f"{self.source}: {key} was expected to be tied to {same_as}, but they differ")

    def drop_prefix(self, prefix: str) -> list[str]:
        """Mark every key under `prefix` as unused by design (say why at the call); returns them."""
        keys = [k for k in self.state if k.startswith(prefix)]
        self.used.update(keys)
        return keys

    def copy(self, table: Mapping[str, str], dst_prefix: str = "", src_prefix: str = "") -> None:
        """Copy tensors as they are: {destination name: source name} under the two prefixes."""
        for dst, src in table.items():
            self.out[dst_prefix + dst] = self.take(src_prefix + src)

    def concat(self, dst: str, srcs: list[str]) -> None:
        """Fuse tensors along the output dimension (q, k, v into one projection)."""
        self.out[dst] = torch.cat([self.take(s) for s in srcs], dim=0)

    def finish(self) -> dict[str, Tensor]:
        unused = sorted(set(self.state) - self.used)
        if unused:
            raise ValueError(f"{self.source}: the converter does not know these tensors: {unused}")
        return self.out
