"""Safetensors shards written and read one tensor at a time, so that neither saving nor converting nor loading a
checkpoint ever holds more than the weights themselves plus one tensor in flight.

Writing: the header of a shard (names, dtypes, shapes, offsets) is known before any data is made, so each tensor
is produced, written and released in turn (`write_shards`). The files are standard safetensors: an 8-byte
little-endian header length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back.

Reading: `ShardReader` reads each tensor with `pread` into memory of its own (safetensors' "pread" backend), not as
a view of a memory map, so the pages of tensors that are converted and dropped do not stay resident.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    """A tensor to write: its name, dtype and shape up front, and a function that makes it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_shard(path: Path, entries: Sequence[Entry], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_CODES:
            raise TypeError(f"{e.name}: cannot store dtype {e.dtype} in safetensors")
        header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset,
                                                                                                    offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            t = e.make().detach()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise ValueError(f"{e.name}: made a {t.dtype} tensor of shape {tuple(t.shape)}, expected {e.dtype} "
                                 f"{e.shape}")
            if t.numel():
                f.write(memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t  # released before the next one is made
        f.flush()
        os.fsync(f.fileno())


def write_shards(entries: Iterable[Entry], folder: Path, *, shard_bytes: int, prefix: str = "model",
                 progress: Callable[[Entry], None] | None = None) -> dict[str, list[str]]:
    """Write `entries` into shards of at most `shard_bytes` (a larger tensor gets a shard of its own) named
    `{prefix}-00001.safetensors`, ...; returns {file name: [tensor names]}. `progress` is called after each tensor."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    shards: dict[str, list[str]] = {}
    for i, group in enumerate(g for g in groups if g):
        name = f"{prefix}-{i + 1:05d}.safetensors"
        if progress is not None:
            group = [Entry(e.name, e.dtype, e.shape, _reporting(e, progress)) for e in group]
        _write_shard(folder / name, group, {"format": "pt"})
        shards[name] = [e.name for e in group]
    return shards


def _reporting(entry: Entry, progress: Callable[[Entry], None]) -> Callable[[], Tensor]:
    def make() -> Tensor:
        t = entry.make()
        progress(entry)
        return t

    return make


class ShardReader:
    """Tensors by name from a set of safetensors files, read on demand; errors name the file."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self._handles = {}
        self.location: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        try:
            for file in map(Path, files):
                if not file.is_file():
                    raise FileNotFoundError(f"the shard {file} is missing")
                handle = self._open(file)
                for key in handle.keys():
                    meta = handle.get_slice(key)
                    self.location[key] = file
                    self.shape[key] = tuple(meta.get_shape())
                    self.dtype[key] = _TORCH_DTYPES[meta.get_dtype()]
        except BaseException:
            self.close()
            raise

    def _open(self, file: Path):
        try:
            handle = safe_open(file, framework="pt", device="cpu", backend="pread")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is corrupted or truncated ({e}); download or convert the checkpoint again") \
                from e
        self._handles[file] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self.location)

    def meta(self, key: str) -> Tensor:
        """A meta tensor with the stored shape and dtype (what conversion plans read)."""
        return torch.empty(self.shape[key], dtype=self.dtype[key], device="meta")

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        file = self.location[key]
        try:
            t = self._handles[file].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read {key} ({e}); the file is corrupted or truncated") from e
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()} | {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
