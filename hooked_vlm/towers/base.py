"""What every tower shares: the model can skip a tower by handing it its output, or resume it at a block from a
cached stream (a causal tower: on the suffix after a prefix whose keys and values come from a cached run,
`prefix_cache`). Patching sweeps use this to avoid re-running what a patch cannot change (`HookedVLM.resume`)."""

from __future__ import annotations

from collections.abc import Mapping

from jaxtyping import Float
from torch import Tensor, nn

from ..cache import ActivationCache
from ..components.kv_cache import KVCache
from ..hooks import HookPoint, PerCall


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

    def cached_kv_hooks(self, layer: int) -> tuple[HookPoint, HookPoint]:
        """The hook points whose outputs block `layer`'s KV cache holds: (keys, values). Only a `prefix_resumable`
        tower has them."""
        raise ValueError(f"{type(self).__name__} cannot resume on a suffix (it is not a causal tower with a KV cache)")

    def prefix_cache(self, activations: ActivationCache | Mapping[str, Tensor], length: int,
                     start_layer: int = 0) -> KVCache:
        """A KV cache of the first `length` positions for blocks `start_layer` on, from a cached run's activations at
        `cached_kv_hooks` (the `prefix` of `HookedVLM.resume`)."""
        kv: list[tuple[Tensor, Tensor] | None] = []
        for i in range(len(self.blocks)):
            if i < start_layer:  # the resumed run starts after these blocks: it never reads their cache
                kv.append(None)
                continue
            names = [hook.name for hook in self.cached_kv_hooks(i)]
            missing = next((name for name in names if name not in activations), None)
            if missing is not None:
                raise KeyError(f"the cache holds no {missing!r}: cache the names from model.prefix_hook_names() in "
                               "the run whose prefix is kept")
            k, v = (activations[name] for name in names)
            if not 0 < length <= k.shape[1]:
                raise ValueError(f"prefix length {length} is not in 1..{k.shape[1]} (the cached run's positions)")
            kv.append((k, v))
        return KVCache.prefix(kv, length)

    def start(self) -> tuple[int, Float[Tensor, "B T D"] | None]:
        """(first block to run, its input); (0, None) unless resuming: then the tower skips its embeddings."""
        return self.resume_at if self.resume_at is not None else (0, None)

    def finish(self, output: Tensor) -> Tensor:
        if self.record_output:
            self.recorded_output = output
        return output
