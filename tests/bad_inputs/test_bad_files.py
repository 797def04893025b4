"""Files and loading, as an adversary would use them: overwrites that would lose data, crafted shards, headers and
shard indexes, bad dtypes, paths and loading options (one row each); then the data-loss scenarios: refusals that
leave every byte in place, a kill at each phase of a save's swap, stale temporaries, and the user's umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from badcase import expect_error

from hooked_vlm import HookedVLM, serialization, shards
from hooked_vlm.tiny import random_image
from weights_conversion.__main__ import convert, main as convert_main
from weights_conversion.streaming import convert_checkpoint

SHARD = "model-00001.safetensors"  # the one shard of a tiny model saved with the default shard size


@dataclass
class Ctx:
    """One row's world: fresh copies of a saved hooked checkpoint and of its HF folder in `tmp`."""

    tmp: Path
    model: HookedVLM
    ckpt: Path
    hf: Path
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture(scope="module")
def saved(families, tmp_path_factory):
    fam = families["blip"]
    root = tmp_path_factory.mktemp("saved")
    fam.model.save_pretrained(root / "hooked")
    fam.hf.save_pretrained(root / "hf")
    fam.processor.save_pretrained(root / "hf")
    return root


@pytest.fixture
def c(saved, families, tmp_path, monkeypatch) -> Ctx:
    shutil.copytree(saved / "hooked", tmp_path / "ckpt")
    shutil.copytree(saved / "hf", tmp_path / "hf")
    return Ctx(tmp_path, families["blip"].model, tmp_path / "ckpt", tmp_path / "hf", monkeypatch)


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` with its content's hash: what a refused call must leave exactly as it was."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


# ---------------------------------------------------------------------------------------------- row helpers
def save_to(target):
    return lambda c: lambda: c.model.save_pretrained(target(c), overwrite=True)


def in_cwd(folder: str, target: str):
    def setup(c):
        (c.tmp / folder).mkdir(parents=True)
        c.monkeypatch.chdir(c.tmp / folder)
        return lambda: c.model.save_pretrained(target, overwrite=True)
    return setup


def as_home(c):
    (c.tmp / "home").mkdir()  # empty: only its being the home folder protects it
    c.monkeypatch.setenv("HOME", str(c.tmp / "home"))
    return lambda: c.model.save_pretrained(c.tmp / "home", overwrite=True)


def with_file(name: str, where: str = "ckpt", legacy: bool = False):
    def setup(c):
        folder = c.tmp / where
        folder.mkdir(exist_ok=True)
        (folder / name).write_text("the user's own work")
        if legacy:  # a checkpoint from before the config listed its files
            edit_config(c, lambda meta: meta.pop("files"))
        return lambda: c.model.save_pretrained(folder, overwrite=True)
    return setup


def with_subfolder(c):
    (c.ckpt / "runs").mkdir()
    return lambda: c.model.save_pretrained(c.ckpt, overwrite=True)


def to_symlink(c):
    (c.tmp / "link").symlink_to(c.ckpt)
    return lambda: c.model.save_pretrained(c.tmp / "link", overwrite=True)


def pickle_only(c):
    (c.hf / "model.safetensors").unlink()
    (c.hf / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    return c.hf


def edit_config(c, edit):
    path = c.ckpt / serialization.CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def shard_named(name: str):
    """The checkpoint's config names its shard `name` instead of the file it wrote."""
    def setup(c):
        edit_config(c, lambda meta: meta.__setitem__("shards", {name: meta["shards"].pop(SHARD)}))
        return lambda: HookedVLM.from_pretrained(c.ckpt)
    return setup


def shard_linked_outside(c):
    shutil.move(c.ckpt / SHARD, c.tmp / "elsewhere.safetensors")
    (c.ckpt / SHARD).symlink_to(c.tmp / "elsewhere.safetensors")
    return lambda: HookedVLM.from_pretrained(c.ckpt)


def hf_index(content: str):
    def setup(c):
        (c.hf / "model.safetensors.index.json").write_text(content)
        return lambda: HookedVLM.from_pretrained(c.hf)
    return setup


def crafted(header, data: bytes = bytes(16), length: int | None = None):
    """The checkpoint's shard replaced by a safetensors file with this header (JSON-encoded unless bytes)."""
    def setup(c):
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        n = len(text) if length is None else length
        (c.ckpt / SHARD).write_bytes(struct.pack("<Q", n) + text + data)
        return lambda: HookedVLM.from_pretrained(c.ckpt)
    return setup


def f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def load(source, **kw):
    return lambda c: lambda: HookedVLM.from_pretrained(source(c), **kw)


def offline(c):
    c.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lambda: HookedVLM.from_pretrained("tiny-org/never-downloaded", cache_dir=c.tmp / "cache")


ROWS = [
    # overwrites that would lose data: refused, naming the path and why
    pytest.param(lambda c: lambda: c.model.save_pretrained(c.ckpt), FileExistsError, ("exists", "overwrite=True"),
                 id="exists-without-overwrite"),
    pytest.param(in_cwd("work", "."), FileExistsError, ("working directory",), id="overwrite-cwd"),
    pytest.param(in_cwd("a/b", ".."), FileExistsError, ("working directory",), id="overwrite-parent-of-cwd"),
    pytest.param(as_home, FileExistsError, ("home",), id="overwrite-home"),
    pytest.param(save_to(lambda c: "/"), FileExistsError, ("filesystem root",), id="overwrite-root"),
    pytest.param(save_to(lambda c: c.ckpt / SHARD), FileExistsError, ("is a file",), id="overwrite-a-file"),
    pytest.param(to_symlink, FileExistsError, ("symbolic link",), id="overwrite-a-symlink"),
    pytest.param(with_file("notes.txt", where="mine"), FileExistsError, ("not a hooked_vlm checkpoint", "notes.txt"),
                 id="overwrite-non-checkpoint"),
    pytest.param(with_file("notes.txt"), FileExistsError, ("did not write", "notes.txt"),
                 id="overwrite-checkpoint-with-extra-file"),
    pytest.param(with_file("weights.safetensors", legacy=True), FileExistsError, ("weights.safetensors",),
                 id="overwrite-legacy-checkpoint-with-extra-shard"),
    pytest.param(with_subfolder, FileExistsError, ("did not write", "runs"), id="overwrite-checkpoint-with-folder"),
    pytest.param(save_to(lambda c: c.hf), FileExistsError, ("not a hooked_vlm checkpoint",),
                 id="overwrite-hf-folder"),
    pytest.param(lambda c: lambda: convert_checkpoint(c.hf, c.hf, overwrite=True), FileExistsError,
                 ("source", "hf"), id="convert-onto-source"),
    pytest.param(lambda c: lambda: convert_checkpoint(c.hf, c.tmp, overwrite=True), FileExistsError,
                 ("source",), id="convert-onto-parent-of-source"),
    pytest.param(lambda c: (pickle_only(c), lambda: convert(str(c.hf), str(c.tmp), overwrite=True, progress=False))[1],
                 FileExistsError, ("source",), id="convert-pickle-onto-parent-of-source"),
    # dtypes
    pytest.param(lambda c: lambda: c.model.save_pretrained(c.tmp / "x", dtype=torch.int8), TypeError,
                 ("int8", "bfloat16"), id="save-int8"),
    pytest.param(lambda c: lambda: c.model.save_pretrained(c.tmp / "x", dtype="float61"), TypeError,
                 ("float61",), id="save-dtype-typo"),
    pytest.param(load(lambda c: c.ckpt, dtype=torch.int64), TypeError, ("int64",), id="load-int64"),
    pytest.param(lambda c: lambda: convert_checkpoint(c.hf, c.tmp / "x", dtype="int8"), TypeError, ("int8",),
                 id="convert-int8"),
    # options: every one honoured or refused, for every source
    pytest.param(load(lambda c: c.ckpt, mask_cross_atention=True), TypeError, ("mask_cross_attention",),
                 id="option-typo"),
    pytest.param(load(lambda c: c.ckpt, devcie="cpu"), TypeError, ("'device'",), id="keyword-typo"),
    pytest.param(load(lambda c: c.ckpt, hf_positions=True), TypeError, ("hf_positions",),
                 id="hooked-folder-option-of-another-family"),
    pytest.param(load(lambda c: c.hf, hf_positions=True), TypeError, ("hf_positions",),
                 id="hf-folder-option-of-another-family"),
    pytest.param(load(lambda c: c.ckpt, mask_cross_attention="yes"), TypeError, ("True or False",),
                 id="option-not-a-bool"),
    pytest.param(load(lambda c: c.ckpt, revision="main"), ValueError, ("revision", "local folder"),
                 id="revision-with-hooked-folder"),
    pytest.param(load(lambda c: c.hf, cache_dir="/tmp"), ValueError, ("cache_dir", "local folder"),
                 id="cache-dir-with-hf-folder"),
    pytest.param(lambda c: lambda: convert_checkpoint(c.hf, c.tmp / "x", hf_positions=True), TypeError,
                 ("hf_positions",), id="convert-option-of-another-family"),
    # paths
    pytest.param(load(lambda c: c.tmp / "missing"), FileNotFoundError, ("no folder", "missing"),
                 id="missing-local-path"),
    pytest.param(load(lambda c: "./missing-model"), FileNotFoundError, ("no folder",), id="missing-relative-path"),
    pytest.param(load(lambda c: c.ckpt / SHARD), NotADirectoryError, ("is a file",), id="a-file-as-checkpoint"),
    pytest.param(offline, FileNotFoundError, ("tiny-org/never-downloaded", "HF cache"), id="hub-id-offline"),
    pytest.param(lambda c: lambda: HookedVLM.from_pretrained("tiny-org/never-downloaded", local_files_only=True,
                                                             cache_dir=c.tmp / "cache"),
                 FileNotFoundError, ("local_files_only",), id="hub-id-local-files-only"),
    pytest.param(lambda c: (pickle_only(c), lambda: HookedVLM.from_pretrained(c.hf))[1], ValueError,
                 ("no safetensors weights", "model.safetensors"), id="pickle-only-unloadable"),
    # shard indexes that reach outside the folder
    pytest.param(shard_named("../outside.safetensors"), ValueError, ("../outside.safetensors", "inside"),
                 id="hooked-index-dotdot"),
    pytest.param(shard_named("/etc/hostname"), ValueError, ("/etc/hostname", "inside"), id="hooked-index-absolute"),
    pytest.param(shard_linked_outside, ValueError, ("link", "outside"), id="hooked-shard-symlink-outside"),
    pytest.param(hf_index('{"weight_map": {"a": "../model.safetensors"}}'), ValueError,
                 ("../model.safetensors", "inside"), id="hf-index-dotdot"),
    pytest.param(hf_index('{"weight_map": {"a": "/etc/hostname"}}'), ValueError, ("/etc/hostname", "inside"),
                 id="hf-index-absolute"),
    pytest.param(hf_index('{"weight_map": ["model.safetensors"]}'), ValueError, ("not a shard index",),
                 id="hf-index-not-a-map"),
    pytest.param(hf_index("{not json"), ValueError, ("not a shard index",), id="hf-index-not-json"),
    pytest.param(lambda c: (edit_config(c, lambda m: m.__setitem__("shards", [SHARD])),
                            lambda: HookedVLM.from_pretrained(c.ckpt))[1], ValueError, ("'shards'",),
                 id="hooked-index-not-a-map"),
    pytest.param(lambda c: ((c.ckpt / serialization.CONFIG_NAME).write_text("{oops"),
                            lambda: HookedVLM.from_pretrained(c.ckpt))[1], ValueError, ("not valid JSON",),
                 id="hooked-config-not-json"),
    # safetensors headers and offsets
    pytest.param(crafted([1, 2]), ValueError, ("JSON list", SHARD), id="header-a-json-list"),
    pytest.param(crafted(b"{nope"), ValueError, ("corrupted", SHARD), id="header-not-json"),
    pytest.param(crafted(b"{}", length=2**40), ValueError, ("header of",), id="header-longer-than-file"),
    pytest.param(crafted({"a": f32([-8, 0])}), ValueError, ("offsets",), id="offset-negative"),
    pytest.param(crafted({"a": f32([8, 0])}), ValueError, ("spans bytes 8..0",), id="offsets-reversed"),
    pytest.param(crafted({"a": f32([0, 8]), "b": f32([4, 12])}), ValueError, ("overlaps",), id="offsets-overlap"),
    pytest.param(crafted({"a": f32([8, 24], (4,))}), ValueError, ("ends at byte 24",), id="offset-past-the-data"),
    pytest.param(crafted({"a": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}), ValueError, ("dtype",),
                 id="dtype-unknown"),
    pytest.param(crafted({"a": f32([0, 8], (-1, -2))}), ValueError, ("shape",), id="shape-negative"),
]


@pytest.mark.parametrize("setup, error, words", ROWS)
def test_bad_file_input(c, setup, error, words):
    call = setup(c)
    before = tree(c.tmp)
    expect_error(call, error, *words)
    assert tree(c.tmp) == before, "a refused call changed files"


def test_refused_conversions_from_the_command_line_lose_nothing(c, capsys):
    """`python -m weights_conversion SRC OUT --overwrite` with OUT '.', the source or its parent: exit 2, one
    line, every file kept."""
    c.monkeypatch.chdir(c.tmp)
    before = tree(c.tmp)
    for out in (".", str(c.hf), str(c.tmp)):
        assert convert_main([str(c.hf), out, "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing to replace" in err
    assert tree(c.tmp) == before


# ---------------------------------------------------------------------------------------------- what is honoured
def test_switches_and_dtype_names_are_honoured_for_every_source(c, families):
    fam = families["blip"]
    for source in (c.ckpt, c.hf):
        model = HookedVLM.from_pretrained(source, mask_cross_attention=True, dtype="float64")
        assert model.cfg.mask_cross_attention and model.dtype == torch.float64, source
    plain = HookedVLM.from_pretrained(c.ckpt)
    assert not plain.cfg.mask_cross_attention
    texts = ["what color is the car", "what"]  # padded: the switch changes the answer decoder's cross-attention
    inputs = fam.processor(images=[random_image(seed=0)] * 2, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = HookedVLM.from_hf(fam.hf, mask_cross_attention=True)(**inputs)
        got = HookedVLM.from_pretrained(c.ckpt, mask_cross_attention=True)(**inputs)
        assert torch.equal(got, want) and not torch.equal(plain(**inputs), want)
    out = fam.model.save_pretrained(c.tmp / "bf16", dtype="bfloat16")
    assert HookedVLM.from_pretrained(out).dtype == torch.bfloat16
    llava = families["llava"].model.save_pretrained(c.tmp / "llava")
    assert HookedVLM.from_pretrained(llava, hf_positions=True).cfg.hf_positions


# ---------------------------------------------------------------------------------------------- replacing
def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def w_pos(path: Path) -> torch.Tensor:
    return HookedVLM.from_pretrained(path).vision.W_pos


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_a_checkpoint_and_nothing_else(c, exchange):
    if not exchange:
        c.monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    (c.tmp / "keep.txt").write_text("beside the target")
    new = HookedVLM.from_pretrained(c.ckpt)
    with torch.no_grad():
        new.vision.W_pos.add_(1)
    serialization.save(new, c.ckpt, overwrite=True, shard_bytes=64 * 1024)
    assert torch.equal(w_pos(c.ckpt), new.vision.W_pos) and len(list(c.ckpt.glob("*.safetensors"))) > 3
    assert siblings(c.ckpt) == [] and (c.tmp / "keep.txt").read_text() == "beside the target"
    empty = c.tmp / "empty"
    empty.mkdir()
    assert torch.equal(w_pos(new.save_pretrained(empty, overwrite=True)), new.vision.W_pos)


def _arm(phase: str) -> None:
    """In the child: SIGKILL itself at `phase` of `serialization.save(..., overwrite=True)`."""
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "writing":  # the second shard of the new folder
        write, count = shards._write_shard, []
        def write_shard(*args):
            count.append(1)
            if len(count) == 2:
                die()
            write(*args)
        shards._write_shard = write_shard
    elif phase == "written":  # the new folder complete and still marked partial
        serialization._swap_in = lambda tmp, out, old: die()
    elif phase in ("unmarked", "exchanged"):  # just before, or just after, the exchange of the two folders
        exchange = serialization._exchange
        serialization._exchange = lambda a, b: die() if phase == "unmarked" else (exchange(a, b), die())
    elif phase in ("set-aside", "renamed-in"):  # between, or after, the two renames where there is no exchange
        serialization._exchange = lambda a, b: False
        rename, count = os.rename, []
        def rename_then_die(a, b):
            rename(a, b)
            count.append(1)
            if len(count) == (1 if phase == "set-aside" else 2):
                die()
        os.rename = rename_then_die
    elif phase == "discarding":  # the old folder's files half removed
        discard = serialization._discard
        unlink = Path.unlink
        def discard_then_die(folder, names):
            count = []
            def unlink_then_die(self, missing_ok=False):
                unlink(self, missing_ok=missing_ok)
                count.append(1)
                if len(count) == 2:
                    die()
            Path.unlink = unlink_then_die
            discard(folder, names)
        serialization._discard = discard_then_die


PHASES = {"writing": "old", "written": "old", "unmarked": "old", "exchanged": "new", "set-aside": "missing",
          "renamed-in": "new", "discarding": "new"}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_kill_at_any_phase_leaves_the_old_or_the_new_checkpoint_whole(c, phase):
    if phase == "exchanged" and getattr(serialization._libc(), "renameat2", None) is None:
        pytest.skip("no renameat2 here: the two-renames phases cover this system")
    (c.tmp / "keep.txt").write_text("beside the target")
    old = w_pos(c.ckpt)
    new = HookedVLM.from_pretrained(c.ckpt)
    with torch.no_grad():
        new.vision.W_pos.add_(1)
    pid = os.fork()  # a child killed mid-save, as SIGKILL or a power cut would
    if pid == 0:
        try:
            torch.set_num_threads(1)  # no thread pool in a forked child
            _arm(phase)
            serialization.save(new, c.ckpt, overwrite=True, shard_bytes=64 * 1024)
        finally:
            os._exit(3)  # never back into pytest; 3: the kill did not happen
    deadline = time.monotonic() + 120
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the child saving at phase {phase} hung")
    assert os.WIFSIGNALED(status[1]) and os.WTERMSIG(status[1]) == signal.SIGKILL, status
    assert siblings(c.ckpt), "the kill left no temporary folder: the phase was not reached"
    expected = PHASES[phase]
    if expected == "missing":  # between the two renames; a load puts the old checkpoint back
        assert not c.ckpt.exists()
        with pytest.warns(UserWarning, match="restored"):
            assert torch.equal(w_pos(c.ckpt), old)
    else:
        assert torch.equal(w_pos(c.ckpt), old if expected == "old" else new.vision.W_pos)
    serialization.save(new, c.ckpt, overwrite=True)  # a later write removes what the killed one left
    assert siblings(c.ckpt) == [] and torch.equal(w_pos(c.ckpt), new.vision.W_pos)
    assert (c.tmp / "keep.txt").read_text() == "beside the target"


def test_stale_temporaries_of_dead_writers_are_removed_others_named(c):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    name = c.ckpt.name

    def temp(pid: int, suffix: str, files: dict[str, str]) -> Path:
        folder = c.tmp / f".{name}.new-{pid}-{suffix}"
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        return folder

    marked = temp(dead.pid, "0123abcd", {serialization.PARTIAL: f"{dead.pid} {host}", SHARD: "half"})
    foreign = temp(dead.pid, "89abcdef", {"thesis.tex": "the user's own work"})
    running = temp(os.getppid(), "deadbeef", {serialization.PARTIAL: f"{os.getppid()} {host}"})
    other = c.tmp / f".other.new-{dead.pid}-0123abcd"
    other.mkdir()
    with pytest.warns(UserWarning, match=f"left .*{foreign.name}"):
        c.model.save_pretrained(c.ckpt, overwrite=True)
    assert not marked.exists() and (foreign / "thesis.tex").exists() and running.exists() and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_folders_and_files_get_the_users_umask(c, umask):
    previous = os.umask(umask)
    try:
        out = c.model.save_pretrained(c.tmp / "nested" / "m")
        replaced = c.model.save_pretrained(c.ckpt, overwrite=True)
    finally:
        os.umask(previous)
    for folder in (out, out.parent, replaced):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
        for f in folder.glob("*.*"):
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
