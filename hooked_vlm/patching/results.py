"""Sweeps over a data set: `sweep_dataset` (stacked) and `sweep_results` (per example, with what identifies it, and
aligned by role: `SweepResults`, `AlignedResults`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import distributed as distributed_
from ..arguments import keyword_names, reject_unknown
from ..corruption.noise import Corruption
from ..models.base import HookedVLM
from ..positions import Positions
from .engine import _progress
from .groups import _tower_positions
from .sweeps import (_trace_corruption, attribution_patch_heads, attribution_patch_resid, causal_trace, patch_heads,
                     patch_resid)


def sweep_dataset(sweep: Callable[..., Tensor], model: HookedVLM, examples: Sequence[Sequence[Any]], *,
                  distributed: bool = False, progress: bool = True, **kwargs: Any) -> Tensor | None:
    """`sweep(model, *example, **kwargs)` for each example of a data set, stacked: [n_examples, ...]. Any sweep
    here that returns a tensor works: `examples` holds its positional arguments after the model, e.g. (clean,
    corrupt, metric) for `patch_heads` and `patch_resid`, (inputs, target) for `causal_trace`, (inputs, metric) for
    `ablation_sweep`.

    `distributed=True` shards the examples across the processes of the torch.distributed group (torchrun; see
    `hooked_vlm.distributed`) and gathers the results on rank 0, which returns them (the other ranks return None).
    Each example is swept alone, so the results equal a single process's. Results of different shapes (sweeps
    over every position of prompts of different lengths) are padded with NaN at the end of each dimension, so
    position i is not the same role in every example: `sweep_results` keeps them per example and aligns them.
    """
    results = _run_dataset(sweep, model, examples, distributed, progress, kwargs, "sweep_dataset")
    return None if results is None else _stack_padded(results)


def sweep_results(sweep: Callable[..., Tensor], model: HookedVLM, examples: Sequence[Sequence[Any]], *,
                  ids: Sequence[Any] | None = None, answers: Sequence[Any] | None = None, distributed: bool = False,
                  progress: bool = True, **kwargs: Any) -> "SweepResults | None":
    """`sweep_dataset`'s sweeps, kept per example with what identifies them: a `SweepResults` holding each
    example's values, its id (`ids`, default its index), answer (`answers`), tokens and positions (from
    `model.positions` of its first argument, the inputs), the corruption's description and the sweep's settings.
    `.aligned("last")` lines the examples up on a role; `.mean(anchor)` averages them there; `.stacked()` is
    `sweep_dataset`'s padded tensor. With `distributed=True`, rank 0 returns the results, the other ranks None."""
    for what, given in (("ids", ids), ("answers", answers)):
        if given is not None and len(given) != len(examples):
            raise ValueError(f"{what} has {len(given)} entries for {len(examples)} examples: give one per example")
    values = _run_dataset(sweep, model, examples, distributed, progress, kwargs, "sweep_results")
    if values is None:
        return None
    out = SweepResults(sweep=getattr(sweep, "__name__", "sweep"),
                       settings={k: _plain_setting(v) for k, v in kwargs.items()})
    for i, (example, value) in enumerate(zip(examples, values)):
        meta = _example_meta(sweep, model, example, kwargs, value)
        out.values.append(value)
        out.ids.append(i if ids is None else ids[i])
        out.answers.append(None if answers is None else answers[i])
        out.tokens.append(meta["tokens"])
        out.positions.append(meta["positions"])
        out.cell_positions.append(meta["cell_positions"])
        out.corruption.append(meta["corruption"])
    return out


def _run_dataset(sweep: Callable[..., Tensor], model: HookedVLM, examples: Sequence[Sequence[Any]],
                 distributed: bool, progress: bool, kwargs: dict[str, Any], where: str) -> list[Tensor] | None:
    label = getattr(sweep, "__name__", "sweep")
    accepted = set(keyword_names(sweep)) - {"model", "progress"}
    reject_unknown(kwargs, accepted, f"{where}({label})")
    if not len(examples):
        raise ValueError(f"{where} got no examples: pass a non-empty sequence of argument tuples, e.g. "
                         "[(clean, corrupt, metric), ...]")
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)):
            raise TypeError(f"example {i} is a {type(example).__name__}: each example must be a tuple of the sweep's "
                            "positional arguments after the model, e.g. (clean, corrupt, metric)")
    bar = _progress(len(distributed_.shard(len(examples))) if distributed else len(examples), progress,
                    f"{label} over {len(examples)} examples")

    def one(example: Sequence[Any]) -> Tensor:
        out = sweep(model, *example, progress=False, **kwargs)
        bar.update(1)
        return out

    try:
        return distributed_.map_dataset(one, examples, distributed=distributed)
    finally:
        bar.close()


