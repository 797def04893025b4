"""Sweeps over a data set: `sweep_dataset` (stacked) and `sweep_results` (per example, with what identifies it, and
aligned by role: `SweepResults`, `AlignedResults`)."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import distributed as distributed_
from ..arguments import keyword_names, reject_unknown
from ..corruption.noise import Corruption
from ..models.base import HookedVLM
from ..positions import Positions
from ..result_store import ResultStore, StoredExample, example_key, positions_on_cpu
from ..utils import progress_bar
from .groups import _tower_positions
from .sweeps import (_trace_corruption, attribution_patch_heads, attribution_patch_resid, causal_trace, patch_heads,
                     patch_resid)


# `examples` is typed Iterable[Any], not Iterable[Sequence[Any]]: a runtime type checker would index a lazy data set
# to check one item, building an example the sweep may never need.
def sweep_dataset(sweep: Callable[..., Tensor], model: HookedVLM, examples: Iterable[Any], *,
                  out: str | os.PathLike | None = None, distributed: bool = False, progress: bool = True,
                  **kwargs: Any) -> Tensor | None:
    """`sweep(model, *example, **kwargs)` for each example of a data set, stacked: [n_examples, ...]. Any sweep
    here that returns a tensor works: `examples` holds its positional arguments after the model, e.g. (clean,
    corrupt, metric) for `patch_heads` and `patch_resid`, (inputs, target) for `causal_trace`, (inputs, metric) for
    `ablation_sweep`. `examples` is any iterable: a list, a generator that builds each example's inputs when asked
    for it, or a sequence whose items are built on indexing (then the examples a resumed run skips are never built).

    `out=folder` writes each example's result, with its id, tokens and answer, to a `ResultStore` as it finishes;
    a rerun with the same `out` (and the same sweep, settings and model; otherwise an error) takes the examples
    found there, matched by id (here its index), and sweeps the rest: a killed run resumes, with the result of an
    uninterrupted one. `sweep_results` and `SweepResults.load(out)` read the store with its metadata.

    `distributed=True` shards the examples across the processes of the torch.distributed group (torchrun; see
    `hooked_vlm.distributed`) and gathers the results on rank 0, which returns them (the other ranks return None);
    with `out`, each process writes its own examples (`out` must be on a file system every process sees).
    Each example is swept alone, so the results equal a single process's. Results of different shapes (sweeps
    over every position of prompts of different lengths) are padded with NaN at the end of each dimension, so
    position i is not the same role in every example: `sweep_results` keeps them per example and aligns them.
    """
    records = _run_dataset(sweep, model, examples, None, None, out, distributed, progress, kwargs, "sweep_dataset",
                           meta=out is not None)
    return None if records is None else _stack_padded([r.value for r in records])


def sweep_results(sweep: Callable[..., Tensor], model: HookedVLM, examples: Iterable[Any], *,
                  ids: Sequence[str | int] | None = None, answers: Sequence[Any] | None = None,
                  out: str | os.PathLike | None = None, distributed: bool = False, progress: bool = True,
                  **kwargs: Any) -> "SweepResults | None":
    """`sweep_dataset`'s sweeps, kept per example with what identifies them: a `SweepResults` holding each
    example's values, its id (`ids`, default its index), answer (`answers`), tokens and positions (from
    `model.positions` of its first argument, the inputs), the corruption's description and the sweep's settings.
    `.aligned("last")` lines the examples up on a role; `.mean(anchor)` averages them there; `.stacked()` is
    `sweep_dataset`'s padded tensor. `out` and `distributed` as in `sweep_dataset`; with `out`, a resumed run
    matches the examples by their `ids`, and the values and positions are returned on the CPU, as stored. With
    `distributed=True`, rank 0 returns the results, the other ranks None."""
    records = _run_dataset(sweep, model, examples, ids, answers, out, distributed, progress, kwargs, "sweep_results",
                           meta=True)
    if records is None:
        return None
    results = SweepResults(sweep=_label(sweep), settings={k: _plain_setting(v) for k, v in kwargs.items()})
    results._extend(records)
    return results


# keyword arguments that change how a sweep fits in memory, not its result: a resumed run may change them
MEMORY_ONLY = ("batch_size", "cache_device", "memory_budget")


def _label(sweep: Callable[..., Tensor]) -> str:
    return getattr(sweep, "__name__", "sweep")


def _run_dataset(sweep: Callable[..., Tensor], model: HookedVLM, examples: Iterable[Any],
                 ids: Sequence[str | int] | None, answers: Sequence[Any] | None, out: str | os.PathLike | None,
                 distributed: bool, progress: bool, kwargs: dict[str, Any], where: str,
                 meta: bool) -> list[StoredExample] | None:
    """Each example's record, in order (None on ranks other than 0); `meta`: with its tokens and positions."""
    label = _label(sweep)
    accepted = set(keyword_names(sweep)) - {"model", "progress"}
    reject_unknown(kwargs, accepted, f"{where}({label})")
    n = _check_examples(examples, ids, answers, where)
    if distributed:
        distributed_.require_group()
    store = None
    if out is not None:
        settings = {k: _plain_setting(v) for k, v in kwargs.items() if k not in MEMORY_ONLY}
        store = ResultStore(out, {"sweep": label, "settings": settings, "model": model_fingerprint(model)})
    total = None if n is None else len(distributed_.shard(n)) if distributed else n
    bar = progress_bar(total, progress, label if n is None else f"{label} over {n} examples")

    def one(item: tuple[int, Callable[[], Sequence[Any]]]) -> StoredExample:
        i, fetch = item
        key = i if ids is None else _at(ids, i, "ids")
        if store is not None and key in store:  # done by an earlier run
            bar.update(1)
            return store.get(key)
        example = fetch()
        if not isinstance(example, (tuple, list)):
            raise TypeError(_not_a_tuple(i, example))
        value = sweep(model, *example, progress=False, **kwargs)
        found = _example_meta(sweep, model, example, kwargs, value) if meta else {}
        record = StoredExample(key, i, value, None if answers is None else _at(answers, i, "answers"), **found)
        if store is not None:
            store.put(record)
            record = store.get(key)  # what a resumed run reads back: on the CPU, the same in every run
        elif distributed:
            record.value, record.positions = record.value.cpu(), positions_on_cpu(record.positions)
        bar.update(1)
        return record

    try:
        records = distributed_.map_dataset(one, _indexed(examples), distributed=distributed)
    finally:
        bar.close()
    if records is not None:
        _check_count(len(records), ids, answers, where)
    return records


