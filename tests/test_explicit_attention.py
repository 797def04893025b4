"""The explicit attention path scales and masks the scores in place (the cost of `run_with_cache` on long sequences
is the [B, H, T, S] tensors it writes), and the Qwen vision tower passes no mask when no image is padded. Neither may
change a number: the cached scores and pattern equal the out-of-place formula bit for bit, gradients still flow, and a
single image's explicit run still equals transformers'."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.components import AttnConfig
from hooked_vlm.components.attention import Attention
from hooked_vlm.tiny import build_qwen2_vl, random_image


def _attention(n_kv_heads: int | None) -> Attention:
    torch.manual_seed(0)
    attn = Attention(48, AttnConfig(4, 12, n_kv_heads=n_kv_heads))  # scale 12 ** -0.5: not a power of two
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 1)
    attn.use_fast_path = False
    return attn


def _cached(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    cache: dict[str, torch.Tensor] = {}
    hooks = {name: getattr(attn, name) for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern")}
    handles = [hook.add_hook(lambda t, hook, name=name: cache.__setitem__(name, t.detach().clone()))
               for name, hook in hooks.items()]
    try:
        out = attn(x, mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return cache, out


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask_dtype", [None, torch.float32, torch.float64], ids=["no_mask", "mask", "wider_mask"])
def test_scores_and_pattern_equal_the_out_of_place_formula(n_kv_heads, mask_dtype):
    attn = _attention(n_kv_heads)
    x = torch.randn(2, 7, 48)
    mask = None
    if mask_dtype is not None:  # row 0 left-padded by 2, as a [B, 1, 1, S] padding mask
        mask = torch.zeros(2, 1, 1, 7, dtype=mask_dtype)
        mask[0, ..., :2] = torch.finfo(mask_dtype).min
    with torch.no_grad():
        cache, _ = _cached(attn, x, mask)
    q, k = (cache[name].transpose(1, 2) for name in ("hook_q", "hook_k"))
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.cfg.scale  # the formula as written before, out of place
    if mask is not None:
        scores = scores + mask  # a float64 mask makes float64 scores
    assert cache["hook_attn_scores"].dtype == scores.dtype
    assert torch.equal(cache["hook_attn_scores"], scores)
    assert torch.equal(cache["hook_pattern"], torch.softmax(scores, dim=-1).to(torch.float32))


def test_gradients_flow_through_the_in_place_scores():
    attn = _attention(2).double()  # float64: the two paths then differ by rounding far below the tolerance
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.float64)
    mask[0, ..., :2] = torch.finfo(torch.float64).min
    _, explicit = _cached(attn, x, mask)  # hooked scores and pattern: the explicit path
    (grad,) = torch.autograd.grad(explicit.square().sum(), x)
    attn.use_fast_path = True
    (fused,) = torch.autograd.grad(attn(x, mask=mask).square().sum(), x)
    # measured max |diff| 7.6e-10 on gradients up to 3.5e5
    torch.testing.assert_close(grad, fused, atol=1e-8, rtol=0)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_one_unpadded_image_matches_hf_on_the_explicit_path(version):
    hf, processor = build_qwen2_vl(seed=7, version=version)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image((50, 50), seed=1)], text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
                       return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert model.vision.valid(grid).all()  # one image: no padding, so no mask reaches the vision attention
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)  # every hook: the explicit path everywhere
        vision = hf.model.visual(inputs["pixel_values"], grid_thw=grid, output_hidden_states=True)
        ref = hf(**inputs).logits
    stream = [cache["vision", layer, "resid_post"][0] for layer in range(len(model.vision.blocks))]
    vc = model.cfg.vision
    if vc.window is not None:  # HF's Qwen2.5 stream is permuted window by window, in units of merged blocks
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(grid, vc.merge_size, vc.window * vc.merge_size * vc.patch_size,
                                           vc.patch_size)
        group = vc.merge_size**2
        stream = [s.reshape(-1, group, s.shape[-1])[order].reshape(s.shape) for s in stream]
    for ours, theirs in zip(stream, vision.hidden_states[1:], strict=True):  # measured max |diff| 1.4e-6
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=0)  # measured max |diff| 2.6e-6
    pattern = cache["vision", 0, "pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
