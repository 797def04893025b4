"""Half precision: observing a model does not change it beyond rounding.

Hooking `hook_scale`, `hook_attn_scores` or `hook_pattern` (as `run_with_cache()` with no filter does) moves a norm
or an attention off its fused kernel onto an explicit path. Those paths take their statistics in float32 as the fused
kernels do, so in float16 and bfloat16 every cached tensor is finite and the logits with every hook cached differ
from the unhooked logits by no more than rounding. "Rounding" is measured, not assumed: the unhooked half-precision
logits are compared with the same model run in float64, and the hooked logits may differ from the unhooked ones by at
most twice that error (each of the two results lies within about that error of the float64 one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooked_vlm import HookedVLM
from hooked_vlm.components import AttnConfig
from hooked_vlm.components.attention import Attention
from hooked_vlm.components.norms import LayerNorm
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=3), random_image(seed=4)]
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# with HF's init (randomize=False) LayerNorms are 1/0 and InstructBLIP's query tokens exactly 0: constant rows, where
# a float16 variance with BERT's eps=1e-12 (0 in float16) gives 0 / 0
CASES = [pytest.param((family, randomize), id=f"{family}-{'random' if randomize else 'hf_init'}")
         for family in ("blip", "llava", "instructblip-llama", "instructblip-t5") for randomize in (False, True)]


def margin_of(error: torch.Tensor) -> float:
    """The tolerance for a hooked-vs-unhooked difference when each lies within `error` of the exact result."""
    return 2 * float(error)


@pytest.fixture(scope="module", params=CASES)
def family(request):
    """An HF model, a padded batch of two prompts, and the hooked model's float64 logits (the exact reference)."""
    name, randomize = request.param
    if name == "blip":
        hf, processor = build_blip("vqa", seed=2, randomize=randomize)
        text = ["what color is it", "how many"]
    elif name == "llava":
        hf, processor = build_llava(seed=2, randomize=randomize)
        text = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    else:
        hf, processor = build_instructblip(name.split("-")[1], seed=2, randomize=randomize)
        text = ["what is in the picture?", "describe this"]
    inputs = dict(processor(images=IMAGES, text=text, padding=True, return_tensors="pt"))
    exact = HookedVLM.from_hf(hf, dtype=torch.float64)
    with torch.no_grad():
        reference = exact(**{**inputs, "pixel_values": inputs["pixel_values"].double()})
    return hf, inputs, reference


@pytest.mark.parametrize("dtype", HALF)
def test_caching_every_hook_changes_nothing_but_rounding(family, dtype):
    hf, inputs, reference = family
    model = HookedVLM.from_hf(hf, dtype=dtype)
    inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    with torch.no_grad():
        fused = model(**inputs)
        hooked, cache = model.run_with_cache(**inputs)
    explicit = [n for n in cache if n.endswith(("hook_scale", "hook_attn_scores", "hook_pattern"))]
    assert len(cache) == len(model.hook_dict) and explicit  # every hook ran, the explicit paths among them
    not_finite = [n for n, t in cache.items() if not torch.isfinite(t).all()]
    assert not not_finite, f"{len(not_finite)} cached tensors hold NaN or inf, e.g. {not_finite[:4]}"
    fused_error = (fused.double() - reference).abs().max()
    assert 0 < fused_error < 1  # the half model rounds, and does not break
    drift = (hooked.double() - fused.double()).abs().max()
    assert drift <= margin_of(fused_error), f"hooking moved the logits by {drift:.3g}; rounding is {fused_error:.3g}"


@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_hooked_equals_fused_on_constant_rows(dtype):
    """BERT's eps=1e-12: a constant row has variance 0, and eps is 0 in float16."""
    torch.manual_seed(0)
    norm = LayerNorm(64, eps=1e-12).to(dtype)
    with torch.no_grad():
        norm.w.normal_(1, 0.1), norm.b.normal_(0, 0.1)
    x = torch.cat([torch.full((1, 1, 64), 0.3), torch.randn(1, 3, 64) * 4 + 2], dim=1).to(dtype)
    with torch.no_grad():
        exact = F.layer_norm(x.double(), (64,), norm.w.double(), norm.b.double(), 1e-12)
        fused = norm(x)
        handle = norm.hook_scale.add_hook(lambda t, hook: None)
        try:
            hooked = norm(x)
        finally:
            handle.remove()
    assert hooked.dtype == dtype and torch.isfinite(hooked).all()
    error = (fused.double() - exact).abs().max()
    assert (hooked.double() - fused.double()).abs().max() <= margin_of(error)


@pytest.mark.parametrize("dtype", HALF)
def test_explicit_attention_equals_fused_on_large_scores(dtype):
    """q.k products past float16's range (65504): the fused kernel accumulates in float32, so must the explicit path."""
    torch.manual_seed(0)
    attn = Attention(64, AttnConfig(4, 16))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 1)
    x = torch.randn(2, 12, 64) * 20
    mask = torch.zeros(2, 1, 12, 12)
    mask[0, ..., :3] = torch.finfo(dtype).min  # row 0 left-padded: its queries may not see the first 3 keys
    with torch.no_grad():
        exact = attn.double()(x.double(), mask=mask.double())
        half = attn.to(dtype)
        fused = half(x.to(dtype), mask=mask.to(dtype))
        half.use_fast_path = False
        explicit = half(x.to(dtype), mask=mask.to(dtype))
    assert torch.isfinite(explicit).all()
    error = (fused.double() - exact).abs().max()
    assert (explicit.double() - fused.double()).abs().max() <= margin_of(error)
