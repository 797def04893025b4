"""Qwen2-VL and Qwen2.5-VL parity against transformers' own models, built tiny and fully randomised in the test:
images of different sizes in one batch, left padding, two images in one prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedQwen2VL, HookedVLM, analysis, cli, metrics, patching
from hooked_vlm.tiny import build_qwen2_vl, random_image
from lm_parity import assert_lm_layers_match_hf, inert_hook_points

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
# three images of three sizes (8 x 10, 12 x 12 and 8 x 16 patches after the processor's resize); row 0 is left-padded,
# row 1 holds two images
IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1), random_image((60, 30), seed=2)]
PROMPTS = [f"{IMG}what is in the picture?", f"hi {IMG} and {IMG} compare them"]
GOLDEN = Path(__file__).parent / "golden"
VERSIONS = {"qwen2": "2", "qwen2.5": "2.5"}


@pytest.fixture(scope="module", params=list(VERSIONS))
def qwen(request):
    hf, processor = build_qwen2_vl(seed=5, version=VERSIONS[request.param])
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")  # left-padded
    return hf, model, inputs


def test_inputs_cover_the_hard_cases(qwen):
    hf, model, inputs = qwen
    assert isinstance(model, HookedQwen2VL)
    assert not inputs["attention_mask"][0].all() and inputs["attention_mask"][1].all()  # row 0 left-padded
    assert len({tuple(g) for g in inputs["image_grid_thw"].tolist()}) == 3  # three sizes
    if model.cfg.vision.window is not None:  # Qwen2.5: several windows per image, and a full-attention block
        assert model.cfg.vision.full_attention_layers and any(b.windowed for b in model.vision.blocks)


@pytest.mark.parametrize("fast", [False, True], ids=["explicit", "fast"])
def test_logits_match_hf(qwen, fast):
    hf, model, inputs = qwen
    model.set_fast_attention(fast)
    try:
        with torch.no_grad():
            ours, ref = model(**inputs), hf(**inputs).logits
    finally:
        model.set_fast_attention(True)
    keep = inputs["attention_mask"].bool()
    # measured max |diff|: explicit 2.0e-6 / fast 2.3e-6 (both versions)
    torch.testing.assert_close(ours[keep], ref[keep], atol=2e-5, rtol=0)


def test_rope_positions_match_hf(qwen):
    hf, model, inputs = qwen
    ref, deltas = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    prompt, spans = model._check_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                                        inputs["attention_mask"])
    ours = model.rope_positions(prompt, spans)
    assert torch.equal(ours, ref)
    assert torch.equal(ours.amax(dim=(0, 2)) + 1 - inputs["attention_mask"].sum(-1), deltas.flatten())


def _hf_window_order(model, inputs):
    """Qwen2.5's HF vision stream is permuted window by window, in units of merged blocks (`window_index`)."""
    from transformers.vision_utils import get_vision_window_index

    vc = model.cfg.vision
    index, _ = get_vision_window_index(inputs["image_grid_thw"], vc.merge_size, vc.window * vc.merge_size *
                                       vc.patch_size, vc.patch_size)
    return index


