"""Patching sweeps equal the naive loop (one full forward per cell, written here with run_with_hooks only)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, metrics, patching
from hooked_vlm.tiny import build_blip, random_image
from hooked_vlm.towers.vit import VisionConfig, VisionTower

QUESTIONS = ["what color is the car on the street", "how many cats"]


@pytest.fixture(scope="module")
def vqa():
    hf, processor = build_blip("vqa", seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=0), random_image(seed=1)]
    other = [random_image(seed=2), random_image(seed=3)]
    clean = processor(images=images, text=QUESTIONS, padding=True, return_tensors="pt")
    corrupt_image = processor(images=other, text=QUESTIONS, padding=True, return_tensors="pt")
    corrupt_text = processor(images=images, text=["what color is the dog on the street", "how many dogs"],
                             padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)  # the clean first answer token, per example
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    return model, clean, corrupt_image, corrupt_text, metric


def naive(model, clean, corrupt, metric, hook_name, edit, n_cells, direction, normalize):
    """One fresh forward per cell; `edit(act, source, cell)` patches the cell."""
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    examples = torch.arange(target["input_ids"].shape[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=hook_name)
        m_clean, m_corrupt = metric(model(**clean), examples), metric(model(**corrupt), examples)
        out = []
        for cell in range(n_cells):
            logits = model.run_with_hooks(**target, fwd_hooks=[
                (hook_name, lambda act, hook: edit(act.clone(), cache[hook_name], cell))])
            value = metric(logits, examples)
            out.append((metrics.normalized(value, m_clean, m_corrupt) if normalize else value).mean())
    return torch.stack(out)


def set_position(act, src, p):
    act[:, p] = src[:, p]
    return act


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("tower,hook", [("text_encoder", "resid_pre"), ("text_encoder", "cross_attn_out"),
                                        ("vision", "mlp_out"), ("text_decoder", "resid_mid")])
def test_patch_resid_equals_naive_loop(vqa, tower, hook, direction, normalize):
    model, clean, corrupt, _, metric = vqa
    result = patching.patch_resid(model, clean, corrupt, metric, tower=tower, hook=hook, direction=direction,
                                  normalize=normalize, batch_size=8, progress=False)
    n_layers = model.tower_info(tower).n_layers
    n_pos = result.shape[1]
    for layer in range(n_layers):
        name = f"{tower}.blocks.{layer}.hook_{hook}"
        expected = naive(model, clean, corrupt, metric, name, set_position, n_pos, direction, normalize)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


def test_patch_resid_text_corruption_and_per_example_positions(vqa):
    model, clean, _, corrupt_text, metric = vqa
    positions = torch.tensor([[1, 5], [0, 3]])  # per example
    result = patching.patch_resid(model, clean, corrupt_text, metric, tower="text_encoder", hook="resid_post",
                                  positions=positions, progress=False)
    n_layers = model.tower_info("text_encoder").n_layers
    assert result.shape == (n_layers, positions.shape[1])
    for layer in range(n_layers):
        name = f"text_encoder.blocks.{layer}.hook_resid_post"

        def edit(act, src, cell):
            rows = torch.arange(2)
            act[rows, positions[:, cell]] = src[rows, positions[:, cell]]
            return act

        expected = naive(model, clean, corrupt_text, metric, name, edit, positions.shape[1], "denoise", False)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower,attention,activation", [
    ("text_encoder", "attn", "z"), ("text_encoder", "cross_attn", "z"), ("text_decoder", "cross_attn", "z"),
    ("vision", "attn", "z"), ("text_encoder", "cross_attn", "pattern"), ("text_encoder", "attn", "v"),
    ("text_encoder", "cross_attn", "q"), ("text_encoder", "cross_attn", "k"),
])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patch_heads_equals_naive_loop(vqa, tower, attention, activation, direction):
    model, clean, corrupt, _, metric = vqa
    result = patching.patch_heads(model, clean, corrupt, metric, tower=tower, attention=attention,
                                  activation=activation, direction=direction, normalize=True, batch_size=6,
                                  progress=False)
    info = model.tower_info(tower)
    assert result.shape == (info.n_layers, info.n_heads)
    head_axis = 1 if activation == "pattern" else 2
    for layer in range(info.n_layers):
        name = f"{tower}.blocks.{layer}.{attention}.hook_{activation}"

        def edit(act, src, head):
            index = [slice(None)] * act.ndim
            index[head_axis] = head
            act[tuple(index)] = src[tuple(index)]
            return act

        expected = naive(model, clean, corrupt, metric, name, edit, info.n_heads, direction, True)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


def test_patch_heads_by_position_equals_naive_loop(vqa):
    model, clean, corrupt, _, metric = vqa
    positions = [0, 2, 4]
    result = patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", attention="cross_attn",
                                  positions=positions, by_position=True, batch_size=5, progress=False)
    info = model.tower_info("text_encoder")
    P = len(positions)
    assert result.shape == (info.n_layers, info.n_heads, P)
    for layer in range(info.n_layers):
        name = f"text_encoder.blocks.{layer}.cross_attn.hook_z"

        def edit(act, src, cell):
            head, p = cell // P, positions[cell % P]
            act[:, p, head] = src[:, p, head]
            return act

        expected = naive(model, clean, corrupt, metric, name, edit, info.n_heads * P, "denoise", False)
        expected = expected.view(info.n_heads, P)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


def test_denoising_the_corrupted_token_at_block_0_restores_the_clean_run(vqa):
    """With one word swapped, the stream entering block 0 differs only at that word: patching it there gives the
    clean run, patching any other position changes nothing."""
    model, clean, _, corrupt_text, metric = vqa
    differs = (clean["input_ids"] != corrupt_text["input_ids"])
    assert differs.sum(1).tolist() == [1, 1]
    swapped = differs.float().argmax(1, keepdim=True)  # [B, 1], a different position in each example
    same = torch.ones_like(swapped)  # position 1 is the same word in both runs
    assert not differs.gather(1, same).any()
    result = patching.patch_resid(model, clean, corrupt_text, metric, tower="text_encoder", hook="resid_pre",
                                  positions=torch.cat([swapped, same], 1), progress=False)
    with torch.no_grad():
        m_clean = metric(model(**clean), torch.arange(2)).mean()
        m_corrupt = metric(model(**corrupt_text), torch.arange(2)).mean()
    torch.testing.assert_close(result[0], torch.stack([m_clean, m_corrupt]), atol=1e-5, rtol=0)


def test_bad_sweep_inputs(vqa):
    model, clean, corrupt, _, metric = vqa
    longer = model.processor(images=[random_image(seed=2), random_image(seed=3)],
                             text=["what color is the car on the street now", "how many"], padding=True,
                             return_tensors="pt")
    with pytest.raises(ValueError, match="differ in length"):
        patching.patch_resid(model, clean, longer, metric, tower="text_encoder", progress=False)
    no_image = {k: v for k, v in corrupt.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="needs an image"):
        patching.patch_heads(model, clean, no_image, metric, tower="text_encoder", progress=False)
    with pytest.raises(ValueError, match="pair them one to one"):
        patching.patch_resid(model, clean, {k: v[:1] for k, v in corrupt.items()}, metric, tower="text_encoder",
                             progress=False)
    with pytest.raises(ValueError, match="hook must be one of"):
        patching.patch_resid(model, clean, corrupt, metric, tower="text_encoder", hook="pattern", progress=False)
    with pytest.raises(KeyError, match="no tower"):
        patching.patch_resid(model, clean, corrupt, metric, tower="lm", progress=False)


# ------------------------------------------------------------------------------------------ causal tracing
def naive_trace(model, inputs, target, site, sites, scale, seed, tower, leaf, window, positions):
    """ROME's loop: one forward per cell, noise and restore hooks written out here."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    values = cache[site]
    mask = sites[..., None].expand_as(values)
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed)) * scale * values[mask].std()
    noise = torch.where(mask, noise, 0.0)
    n_layers = model.tower_info(tower).n_layers
    examples = torch.arange(values.shape[0])
    out = torch.full((n_layers, len(positions)), float("nan"))
    for layer in range(n_layers):
        span = [i for i in range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
                if f"{tower}.blocks.{i}.{leaf}" in model.hook_dict]
        for j, p in enumerate(positions):
            def restore(act, hook, p=p):
                act = act.clone()
                act[:, p] = cache[hook.name][:, p]
                return act
            hooks = [(site, lambda t, hook: t + noise)] + [(f"{tower}.blocks.{i}.{leaf}", restore) for i in span]
            with torch.no_grad():
                logits = model.run_with_hooks(**inputs, fwd_hooks=hooks)
            out[layer, j] = metrics.prob(target)(logits, examples).mean()
    return out


