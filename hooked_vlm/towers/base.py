"""What every tower shares: the model can skip a tower by handing it its output, or resume it at a block from a
cached stream. Patching sweeps use this to avoid re-running what a patch cannot change (`HookedVLM.resume`)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.given_output: Tensor | None = None  # returned as the tower's output, nothing computed
        self.resume_at: tuple[int, Tensor] | None = None  # (block, stream entering it): skip what comes before
        # causal towers that take a KV cache can also resume on a suffix of the sequence: the keys and values of
        # the prefix (positions the resumed run cannot change) come from this cache instead of being recomputed
        self.resume_past = None
        self.prefix_resumable = False
        self.recorded_output: Tensor | None = None  # set on every forward while `record_output` is on
        self.record_output = False
        # absolute position of the current forward's first token: 0, or while generating with a KV cache the
        # number of tokens already processed (hooks that address positions read it, e.g. attention knockout)
        self.position_offset = 0

    def start(self) -> tuple[int, Float[Tensor, "B T D"] | None]:
        """(first block to run, its input); (0, None) unless resuming: then the tower skips its embeddings."""
        return self.resume_at if self.resume_at is not None else (0, None)

    def finish(self, output: Tensor) -> Tensor:
        if self.record_output:
            self.recorded_output = output
        return output