def _stack_padded(results: list[Tensor]) -> Tensor:
    shape = [max(sizes) for sizes in zip(*(r.shape for r in results))]
    out = torch.full((len(results), *shape), float("nan"), dtype=results[0].dtype)
    for row, r in zip(out, results):
        row[tuple(slice(0, n) for n in r.shape)] = r
    return out


ANCHORS = ("last", "first", "image_start", "image_end")


@dataclass
class AlignedResults:
    """Results lined up on a role: `values` [n_examples, ..., n_offsets], where `offsets[k]` is the position
    relative to each example's anchor (0: the anchor itself, -1: the token before it); NaN where an example has no
    token at that offset."""

    values: Tensor
    offsets: Tensor
    anchor: str

    def mean(self) -> Tensor:
        """The mean over the examples that have each offset: [..., n_offsets]."""
        return self.values.nanmean(0)

    def count(self) -> Tensor:
        """How many examples have a token at each offset: [n_offsets]."""
        return (~self.values.isnan()).reshape(self.values.shape[0], -1, self.values.shape[-1]).any(1).sum(0)

    def labels(self) -> list[str]:
        """One label per offset: "last", "last-1", "image_start+3", ..."""
        return [self.anchor if k == 0 else f"{self.anchor}{k:+d}" for k in self.offsets.tolist()]


@dataclass
class SweepResults:
    """A sweep's results over a data set, per example (`sweep_results` builds it).

    `values[i]`: example i's result (as the sweep returns it); `ids`, `answers`, `tokens` (the prompt's token
    labels, where the swept tower reads the prompt), `positions` (its `Positions` in the swept tower's sequence,
    where known), `cell_positions[i]` (the sequence position of each index of the result's last axis, when that
    axis is positions; None otherwise), `corruption[i]` (what corrupted it: `Corruption.describe()`, or {"kind":
    "inputs"}), `settings` (the sweep's keyword arguments)."""

    sweep: str = "sweep"
    settings: dict[str, Any] = field(default_factory=dict)
    values: list[Tensor] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)
    positions: list[Any] = field(default_factory=list)
    cell_positions: list[Any] = field(default_factory=list)
    corruption: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    def stacked(self) -> Tensor:
        """The values stacked, padded with NaN at the end of each dimension (`sweep_dataset`'s result)."""
        return _stack_padded(self.values)

    def mean(self, anchor: Any = None) -> Tensor:
        """The mean over examples (NaN cells left out). Results over the positions of prompts of different lengths
        need an `anchor` (see `aligned`): position i is not the same token in every example."""
        if anchor is not None:
            return self.aligned(anchor).mean()
        shapes = {tuple(v.shape) for v in self.values}
        if len(shapes) > 1:
            what = ("the prompts differ in length, so position i is a different token in each example: pass an "
                    "anchor (e.g. mean('last')) to align them on a role" if self._positional() else
                    "the examples' results differ in shape")
            raise ValueError(f"{what} (shapes {sorted(shapes)}); stacked() gives the NaN-padded tensor")
        return torch.stack(self.values).nanmean(0)

    def anchor_positions(self, anchor: Any) -> list[int]:
        """Each example's anchor as a position of its sequence: "last" (its last real token), "first", "image_start"
        / "image_end" (the first / last token of its first image), an int (one position for all; negative from the
        end), one int per example (a token of interest), or a function of the example's `Positions`."""
        if isinstance(anchor, (Sequence, Tensor)) and not isinstance(anchor, str):
            given = torch.as_tensor(anchor).flatten().tolist()  # a list or a tensor on any device
            if len(given) != len(self):
                raise ValueError(f"anchor gives {len(given)} positions for {len(self)} examples: give one per example")
            return [int(a) for a in given]
        return [self._anchor(anchor, i) for i in range(len(self))]

    def aligned(self, anchor: Any, window: tuple[int, int] | None = None) -> AlignedResults:
        """The results over positions lined up on `anchor` (see `anchor_positions`): an `AlignedResults` whose
        last axis is the offset from each example's anchor, NaN where an example has no token there. `window`:
        (first, last) offsets to keep, e.g. (-5, 0) for the five tokens before the last and the last."""
        if not self._positional():
            raise ValueError(f"the results of {self.sweep} have no axis of positions to align (it needs positions "
                             "per cell: patch_resid, causal_trace, patch_heads(by_position=True), without groups)")
        anchors = self.anchor_positions(anchor)
        relative = [cells - a for cells, a in zip(self.cell_positions, anchors)]
        offsets = torch.unique(torch.cat(relative))
        if window is not None:
            offsets = offsets[(offsets >= window[0]) & (offsets <= window[1])]
        lead = self.values[0].shape[:-1]
        if any(v.shape[:-1] != lead for v in self.values):
            raise ValueError("the examples' results differ in shape before their axis of positions: they cannot be "
                             "aligned")
        out = torch.full((len(self), *lead, len(offsets)), float("nan"), dtype=self.values[0].dtype)
        slot = {int(k): j for j, k in enumerate(offsets.tolist())}
        for i, (value, rel) in enumerate(zip(self.values, relative)):
            for src, k in enumerate(rel.tolist()):
                if k in slot:
                    out[i, ..., slot[k]] = value[..., src]
        label = anchor if isinstance(anchor, str) else "anchor"
        return AlignedResults(out, offsets, label)

    def _positional(self) -> bool:
        return bool(self.cell_positions) and all(c is not None for c in self.cell_positions)

    def _anchor(self, anchor: Any, i: int) -> int:
        pos, cells = self.positions[i], self.cell_positions[i]
        if isinstance(anchor, bool):
            raise TypeError(f"anchor={anchor!r} is not a role or a position")
        if isinstance(anchor, int):
            length = int(pos.input_ids.shape[1]) if pos is not None else int(cells.max()) + 1
            if not -length <= anchor < length:
                raise ValueError(f"anchor {anchor} is out of range for example {i} ({length} positions)")
            return anchor % length
        if pos is None:
            raise ValueError(f"example {i} has no Positions of the swept tower's sequence (only the prompt's are "
                             "known): pass the anchor as an int or as one position per example")
        if pos.input_ids.shape[0] != 1:
            raise ValueError(f"example {i} is a batch of {pos.input_ids.shape[0]}: roles are per prompt; sweep the "
                             "examples one prompt each")
        if callable(anchor):
            return int(anchor(pos))
        if anchor == "last":
            return int(pos.last[0])
        if anchor == "first":
            return 0
        if anchor in ("image_start", "image_end"):
            spans = pos.image[0] if pos.image else []
            if not spans:
                raise ValueError(f"example {i} has no image tokens in this sequence, so no {anchor!r}")
            return spans[0].start if anchor == "image_start" else spans[0].stop - 1
        raise ValueError(f"anchor must be one of {', '.join(map(repr, ANCHORS))}, an int, one int per example or a "
                         f"function of the example's Positions; got {anchor!r}")