@pytest.mark.parametrize("kind,window,tower", [("resid", 1, "text_encoder"), ("mlp", 3, "text_encoder"),
                                               ("cross_attn", 1, "text_decoder"), ("attn", 2, "vision")])
def test_causal_trace_equals_naive_loop(vqa, kind, window, tower):
    model, clean, _, _, _ = vqa
    target = model(**clean)[:, -1].argmax(-1)
    result = patching.causal_trace(model, clean, target, tower=tower, kind=kind, window=window, seed=4,
                                   batch_size=16, progress=False)
    T = result.shape[1]
    sites = torch.ones(clean["pixel_values"].shape[0], model.vision.cfg.n_tokens, dtype=torch.bool)  # all vision tokens
    leaf = patching.TRACE_KINDS[kind]
    expected = naive_trace(model, clean, target, "vision.ln_post.hook_normalized", sites, 3.0, 4, tower, leaf,
                           window, list(range(T)))
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)


def test_causal_trace_text_positions_equals_naive_loop(vqa):
    model, clean, _, _, _ = vqa
    target = model(**clean)[:, -1].argmax(-1)
    result = patching.causal_trace(model, clean, target, tower="text_encoder", corrupt=[1, 2], noise=2.0, seed=1,
                                   progress=False)
    sites = torch.zeros(clean["input_ids"].shape, dtype=torch.bool)
    sites[:, [1, 2]] = True
    expected = naive_trace(model, clean, target, "text_encoder.hook_embed", sites, 2.0, 1, "text_encoder",
                           "hook_resid_post", 1, list(range(result.shape[1])))
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)


