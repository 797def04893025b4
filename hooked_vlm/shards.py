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
                if not isinstance(header, dict):
                    raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
                stored = {key: _parse_entry(key, info) for key, info in header.items() if key != "__metadata__"}
                _check_layout(stored, size - 8 - n)
                for key, (dtype, shape, begin, stop) in stored.items():
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


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(key: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry -> (dtype, shape, begin, stop), every field checked (a crafted header is data, not code)."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in _TORCH_DTYPES:
        raise ValueError(f"{key} has no known dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise ValueError(f"{key} has the shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise ValueError(f"{key} has the offsets {offsets!r}, not two byte positions")
    dtype, (begin, stop) = _TORCH_DTYPES[info["dtype"]], offsets
    if stop - begin != math.prod(shape) * dtype.itemsize:
        need = math.prod(shape) * dtype.itemsize
        raise ValueError(f"{key} spans bytes {begin}..{stop}, its shape and dtype need {need} bytes")
    return dtype, tuple(shape), begin, stop


def _check_layout(stored: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], data_bytes: int) -> None:
    """Tensors lie inside the data section, one after another, none overlapping another (so that no tensor reads
    the header or another tensor's bytes)."""
    end, previous = 0, None
    for key, (_, _, begin, stop) in sorted(stored.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if stop > data_bytes:
            raise ValueError(f"{key} ends at byte {stop} of a data section of {data_bytes}")
        if begin < end:
            raise ValueError(f"{key} (bytes {begin}..{stop}) overlaps {previous}")
        end, previous = stop, key


def inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a file named by a checkpoint's index, refused unless it is a plain relative path that
    stays inside `folder` once symbolic links are followed (an index is data: it must not reach other files)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{what} names the shard {name!r}, which is not a file inside {folder}; only file names "
                         "inside the checkpoint folder are allowed")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{what} names the shard {name!r}, a link to {path.resolve()} outside {folder}; copy the "
                         "file into the checkpoint folder")
    return path
