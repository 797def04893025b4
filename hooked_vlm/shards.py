"""Safetensors shards written and read one tensor at a time, so that neither saving nor converting nor loading a
checkpoint ever holds more than the weights themselves plus one tensor in flight.

Writing: the header of a shard (names, dtypes, shapes, offsets) is known before any data is made, so each tensor
is produced, written and released in turn (`write_shards`). The files are standard safetensors: an 8-byte
little-endian header length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back.

Reading: `ShardReader` maps each file privately (copy-on-write). A tensor kept as stored on the CPU is a view of the
map, with no copy at all; a tensor that is converted, cast or moved to a GPU is copied and the pages it was read
from are released at once (`madvise`), so that the checkpoint never stays resident beside the converted weights.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    """A tensor to write: its name, dtype and shape up front, a function that makes it when its turn comes, and one
    called once it is written (to release what it was made from)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Tensor]
    written: Callable[[], None] | None = None

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
            if e.written is not None:
                e.written()
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
            group = [Entry(e.name, e.dtype, e.shape, _reporting(e, progress), e.written) for e in group]
        _write_shard(folder / name, group, {"format": "pt"})
        shards[name] = [e.name for e in group]
    return shards


def _reporting(entry: Entry, progress: Callable[[Entry], None]) -> Callable[[], Tensor]:
    def make() -> Tensor:
        t = entry.make()
        progress(entry)
        return t

    return make


@dataclass(frozen=True)
class _Stored:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


class ShardReader:
    """Tensors by name from a set of safetensors files, as views of private (copy-on-write) memory maps.

    `read` returns a tensor kept as stored on the CPU as the view itself (no copy; the pages come in when touched,
    and an edit copies the page, never writing the file); a tensor cast or moved elsewhere is copied, and the pages
    it was read from are released at once, so that converting a checkpoint does not keep it resident. Errors name
    the file.
    """

    def __init__(self, files: Iterable[str | os.PathLike]):
        self._maps: dict[Path, mmap.mmap] = {}
        self._stored: dict[str, _Stored] = {}
        for file in map(Path, files):
            self._index(file)

    def _index(self, file: Path) -> None:
        if not file.is_file():
            raise FileNotFoundError(f"the shard {file} is missing")
        size = file.stat().st_size
        broken = f"{file} is corrupted or truncated"
        with open(file, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                if 8 + n > size:
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    dtype, shape = _TORCH_DTYPES[info["dtype"]], tuple(info["shape"])
                    begin, stop = info["data_offsets"]
                    if stop - begin != math.prod(shape) * dtype.itemsize or 8 + n + stop > size:
                        raise ValueError(f"{key} does not fit in the file")
                    if key in self._stored:
                        raise LookupError(f"{key} is stored in both {self._stored[key].file} and {file}")
                    self._stored[key] = _Stored(file, dtype, shape, 8 + n + begin, stop - begin)
            except (ValueError, KeyError, TypeError, struct.error) as e:
                raise ValueError(f"{broken} ({e}); download or convert the checkpoint again") from e
            except LookupError as e:
                raise ValueError(f"{e}: pass a folder holding one copy of the weights") from e
            self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self._stored)

    def file(self, key: str) -> Path:
        return self._stored[key].file

    def meta(self, key: str) -> Tensor:
        """A meta tensor with the stored shape and dtype (what conversion plans read)."""
        s = self._stored[key]
        return torch.empty(s.shape, dtype=s.dtype, device="meta")

    def view(self, key: str) -> Tensor:
        """The stored tensor as a view of the file's memory map."""
        s = self._stored[key]
        if s.nbytes == 0:
            return torch.empty(s.shape, dtype=s.dtype)
        with warnings.catch_warnings():  # a private map is writable; torch cannot tell
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._maps[s.file], dtype=s.dtype, count=math.prod(s.shape), offset=s.start)
        return flat.view(s.shape)

    def release(self, key: str) -> None:
        """Drop the pages of a tensor read and copied elsewhere from this process's memory (the whole pages
        inside it; they are read again from the file if touched)."""
        s = self._stored[key]
        first = -(-s.start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (s.start + s.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._maps[s.file].madvise(mmap.MADV_DONTNEED, first, last - first)

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """The tensor, cast to `dtype` if it is floating point, on `device`: the view itself if nothing changes."""
        return self.combine([key], lambda view: view(key), dtype, device)

    def combine(self, keys: Sequence[str], make: Callable[[Callable[[str], Tensor]], Tensor],
                dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """`make(view)` (e.g. a concatenation of the views of `keys`), cast to `dtype` if floating point and moved
        to `device`; the views' pages are released unless the result is a view of them."""
        viewed: set[int] = set()

        def view(key: str) -> Tensor:
            v = self.view(key)
            viewed.add(v.untyped_storage().data_ptr())
            return v

        out = make(view)
        target = dtype if dtype is not None and out.is_floating_point() else out.dtype
        out = out.to(device, target)
        if out.device.type != "cpu" or out.untyped_storage().data_ptr() not in viewed:  # a copy: free the source
            for key in keys:
                self.release(key)
        return out

    def close(self) -> None:
        """Forget the maps; the tensors still viewing them keep them alive."""
        self._maps.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()} | {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
