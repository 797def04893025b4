"""The streaming safetensors writer and the memory-mapped reader, against safetensors' own implementation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_vlm.shards import Entry, ShardReader, write_shards

TENSORS = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "scalar": torch.tensor(3.0),
           "empty": torch.zeros(0, 4), "ints": torch.arange(10), "mask": torch.tensor([True, False, True]),
           "half": torch.randn(2, 2048).half()}


def test_written_shards_read_back_by_safetensors(tmp_path):
    entries = [Entry(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in TENSORS.items()]
    shards = write_shards(entries, tmp_path, shard_bytes=64)
    assert len(shards) > 2 and sorted(n for names in shards.values() for n in names) == sorted(TENSORS)
    for file, names in shards.items():
        loaded = load_file(tmp_path / file)
        assert sorted(loaded) == sorted(names)
        for k, v in loaded.items():
            assert v.dtype == TENSORS[k].dtype and torch.equal(v, TENSORS[k]), k
    with pytest.raises(ValueError, match="expected torch.float32"):
        write_shards([Entry("x", torch.float32, (2,), lambda: torch.zeros(3))], tmp_path / ".", shard_bytes=64,
                     prefix="bad")


def test_reader_views_casts_and_releases(tmp_path):
    save_file(TENSORS, tmp_path / "t.safetensors")
    reader = ShardReader([tmp_path / "t.safetensors"])
    for k, v in TENSORS.items():
        assert reader.meta(k).shape == v.shape and reader.meta(k).dtype == v.dtype
        assert torch.equal(reader.read(k), v), k
    half = reader.read("half", torch.float32)
    assert half.dtype == torch.float32 and torch.equal(half, TENSORS["half"].float())
    assert torch.equal(reader.read("ints", torch.float16), TENSORS["ints"])  # integers are never cast
    view = reader.read("half")
    reader.release("half")  # the pages are dropped and come back from the file, unchanged
    assert torch.equal(view, TENSORS["half"])
    joined = reader.combine(["a", "a"], lambda v: torch.cat([v("a"), v("a")]))
    assert torch.equal(joined, torch.cat([TENSORS["a"]] * 2))
    view.mul_(2)  # copy-on-write: the file is never written
    reader.close()
    assert torch.equal(load_file(tmp_path / "t.safetensors")["half"], TENSORS["half"])
    assert torch.equal(view, TENSORS["half"] * 2)  # views outlive the reader


def test_broken_files_are_named(tmp_path):
    save_file(TENSORS, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="cut.safetensors is corrupted or truncated"):
        ShardReader([tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="junk.safetensors is corrupted"):
        ShardReader([tmp_path / "junk.safetensors"])
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        ShardReader([tmp_path / "gone.safetensors"])


def test_a_tensor_stored_twice_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="a is stored in both .*one.safetensors and .*two.safetensors"):
        ShardReader([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