def _check_examples(examples: Iterable[Any], ids: Sequence[Any] | None, answers: Sequence[Any] | None,
                    where: str) -> int | None:
    """The number of examples, if known up front; every check that needs no example built."""
    if isinstance(examples, (str, bytes, Mapping)) or not (isinstance(examples, Iterable) or _indexable(examples)):
        raise TypeError(f"{where} takes the examples as an iterable of argument tuples, e.g. [(clean, corrupt, "
                        f"metric), ...]; got a {type(examples).__name__}")
    if ids is not None:
        seen: set[str] = set()
        for given in ids:
            key = example_key(given)  # a str or an int
            if key in seen:
                raise ValueError(f"ids holds {given!r} twice: give each example its own id")
            seen.add(key)
    n = len(examples) if isinstance(examples, Sized) else None
    if n == 0:
        raise ValueError(f"{where} got no examples: pass a non-empty sequence of argument tuples, e.g. "
                         "[(clean, corrupt, metric), ...]")
    if n is not None:
        for what, given in (("ids", ids), ("answers", answers)):
            if given is not None and len(given) != n:
                raise ValueError(f"{what} has {len(given)} entries for {n} examples: give one per example")
    if isinstance(examples, (list, tuple)):  # materialised: check them all before any work
        for i, example in enumerate(examples):
            if not isinstance(example, (tuple, list)):
                raise TypeError(_not_a_tuple(i, example))
    return n


def _check_count(n: int, ids: Sequence[Any] | None, answers: Sequence[Any] | None, where: str) -> None:
    if n == 0:
        raise ValueError(f"{where} got no examples: the iterable was empty")
    for what, given in (("ids", ids), ("answers", answers)):
        if given is not None and len(given) != n:
            raise ValueError(f"{what} has {len(given)} entries for {n} examples: give one per example")


def _at(given: Sequence[Any], i: int, what: str) -> Any:
    if i >= len(given):
        raise ValueError(f"{what} has {len(given)} entries but the examples go on: give one per example")
    return given[i]


def _not_a_tuple(i: int, example: Any) -> str:
    return (f"example {i} is a {type(example).__name__}: each example must be a tuple of the sweep's positional "
            "arguments after the model, e.g. (clean, corrupt, metric)")


class _Indexed(Sequence):
    """(index, fetch) per item of a sequence: an item is built (indexed) only when a sweep needs it."""

    def __init__(self, items: Sequence[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Callable[[], Any]]:  # type: ignore[override]
        if not 0 <= i < len(self.items):
            raise IndexError(i)
        return i, lambda: self.items[i]


def _indexable(examples: Any) -> bool:
    """A sequence, or anything with a length and items by index (a torch map-style Dataset)."""
    return isinstance(examples, Sequence) or (hasattr(type(examples), "__getitem__") and isinstance(examples, Sized)
                                              and not isinstance(examples, Mapping))


def _indexed(examples: Iterable[Any]) -> Iterable[tuple[int, Callable[[], Any]]]:
    if _indexable(examples):
        return _Indexed(examples)
    return ((i, lambda e=e: e) for i, e in enumerate(examples))


def model_fingerprint(model: HookedVLM) -> dict[str, str]:
    """What tells one model's results from another's, cheaply: its class, and a hash of every tensor's name,
    dtype, shape and 8 of its values (another checkpoint, dtype or architecture gives another hash)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.is_meta:  # offloaded by a device map: its shape is all there is to read here
            continue
        flat = t.detach().reshape(-1)
        some = flat[torch.linspace(0, flat.numel() - 1, min(8, flat.numel()), device=flat.device).long()]
        digest.update(some.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {"class": type(model).__name__, "tensors": digest.hexdigest()[:32]}


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

    @classmethod
    def load(cls, out: str | os.PathLike) -> "SweepResults":
        """The results a run of `sweep_results` or `sweep_dataset` with `out=` wrote so far (a finished run's or a
        killed one's), in the data set's order, without the model."""
        store = ResultStore(out)
        results = cls(sweep=store.header["sweep"], settings=store.header["settings"])
        results._extend(store.entries())
        return results

    def _extend(self, records: Iterable[StoredExample]) -> None:
        for r in records:
            self.values.append(r.value)
            self.ids.append(r.id)
            self.answers.append(r.answer)
            self.tokens.append(r.tokens)
            self.positions.append(r.positions)
            self.cell_positions.append(r.cell_positions)
            self.corruption.append(r.corruption)

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
        if value.numel() <= 64:
            return value.tolist()
        data = value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()  # settings tell tensors apart
        return f"{value.dtype} tensor of shape {tuple(value.shape)}, sha256 {hashlib.sha256(data).hexdigest()[:16]}"
    if isinstance(value, Mapping):
        return {str(k): _plain_setting(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain_setting(v) for v in value]
    return getattr(value, "label", None) or getattr(value, "__name__", None) or repr(value)