def test_causal_trace_is_seeded_and_noise_free_restores_clean(vqa):
    model, clean, _, _, _ = vqa
    target = model(**clean)[:, -1].argmax(-1)
    run = lambda **kw: patching.causal_trace(model, clean, target, tower="text_encoder", progress=False, **kw)  # noqa
    torch.testing.assert_close(run(seed=3), run(seed=3), atol=0, rtol=0)
    assert not torch.allclose(run(seed=3), run(seed=5))
    with torch.no_grad():
        p_clean = metrics.prob(target)(model(**clean), torch.arange(2)).mean()
    torch.testing.assert_close(run(noise=0.0), torch.full_like(run(noise=0.0), float(p_clean)), atol=1e-6, rtol=0)
    two = run(samples=2, seed=3)
    torch.testing.assert_close(two, (run(seed=3) + run(seed=4)) / 2, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ attribution patching
class LinearReadout(HookedVLM):
    """A ViT without its final norm, read out linearly, whose last MLP outputs zero: the logits are linear in the
    last block's stream, attention output and per-head values, so attribution patching is exact there."""

    tower_names = ("vision",)

    def __init__(self, cfg):
        super().__init__()
        from torch import nn

        self.vision = VisionTower(cfg)
        self.readout = nn.Linear(cfg.d_model, 5)
        self.setup()

    def forward(self, pixel_values=None, **unused):
        return self.readout(self.vision(pixel_values))


@pytest.fixture(scope="module")
def linear_model():
    from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig
    from hooked_vlm.tiny import randomize_parameters_

    block = BlockConfig(32, AttnConfig(4, 8), MLPConfig(64), NormConfig("layer", 1e-5))
    model = LinearReadout(VisionConfig(16, 8, 3, block, ln_post=False))
    randomize_parameters_(model, seed=0, std=0.2)
    with torch.no_grad():
        model.vision.blocks[-1].mlp.out_weight.zero_()
        model.vision.blocks[-1].mlp.out_bias.zero_()
    clean = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    corrupt = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return model.eval(), clean, corrupt


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_is_exact_where_the_metric_is_linear(linear_model, direction):
    model, clean, corrupt = linear_model
    metric = metrics.logit_diff(torch.tensor([0, 2]), torch.tensor([1, 3]))
    for hook in ("resid_post", "attn_out", "resid_mid"):
        exact = patching.patch_resid(model, clean, corrupt, metric, tower="vision", hook=hook, direction=direction,
                                     progress=False)
        approx = patching.attribution_patch_resid(model, clean, corrupt, metric, tower="vision", hook=hook,
                                                  direction=direction)
        assert approx.shape == exact.shape
        torch.testing.assert_close(approx[-1], exact[-1], atol=1e-5, rtol=1e-5)
    for kw in ({}, {"by_position": True, "positions": [0, 3, 4]}):
        exact = patching.patch_heads(model, clean, corrupt, metric, tower="vision", direction=direction,
                                     normalize=True, progress=False, **kw)
        approx = patching.attribution_patch_heads(model, clean, corrupt, metric, tower="vision",
                                                  direction=direction, normalize=True, **kw)
        assert approx.shape == exact.shape
        torch.testing.assert_close(approx[-1], exact[-1], atol=1e-4, rtol=1e-4)


def test_attribution_correlates_with_exact_patching(vqa):
    model, clean, corrupt, _, metric = vqa
    for kw in ({"attention": "cross_attn"}, {"attention": "attn", "activation": "v"}):
        exact = patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", progress=False, **kw)
        approx = patching.attribution_patch_heads(model, clean, corrupt, metric, tower="text_encoder", **kw)
        corr = torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]
        assert corr > 0.8, f"{kw}: correlation {corr:.3f}"
    exact = patching.patch_resid(model, clean, corrupt, metric, tower="text_encoder", progress=False)
    approx = patching.attribution_patch_resid(model, clean, corrupt, metric, tower="text_encoder")
    assert torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1] > 0.8
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the user's parameters


