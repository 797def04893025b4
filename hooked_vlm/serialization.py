"""hooked_vlm's own checkpoint format: safetensors shards of the hooked state dict, the model config as JSON, and the
processor's files. Loading it needs no transformers model class (only the processor comes from transformers).

    out_dir/
      hooked_vlm_config.json      {"format": "hooked_vlm", "version": 1, "model_class": ..., "config": ...,
                                   "shards": {file: [tensor names]}, "files": [every file written],
                                   "hf_origin": {"hf_class": ..., "config": ...}}
      model-00001.safetensors ...  the hooked state dict, then the HF tensors hooked_vlm does not use (`hf_unused.*`)
      processor files (as the processor's save_pretrained writes them)

Writes are atomic: everything goes to a temporary folder beside `out_dir`, swapped in at the end, so that `out_dir`
holds the old checkpoint or the new one, whole, at every instant (`write_checkpoint`); only an empty folder or a
hooked_vlm checkpoint holding nothing but the files listed in its config is ever replaced (`check_target`). Shards
are written and read one tensor at a time (`shards.py`): saving holds nothing beyond the model, and loading
(`loading.py`) builds the model on the meta device and reads each tensor once, into place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import glob
import importlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from .arguments import as_dtype, reject_unknown
from . import processors
from .shards import Entry, ShardReader, inside, write_shards

CONFIG_NAME = "hooked_vlm_config.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- configs as JSON
def encode_config(obj: Any) -> Any:
    """Nested config dataclasses -> JSON-able data, each dataclass tagged with its class."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: encode_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_config(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_config(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode_config(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a hooked_vlm config")


def _config_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module.startswith("hooked_vlm."):  # only our own config classes are ever instantiated from a file
        raise ValueError(f"config class {path!r} is not a hooked_vlm class")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"config class {path!r} does not exist in this version of hooked_vlm")
    return cls


# Fields that earlier versions wrote and this one dropped because what they held lives elsewhere now; a file that
# holds them still loads. BlockConfig.n_query: the Q-Former's query count, now only on QFormerConfig.
RETIRED_FIELDS = {"BlockConfig": frozenset({"n_query"})}


def decode_config(data: Any) -> Any:
    if isinstance(data, dict) and "__class__" in data:
        cls = _config_class(data["__class__"])
        fields = {f.name for f in dataclasses.fields(cls)}
        retired = RETIRED_FIELDS.get(cls.__name__, frozenset())
        values = {k: decode_config(v) for k, v in data.items() if k != "__class__" and k not in retired}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}: the file is from another version")
        init = {k: v for k, v in values.items() if next(f for f in dataclasses.fields(cls) if f.name == k).init}
        return cls(**init)
    if isinstance(data, dict) and "__tuple__" in data:
        return tuple(decode_config(v) for v in data["__tuple__"])
    if isinstance(data, list):
        return [decode_config(v) for v in data]
    if isinstance(data, dict):
        return {k: decode_config(v) for k, v in data.items()}
    return data


# ---------------------------------------------------------------------------------------------- save and load
UNUSED_PREFIX = "hf_unused."
DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclasses.dataclass
class HFOrigin:
    """What exporting back to transformers needs beyond the hooked weights: the HF class and config, and the HF
    tensors hooked_vlm does not use (LLaVA's vision blocks after the feature layer), kept on the CPU."""

    hf_class: str
    config: dict[str, Any]
    unused: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, hf_class: str, config: Any, unused: dict[str, torch.Tensor] | None = None) -> "HFOrigin":
        """From a transformers config object (stored whole, not as a diff to the class defaults)."""
        return cls(hf_class, json.loads(config.to_json_string(use_diff=False)), unused or {})