def test_per_layer(qwen):
    hf, model, inputs = qwen
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
        vision = hf.model.visual(inputs["pixel_values"], grid_thw=grid, output_hidden_states=True)
        features = hf.model.get_image_features(inputs["pixel_values"], grid)
        out = hf(**inputs, output_hidden_states=True, output_attentions=True)
    valid = model.vision.valid(grid)
    group = model.cfg.vision.merge_size**2

    def packed(t):  # our [n, N, D] rows -> HF's packed [P, D] (Qwen2.5: in HF's window order)
        t = t[valid]
        if model.cfg.vision.window is not None:
            t = t.reshape(-1, group, t.shape[-1])[_hf_window_order(model, inputs)].reshape(-1, t.shape[-1])
        return t

    n_vision = model.tower_info("vision").n_layers
    assert len(vision.hidden_states) == n_vision + 1
    # conv3d vs linear: measured max |diff| 1.2e-6
    torch.testing.assert_close(packed(cache["vision.hook_embed"]), vision.hidden_states[0], atol=1e-5, rtol=0)
    for layer in range(n_vision):  # measured max |diff| 1.2e-6
        torch.testing.assert_close(packed(cache["vision", layer, "resid_post"]), vision.hidden_states[layer + 1],
                                   atol=1e-5, rtol=0)
    counts = [int(t * h * w) // group for t, h, w in grid.tolist()]
    merged = torch.arange(cache["projector.hook_out"].shape[1])[None, :] < torch.tensor(counts)[:, None]
    torch.testing.assert_close(cache["projector.hook_out"][merged], torch.cat(features.pooler_output), atol=1e-5,
                               rtol=0)

    assert_lm_layers_match_hf(cache, out, inputs["attention_mask"].bool(), embeds_atol=1e-5, stream_atol=1e-5,
                              pattern_atol=1e-6)


def test_vision_patterns_stay_in_the_image_and_window(qwen):
    hf, model, inputs = qwen
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda name: name.endswith("hook_pattern"))
    valid = model.vision.valid(inputs["image_grid_thw"])
    for layer, block in enumerate(model.vision.blocks):
        pattern = cache["vision", layer, "pattern"]  # [n, H, N, N]
        pads_seen_by_patches = valid[:, None, :, None] & ~valid[:, None, None, :]
        assert torch.all(pattern.masked_select(pads_seen_by_patches) == 0)  # no patch gives weight to a pad
        if block.windowed:  # some pairs of patches of one image do not see each other
            assert (pattern[:, :, valid[0]][..., valid[0]][0] == 0).any()


def test_positions_match_the_processor(qwen):
    hf, model, inputs = qwen
    m = model.cfg.vision.merge_size
    grids = [(h // m, w // m) for _, h, w in inputs["image_grid_thw"].tolist()]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="lm.hook_inputs_embeds")
    positions = cache.positions
    spans = [span for row in positions.image for span in row]
    assert [len(row) for row in positions.image] == [1, 2]
    image_id = hf.config.image_token_id
    for b, row in enumerate(positions.image):  # the processor's own token counts, per example
        assert sum(s.stop - s.start for s in row) == int((inputs["input_ids"][b] == image_id).sum())
    for span, (rows, cols) in zip(spans, grids):
        b = next(i for i, row in enumerate(positions.image) if span in row)
        assert torch.all(inputs["input_ids"][b, span.start:span.stop] == image_id)
        assert span.stop - span.start == rows * cols
        assert int(span.rows.max()) + 1 == rows and int(span.cols.max()) + 1 == cols
        assert span.patches(rows=[rows - 1], cols=[cols - 1]).tolist() == [span.stop - 1]  # row-major
        assert span.patches(rows=[1], cols=[0]).tolist() == [span.start + cols]
    assert positions.last.tolist() == [inputs["input_ids"].shape[1] - 1] * 2


def test_hook_edits_equal_hf_edits(qwen):
    """Scaling a vision MLP output, a merger output and an LM attention output equals the same edit made with
    forward hooks on HF's modules."""
    hf, model, inputs = qwen
    edits = [("vision.blocks.1.hook_mlp_out", hf.model.visual.blocks[1].mlp),
             ("lm.blocks.0.hook_attn_out", hf.model.language_model.layers[0].self_attn)]
    keep = inputs["attention_mask"].bool()
    for name, module in edits:
        with torch.no_grad():
            ours = model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda t, hook: t * 3)])

            def scale(m, args, out):
                return (out[0] * 3, *out[1:]) if isinstance(out, tuple) else out * 3

            handle = module.register_forward_hook(scale)
            try:
                ref = hf(**inputs).logits
            finally:
                handle.remove()
        torch.testing.assert_close(ours[keep], ref[keep], atol=2e-5, rtol=0)
        assert not model.hook_dict[name].has_hooks


@pytest.mark.parametrize("with_hook", [False, True])
def test_generate_matches_hf(qwen, with_hook):
    hf, model, inputs = qwen
    name = "lm.blocks.0.hook_mlp_out"
    snapshot = {k: v.clone() for k, v in inputs.items()}
    hooks = [(name, lambda t, hook: t * 3)] if with_hook else []
    ours = model.generate(**inputs, max_new_tokens=6, fwd_hooks=hooks)
    handle = hf.model.language_model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 3) if with_hook else None
    try:
        ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(ours, ref)
    assert all(torch.equal(inputs[k], snapshot[k]) for k in inputs)
    assert not model.hook_dict[name].has_hooks


