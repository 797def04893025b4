"""Sweeps of a vision tower whose rows are the images (Qwen2.5-VL and LLaVA), on a batch holding one image, two
images (of different sizes on Qwen) and a text-only prompt: each against a naive loop written with hand-made hooks
that patch the same image rows (one full forward per cell), and split into chunks of one example against the
unsplit sweep. The text-only example has no vision row, so a vision patch leaves its metric as the unpatched run's.
(The projector has no blocks, so it is not swept.)"""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.patching import ImagePatches
from hooked_vlm.tiny import build_llava, build_qwen2_vl, random_image

QWEN_IMG = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGES = [random_image((24, 16), seed=0), random_image((32, 24), seed=1), random_image((16, 32), seed=2)]
FAMILIES = {
    "qwen2.5": (lambda: build_qwen2_vl(seed=3, version="2.5"),
                [f"{QWEN_IMG}what is in the picture?", f"hi {QWEN_IMG} and {QWEN_IMG} tell", "no picture here"]),
    "llava": (lambda: build_llava(seed=1),
              ["USER: <image>\nwhat is it? ASSISTANT:", "USER: <image> and <image>\nsame? ASSISTANT:",
               "USER: no picture here? ASSISTANT:"]),
}
# Measured max |sweep - naive loop| over these tests: 1.4e-6 (Qwen2.5-VL), 0 (LLaVA); chunked vs unchunked: 0.
ATOL = 1e-5


@pytest.fixture(scope="module", params=list(FAMILIES))
def batch(request):
    build, prompts = FAMILIES[request.param]
    hf, processor = build()
    model = HookedVLM.from_hf(hf, processor=processor)
    clean = processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
    corrupt = {**clean, "pixel_values": clean["pixel_values"].flip(0)}  # other pixels, same images per example
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    assert model.positions(**clean).image_examples.tolist() == [0, 1, 1]  # example 2 has no image
    return model, clean, corrupt, metric


