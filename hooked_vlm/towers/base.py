"""The tower protocol, defined once: every tower is a stack of blocks that `Tower.run` drives through the same
steps, and a subclass supplies only what is its own (its inputs, embeddings, per-forward block inputs, output map).

    given output? ── yes ──────────────────────────────────────────────────────────────────> output
        │ no
    where to start: `start_at_layer` + `resid` (explicit), or the model's `resume` request, or block 0
        │
    embed_inputs(call)          unless started later from a stream
        │
    block_inputs(call, x)       masks, rotary tables, position bias, the attended sequence: once per forward
        │
    blocks[first:stop]          each with its slice of the KV cache (generation, or a resumed suffix's prefix)
        │
    output(call, x)             the tower's output map (final norm, feature concat, query slice)
        │
    recorded                    while `record_output` is on (`run_with_cache(tower_outputs=True)`)

`position_offset` is set on every forward: the number of positions the KV cache already holds (0 without one).
Patching sweeps use `given`/`resume` to avoid re-running what a patch cannot change (`HookedVLM.resume`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from ..cache import ActivationCache
from ..components.kv_cache import KVCache
from ..hooks import HookPoint, PerCall
from ..weights import TowerWeights


@dataclass(kw_only=True)
class TowerCall:
    """One forward of a tower: its inputs (each tower's subclass adds its own fields) and the protocol's choices."""

    past: KVCache | None = None  # keys and values of earlier positions, updated in place; None: none
    stop_at_layer: int | None = None  # run blocks up to this one, excluded (slice semantics); None: all
    keep_streams: tuple[int, ...] = ()  # block counts whose streams `output` reads (`streams[c]`: after c blocks)
    # filled by `Tower.run`
    first: int = 0  # the first block run
    offset: int = 0  # absolute position of the first new token (= `Tower.position_offset`)
    streams: dict[int, Tensor] = field(default_factory=dict)


class Tower(TowerWeights, nn.Module, ABC):
    """A stack of `blocks` run by `run` (see the module docstring). The switches below are set per call by the model
    (`HookedVLM.resume`, `run_with_cache(tower_outputs=True)`), read by `run` alone, and are `PerCall`: each thread
    sees only its own.

    TransformerLens's stacked weights (`W_Q`, `W_O`, `W_in`, `W_U`, ...) and circuits (`OV`, `QK`) come from
    `TowerWeights` (`hooked_vlm.weights`).

    Subclasses implement `embed_inputs`, and where they need them `block_inputs` and `output`; their `forward` names the
    tower's inputs, packs them into a `TowerCall` and returns `self.run(call, start_at_layer, resid)`.
    """

    given_output: PerCall[Tensor | None] = PerCall(None)  # returned as the tower's output, nothing computed
    resume_at: PerCall[tuple[int, Tensor] | None] = PerCall(None)  # (block, stream entering it): skip what precedes
    # causal towers that take a KV cache can also resume on a suffix of the sequence: the keys and values of the
    # prefix (positions the resumed run cannot change) come from this cache instead of being recomputed
    resume_past: PerCall[KVCache | None] = PerCall(None)
    recorded_output: PerCall[Tensor | None] = PerCall(None)  # set on every forward while `record_output` is on
    record_output: PerCall[bool] = PerCall(False)
    # absolute position of the current forward's first token: 0, or while generating with a KV cache the number of
    # tokens already processed (hooks that address positions read it, e.g. attention knockout)
    position_offset: PerCall[int] = PerCall(0)

    blocks: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.prefix_resumable = False  # a property of the tower, not of a call

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ what a subclass provides
    @abstractmethod
    def embed_inputs(self, call: TowerCall) -> Float[Tensor, "B T D"]:
        """The stream entering block 0, from the call's inputs."""

    def block_inputs(self, call: TowerCall, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        """Keyword arguments every block of this forward gets (masks, rotary, position bias, the attended sequence),
        built once from the call's inputs and the stream entering the first block run (its length and dtype). It
        may also set the call's `stop_at_layer` and `keep_streams` (the vision tower's feature layers)."""
        return {}

    def output(self, call: TowerCall, x: Float[Tensor, "B T D"]) -> Tensor:
        """The tower's output from the stream after the last block run."""
        return x

    # ------------------------------------------------------------------ the protocol
    def run(self, call: TowerCall, start_at_layer: int | None = None,
            resid: Float[Tensor, "B T D"] | None = None) -> Tensor:
        """One forward. `start_at_layer` with `resid` (the stream entering that block, e.g. a cached
        `blocks.{L}.hook_resid_pre`) skips the embeddings and the blocks before it; the inputs still go in whole
        (masks and positions come from them). Explicit arguments take precedence over the model's `resume`."""
        if (start_at_layer is None) != (resid is None):
            raise ValueError("pass start_at_layer and resid together: resid is the stream entering block "
                             "start_at_layer")
        if start_at_layer is not None:
            first, x = start_at_layer, resid
        else:
            first, x = self.resume_at if self.resume_at is not None else (0, None)
            if call.past is None and self.resume_past is not None:
                call.past = self.resume_past  # resuming on the suffix after a cached prefix
        if not 0 <= first <= self.n_layers:
            raise ValueError(f"start_at_layer {first} is not in 0..{self.n_layers} (the blocks of "
                             f"{type(self).__name__})")
        call.first, call.offset = first, call.past.length if call.past is not None else 0
        self.position_offset = call.offset
        if self.given_output is not None:
            return self.given_output
        if x is None:
            x = self.embed_inputs(call)
        kwargs = self.block_inputs(call, x)
        T = x.shape[1]
        if first in call.keep_streams:
            call.streams[first] = x
        for i in range(self.n_layers)[first:call.stop_at_layer]:
            x = self.blocks[i](x, past=call.past.blocks[i] if call.past is not None else None, **kwargs)
            if i + 1 in call.keep_streams:
                call.streams[i + 1] = x
        if call.past is not None:
            call.past.length = call.offset + T
        out = self.output(call, x)
        if self.record_output:
            self.recorded_output = out
        return out

    # ------------------------------------------------------------------ resuming on a suffix
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