def write_checkpoint(out_dir: str | os.PathLike, *, model_class: str, cfg: Any, entries: Iterable[Entry],
                     hf_origin: HFOrigin | None = None, unused: Iterable[Entry] = (), processor: Any = None,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                     progress: Callable[[Entry], None] | None = None,
                     sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a checkpoint folder from entries made one at a time (`save` and the streaming converter both come
    here). `unused`: the HF tensors of `hf_origin.unused`, named without the prefix. `sources`: the folders the
    checkpoint is made from, which `out_dir` may never replace nor contain.

    The folder is written complete beside `out_dir`, then swapped in (`check_target` says what may be replaced):
    at every instant `out_dir` holds the old checkpoint or the new one, whole."""
    out = Path(os.path.abspath(out_dir))  # "a/.." named by its own name, so the temporary folder lies beside it
    recover(out)
    old = check_target(out_dir, overwrite=overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = _make_temp(out, "new")
    try:
        prefixed = [Entry(UNUSED_PREFIX + e.name, e.dtype, e.shape, e.make, e.written) for e in unused]
        shards = write_shards([*entries, *prefixed], tmp, shard_bytes=shard_bytes, progress=progress)
        if processor is not None:
            processor.save_pretrained(tmp)
        written = sorted({p.name for p in tmp.iterdir()} - {PARTIAL} | {CONFIG_NAME})
        meta = {"format": "hooked_vlm", "version": FORMAT_VERSION, "model_class": model_class,
                "config": encode_config(cfg), "shards": shards, "files": written}
        if hf_origin is not None:
            meta["hf_origin"] = {"hf_class": hf_origin.hf_class, "config": hf_origin.config}
        with open(tmp / CONFIG_NAME, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # everything in it is ours, half written
        raise
    _swap_in(tmp, out, old)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- safe replacement
# A temporary folder beside the target, `.{name}.new-{pid}-{8 hex}` (the new checkpoint being written) or
# `.{name}.old-{pid}-{8 hex}` (the old one set aside, where the system cannot exchange two folders in one step).
# While a new one is written it holds PARTIAL (the writer's pid and host), removed just before the swap.
PARTIAL = ".hooked_vlm_partial"
LEGACY_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")  # processor files of a checkpoint without a file list


def _temp_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.(new|old)-(\d+)-[0-9a-f]{{8}}")


def _make_temp(out: Path, kind: str) -> Path:
    """A new folder beside `out`, with the user's umask (os.mkdir applies it; tempfile.mkdtemp would give 0700)."""
    while True:
        tmp = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        if kind == "new":
            (tmp / PARTIAL).write_text(f"{os.getpid()} {socket.gethostname()}")
        return tmp


def _own_meta(folder: Path) -> dict[str, Any] | None:
    """The metadata of a hooked_vlm checkpoint in `folder`, or None if it is not one."""
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == "hooked_vlm" and isinstance(meta.get("shards"), dict)
    return meta if ok else None


def _foreign(folder: Path, meta: dict[str, Any]) -> list[str]:
    """What `folder` holds that writing its checkpoint did not make: anything not in the config's list of files;
    for a checkpoint written before the list existed, anything but the config, its shards and top-level processor
    files (*.json, *.txt, *.model, *.jinja)."""
    listed = meta.get("files")
    if isinstance(listed, list):
        return sorted(p.name for p in folder.iterdir() if p.name not in listed)
    known = {CONFIG_NAME, *meta["shards"]}
    return sorted(p.name for p in folder.iterdir() if not (
        p.name in known or (p.is_file() and not p.is_symlink() and any(fnmatch(p.name, g) for g in LEGACY_PATTERNS))))


def check_target(out_dir: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike] = ()
                 ) -> list[str] | None:
    """Refuse, before any work, a target that writing would damage; returns the names the old folder holds (to
    remove once the new one is in), None if it does not exist.

    Only an empty folder or a hooked_vlm checkpoint holding nothing but what we wrote is replaced, and only with
    `overwrite`; never the filesystem root, the home folder, the working directory, a source of the checkpoint,
    nor any folder containing one of them."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return None
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it, or choose another "
                              "folder")
    why, real = None, out.resolve()
    if out.is_symlink():
        why = "it is a symbolic link; pass the folder it points to"
    elif not out.is_dir():
        why = "it is a file, not a checkpoint folder"
    elif real == Path(real.anchor):
        why = "it is the filesystem root"
    elif Path.home().resolve().is_relative_to(real):
        why = "it is your home folder or contains it"
    elif Path.cwd().resolve().is_relative_to(real):
        why = "it is the working directory or contains it"
    else:
        source = next((Path(s) for s in sources if Path(s).resolve().is_relative_to(real)), None)
        if source is not None:
            why = f"it is the source checkpoint {source} or contains it"
    if why is not None:
        raise FileExistsError(f"refusing to replace {out}: {why}; choose another output folder")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return names
    meta = _own_meta(out)
    if meta is None:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"refusing to replace {out}: it is not a hooked_vlm checkpoint (it holds {shown}); "
                              "choose another output folder")
    foreign = _foreign(out, meta)
    if foreign:
        raise FileExistsError(f"refusing to replace {out}: it holds files hooked_vlm did not write "
                              f"({', '.join(foreign[:5])}); move them away or choose another output folder")
    return names


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):  # kernel or filesystem lacks it
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable (a power cut after the swap keeps it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path, old: list[str] | None) -> None:
    """Put the complete folder `tmp` at `out`, then remove the old folder's files (only those)."""
    (tmp / PARTIAL).unlink()
    _fsync_dir(tmp)
    if old is None:
        try:
            os.rename(tmp, out)  # fails, losing nothing, if a non-empty `out` appeared meanwhile
        except OSError:
            shutil.rmtree(tmp)
            raise
    elif _exchange(tmp, out):
        _discard(tmp, old)  # `tmp` now holds the old folder
    else:  # two renames: between them `out` is missing, and `recover` puts the old folder back
        aside = _make_temp(out, "old")
        os.rename(out, aside)  # onto the empty folder just made
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        _discard(aside, old)
    _fsync_dir(out.parent)


