"""Keys and values of a tower's blocks kept between generation steps, or standing for a prefix of the sequence when
a causal tower resumes on its suffix (`HookedVLM.prefix_cache`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from .attention import LayerKV
from .block import BlockKV


@dataclass
class KVCache:
    blocks: list[BlockKV]
    length: int = 0  # positions already processed

    @classmethod
    def for_tower(cls, tower) -> "KVCache":
        return cls([block.new_kv() for block in tower.blocks])

    @classmethod
    def prefix(cls, kv: Sequence[tuple[Float[Tensor, "B S H_kv d"], Float[Tensor, "B S H_kv d"]] | None],
               length: int) -> "KVCache":
        """A cache of the first `length` positions, from each block's self-attention (keys, values) as the cache
        stores them (None: a block the resumed run does not reach)."""
        blocks = [BlockKV(LayerKV() if pair is None else LayerKV(pair[0][:, :length], pair[1][:, :length]), LayerKV())
                  for pair in kv]
        return cls(blocks, length=length)

    def select(self, rows) -> "KVCache":
        """A new cache of the batch rows `rows` ([N] indices, in that order; repeats allowed, e.g. several stacked
        variants of each example); this one is left as it is (a forward updates a cache in place)."""

        def pick(layer: LayerKV) -> LayerKV:
            return LayerKV() if layer.k is None else LayerKV(layer.k[rows], layer.v[rows])

        return KVCache([BlockKV(pick(b.attn), pick(b.cross_attn)) for b in self.blocks], length=self.length)

    def reorder(self, index) -> None:
        """Keep only the batch rows in `index` (generation drops no rows today; kept for beam-style callers)."""
        for kv in self.blocks:
            for layer in (kv.attn, kv.cross_attn):
                if layer.k is not None:
                    layer.k, layer.v = layer.k[index], layer.v[index]