def test_batched_equals_unbatched(qwen):
    hf, model, inputs = qwen
    with torch.no_grad():
        batched = model(**inputs)
        for b, (images, prompt) in enumerate(zip([IMAGES[:1], IMAGES[1:]], PROMPTS)):
            single = model(**model.processor(images=images, text=[prompt], return_tensors="pt"))
            T = single.shape[1]
            torch.testing.assert_close(single[0], batched[b, -T:], atol=1e-5, rtol=0)


def test_lm_sweep_equals_naive_loop(qwen):
    hf, model, inputs = qwen
    corrupt = {**inputs, "pixel_values": inputs["pixel_values"] + 0.5}  # the same images, shifted: same token counts
    with torch.no_grad():
        logits = model(**inputs)
    answer = logits[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    positions = torch.stack([model.positions(**inputs).last, torch.tensor([20, 20])], dim=1)
    result = patching.patch_resid(model, inputs, corrupt, metric, tower="lm", hook="resid_post", positions=positions,
                                  direction="denoise", batch_size=4, progress=False)
    rows = torch.arange(2)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
        for layer in range(model.tower_info("lm").n_layers):
            name = f"lm.blocks.{layer}.hook_resid_post"
            for cell in range(positions.shape[1]):
                def edit(act, hook, cell=cell):
                    act = act.clone()
                    act[rows, positions[:, cell]] = cache[name][rows, positions[:, cell]]
                    return act
                expected = metric(model.run_with_hooks(**corrupt, fwd_hooks=[(name, edit)]), rows).mean()
                torch.testing.assert_close(result[layer, cell], expected, atol=1e-5, rtol=1e-5)


def test_weights_round_trip(qwen):
    hf, model, inputs = qwen
    ref = hf.state_dict()
    back = model.hf_state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    exported = model.to_hf()  # a transformers model again, weights edits included
    assert type(exported) is type(hf)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():  # measured max |diff| 2e-6 (the export runs HF's default sdpa attention)
        torch.testing.assert_close(exported(**inputs).logits[keep], hf(**inputs).logits[keep], atol=2e-5, rtol=0)


def test_every_hook_point_is_listed_and_can_edit(qwen):
    hf, model, inputs = qwen
    golden = "qwen2_5_vl_hook_names.txt" if model.cfg.vision.window is not None else "qwen2_vl_hook_names.txt"
    assert list(model.hook_dict) == (GOLDEN / golden).read_text().split()
    inert = inert_hook_points(model, inputs)
    assert not inert, inert


def test_from_pretrained_local_directory(tmp_path):
    hf, processor = build_qwen2_vl(seed=11, version="2.5")
    hf.save_pretrained(tmp_path)  # the weights alone: AutoProcessor would build a video processor (torchvision)
    model = HookedVLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(model, HookedQwen2VL)
    inputs = processor(images=IMAGES[:1], text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits
        torch.testing.assert_close(model(**inputs), ref, atol=2e-5, rtol=0)
        model.save_pretrained(tmp_path / "hooked")  # hooked_vlm's own format, reloaded through a device map
        again = HookedVLM.from_pretrained(tmp_path / "hooked", device_map={"vision": "cpu", "projector": "cpu",
                                                                           "lm": "cpu"})
        torch.testing.assert_close(again(**inputs), ref, atol=2e-5, rtol=0)


def test_text_only_prompt(qwen):
    hf, model, inputs = qwen
    text = model.processor.tokenizer(["what is a cat?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**text), hf(**text).logits, atol=2e-5, rtol=0)


@pytest.mark.no_typecheck  # the errors under test are the model's own, not the annotations'
def test_bad_inputs(qwen):
    hf, model, inputs = qwen
    with pytest.raises(ValueError, match="videos"):
        model(**inputs, pixel_values_videos=torch.zeros(4, 96), video_grid_thw=torch.tensor([[2, 2, 2]]))
    with pytest.raises(ValueError, match=r"hold \d+ <\|image_pad\|> tokens, but the 2 image"):
        n = int(inputs["image_grid_thw"][:2].prod(-1).sum())
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:n], "image_grid_thw": inputs["image_grid_thw"][:2]})
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]})
    with pytest.raises(ValueError, match="image_grid_thw was given without pixel_values"):
        model(input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="must be consecutive"):
        ids = inputs["input_ids"].clone()
        image = torch.nonzero(ids[0] == hf.config.image_token_id).flatten()
        ids[0, image[3]], ids[0, image[-1] + 1] = 5, hf.config.image_token_id
        model(**{**inputs, "input_ids": ids})
    with pytest.raises(ValueError, match=r"position_ids must be integers of shape \(3, 2"):
        model(**inputs, position_ids=torch.zeros_like(inputs["input_ids"]))