def _discard(folder: Path, names: Iterable[str]) -> None:
    """Remove the named entries of a folder we wrote (the config last: until then the rest is recognisably ours),
    then the folder; anything else found in it is left, with a warning."""
    for name in sorted(names, key=lambda n: n == CONFIG_NAME):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        left = sorted(p.name for p in folder.iterdir())
        warnings.warn(f"left {folder}: it holds files hooked_vlm did not write ({', '.join(left[:5])})",
                      stacklevel=3)


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _stale(out: Path) -> list[tuple[Path, str, int]]:
    """Temporary folders beside `out` left by writes whose process has died: (folder, kind, pid)."""
    pattern, found = _temp_pattern(out), []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and _dead(int(match[2])):
            found.append((path, match[1], int(match[2])))
    return found


def recover(out_dir: str | os.PathLike) -> None:
    """Put back the folder set aside by a write killed between its two renames (`out_dir` missing): the old
    checkpoint, whole (or the empty folder it replaced)."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink() or not out.parent.is_dir():
        return
    aside = [(p, pid) for p, kind, pid in _stale(out) if kind == "old" and (_whole(p) or not any(p.iterdir()))]
    if aside:
        path, pid = max(aside, key=lambda a: a[0].stat().st_mtime)
        os.rename(path, out)
        warnings.warn(f"restored {out} from {path.name}, set aside by a write (pid {pid}) that was interrupted",
                      stacklevel=3)


def _whole(folder: Path) -> bool:
    meta = _own_meta(folder)
    return meta is not None and not (folder / PARTIAL).exists() and all(
        (folder / name).is_file() for name in meta["shards"])


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders of killed writes to `out`: a partial one marked by its (dead) writer, or a
    whole checkpoint holding nothing but its own files; name anything else in a warning."""
    host = socket.gethostname()
    for path, kind, pid in _stale(out):
        marker = path / PARTIAL
        meta = _own_meta(path)
        if marker.is_file() and marker.read_text().split() == [str(pid), host]:
            shutil.rmtree(path)
        elif not marker.exists() and meta is not None and not _foreign(path, meta):
            _discard(path, [p.name for p in path.iterdir()])
        elif not any(path.iterdir()):
            path.rmdir()
        else:
            warnings.warn(f"left {path}: a temporary folder of an interrupted write to {out.name} (pid {pid}) "
                          "holding files it did not write; remove it yourself", stacklevel=3)


