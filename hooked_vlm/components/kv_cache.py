"""Keys and values of a tower's blocks kept between generation steps."""

from __future__ import annotations

from dataclasses import dataclass

from .block import BlockKV


@dataclass
class KVCache:
    blocks: list[BlockKV]
    length: int = 0  # positions already processed

    @classmethod
    def for_tower(cls, tower) -> "KVCache":
        return cls([block.new_kv() for block in tower.blocks])

    def reorder(self, index) -> None:
        """Keep only the batch rows in `index` (generation drops no rows today; kept for beam-style callers)."""
        for kv in self.blocks:
            for layer in (kv.attn, kv.cross_attn):
                if layer.k is not None:
                    layer.k, layer.v = layer.k[index], layer.v[index]
