"""Streaming conversion from HF checkpoint folders, and export back to transformers, for every family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_vlm import HookedVLM, shards
from hooked_vlm.loading import hooked_class
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image
from weights_conversion import CONVERTERS, converter_for
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
    elif family == "qwen":  # "qwen-2", "qwen-2.5" (not in FAMILIES: AutoProcessor needs torchvision for them)
        from hooked_vlm.tiny import build_qwen2_vl

        hf, processor = build_qwen2_vl(seed=2, version=kind)
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        text = [f"{image}what is this?", f"hi {image}"]
    else:
        hf, processor = build_instructblip(kind, seed=2)
        text = ["what is in the picture?", "describe this"]
    return hf, processor, processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


# The tiny builds of each registered HF class (names from FAMILIES). A class registered in weights_conversion
# without an entry here fails test_every_registered_converter below, naming it: add a tiny builder for it.
TINY_BUILDS = {
    "BlipForConditionalGeneration": ["blip-caption"],
    "BlipForQuestionAnswering": ["blip-vqa"],
    "BlipForImageTextRetrieval": ["blip-itm"],
    "LlavaForConditionalGeneration": ["llava"],
    "InstructBlipForConditionalGeneration": ["instructblip-llama", "instructblip-t5"],
    "Qwen2VLForConditionalGeneration": ["qwen-2"],
    "Qwen2_5_VLForConditionalGeneration": ["qwen-2.5"],
}


@pytest.mark.parametrize("hf_class", sorted(CONVERTERS))
def test_every_registered_converter(hf_class):
    """Parametrised over the registry, so that registering an architecture tests it: each tiny build of the class
    converts through its converter, every hooked tensor comes from the plan (none left at its initial value), the
    hooked model runs, and HF -> hooked -> HF gives back every HF tensor bit for bit."""
    if hf_class not in TINY_BUILDS:
        pytest.fail(f"{hf_class} is registered in weights_conversion but has no tiny builder in TINY_BUILDS "
                    "(tests/test_conversion.py): add one so that its conversion is tested")
    for name in TINY_BUILDS[hf_class]:
        hf, processor, inputs = build(name)
        assert type(hf).__name__ == hf_class, name
        converter = converter_for(hf)
        assert converter is CONVERTERS[hf_class]
        model = HookedVLM.from_hf(hf, processor=processor)
        assert isinstance(model, hooked_class(converter)), name
        hf_state = hf.state_dict()
        converted = converter.convert(hf_state, model.cfg)
        hooked = model.state_dict()
        assert converted.keys() == hooked.keys(), name
        for k, v in hooked.items():
            assert torch.equal(converted[k], v), (name, k)
        with torch.no_grad():
            assert torch.isfinite(model(**inputs)).all(), name
        exported = model.hf_state_dict()
        assert exported.keys() == hf_state.keys(), name
        for k, v in hf_state.items():
            assert torch.equal(exported[k], v), (name, k)


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


def _llava_with_text(text_class: str, seed: int, **fields):
    """The tiny LLaVA with its Llama LM's config rebuilt as `text_class` with `fields` changed (weights random)."""
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from hooked_vlm.tiny import randomize_parameters_

    hf, processor = build_llava(seed=seed)
    text = {k: v for k, v in hf.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    text_config = getattr(transformers, text_class)(**{**text, **fields})
    cfg = LlavaConfig(vision_config=hf.config.vision_config.to_dict(), text_config=text_config.to_dict(),
                      image_token_index=hf.config.image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=fields.get("tie_word_embeddings", False))
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    return randomize_parameters_(model, seed=seed), processor


def test_llama_fields_that_change_the_forward_convert_at_parity(tmp_path):
    """head_dim != hidden / heads, q/k/v/o and MLP biases, and an unembedding tied to the embedding: each read by HF's
    Llama forward and implemented by the converter, so each is checked against transformers (from_hf and a folder)."""
    hf, processor = _llava_with_text("LlamaConfig", 12, head_dim=24, attention_bias=True, mlp_bias=True,
                                     tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert hf.model.language_model.layers[0].self_attn.q_proj.out_features == 4 * 24
    hf.save_pretrained(tmp_path / "hf")
    inputs = processor(images=IMAGES, text=["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"],
                       padding=True, return_tensors="pt")
    real = inputs["attention_mask"].bool()  # pad positions differ by design (HF numbers them, see docs/hooks.md)
    with torch.no_grad():
        ref = hf(**inputs).logits
        for model in (HookedVLM.from_hf(hf), HookedVLM.from_pretrained(tmp_path / "hf")):
            assert model.lm.cfg.block.attn.d_head == 24 and model.lm.cfg.block.mlp.bias
            torch.testing.assert_close(model(**inputs)[real], ref[real], atol=1e-5, rtol=0)


def test_a_stray_llama_field_in_a_mistral_config_changes_nothing():
    """HF's Mistral has no attention or MLP biases, whatever its config holds: the converter reads them for Llama
    only (it used to expect bias tensors that a Mistral never has)."""
    hf, processor = _llava_with_text("MistralConfig", 13, attention_bias=True, mlp_bias=True)
    assert hf.model.language_model.layers[0].self_attn.q_proj.bias is None
    inputs = processor(images=IMAGES[:1], text=["USER: <image>\nwhat is this? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(HookedVLM.from_hf(hf)(**inputs), hf(**inputs).logits, atol=1e-5, rtol=0)


def test_tied_t5_scales_its_decoder_output_at_parity(tmp_path):
    """A T5 whose head is tied to the embedding (T5 v1.0) scales the decoder output by d_model ** -0.5 before it:
    checked against transformers, from the live model and from a folder that stores the shared tensor once."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, T5Config

    from hooked_vlm.tiny import randomize_parameters_

    flan, processor, inputs = build("instructblip-t5")
    text = {k: v for k, v in flan.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    cfg = InstructBlipConfig(vision_config=flan.config.vision_config.to_dict(),
                             qformer_config=flan.config.qformer_config.to_dict(),
                             text_config=T5Config(**{**text, "tie_word_embeddings": True,
                                                        "scale_decoder_outputs": True}).to_dict(),
                             num_query_tokens=flan.config.num_query_tokens,
                             image_token_index=flan.config.image_token_id)
    hf = randomize_parameters_(InstructBlipForConditionalGeneration._from_config(cfg, attn_implementation="eager"),
                               seed=14).eval()
    assert hf.config.text_config.scale_decoder_outputs
    assert hf.language_model.lm_head.weight is hf.language_model.shared.weight
    hf.save_pretrained(tmp_path / "hf")
    inputs = {**inputs, "decoder_input_ids": torch.tensor([[0, 5, 7, 9], [0, 4, 6, 1]])}
    with torch.no_grad():
        ref = hf(**inputs).logits
        for model in (HookedVLM.from_hf(hf), HookedVLM.from_pretrained(tmp_path / "hf")):
            assert model.lm_decoder.cfg.scale_outputs
            torch.testing.assert_close(model(**inputs), ref, atol=1e-5, rtol=0)


def test_instructblip_with_a_mistral_lm_at_parity():
    """Mistral is accepted for InstructBLIP's decoder-only LM too (HF builds it with AutoModelForCausalLM): the sliding
    window binds on these prompts, and the logits equal transformers'."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, MistralConfig

    from hooked_vlm.tiny import randomize_parameters_

    vicuna, processor, inputs = build("instructblip-llama")
    text = {k: v for k, v in vicuna.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    cfg = InstructBlipConfig(vision_config=vicuna.config.vision_config.to_dict(),
                             qformer_config=vicuna.config.qformer_config.to_dict(),
                             text_config=MistralConfig(**{**text, "sliding_window": 4}).to_dict(),
                             num_query_tokens=vicuna.config.num_query_tokens,
                             image_token_index=vicuna.config.image_token_id)
    hf = randomize_parameters_(InstructBlipForConditionalGeneration._from_config(cfg, attn_implementation="eager"),
                               seed=15).eval()
    assert type(hf.language_model).__name__.startswith("Mistral")
    model = HookedVLM.from_hf(hf)
    assert model.lm.cfg.sliding_window == 4
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**inputs).logits
        torch.testing.assert_close(model(**inputs)[real], ref[real], atol=1e-5, rtol=0)
        model.lm.cfg.sliding_window = None  # the window matters here: without it the logits differ
        assert not torch.allclose(model(**inputs)[real], ref[real], atol=1e-3)
