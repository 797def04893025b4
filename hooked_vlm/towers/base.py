"""What every tower shares: the model can skip a tower by handing it its output, or resume it at a block from a
cached stream. Patching sweeps use this to avoid re-running what a patch cannot change (`HookedVLM.resume`)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from ..hooks import PerCall


class Tower(nn.Module):
    """A stack of blocks. The switches below are set per call (by `HookedVLM.resume`, `run_with_cache(
    tower_outputs=True)` or the tower's own forward) and are `PerCall`: each thread sees only its own."""

    given_output: PerCall[Tensor | None] = PerCall(None)  # returned as the tower's output, nothing computed
    resume_at: PerCall[tuple[int, Tensor] | None] = PerCall(None)  # (block, stream entering it): skip what precedes
    # causal towers that take a KV cache can also resume on a suffix of the sequence: the keys and values of the
    # prefix (positions the resumed run cannot change) come from this cache instead of being recomputed
    resume_past: PerCall[object | None] = PerCall(None)
    recorded_output: PerCall[Tensor | None] = PerCall(None)  # set on every forward while `record_output` is on
    record_output: PerCall[bool] = PerCall(False)
    # absolute position of the current forward's first token: 0, or while generating with a KV cache the number of
    # tokens already processed (hooks that address positions read it, e.g. attention knockout)
    position_offset: PerCall[int] = PerCall(0)

    def __init__(self) -> None:
        super().__init__()
        self.prefix_resumable = False  # a property of the tower, not of a call

    def start(self) -> tuple[int, Float[Tensor, "B T D"] | None]:
        """(first block to run, its input); (0, None) unless resuming: then the tower skips its embeddings."""
        return self.resume_at if self.resume_at is not None else (0, None)

    def finish(self, output: Tensor) -> Tensor:
        if self.record_output:
            self.recorded_output = output
        return output