# ------------------------------------------------------------------------------------------ LLaVA
def llava_positions(model, inputs):
    """[B, 3] per example: the first and a middle token of its image (from `cache.positions`) and its last token."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="lm.hook_inputs_embeds")
    pos = cache.positions
    spans = [spans[0] for spans in pos.image]
    assert all(s.stop - s.start == model.cfg.tokens_per_image for s in spans)
    image = torch.tensor([[s.start, s.start + (s.stop - s.start) // 2] for s in spans])
    assert (pos.input_ids.gather(1, image) == model.cfg.image_token_id).all()
    return torch.cat([image, pos.last[:, None]], 1)


def image_sites(model, inputs):
    """[B, T] the image tokens of the LM's input, from `cache.positions`."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="lm.hook_inputs_embeds")
    return model.image_embeddings_mask(cache.positions)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_llava_sweeps_equal_naive_loop(llava_minimal_pair, direction):
    model, clean, corrupt, metric = llava_minimal_pair
    positions = llava_positions(model, clean)  # per example: two image tokens and the last token
    n_cells = positions.shape[1]
    resid = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_post", positions=positions,
                                 direction=direction, normalize=True, batch_size=4, progress=False)
    heads = patching.patch_heads(model, clean, corrupt, metric, tower="lm", direction=direction, batch_size=4,
                                 progress=False)
    vision = patching.patch_heads(model, clean, corrupt, metric, tower="vision", activation="v",
                                  direction=direction, progress=False)
    lm, vit = model.tower_info("lm"), model.tower_info("vision")
    assert resid.shape == (lm.n_layers, n_cells) and heads.shape == (lm.n_layers, lm.n_heads)
    assert vision.shape == (vit.n_layers, vit.n_heads)
    for layer in range(max(lm.n_layers, vit.n_layers)):
        def edit_pos(act, src, cell):
            rows = torch.arange(positions.shape[0])
            act[rows, positions[:, cell]] = src[rows, positions[:, cell]]
            return act

        def edit_head(act, src, head):
            act[:, :, head] = src[:, :, head]
            return act

        if layer < lm.n_layers:
            expected = naive(model, clean, corrupt, metric, f"lm.blocks.{layer}.hook_resid_post", edit_pos, n_cells,
                             direction, True)
            torch.testing.assert_close(resid[layer], expected, atol=1e-5, rtol=1e-5)
            expected = naive(model, clean, corrupt, metric, f"lm.blocks.{layer}.attn.hook_z", edit_head, lm.n_heads,
                             direction, False)
            torch.testing.assert_close(heads[layer], expected, atol=1e-5, rtol=1e-5)
        if layer < vit.n_layers:
            expected = naive(model, clean, corrupt, metric, f"vision.blocks.{layer}.attn.hook_v", edit_head,
                             vit.n_heads, direction, False)
            torch.testing.assert_close(vision[layer], expected, atol=1e-5, rtol=1e-5)


def test_llava_causal_trace_noises_the_image_tokens(llava_minimal_pair):
    model, clean, _, _ = llava_minimal_pair
    target = model(**clean)[:, -1].argmax(-1)
    result = patching.causal_trace(model, clean, target, tower="lm", seed=2, progress=False)
    sites = image_sites(model, clean)
    assert sites.sum() == clean["pixel_values"].shape[0] * model.cfg.tokens_per_image
    expected = naive_trace(model, clean, target, "lm.hook_inputs_embeds", sites, 3.0, 2, "lm", "hook_resid_post", 1,
                           list(range(result.shape[1])))
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ InstructBLIP
@pytest.fixture(scope="module", params=["llama", "t5"])
def instructblip(request):
    from hooked_vlm.tiny import build_instructblip

    hf, processor = build_instructblip(request.param, seed=2, qf_layers=3)  # cross-attention in layers 0 and 2
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["what is in the picture?", "describe this image"]
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=prompts, padding=True,
                      return_tensors="pt")
    corrupt = processor(images=[random_image(seed=2), random_image(seed=3)], text=prompts, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    return request.param, model, clean, corrupt, metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])


