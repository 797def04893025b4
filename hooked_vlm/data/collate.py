"""Streaming a data set into model inputs: a collate that runs the model's processor batch by batch, pads the text,
records each example's positions, and optionally groups examples of similar length to cut padding.

Order guarantees:
- without bucketing (`bucket=None`), batches follow the stream: batch k holds stream items k*batch_size.. in order;
- with bucketing, the stream is read `bucket` items at a time (a window); each window's items are sorted by token
  length (stable: ties keep stream order) and cut into batches, and windows follow the stream. So an item's batch
  and row depend on its neighbours' lengths: read results by `InputBatch.index` (each row's position in the stream)
  or `InputBatch.ids` (the `Example` ids), or put them back in stream order with `in_stream_order`.
Either way every item appears exactly once, and nothing is read from the stream beyond the current window (a
window holds items, i.e. paths and texts; pixels are loaded only for the batch being built).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..models.base import HookedVLM
from ..positions import Positions
from .example import Example

Item = Example | tuple[Any, str]  # an Example, or (image, text): a PIL image or anything with .load(), and its text
Prompt = str | Callable[[Example], str] | None


class InputBatch(dict):
    """One batch of model inputs (the processor's output on the model's device, pixels in its dtype: pass it as
    `model(**batch)`, or wherever a dict of inputs goes), with its bookkeeping as attributes:

    `index`: each row's position in the stream; `ids`: each row's example id (`Example.id`, else str(index));
    `examples`: the source items (their `answer`s, `meta`, ...); `positions`: `model.positions(**batch)`, where each
    row's tokens, padding, image spans and last real token are."""

    index: list[int]
    ids: list[str]
    examples: list[Any]
    positions: Positions


def _load(image: Any) -> Image.Image:
    """A PIL image, or anything with `.load()` (an `ImageFile`), opened now."""
    return image if isinstance(image, Image.Image) or not hasattr(image, "load") else image.load()


@contextlib.contextmanager
def padding_side(processor: Any, side: str | None) -> Iterator[None]:
    """The processor's tokenizer pads on `side` ("left" / "right") inside the block; None: its own setting."""
    tokenizer = getattr(processor, "tokenizer", processor)
    before = getattr(tokenizer, "padding_side", None)
    try:
        if side is not None and before is not None:
            tokenizer.padding_side = side
        yield
    finally:
        if side is not None and before is not None:
            tokenizer.padding_side = before


def _text(model: HookedVLM, item: Any, prompt: Prompt, i: int) -> tuple[Any, str, str]:
    """(image, text, id) of one stream item."""
    if isinstance(item, Example):
        if item.image is None:
            raise ValueError(f"item {i} (example {item.id!r}) has no image; these models read one image per example")
        if callable(prompt):
            text = prompt(item)
        else:
            text = (prompt or model.prompt_template).format(question=item.question)
        return item.image, text, str(item.id)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str):
        return item[0], item[1], str(i)
    raise TypeError(f"item {i} is a {type(item).__name__}: pass data.Example objects or (image, text) pairs")