def _example_meta(sweep: Callable[..., Tensor], model: HookedVLM, example: Sequence[Any], kwargs: dict[str, Any],
                  value: Tensor) -> dict[str, Any]:
    """An example's tokens, positions, cell positions and corruption, from the sweep's arguments."""
    try:
        args = inspect.signature(sweep).bind_partial(model, *example, **kwargs).arguments
    except TypeError:
        args = {}
    inputs = example[0] if example and isinstance(example[0], Mapping) else None
    tower = args.get("tower")
    prompt = None
    if inputs is not None:
        try:
            prompt = model.positions(**inputs)
        except (TypeError, ValueError):
            prompt = None
    pos = _tower_positions(model, tower, prompt) if isinstance(tower, str) else None
    tokens = None
    if pos is not None and prompt is pos and pos.input_ids.shape[0] == 1:
        tokens = model.to_str_tokens(pos.input_ids[0])
    return {"tokens": tokens, "positions": pos, "cell_positions": _cell_positions(sweep, args, value, pos),
            "corruption": _describe_corrupt(sweep, args)}


def _cell_positions(sweep: Callable[..., Tensor], args: Mapping[str, Any], value: Tensor,
                    pos: Positions | None) -> Tensor | None:
    """The sequence position of each index of the result's last axis, if that axis is positions."""
    positional = sweep in (patch_resid, causal_trace, attribution_patch_resid) or (
        sweep in (patch_heads, attribution_patch_heads) and args.get("by_position", False))
    if not positional or args.get("groups") is not None:
        return None
    spec = args.get("positions")
    if spec is None:
        return torch.arange(value.shape[-1])
    given = torch.as_tensor(spec).cpu()
    if given.ndim == 2:
        if given.shape[0] != 1:
            return None
        given = given[0]
    if (given < 0).any():
        if pos is None:
            return None
        given = given % pos.input_ids.shape[1]
    return given.long()


def _describe_corrupt(sweep: Callable[..., Tensor], args: Mapping[str, Any]) -> dict[str, Any] | None:
    corrupt = args.get("corrupt")
    if sweep is causal_trace:
        try:
            corrupt = _trace_corruption(args.get("corrupt", "image"), args.get("noise"), args.get("seed"), False)
        except ValueError:
            return None
    if isinstance(corrupt, Corruption):
        out = corrupt.describe()
    elif isinstance(corrupt, Mapping):
        out = {"kind": "inputs"}
    else:
        return None
    if args.get("samples", 1) != 1:
        out["samples"] = args["samples"]
    return out


def _plain_setting(value: Any) -> Any:
    if isinstance(value, Corruption):
        return value.describe()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return {str(k): _plain_setting(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain_setting(v) for v in value]
    return getattr(value, "label", None) or getattr(value, "__name__", None) or repr(value)