def naive_heads(model, clean, corrupt, metric, tower, attention, n_heads, direction, normalize):
    out = []
    for layer in range(model.tower_info(tower).n_layers):
        name = f"{tower}.blocks.{layer}.{attention}.hook_z"
        if name not in model.hook_dict:
            out.append(torch.full((n_heads,), float("nan")))
            continue

        def edit(act, src, head):
            act[:, :, head] = src[:, :, head]
            return act
        out.append(naive(model, clean, corrupt, metric, name, edit, n_heads, direction, normalize))
    return torch.stack(out)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_instructblip_head_sweeps_equal_naive_loop(instructblip, direction):
    lm, model, clean, corrupt, metric = instructblip
    lm_tower = "lm" if lm == "llama" else "lm_decoder"
    for tower, attention in (("qformer", "cross_attn"), ("qformer", "attn"), (lm_tower, "attn")) + (
            (("lm_decoder", "cross_attn"), ("lm_encoder", "attn")) if lm == "t5" else ()):
        result = patching.patch_heads(model, clean, corrupt, metric, tower=tower, attention=attention,
                                      direction=direction, normalize=True, batch_size=6, progress=False)
        expected = naive_heads(model, clean, corrupt, metric, tower, attention, result.shape[1], direction, True)
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
        if tower == "qformer" and attention == "cross_attn":
            assert torch.isnan(result[1]).all() and not torch.isnan(result[0]).any()  # layer 1 has none
    resid = patching.patch_resid(model, clean, corrupt, metric, tower="qformer", hook="resid_mid_cross",
                                 positions=[0, 3, 5], direction=direction, progress=False)

    def edit_pos(act, src, cell):
        p = [0, 3, 5][cell]
        act[:, p] = src[:, p]
        return act
    cross_layers = [layer for layer in range(model.tower_info("qformer").n_layers)
                    if f"qformer.blocks.{layer}.hook_resid_mid_cross" in model.hook_dict]
    assert cross_layers == [0, 2]  # qf_layers=3 with cross-attention every other layer
    assert torch.isnan(resid[1]).all()
    for layer in cross_layers:
        expected = naive(model, clean, corrupt, metric, f"qformer.blocks.{layer}.hook_resid_mid_cross", edit_pos, 3,
                         direction, False)
        torch.testing.assert_close(resid[layer], expected, atol=1e-5, rtol=1e-5)


def test_llava_last_token_sweeps_resume_on_the_suffix(llava_minimal_pair):
    """Patching at the last token only: the resumed runs compute one position per row (the prefix's keys and values
    come from the corrupted run) and still equal the naive loop."""
    model, clean, corrupt, metric = llava_minimal_pair
    last = [clean["input_ids"].shape[1] - 1]
    lengths = []
    counter = model.lm.register_forward_hook(lambda tower, args, out: lengths.append(out.shape[1]))
    try:
        heads = patching.patch_heads(model, clean, corrupt, metric, tower="lm", positions=last, by_position=True,
                                     progress=False)
    finally:
        counter.remove()
    assert set(lengths[2:]) == {1}  # after the clean and corrupted runs, every resumed run is one token long
    info = model.tower_info("lm")
    for layer in range(info.n_layers):
        def edit(act, src, head):
            act[:, last, head] = src[:, last, head]
            return act
        expected = naive(model, clean, corrupt, metric, f"lm.blocks.{layer}.attn.hook_z", edit, info.n_heads,
                         "denoise", False)
        torch.testing.assert_close(heads[layer, :, 0], expected, atol=1e-5, rtol=1e-5)
    target = model(**clean)[:, -1].argmax(-1)
    T = clean["input_ids"].shape[1]
    trace = patching.causal_trace(model, clean, target, tower="lm", positions=[T - 2, T - 1], window=2, seed=1,
                                  progress=False)
    sites = image_sites(model, clean)
    expected = naive_trace(model, clean, target, "lm.hook_inputs_embeds", sites, 3.0, 1, "lm", "hook_resid_post", 2,
                           [T - 2, T - 1])
    torch.testing.assert_close(trace, expected, atol=1e-6, rtol=1e-5)