def collate(model: HookedVLM, items: Iterable[Item], *, batch_size: int = 8, prompt: Prompt = None,
            side: str | None = "left", bucket: int | None = None) -> Iterator[InputBatch]:
    """Model input batches (`InputBatch`) from a stream of `Example`s or (image, text) pairs, read lazily.

    Args:
        batch_size: examples per batch (the last batch of a window may be smaller).
        prompt: how an `Example`'s question becomes the text: None (the family's `model.prompt_template`), a
            template with `{question}`, or a function of the example. (image, text) pairs are used as given.
        side: the side the text is padded on: "left" (default, as `evaluation` pads: a decoder-only LM generates
            from each row's last position, and `positions.last` is -1 for every row), "right", or None (the
            tokenizer's own setting).
        bucket: None, no reordering; else a window of that many items (>= batch_size) is read, sorted by token
            length and cut into batches, so a batch holds examples of similar length (see the module's order
            guarantees).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass a number of examples per batch >= 1")
    if side not in (None, "left", "right"):
        raise ValueError(f"side must be 'left', 'right' or None (the tokenizer's own), got {side!r}")
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < batch_size):
        raise ValueError(f"bucket={bucket!r}: pass a window of at least batch_size={batch_size} items (or None: no "
                         "bucketing)")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise TypeError(f"items is a {type(items).__name__}: pass an iterable of data.Example or (image, text) pairs")
    if model.processor is None:
        raise ValueError("the model has no processor: load it with one (from_pretrained, or from_hf(processor=...))")
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    window = bucket or batch_size
    pending: list[tuple[int, Any, Any, str, str]] = []  # (index, item, image, text, id)
    for i, item in enumerate(items):
        pending.append((i, item, *_text(model, item, prompt, i)))
        if len(pending) == window:
            yield from _window(model, pending, batch_size, side, tokenizer if bucket else None)
            pending = []
    if pending:
        yield from _window(model, pending, batch_size, side, tokenizer if bucket else None)


def _window(model: HookedVLM, rows: list, batch_size: int, side: str | None, tokenizer: Any) -> Iterator[InputBatch]:
    if tokenizer is not None:  # bucketing: by the text's token count (every example adds the same image tokens)
        lengths = [len(tokenizer(text)["input_ids"]) for _, _, _, text, _ in rows]
        rows = [rows[k] for k in sorted(range(len(rows)), key=lengths.__getitem__)]  # sorted() is stable
    for start in range(0, len(rows), batch_size):
        yield _batch(model, rows[start:start + batch_size], side)


def _batch(model: HookedVLM, rows: list, side: str | None) -> InputBatch:
    with padding_side(model.processor, side):
        inputs = model.processor(images=[_load(image) for _, _, image, _, _ in rows],
                                 text=[text for _, _, _, text, _ in rows], padding=True, return_tensors="pt")
    batch = InputBatch({k: _to_model(v, model) for k, v in inputs.items()})
    batch.index = [i for i, *_ in rows]
    batch.examples = [item for _, item, *_ in rows]
    batch.ids = [ex_id for *_, ex_id in rows]
    batch.positions = model.positions(**batch)
    return batch


def _to_model(value: Any, model: HookedVLM) -> Any:
    """A tensor on the model's device (floating point in its dtype: the pixels); anything else as it is."""
    if not isinstance(value, Tensor):
        return value
    return value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)


def in_stream_order(results: Iterable[tuple[InputBatch, Sequence[Any] | Tensor]]) -> list[Any]:
    """Per-row results of bucketed (or any) batches, `(batch, one value per row)`, put back in stream order: the
    list's k-th entry belongs to stream item k. Raises if an index is missing or repeated."""
    found: dict[int, Any] = {}
    for batch, values in results:
        if len(values) != len(batch.index):
            raise ValueError(f"{len(values)} values for a batch of {len(batch.index)} rows: pass one per row")
        for i, value in zip(batch.index, values):
            if i in found:
                raise ValueError(f"stream item {i} appears twice: pass each batch once")
            found[i] = value
    n = max(found) + 1 if found else 0
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise ValueError(f"stream items {missing[:8]} have no result: pass every batch of the stream")
    return [found[i] for i in range(n)]


def rows_of(inputs: Mapping[str, Any], rows: slice | Sequence[int]) -> dict[str, Any]:
    """The examples `rows` of a batch of model inputs: each tensor sliced along its first (batch) dimension,
    everything else kept. Every tensor must have one row per example (one image per example)."""
    n = batch_rows(inputs)
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            if value.ndim == 0 or value.shape[0] != n:
                raise ValueError(f"inputs[{key!r}] has shape {tuple(value.shape)}, not one row per example of the "
                                 f"{n} examples: a batch can be split only when every tensor has one row per example "
                                 "(one image per example); pass batch_size >= the batch's size")
            value = value[rows]
        out[key] = value
    return out


def batch_rows(inputs: Mapping[str, Any]) -> int:
    """The number of examples in a batch of model inputs (the first dimension of its `input_ids`, else of its
    first tensor)."""
    ids = inputs.get("input_ids")
    if isinstance(ids, Tensor) and ids.ndim:
        return ids.shape[0]
    for value in inputs.values():
        if isinstance(value, Tensor) and value.ndim:
            return value.shape[0]
    raise ValueError("the inputs hold no tensors; pass the processor's output")


def split(inputs: Mapping[str, Any], batch_size: int | None) -> Iterator[tuple[range, Mapping[str, Any]]]:
    """`(rows, inputs of those rows)` for consecutive chunks of at most `batch_size` examples (None: the whole
    batch, as it is)."""
    n = batch_rows(inputs)
    if batch_size is None or batch_size >= n:
        yield range(n), inputs  # as it is (an InputBatch keeps its positions)
        return
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        yield rows, rows_of(inputs, slice(rows.start, rows.stop))


def check_batch_size(batch_size: Any) -> None:
    """Raise unless `batch_size` is None or an int >= 1."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: pass the most examples per forward, an int >= 1 (None: each "
                         "batch as given)")
