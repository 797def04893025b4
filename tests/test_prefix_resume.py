"""The public prefix API (`HookedVLM.prefix_hook_names` / `prefix_cache` + `resume(prefix=...)`): a Llama tower resumed
at a block on the suffix after a cached prefix gives the full forward's logits on that suffix."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]


@pytest.fixture(scope="module", params=["llava", "instructblip-vicuna"])
def lm_model(request):
    if request.param == "llava":
        hf, processor = build_llava(seed=3, kv_heads=2)  # grouped-query: the cache holds H_kv heads
        prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    else:
        hf, processor = build_instructblip("llama", seed=2)
        prompts = ["what is in the picture of the street?", "a cat"]
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")  # left-padded: mask positions
    return model, inputs


def resumed_logits(model, inputs, layer, cut, copies=1):
    """The LM resumed at `layer` on the positions from `cut` on, `copies` stacked copies of the batch."""
    names = model.prefix_hook_names("lm", start_layer=layer) + [f"lm.blocks.{layer}.hook_resid_pre"]
    with torch.no_grad():
        full, cache = model.run_with_cache(**inputs, names_filter=names, tower_outputs=True)
    B = full.shape[0]
    prefix = model.prefix_cache("lm", cache, cut, start_layer=layer)
    if copies > 1:
        prefix = prefix.select(torch.arange(B).repeat(copies))
    stack = lambda t: t.repeat(copies, *([1] * (t.ndim - 1)))  # noqa: E731
    given = {name: stack(out) for name, out in cache.tower_outputs.items() if name != "lm"}
    resid = stack(cache[f"lm.blocks.{layer}.hook_resid_pre"][:, cut:])
    with torch.no_grad(), model.resume("lm", layer, resid, given, prefix):
        logits = model(**{k: stack(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    return logits, stack(full[:, cut:])


@pytest.mark.parametrize("layer", [0, 1])
def test_resume_on_suffix_equals_full_forward(lm_model, layer):
    model, inputs = lm_model
    T = inputs["input_ids"].shape[1]
    for cut in (2, T // 2, T - 1):  # in the prompt, mid-sequence (the image span for LLaVA), the last token alone
        logits, expected = resumed_logits(model, inputs, layer, cut)
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_stacked_variants_share_one_prefix(lm_model):
    model, inputs = lm_model
    logits, expected = resumed_logits(model, inputs, 1, inputs["input_ids"].shape[1] - 3, copies=3)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_prefix_names_and_errors(lm_model):
    model, inputs = lm_model
    names = model.prefix_hook_names("lm", start_layer=1)
    assert names == ["lm.blocks.1.attn.hook_rot_k", "lm.blocks.1.attn.hook_v"]  # the cache holds rotated keys
    with pytest.raises(ValueError, match="cannot resume on a suffix"):
        model.prefix_hook_names("vision")
    with pytest.raises(ValueError, match="start_layer 2 is not a block"):
        model.prefix_cache("lm", {}, 1, start_layer=2)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names)
    with pytest.raises(KeyError, match="lm.blocks.0.attn.hook_rot_k"):
        model.prefix_cache("lm", cache, 1)  # layer 0's keys were not cached
    with pytest.raises(ValueError, match="prefix length 0"):
        model.prefix_cache("lm", cache, 0, start_layer=1)
    prefix = model.prefix_cache("lm", cache, 3, start_layer=1)
    assert prefix.length == 3 and prefix.blocks[0].attn.k is None and prefix.blocks[1].attn.k.shape[1] == 3


# ------------------------------------------------------------------------------------------ public metric helpers
def test_metric_helpers_pick_per_example_rows():
    """`metrics.logits_at` / `per_row` (what `analysis.head_scores` and custom metrics use) on a stacked batch."""
    from hooked_vlm import metrics

    logits = torch.arange(3 * 4 * 5, dtype=torch.float).view(3, 4, 5)
    examples = torch.tensor([0, 1, 0])  # rows 0 and 2 are two variants of example 0
    torch.testing.assert_close(metrics.per_row([7, 9], examples), torch.tensor([7, 9, 7]))
    torch.testing.assert_close(metrics.per_row(4, examples), torch.tensor([4, 4, 4]))
    torch.testing.assert_close(metrics.logits_at(logits, [1, -1], examples), logits[[0, 1, 2], [1, 3, 1]])
    torch.testing.assert_close(metrics.logits_at(logits[:, 0], 2, examples), logits[:, 0])  # [N, V]: as it is
    with pytest.raises(ValueError, match="3 values given, but the batch has 2 examples"):
        metrics.per_row([1, 2, 3], examples)
    with pytest.raises(ValueError, match="position=4 is out of range"):
        metrics.logits_at(logits, 4, examples)