def _naive(model, target, source, metric, hook_name, edits):
    """One forward of `target` per edit, `hook_name` edited by `edit(act, src)` with the `source` run's values
    (every image row at once); the metric per example [n_edits, B]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=hook_name)
    rows = torch.arange(target["input_ids"].shape[0])
    out = []
    for edit in edits:
        def hook(act, hook, edit=edit):
            return edit(act.clone(), cache[hook.name])
        with torch.no_grad():
            out.append(metric(model.run_with_hooks(**target, fwd_hooks=[(hook_name, hook)]), rows))
    return torch.stack(out)


def _unpatched(model, inputs, metric):
    with torch.no_grad():
        return metric(model(**inputs), torch.arange(inputs["input_ids"].shape[0]))


def test_patch_resid_groups_per_image_row(batch):
    """Per-row groups: "all", a list per image row (ragged), and (Qwen) an image's own top-left 2 x 2 patches
    found on its own grid. A chunk of one example takes that example's image rows."""
    model, clean, corrupt, metric = batch
    per_row = [[0], [1, 2], [3]]  # image rows 0 (example 0), 1 and 2 (example 1)
    groups = {"all": "all", "rows": per_row}
    members = [None, per_row]
    vision = model.positions(**clean).towers.get("vision")
    if vision is not None:  # Qwen: each image's patch grid
        groups["corner"] = ImagePatches(rows=[0, 1], cols=[0, 1])
        members.append([[p for p, (r, c) in enumerate(zip(span.rows.tolist(), span.cols.tolist()))
                         if r < 2 and c < 2] for (span,) in vision.image])
        assert all(len(m) == 4 for m in members[2])
    result = patching.patch_resid(model, clean, corrupt, metric, tower="vision", hook="resid_pre", groups=groups,
                                  progress=False)
    chunked = patching.patch_resid(model, clean, corrupt, metric, tower="vision", hook="resid_pre", groups=groups,
                                   batch_size=1, progress=False)

    def group(g):
        def edit(act, src):
            if members[g] is None:
                return src.clone()
            for i, positions in enumerate(members[g]):
                act[i, positions] = src[i, positions]
            return act
        return edit

    for layer in range(model.tower_info("vision").n_layers):
        expected = _naive(model, corrupt, clean, metric, f"vision.blocks.{layer}.hook_resid_pre",
                          [group(g) for g in range(len(groups))])
        torch.testing.assert_close(result[layer], expected.mean(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, result, atol=ATOL, rtol=0)
    assert result.abs().sum() > 0


@pytest.mark.slow  # ~10 s on Qwen2.5 (every head of every vision layer, chunked and not)
def test_patch_heads_on_every_image_row(batch):
    model, clean, corrupt, metric = batch
    result = patching.patch_heads(model, clean, corrupt, metric, tower="vision", progress=False)
    chunked = patching.patch_heads(model, clean, corrupt, metric, tower="vision", batch_size=1, progress=False)
    H = model.tower_info("vision").n_heads

    def head(h):
        def edit(act, src):
            act[:, :, h] = src[:, :, h]
            return act
        return edit

    for layer in range(model.tower_info("vision").n_layers):
        expected = _naive(model, corrupt, clean, metric, f"vision.blocks.{layer}.attn.hook_z",
                          [head(h) for h in range(H)])
        torch.testing.assert_close(result[layer], expected.mean(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, result, atol=ATOL, rtol=0)


def test_ablation_sweep_per_example_and_text_only_unchanged(batch):
    model, clean, _, metric = batch
    result = patching.ablation_sweep(model, clean, metric, tower="vision", mode="zero", progress=False)
    chunked = patching.ablation_sweep(model, clean, metric, tower="vision", mode="zero", batch_size=1,
                                      progress=False)
    H = model.tower_info("vision").n_heads

    def zero(h):
        def edit(act, src):
            act[:, :, h] = 0
            return act
        return edit

    for layer in range(model.tower_info("vision").n_layers):
        expected = _naive(model, clean, clean, metric, f"vision.blocks.{layer}.attn.hook_z",
                          [zero(h) for h in range(H)])
        torch.testing.assert_close(result[layer], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, result, atol=ATOL, rtol=0)
    unpatched = _unpatched(model, clean, metric)
    torch.testing.assert_close(result[..., 2], unpatched[2].expand_as(result[..., 2]), atol=ATOL, rtol=0)
    assert (result[..., :2] - unpatched[:2]).abs().amax() > 1e-3  # the image examples do move


def test_causal_trace_image_noise_restores_image_rows(batch):
    """Gaussian noise on the image tokens of the LM's input (3 x their std, seeded), each vision layer's clean
    stream restored at one position of every image row (on Qwen the last is padding in the shorter images'
    rows)."""
    model, inputs, _, _ = batch
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    target = logits[:, -1].argmax(-1)
    cells = [0, 7, cache["vision.blocks.0.hook_resid_post"].shape[1] - 1]
    result = patching.causal_trace(model, inputs, target, tower="vision", positions=cells, seed=2, progress=False)
    chunked = patching.causal_trace(model, inputs, target, tower="vision", positions=cells, seed=2, batch_size=1,
                                    progress=False)
    site = model.image_embeddings_hook
    values = cache[site]
    sites = model.positions(**inputs).image_mask
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(2)) * 3.0 * values[sites].std()
    noise = torch.where(sites[..., None], noise, 0.0)
    rows = torch.arange(3)
    for layer in range(model.tower_info("vision").n_layers):
        name = f"vision.blocks.{layer}.hook_resid_post"
        for j, p in enumerate(cells):
            def restore(act, hook, p=p):
                act = act.clone()
                act[:, p] = cache[name][:, p]
                return act
            with torch.no_grad():
                out = model.run_with_hooks(**inputs, fwd_hooks=[(site, lambda t, hook: t + noise), (name, restore)])
            expected = metrics.prob(target)(out, rows)
            torch.testing.assert_close(result[layer, j], expected.mean(), atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, result, atol=ATOL, rtol=0)


@pytest.mark.no_typecheck  # the errors under test are the sweep's own
def test_what_cannot_be_split_or_paired_is_refused(batch):
    model, clean, corrupt, metric = batch
    # a corruption inside the vision tower, whose rows are padded per chunk: not split into chunks
    noise = corruption.gaussian(3.0, site="vision.hook_embed", seed=0)
    with pytest.raises(ValueError, match="cannot be split into chunks of examples"):
        patching.patch_resid(model, clean, noise, metric, tower="vision", positions=[0], batch_size=1,
                             progress=False)
    # corrupted inputs whose images sit in other examples: the image rows would pair with other examples' rows
    prompts = FAMILIES["llava" if "llava" in type(model).__name__.lower() else "qwen2.5"][1]
    other = model.processor(images=[IMAGES[1], IMAGES[2], IMAGES[0]], text=[prompts[i] for i in (1, 0, 2)],
                            padding=True, return_tensors="pt")
    assert model.positions(**other).image_examples.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="hold their images in different examples"):
        patching.patch_heads(model, clean, other, metric, tower="vision", progress=False)


@pytest.mark.no_typecheck  # the error under test is the sweep's own
def test_attribution_refuses_image_rows_that_are_not_the_examples(batch):
    """Attribution patching pairs the tower's rows with the examples: with [1, 2, 0] images per example it would add
    one image's effect to another example's metric, so it refuses."""
    model, clean, corrupt, metric = batch
    with pytest.raises(ValueError, match="not one per example"):
        patching.attribution_patch_resid(model, clean, corrupt, metric, tower="vision", hook="resid_post")
    with pytest.raises(ValueError, match="not one per example"):
        patching.attribution_patch_heads(model, clean, corrupt, metric, tower="vision")