def tensor_entries(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> list[Entry]:
    """Entries for tensors that exist already, cast to `dtype` (floating point ones) one at a time when written."""
    def entry(name: str, t: torch.Tensor) -> Entry:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return Entry(name, target, tuple(t.shape), lambda: t.detach().to("cpu", target))

    return [entry(name, t) for name, t in tensors]


def save(model, out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
         shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
         sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write `model` (a HookedVLM) to `out_dir` in hooked_vlm's format; returns the folder. `sources`: folders the
    model was converted from, which `out_dir` must neither be nor contain."""
    dtype = as_dtype(dtype)
    origin = model.hf_origin
    return write_checkpoint(out_dir, model_class=type(model).__name__, cfg=model.cfg,
                            entries=tensor_entries(model.state_dict().items(), dtype), hf_origin=origin,
                            unused=tensor_entries(origin.unused.items(), dtype) if origin else (),
                            processor=model.processor, shard_bytes=shard_bytes, overwrite=overwrite,
                            sources=sources)


def is_hooked_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except ValueError as e:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({e}); save or convert the checkpoint again") from e
    if not isinstance(meta, dict) or meta.get("format") != "hooked_vlm" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME} is not a hooked_vlm checkpoint of format version {FORMAT_VERSION}")
    if not isinstance(meta.get("shards"), dict) or not all(isinstance(v, list) for v in meta["shards"].values()):
        raise ValueError(f"{path / CONFIG_NAME}: 'shards' is not a map of file names to tensor names; save or "
                         "convert the checkpoint again")
    return meta


# The config fields a user may set when loading (model switches, documented in `HookedVLM.from_hf`).
MODEL_SWITCHES = ("mask_cross_attention", "hf_positions")


def apply_switches(cfg: Any, options: dict[str, Any], where: str, also: Iterable[str] = ()) -> Any:
    """`cfg` with the model switches of `options` set; a switch this model does not have is a TypeError naming the
    closest accepted keyword (`also`: the caller's other keywords, for the hint)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    reject_unknown(options, [s for s in MODEL_SWITCHES if s in fields] + list(also), where)
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{where}: {name}={value!r} is not a switch value; pass True or False")
    return dataclasses.replace(cfg, **options) if options else cfg


def shard_files(path: Path, meta: dict[str, Any]) -> list[Path]:
    """The shard files a checkpoint's metadata lists, each checked to lie inside its folder."""
    return [inside(path, file, str(path / CONFIG_NAME)) for file in meta["shards"]]


def load_processor(folder: Path) -> Any:
    """The processor saved in a folder (tokenizer and image processor files), or None if it holds none.

    A Qwen2-VL processor is built from its image processor and tokenizer where torchvision (which HF's video
    processor needs) is missing (`processors.load_qwen2_vl_processor`). A folder with an image processor whose
    processor loads without one raises rather than handing back the tokenizer alone."""
    folder = Path(folder)
    if not (any(folder.glob("*processor*")) or any(folder.glob("tokenizer*"))):
        return None
    from transformers import AutoProcessor  # here: `import hooked_vlm` does not load transformers

    if processors.is_qwen2_vl_processor_folder(folder):
        try:
            processor = processors.load_qwen2_vl_processor(folder)
        except Exception as error:
            raise ValueError(f"{folder} holds a Qwen2-VL processor that could not be built ({error}); install "
                             "torchvision matching your torch (HF's processor needs it for videos), or check the "
                             "folder's tokenizer and processor_config.json") from error
    else:
        processor = AutoProcessor.from_pretrained(folder)
    has_images = any(folder.glob("preprocessor_config.json")) or "image_processor" in _json_keys(
        folder / "processor_config.json")
    if has_images and getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{folder} holds an image processor, but transformers' AutoProcessor built only a "
                         f"{type(processor).__name__} from it: the processor class it names is missing (install the "
                         "package it needs) or unknown; load it yourself and pass processor=...")
    return processor


def _json_keys(path: Path) -> set[str]:
    return set(json.loads(path.read_text())) if path.is_file() else set()


def read_tensors(path: Path, meta: dict[str, Any], files: list[Path], dtype: torch.dtype | None,
                 target: Callable[[str], torch.device | str]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The hooked state dict of a checkpoint, each tensor read once in `dtype` (None: as stored) straight to
    `target(name)`, and the HF tensors hooked_vlm does not use (`HFOrigin.unused`, on the CPU)."""
    state, unused = {}, {}
    with ShardReader(files) as reader:  # on the CPU as stored: views of the memory-mapped shards, no copy
        for file, names in meta["shards"].items():
            missing = [n for n in names if n not in reader.keys() or reader.file(n) != path / file]
            if missing:
                raise ValueError(f"{path / file} lacks tensors {missing[:5]}")
            for name in names:
                if name.startswith(UNUSED_PREFIX):
                    unused[name[len(UNUSED_PREFIX):]] = reader.read(name, dtype)
                else:
                    state[name] = reader.read(name, dtype, target(name))
    return state, unused
