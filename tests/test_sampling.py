"""Sampling in `generate` equals transformers' `generate(do_sample=True, ...)` token for token for the same seed, on
every family that generates (tiny randomised HF models built in the test), with temperature, top-k and top-p each
and combined; and the sampler's filtered scores equal HF's own logits warpers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from hooked_vlm import HookedVLM
from hooked_vlm.models.generation import Sampler
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
SETTINGS = {
    "defaults": {},  # HF's defaults: top_k=50
    "temperature": {"temperature": 1.7},
    "top_k": {"top_k": 3},
    "top_p": {"top_p": 0.6},
    "combined": {"temperature": 1.5, "top_k": 4, "top_p": 0.5},  # top-p keeps ~2 of the top 4, not ~half
}
NEW_TOKENS = 8


def _blip(kind):
    hf, processor = build_blip(kind, seed=3)
    text = ["how many dogs are in the photo", "what color"] if kind == "vqa" else ["a picture of", "a"]
    return hf, processor, processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


def _llava():
    hf, processor = build_llava(seed=5)
    text = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return hf, processor, processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


def _instructblip(lm):
    hf, processor = build_instructblip(lm, seed=3)
    hf.set_attn_implementation("eager")
    text = ["what is in the picture of the street?", "a cat"]
    return hf, processor, processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


FAMILIES = {
    "blip-caption": lambda: _blip("caption"),
    "blip-vqa": lambda: _blip("vqa"),
    "llava": _llava,
    "instructblip-llama": lambda: _instructblip("llama"),
    "instructblip-t5": lambda: _instructblip("t5"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    hf, processor, inputs = FAMILIES[request.param]()
    return request.param, hf, HookedVLM.from_hf(hf, processor=processor), inputs


def _hf_sample(hf, inputs, seed, **options):
    torch.manual_seed(seed)
    with torch.no_grad():
        return hf.generate(**inputs, do_sample=True, max_new_tokens=NEW_TOKENS, **options)


def _ours_sample(model, inputs, seed, **options):
    torch.manual_seed(seed)
    return model.generate(**inputs, do_sample=True, max_new_tokens=NEW_TOKENS, **options)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampling_equals_hf_for_a_seed(family, setting):
    name, hf, model, inputs = family
    options = SETTINGS[setting]
    for seed in (0, 1):
        ref = _hf_sample(hf, inputs, seed, **options)
        ours = _ours_sample(model, inputs, seed, **options)
        assert torch.equal(ours, ref), (name, setting, seed, ours, ref)


def test_sampling_samples(family):
    """The parity above is not greedy search in disguise: sampled tokens differ from greedy ones and across seeds,
    and a `generator` replaces the global random state."""
    name, hf, model, inputs = family
    greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    runs = [_ours_sample(model, inputs, seed, temperature=3.0) for seed in range(3)]
    assert any(not torch.equal(run, greedy) for run in runs), name
    assert any(not torch.equal(runs[0], run) for run in runs[1:]), name
    torch.manual_seed(123)  # the global state must not matter when a generator is given
    with_generator = model.generate(**inputs, do_sample=True, max_new_tokens=NEW_TOKENS, temperature=3.0,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(with_generator, runs[0])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_warped_scores_equal_hf_warpers(setting):
    """The filtered scores, with ties at the top-k boundary and in the nucleus, equal HF's warpers in HF's order."""
    options = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, **SETTINGS[setting]}
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen, dtype=torch.float64).to(torch.float16)  # float16: many ties
    logits[0, :10] = 5.0  # ten tokens tied for the top
    hf = LogitsProcessorList()
    if options["temperature"] != 1.0:
        hf.append(TemperatureLogitsWarper(float(options["temperature"])))
    hf.append(TopKLogitsWarper(options["top_k"]))
    if options["top_p"] < 1.0:
        hf.append(TopPLogitsWarper(options["top_p"]))
    ref = hf(None, logits.float())
    ours = Sampler(**options).warp(logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours, ref)


def test_disabled_filters_keep_every_token():
    logits = torch.randn(2, 100)
    assert torch.equal(Sampler(top_k=0).warp(logits), logits)
    assert torch.equal(Sampler(top_k=None, top_p=1.0).warp(logits), logits)
    assert Sampler(top_k=None, top_p=0.0).warp(logits).isfinite().sum(-1).tolist() == [1, 1]  # the top one stays
