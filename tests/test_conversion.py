"""Streaming conversion from HF checkpoint folders, and export back to transformers, for every family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_vlm import HookedVLM, shards
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image
from weights_conversion.checkpoint import NoSafetensors
from weights_conversion.streaming import convert_checkpoint

IMAGES = [random_image(seed=3), random_image(seed=4)]
FAMILIES = ["blip-caption", "blip-vqa", "blip-itm", "llava", "instructblip-llama", "instructblip-t5"]


def build(name):
    family, _, kind = name.partition("-")
    if family == "blip":
        hf, processor = build_blip(kind, seed=2)
        text = ["a photo of", "two dogs on a"] if kind == "caption" else ["what color is it", "how many"]
    elif family == "llava":
        hf, processor = build_llava(seed=2, kv_heads=2)  # feature layer -2: one vision block unused
        text = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    else:
        hf, processor = build_instructblip(kind, seed=2)
        text = ["what is in the picture?", "describe this"]
    return hf, processor, processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """An HF checkpoint folder (save_pretrained, 5.x names), and the hooked model converted from the live HF model."""
    hf, processor, inputs = build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, hf, HookedVLM.from_hf(hf, processor=processor), inputs


def assert_same_model(model, reference, inputs):
    assert type(model) is type(reference) and model.cfg == reference.cfg
    for (n, a), (m, b) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))


def test_streamed_load_equals_from_hf(saved, monkeypatch):
    folder, hf, reference, inputs = saved
    from transformers import PreTrainedModel

    init = PreTrainedModel.__init__

    def meta_only(self, *args, **kwargs):  # the HF model may be built only on the meta device, to learn its names
        assert torch.empty(0).device.type == "meta", "streaming built a transformers model with real weights"
        init(self, *args, **kwargs)
    monkeypatch.setattr(PreTrainedModel, "__init__", meta_only)
    model = HookedVLM.from_pretrained(folder)
    assert_same_model(model, reference, inputs)
    assert model.processor is not None


def test_converted_folder_equals_from_hf_and_exports_exactly(saved, tmp_path):
    folder, hf, reference, inputs = saved
    out = convert_checkpoint(folder, tmp_path / "hooked")
    loaded = HookedVLM.from_pretrained(out)
    assert_same_model(loaded, reference, inputs)
    # HF -> hooked format on disk -> hooked -> HF gives back every tensor of the HF model, bit for bit
    hf_state = hf.state_dict()
    for model in (reference, loaded):
        exported = model.hf_state_dict()
        assert exported.keys() == hf_state.keys()
        for k, v in hf_state.items():
            assert torch.equal(exported[k], v), k
    back = loaded.to_hf()
    assert type(back) is type(hf)
    for k, v in back.state_dict().items():
        assert torch.equal(v, hf_state[k]), k


def test_converted_dtype_and_small_shards(tmp_path):
    hf, processor, inputs = build("llava")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # several HF shards and an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "bf16", dtype=torch.bfloat16, shard_bytes=64 * 1024)
    assert len(list(out.glob("*.safetensors"))) > 3
    loaded = HookedVLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    reference = HookedVLM.from_hf(hf, dtype=torch.bfloat16)
    for (n, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    # LLaVA's unused vision block travels with the checkpoint, so the export is still complete
    assert loaded.hf_origin.unused and all(v.dtype == torch.bfloat16 for v in loaded.hf_origin.unused.values())
    assert loaded.hf_state_dict().keys() == hf.state_dict().keys()


def test_hub_names_of_transformers_4_are_renamed(tmp_path):
    """Hub LLaVA checkpoints keep 4.x names (`vision_tower.vision_model.*`): renamed as transformers does."""
    from transformers import LlavaForConditionalGeneration

    hf, processor, inputs = build("llava")
    hf.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    old = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in old)
    save_file(old, file, metadata={"format": "pt"})
    ref = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    model = HookedVLM.from_pretrained(tmp_path / "hf")
    real = inputs["attention_mask"].bool()  # pad positions differ by design (HF numbers them, see docs/hooks.md)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[real], ref(**inputs).logits[real], atol=1e-5, rtol=0)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.hf_state_dict()[k], v), k


def test_edited_weights_run_in_transformers():
    """A head rescaling folded into W_O gives the HF model the logits of the hooked model with the rescaling hook."""
    hf, processor, inputs = build("llava")
    model = HookedVLM.from_hf(hf)
    layer, head, factor = 1, 2, 0.25

    def scale(z, hook):
        z = z.clone()
        z[:, :, head] *= factor
        return z

    with torch.no_grad():
        hooked = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.{layer}.attn.hook_z", scale)])
        model.lm.blocks[layer].attn.W_O[head] *= factor  # a view of the fused o_weight
        edited = model.to_hf()(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(edited[real], hooked[real], atol=1e-5, rtol=0)
    assert not torch.allclose(edited[real], hf(**inputs).logits[real], atol=1e-3)


def test_export_refuses_diverged_copies_of_one_hf_tensor():
    hf, _, _ = build("instructblip-t5")
    model = HookedVLM.from_hf(hf)
    with torch.no_grad():
        model.lm_encoder.embed.W_E[0] += 1  # T5's shared embedding is one HF tensor, a copy in each stack
    with pytest.raises(ValueError, match="language_model.shared.weight is held by lm_encoder.embed.W_E, "
                                         "lm_decoder.embed.W_E"):
        model.hf_state_dict()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    hf, processor, _ = build("blip-vqa")
    hf.save_pretrained(tmp_path / "hf")
    view = shards.ShardReader.view
    calls = []

    def interrupted(self, key):
        calls.append(key)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return view(self, key)
    monkeypatch.setattr(shards.ShardReader, "view", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", shard_bytes=32 * 1024)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_broken_checkpoints_are_named(tmp_path):
    hf, processor, _ = build("blip-caption")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shard = sorted((tmp_path / "hf").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        HookedVLM.from_pretrained(tmp_path / "hf")

    hf.save_pretrained(tmp_path / "extra")
    file = tmp_path / "extra" / "model.safetensors"
    state = load_file(file)
    save_file({**state, "text_decoder.bert.extra.weight": torch.zeros(2)}, file)
    with pytest.raises(ValueError, match=r"does not have: \['text_decoder.bert.extra.weight'\]"):
        HookedVLM.from_pretrained(tmp_path / "extra")
    del state["vision_model.post_layernorm.bias"]
    save_file(state, file)
    with pytest.raises(ValueError, match=r"lacks tensors \['vision_model.post_layernorm.bias'\]"):
        HookedVLM.from_pretrained(tmp_path / "extra")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoints_go_through_transformers(tmp_path):
    hf, processor, inputs = build("blip-vqa")
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(NoSafetensors):
        convert_checkpoint(folder, tmp_path / "never")
    # a local folder, and a hub id whose snapshot in the HF cache holds the pickle
    snapshot = tmp_path / "cache" / "models--org--blip-bin" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "cache" / "models--org--blip-bin" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--blip-bin" / "refs" / "main").write_text("abc")
    for model in (HookedVLM.from_pretrained(folder),
                  HookedVLM.from_pretrained("org/blip-bin", cache_dir=tmp_path / "cache", local_files_only=True)):
        with torch.no_grad():
            assert torch.equal(model(**inputs), HookedVLM.from_hf(hf)(**inputs))
    from weights_conversion.__main__ import main as convert

    assert convert([str(folder), str(tmp_path / "hooked"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "hooked" / "hooked_vlm_config.json").read_text())
    assert meta["hf_origin"]["hf_class"] == "BlipForQuestionAnswering"


def test_parameters_never_share_memory(tmp_path):
    """T5's shared embedding (one HF tensor) feeds both stacks: each parameter still gets its own memory."""
    hf, processor, inputs = build("instructblip-t5")
    hf.save_pretrained(tmp_path / "hf")
    for source in (tmp_path / "hf", HookedVLM.from_hf(hf).save_pretrained(tmp_path / "hooked")):
        model = HookedVLM.from_pretrained(source)
        with torch.no_grad():
            model.lm_encoder.embed.W_E[0] += 1
        assert not torch.equal(model.lm_encoder.embed.W_E, model.lm_decoder.embed.W_E)
