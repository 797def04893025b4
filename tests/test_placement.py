"""Device maps (accelerate): towers and blocks placed apart, on the CPU and offloaded to disk (its weights on the
meta device until a block runs), give the same logits, caches, sweeps and generations as one device."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, metrics, patching
from hooked_vlm.placement import unsplittable
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, build_llava_phi, build_qwen2_vl, random_image

IMAGES = [random_image(seed=5), random_image(seed=6)]


def llava():
    hf, processor = build_llava(seed=3, kv_heads=2)
    maps = {"vision": "cpu", "projector": "disk", "lm.embed": "cpu", "lm.blocks.0": "disk", "lm.blocks.1": "cpu",
            "lm.rotary": "cpu", "lm.ln_final": "disk", "lm.unembed": "cpu"}
    text = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return hf, processor, maps, processor(images=IMAGES, text=text, padding=True, return_tensors="pt"), "lm"


def instructblip_t5():
    hf, processor = build_instructblip("t5", seed=3)
    maps = {"vision": "disk", "qformer": "cpu", "projector": "cpu", "lm_encoder.embed": "cpu",
            "lm_encoder.rel_pos": "disk", "lm_encoder.blocks.0": "disk", "lm_encoder.blocks.1": "cpu",
            "lm_encoder.ln_final": "cpu", "lm_decoder": "disk"}
    inputs = processor(images=IMAGES, text=["what is in the picture?", "describe this"], padding=True,
                       return_tensors="pt")
    return hf, processor, maps, inputs, "lm_encoder"


def blip_vqa():
    hf, processor = build_blip("vqa", seed=3)
    maps = {"vision": "cpu", "text_encoder.embed": "disk", "text_encoder.pos_embed": "disk",
            "text_encoder.ln_embed": "cpu", "text_encoder.blocks.0": "cpu", "text_encoder.blocks.1": "disk",
            "text_decoder": "disk"}
    return hf, processor, maps, processor(images=IMAGES, text=["what color is it", "how many"], padding=True,
                                          return_tensors="pt"), "text_encoder"


def llava_phi2():
    """Phi-2's parallel block (one norm read by attention and MLP), with HF's per-head q/k norms."""
    hf, processor = build_llava_phi("phi", seed=3, qk_layernorm=True)
    maps = {"vision": "disk", "projector": "cpu", "lm.embed": "disk", "lm.blocks.0": "cpu", "lm.blocks.1": "disk",
            "lm.rotary": "cpu", "lm.ln_final": "cpu", "lm.unembed": "disk"}
    text = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return hf, processor, maps, processor(images=IMAGES, text=text, padding=True, return_tensors="pt"), "lm"


def _qwen(version):
    hf, processor = build_qwen2_vl(seed=3, version=version)
    # the vision tower and the patch merger hold parameters of their own: each is placed whole. `lm.rotary` holds
    # no tensors (the multimodal rotary's cos / sin are computed from the [3, B, T] positions in each forward), but
    # is a module of its own, so the map places it. Qwen2 and Qwen2.5 swap the devices: every module meets the disk.
    disk, cpu = ("disk", "cpu") if version == "2" else ("cpu", "disk")
    maps = {"vision": disk, "projector": cpu, "lm.embed": disk, "lm.rotary": cpu, "lm.blocks.0": cpu,
            "lm.blocks.1": disk, "lm.ln_final": cpu, "lm.unembed": disk}
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = processor(images=[random_image((40, 30), seed=5), random_image((50, 50), seed=6)],
                       text=[f"{image}what is this?", f"hi {image}"], padding=True, return_tensors="pt")
    return hf, processor, maps, inputs, "lm"


def qwen2_vl():
    return _qwen("2")


def qwen2_5_vl():
    return _qwen("2.5")


@pytest.fixture(scope="module", params=[llava, instructblip_t5, blip_vqa, llava_phi2, qwen2_vl, qwen2_5_vl],
                ids=lambda f: f.__name__)
def placed(request, tmp_path_factory):
    hf, processor, device_map, inputs, tower = request.param()
    folder = tmp_path_factory.mktemp("hooked")
    reference = HookedVLM.from_hf(hf, processor=processor)
    reference.save_pretrained(folder / "model")
    model = HookedVLM.from_pretrained(folder / "model", device_map=device_map, offload_dir=folder / "offload")
    return reference, model, inputs, tower


def test_split_model_equals_one_device(placed):
    reference, model, inputs, tower = placed
    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    assert offloaded, "the disk-offloaded blocks keep their weights off the model"
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))
        names = lambda n: n.endswith(("hook_resid_post", "hook_pattern", "hook_z"))  # noqa: E731
        _, cache = model.run_with_cache(**inputs, names_filter=names)
        _, ref_cache = reference.run_with_cache(**inputs, names_filter=names)
    assert cache.keys() == ref_cache.keys() and len(cache) > 0
    for name in ref_cache:
        assert torch.equal(cache[name], ref_cache[name]), name
    if reference.output_tower:  # ITM-free families all generate
        assert torch.equal(model.generate(**inputs, max_new_tokens=3), reference.generate(**inputs, max_new_tokens=3))


def test_hooks_and_sweeps_on_a_split_model(placed):
    reference, model, inputs, tower = placed
    zero_head = f"{tower}.blocks.1.attn.hook_z"

    def zero(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(**inputs, fwd_hooks=[(zero_head, zero)]),
                           reference.run_with_hooks(**inputs, fwd_hooks=[(zero_head, zero)]))
    flipped = {k: v.flip(0) for k, v in inputs.items()}
    metric = metrics.logit_diff(3, 5)
    for m in (model, reference):
        m.sweep = patching.patch_heads(m, inputs, flipped, metric, tower=tower, progress=False)
    torch.testing.assert_close(model.sweep, reference.sweep, atol=1e-6, rtol=0)


def test_auto_device_map_spills_to_disk(tmp_path):
    hf, processor, _, inputs, _ = llava()
    reference = HookedVLM.from_hf(hf, processor=processor)
    reference.save_pretrained(tmp_path / "m")
    hf.save_pretrained(tmp_path / "hf")
    half = sum(p.numel() * p.element_size() for p in reference.parameters()) // 2
    for source in (tmp_path / "m", tmp_path / "hf"):  # hooked_vlm's format and a streamed HF checkpoint
        model = HookedVLM.from_pretrained(source, device_map="sequential", max_memory={"cpu": half},
                                          offload_dir=tmp_path / f"offload-{source.name}")
        assert set(model.device_map.values()) == {"cpu", "disk"}
        for name, kind in unsplittable(model).items():  # blocks and towers with parameters of their own stay whole
            assert not any(k.startswith(name + ".") for k in model.device_map), (name, kind)
        with torch.no_grad():
            assert torch.equal(model(**inputs), reference(**inputs))


def test_device_map_errors(tmp_path):
    hf, processor, device_map, _, _ = llava()
    HookedVLM.from_hf(hf).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="offload_dir"):
        HookedVLM.from_pretrained(tmp_path / "m", device_map=device_map)
    with pytest.raises(ValueError, match=r"modules the model does not have: \['lm.blocks.9'\]"):
        HookedVLM.from_pretrained(tmp_path / "m", device_map={**device_map, "lm.blocks.9": "cpu"})
    split_vision = {k: v for k, v in device_map.items() if k != "vision"} | {"vision.blocks.0": "cpu",
                                                                             "vision.patch_embed": "cpu"}
    with pytest.raises(ValueError, match="place 'vision' whole"):
        HookedVLM.from_pretrained(tmp_path / "m", device_map=split_vision)
    with pytest.raises(ValueError, match="one of auto"):
        HookedVLM.from_pretrained(tmp_path / "m", device_map="everywhere")
    missing = {k: v for k, v in device_map.items() if k != "lm.unembed"}
    with pytest.raises(ValueError, match="lm.unembed"):
        HookedVLM.from_pretrained(tmp_path / "m", device_map=missing)
