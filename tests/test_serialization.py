"""hooked_vlm's own format: round trips for every family, atomic writes, corrupted shards."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, serialization, shards
from hooked_vlm.shards import Entry
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]


def family(name):
    if name == "blip":
        hf, processor = build_blip("vqa", seed=1)
        return hf, processor, processor(images=IMAGES, text=["what color is it", "how many"], padding=True,
                                        return_tensors="pt")
    if name == "llava":
        hf, processor = build_llava(seed=1, kv_heads=2)
        return hf, processor, processor(images=IMAGES, text=["USER: <image>\nwhat is this? ASSISTANT:",
                                                             "USER: <image>\nhi ASSISTANT:"], padding=True,
                                        return_tensors="pt")
    hf, processor = build_instructblip(name.split("-")[1], seed=1)
    return hf, processor, processor(images=IMAGES, text=["what is in the picture?", "describe this"], padding=True,
                                    return_tensors="pt")


@pytest.mark.parametrize("name", ["blip", "llava", "instructblip-llama", "instructblip-t5"])
def test_round_trip_equals_hf(name, tmp_path, monkeypatch):
    hf, processor, inputs = family(name)
    model = HookedVLM.from_hf(hf, processor=processor)
    out = model.save_pretrained(tmp_path / "hooked", dtype=None)
    assert (out / serialization.CONFIG_NAME).is_file() and list(out.glob("*.safetensors"))
    from transformers import PreTrainedModel

    def no_model_classes(*args, **kwargs):
        raise AssertionError("loading hooked_vlm's format must not build a transformers model")
    monkeypatch.setattr(PreTrainedModel, "__init__", no_model_classes)
    loaded = HookedVLM.from_pretrained(out)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    assert type(loaded.processor) is type(processor)
    assert loaded.processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_small_shards_and_dtype(tmp_path):
    hf, processor, inputs = family("blip")
    model = HookedVLM.from_hf(hf, processor=processor)
    out = serialization.save(model, tmp_path / "half", dtype=torch.bfloat16, shard_bytes=64 * 1024)
    assert len(list(out.glob("*.safetensors"))) > 3
    loaded = HookedVLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.vision.W_pos, model.vision.W_pos.to(torch.bfloat16))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    hf, processor, _ = family("blip")
    model = HookedVLM.from_hf(hf, processor=processor)
    calls = []
    write_shard = shards._write_shard

    def failing_write(path, entries, metadata):
        calls.append(path)
        if len(calls) == 2:  # interrupted while writing the second shard, half of it on disk
            entries = [*entries[:1], Entry("boom", torch.float32, (1,), lambda: (_ for _ in ()).throw(KeyboardInterrupt))]
        write_shard(path, entries, metadata)
    monkeypatch.setattr(shards, "_write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        serialization.save(model, tmp_path / "out", shard_bytes=64 * 1024)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_corrupted_or_missing_shard_is_named(tmp_path):
    hf, processor, _ = family("blip")
    out = HookedVLM.from_hf(hf, processor=processor).save_pretrained(tmp_path / "m")
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name):
        HookedVLM.from_pretrained(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        HookedVLM.from_pretrained(out)
    with pytest.raises(FileExistsError, match="exists"):
        HookedVLM.from_hf(hf).save_pretrained(out)


def test_conversion_command_and_cli(tmp_path, capsys):
    from hooked_vlm import cli
    from weights_conversion.__main__ import main as convert

    hf, processor, inputs = family("llava")
    hf.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    assert convert([str(tmp_path / "hf"), str(tmp_path / "hooked"), "--dtype", "float32"]) == 0
    loaded = HookedVLM.from_pretrained(tmp_path / "hooked")
    with torch.no_grad():
        ref = HookedVLM.from_hf(hf)(**inputs)
        torch.testing.assert_close(loaded(**inputs), ref, atol=1e-5, rtol=0)
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert HookedVLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert convert([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "hooked")]) == 2  # exists: one-line error
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err


def test_zero_copy_load_never_writes_the_files(tmp_path):
    """On the CPU the weights are views of the shards' memory maps: edits are copy-on-write, the files stay."""
    hf, processor, inputs = family("llava")
    out = HookedVLM.from_hf(hf, processor=processor).save_pretrained(tmp_path / "m")
    before = {f.name: f.read_bytes() for f in out.glob("*.safetensors")}
    model = HookedVLM.from_pretrained(out)
    with torch.no_grad():
        original = model(**inputs)
        for p in model.parameters():
            p.mul_(2)
        assert not torch.equal(model(**inputs), original)
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == before
    with torch.no_grad():
        assert torch.equal(HookedVLM.from_pretrained(out)(**inputs), original)


def test_checkpoint_of_the_previous_version_loads(tmp_path):
    """Checkpoints written before the refactor of issue 12 name the family configs by their old modules and hold
    `BlockConfig.n_query` (None, or the Q-Former's query count): they load, and compute the same."""
    import json

    hf, processor, inputs = family("instructblip-t5")
    model = HookedVLM.from_hf(hf, processor=processor)
    out = model.save_pretrained(tmp_path / "old", dtype=None)
    path = out / serialization.CONFIG_NAME
    saved = json.loads(path.read_text())

    def as_before(node, n_query=None):
        if isinstance(node, dict):
            if node.get("__class__") == "hooked_vlm.configs.InstructBlipConfig":
                node["__class__"] = "hooked_vlm.models.instructblip.InstructBlipConfig"
            if node.get("__class__", "").endswith(".QFormerConfig"):
                n_query = node["n_query"]
            if node.get("__class__", "").endswith(".BlockConfig"):
                node["n_query"] = n_query
            for value in node.values():
                as_before(value, n_query)
        elif isinstance(node, list):
            for value in node:
                as_before(value, n_query)

    as_before(saved)
    text = json.dumps(saved)
    assert text.count('"n_query"') > 1  # the Q-Former config's own, and the blocks'
    assert "hooked_vlm.models.instructblip.InstructBlipConfig" in text
    path.write_text(text)
    loaded = HookedVLM.from_pretrained(out)
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
