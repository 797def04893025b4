"""An append-only folder of per-example results, so that a sweep over a data set can be killed and resumed.

    out/
      store.json                  what made the results: {"format", "version", "sweep", "settings", "model"}
      <key>.safetensors           one example: tensors "value" (its result), "cell_positions", "answer" (a tensor
                                  answer), "positions/..." (its `Positions`); metadata "id", "index", "answer",
                                  "tokens", "corruption", "positions" (JSON)
      .<name>.<pid>.partial       a write in progress (or cut short by a kill): never read

`<key>` is a hash of the example's id (ids are matched, not file names guessed). Every file is written whole to a
`.partial` file, flushed to disk, then renamed over its final name (`os.replace`, atomic on POSIX), so a run killed
at any instant leaves either a complete entry or none. The store never deletes a file, not even its own partials.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from .positions import ImageSpan, Positions

FORMAT, VERSION = "hooked_vlm.result_store", 1
HEADER = "store.json"
_ENTRY = re.compile(r"^[0-9a-f]{32}\.safetensors$")
_PARTIAL = re.compile(r"^\..+\.\d+\.partial$")


@dataclass
class StoredExample:
    """One example's result and what identifies it. `index`: its place in the data set of the run that computed it;
    `positions` and `cell_positions` on the CPU (see `patching.SweepResults` for the fields)."""

    id: str | int
    index: int
    value: Tensor
    answer: Any = None
    tokens: list[str] | None = None
    positions: Positions | None = None
    cell_positions: Tensor | None = None
    corruption: dict[str, Any] | None = None


class ResultStore:
    """The results of one sweep with one set of settings, one file per example (module docstring).

    `ResultStore(folder, header)` opens the store in `folder`, creating it if the folder is new or empty; a store
    made by another sweep or settings (`header` differs) is an error, as is a folder that holds other files.
    `ResultStore(folder)` opens an existing store to read it, whatever made it.

    Args:
        folder: the store's folder.
        header: {"sweep": ..., "settings": ..., "model": ...} as plain JSON values; None to read only.
    """

    def __init__(self, folder: str | os.PathLike, header: Mapping[str, Any] | None = None):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"out={str(self.folder)!r} is a file: give a folder for the results")
        path = self.folder / HEADER
        if header is None:
            if not path.is_file():
                raise FileNotFoundError(f"{str(self.folder)!r} holds no result store (no {HEADER})")
            self.header = self._read_header(path)
            return
        self.header = {"format": FORMAT, "version": VERSION, **json.loads(json.dumps(dict(header)))}
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            others = [p.name for p in self.folder.iterdir() if not _PARTIAL.match(p.name) and p.name != HEADER]
            if others and not path.is_file():  # (another process of the same run may have just created it)
                raise FileExistsError(f"out={str(self.folder)!r} is not empty and holds no result store "
                                      f"({others[0]!r} and {len(others) - 1} more): give a new or empty folder")
            # processes of one distributed run may all create it: each writes the same header, atomically
            _write_atomic(path, json.dumps(self.header, indent=1, sort_keys=True).encode())
        self._check_same(self._read_header(path))

    def __contains__(self, example_id: str | int) -> bool:
        return (self.folder / _file_name(example_id)).is_file()

    def __len__(self) -> int:
        return sum(1 for p in self.folder.iterdir() if _ENTRY.match(p.name))

    def put(self, entry: StoredExample) -> None:
        """Write one example's entry (atomically: a kill leaves it whole or absent)."""
        tensors, meta = _encode(entry)
        _write_atomic(self.folder / _file_name(entry.id), safetensors_bytes(tensors, metadata=meta))

    def get(self, example_id: str | int) -> StoredExample:
        """The entry of the example `example_id`."""
        path = self.folder / _file_name(example_id)
        if not path.is_file():
            raise KeyError(f"{str(self.folder)!r} holds no result for example {example_id!r}")
        entry = _read_entry(path)
        if entry.id != example_id:
            raise ValueError(f"{path} holds example {entry.id!r}, not {example_id!r}: the file was renamed or "
                             "copied by hand; move it out of the store")
        return entry

    def entries(self) -> list[StoredExample]:
        """Every entry, in the order of the data set of the runs that wrote them (`index`)."""
        paths = sorted(p for p in self.folder.iterdir() if _ENTRY.match(p.name))
        return sorted((_read_entry(p) for p in paths), key=lambda e: e.index)

    def _check_same(self, stored: dict[str, Any]) -> None:
        for key in ("format", "version", "sweep", "settings", "model"):
            if stored.get(key) != self.header.get(key):
                raise ValueError(
                    f"out={str(self.folder)!r} was made with {key} {stored.get(key)!r}; this run has {key} "
                    f"{self.header.get(key)!r}. Resume with the same sweep, settings and model, or give a new folder")

    def _read_header(self, path: Path) -> dict[str, Any]:
        try:
            header = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable result store header ({e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a hooked_vlm result store header: give another folder")
        return header


def example_key(example_id: str | int) -> str:
    """The id as it is stored: a str or an int (not a bool), distinct as JSON ("3" and 3 differ)."""
    if isinstance(example_id, bool) or not isinstance(example_id, (str, int)):
        raise TypeError(f"example id {example_id!r} is a {type(example_id).__name__}: a result store needs ids that "
                        "are str or int")
    return json.dumps(example_id)


def _file_name(example_id: str | int) -> str:
    return hashlib.sha256(example_key(example_id).encode()).hexdigest()[:32] + ".safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a partial file, flushed to disk, then renamed over `path`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    try:  # the rename itself reaches the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(entry: StoredExample) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {"value": _own(entry.value)}
    if entry.cell_positions is not None:
        tensors["cell_positions"] = _own(entry.cell_positions)
    answer: Any = entry.answer
    if isinstance(answer, Tensor):
        tensors["answer"], answer = _own(answer), None
    positions = None if entry.positions is None else _encode_positions(entry.positions, "positions", tensors)
    meta = {"id": example_key(entry.id), "index": str(entry.index), "tokens": json.dumps(entry.tokens),
            "corruption": json.dumps(entry.corruption), "positions": json.dumps(positions)}
    try:
        meta["answer"] = json.dumps(answer)
    except TypeError as e:
        raise TypeError(f"example {entry.id!r}: answer {answer!r} cannot be stored: give answers as str, numbers, "
                        "lists of them or tensors") from e
    return tensors, meta


def _own(t: Tensor) -> Tensor:
    # a copy on the CPU: safetensors refuses tensors that share memory (a span's rows and cols may be views of one)
    return t.detach().to("cpu", copy=True).contiguous()


def _read_entry(path: Path) -> StoredExample:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        answer = tensors["answer"] if "answer" in tensors else json.loads(meta["answer"])
        positions = json.loads(meta["positions"])
        return StoredExample(
            id=json.loads(meta["id"]), index=int(meta["index"]), value=tensors["value"], answer=answer,
            tokens=json.loads(meta["tokens"]), corruption=json.loads(meta["corruption"]),
            cell_positions=tensors.get("cell_positions"),
            positions=None if positions is None else _decode_positions(positions, "positions", tensors))
    except Exception as e:  # noqa: BLE001 - any damage is reported the same way, naming the file
        raise ValueError(f"{path} is not a readable result entry ({type(e).__name__}: {e}); it was not written by "
                         "this store: move it out of the folder") from e


def _encode_positions(pos: Positions, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """`pos` as JSON (image span bounds, other towers) plus tensors named under `prefix`."""
    tensors[f"{prefix}/input_ids"] = _own(pos.input_ids)
    tensors[f"{prefix}/attention_mask"] = _own(pos.attention_mask)
    image = []
    for b, spans in enumerate(pos.image):
        for k, span in enumerate(spans):
            tensors[f"{prefix}/image/{b}/{k}/rows"] = _own(span.rows)
            tensors[f"{prefix}/image/{b}/{k}/cols"] = _own(span.cols)
        image.append([[span.start, span.stop] for span in spans])
    towers = {name: _encode_positions(p, f"{prefix}/towers/{name}", tensors) for name, p in pos.towers.items()}
    return {"image": image, "towers": towers}


def _decode_positions(meta: dict[str, Any], prefix: str, tensors: dict[str, Tensor]) -> Positions:
    image = [[ImageSpan(start, stop, tensors[f"{prefix}/image/{b}/{k}/rows"], tensors[f"{prefix}/image/{b}/{k}/cols"])
              for k, (start, stop) in enumerate(spans)] for b, spans in enumerate(meta["image"])]
    towers = {name: _decode_positions(m, f"{prefix}/towers/{name}", tensors) for name, m in meta["towers"].items()}
    return Positions(tensors[f"{prefix}/input_ids"], tensors[f"{prefix}/attention_mask"], image, towers)


def positions_on_cpu(pos: Positions | None) -> Positions | None:
    """A copy of `pos` with every tensor on the CPU (what a store reads back)."""
    if pos is None:
        return None
    tensors: dict[str, Tensor] = {}
    return _decode_positions(_encode_positions(pos, "p", tensors), "p", tensors)