# ------------------------------------------------------------------------------------------ analyses
def test_logit_lens_last_layer_equals_the_model(qwen):
    hf, model, inputs = qwen
    with torch.no_grad():
        logits = model(**inputs)
    last = model.positions(**inputs).last[:, None]
    lens = analysis.logit_lens(model, inputs, tower="lm", positions=last, k=4)
    top = logits[:, -1].softmax(-1).topk(4)
    assert lens.ids.shape == (model.tower_info("lm").n_layers, 2, 1, 4)
    torch.testing.assert_close(lens.probs[-1, :, 0], top.values, atol=1e-6, rtol=0)
    assert torch.equal(lens.ids[-1, :, 0], top.indices)


def test_head_scores_equal_one_forward_per_head(qwen):
    """V-SEAM's head scores on the LM against a loop with one forward per head (mean of the other heads' z)."""
    hf, model, inputs = qwen
    with torch.no_grad():
        logits = model(**inputs)
    answer = torch.tensor([int(logits[0, -1].argmax()), 7])  # example 0 answered correctly
    scores = analysis.head_scores(model, inputs, answer, tower="lm", batch_size=5, progress=False)
    examples = torch.arange(2)
    base = metrics.prob(answer)(logits, examples)
    correct = logits[:, -1].argmax(-1) == answer
    assert torch.equal(scores.correct, correct) and correct[0]
    H = model.tower_info("lm").n_heads
    for layer in range(model.tower_info("lm").n_layers):
        for head in range(H):
            def mean_others(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = z[:, :, [h for h in range(H) if h != head]].mean(2)
                return z
            with torch.no_grad():
                edited = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.{layer}.attn.hook_z", mean_others)])
            drop = base - metrics.prob(answer)(edited, examples)
            torch.testing.assert_close(scores.delta[layer, head], drop.mean(), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(scores.positive[layer, head], drop.clamp(min=0)[correct].mean(), atol=1e-6,
                                       rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_cli_runs_on_the_tiny_models(name, tmp_path, capsys):
    assert cli.main(["info", "--model", name]) == 0
    assert "HookedQwen2VL" in capsys.readouterr().out
    assert cli.main(["lens", "--model", name, "--device", "cpu"]) == 0
    assert cli.main(["patch", "--model", name, "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "patch.json").is_file()


# Largest |half - HF float32| over the real logits, measured for build_qwen2_vl seeds 5..7 (the fixture's is 5), both
# versions, with these inputs: bfloat16 0.040-0.048, float16 0.0053-0.0090. Each tolerance is 1.5x the largest.
# Scaling the LM's last MLP output by 0.9 moves the logits by 0.12-0.19, which the test below checks fails them.
HALF_ATOL = {torch.bfloat16: 0.072, torch.float16: 0.0135}


def _half_error(hf, half, inputs, dtype):
    with torch.no_grad():
        out = half(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
        ref = hf(**inputs).logits
    keep = inputs["attention_mask"].bool()
    assert out.dtype == dtype and torch.isfinite(out[keep]).all()
    return (out.float()[keep] - ref[keep]).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(qwen, dtype):
    hf, model, inputs = qwen
    assert _half_error(hf, HookedVLM.from_hf(hf, dtype=dtype), inputs, dtype) < HALF_ATOL[dtype]
    planted = HookedVLM.from_hf(hf, dtype=dtype)  # a planted bug must fail the same tolerance
    with torch.no_grad():
        planted.lm.blocks[-1].mlp.out_weight.mul_(0.9)
    assert _half_error(hf, planted, inputs, dtype) > HALF_ATOL[dtype]


def test_tiny_build_randomises_every_parameter(qwen):
    hf, model, inputs = qwen
    for name, p in hf.named_parameters():
        assert not torch.all(p == 0) and not torch.all(p == 1), name  # norms' weights and biases included
    assert not torch.equal(hf.model.visual.blocks[0].norm1.weight, hf.model.visual.blocks[1].norm1.weight)
