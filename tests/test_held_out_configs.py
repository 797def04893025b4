"""Parity on held-out configurations (issue 16): Qwen2-VL, Qwen2.5-VL and LLaVA-Phi (Phi-2, Phi-3) built from
configurations that no code was written against, drawn from seeded generators over the knobs HF's configs expose,
each checked against transformers' own model in the same test: logits (explicit and fast attention, float32), every
layer's stream and attention pattern, and greedy generation for some.

The first `N_DEFAULT` draws of each family spread the values that must be covered over the draws (merge 2 and 3,
grouped-query ratios 1, 2 and 4, Qwen2.5's full-attention blocks none / some / all, partial rotary 0.25 / 0.5 / 1.0,
q/k LayerNorm on and off, tied and untied heads; `test_default_draws_cover_the_required_values` checks it); the
further draws (`slow`) pick every knob at random. Every parameter, norms and biases included, is random."""

from __future__ import annotations

import random

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_llava_phi, build_qwen2_vl, random_image
from lm_parity import assert_lm_layers_match_hf

N_DEFAULT = 3  # draws per family in the default run; `N_SLOW` more are marked slow
N_SLOW = 5
GQA_RATIOS = (1, 2, 4)

# Largest |hooked - HF| (float32) measured over draws 0..24 of each family (100 configurations; logits up to ~6,
# streams up to ~12 in magnitude), each tolerance 2.5-3x the largest:
# - Qwen2-VL / 2.5-VL: logits 7.7e-6 explicit, 6.9e-6 fast; vision streams 4.8e-6, merger output 6.7e-6, LM input
#   embeddings 6.7e-6, LM streams 1.0e-5, LM patterns 1.8e-6.
# - LLaVA-Phi (Phi-2, Phi-3): logits 3.7e-6 explicit, 8.2e-6 fast; LM streams 1.3e-5, patterns 2.4e-6.
# Bugs these catch and the fixed-config tests (test_qwen2_vl.py, test_llava_phi.py) miss, each planted once: the
# LM's rope_theta or the Phi norms' eps ignored, the vision rope_theta ignored, Qwen2.5's window side rounded up.
QWEN_LOGITS_ATOL = 2e-5
QWEN_STREAM_ATOL = 3e-5
QWEN_PATTERN_ATOL = 6e-6
PHI_LOGITS_ATOL = {False: 1e-5, True: 3e-5}
PHI_STREAM_ATOL = 4e-5
PHI_PATTERN_ATOL = 7e-6


def _pick(rng: random.Random, index: int, values: tuple, order: list[int]):
    """For the default draws `values[order[index] % len(values)]` (`order` a permutation of range(N_DEFAULT), so
    each of up to N_DEFAULT values is drawn at least once), a random value after them."""
    return values[order[index] % len(values)] if index < N_DEFAULT else rng.choice(values)


def _orders(seed: int, knobs: dict[str, tuple]) -> dict[str, list[int]]:
    """Per knob a seeded shuffle of its value indexes, shared by the default draws of one family."""
    rng = random.Random(seed)
    return {name: rng.sample(range(N_DEFAULT), N_DEFAULT) for name in knobs}


# ------------------------------------------------------------------------------------------ Qwen2-VL / Qwen2.5-VL
QWEN_REQUIRED = {"merge": (2, 3), "gqa": GQA_RATIOS, "full": ("none", "some", "all"), "tie": (False, True)}


def draw_qwen(version: str, index: int) -> dict:
    """The builder keywords of draw `index` of Qwen `version` (a pure function of its arguments)."""
    family_seed = 100 if version == "2" else 200
    rng = random.Random(family_seed + 1 + index)
    order = _orders(family_seed, QWEN_REQUIRED)
    merge = _pick(rng, index, QWEN_REQUIRED["merge"], order["merge"])
    patch = rng.choice((2, 3, 4, 6) if merge == 2 else (2, 3, 4))
    vis_heads = rng.choice((1, 2, 3, 4))
    vis_hidden = vis_heads * rng.choice((4, 8, 12, 16))  # the 2-D rotary needs d_head % 4 == 0
    vis_layers = rng.randint(1, 4)
    ratio = _pick(rng, index, GQA_RATIOS, order["gqa"])
    kv_heads = rng.choice((1, 2))
    heads = kv_heads * ratio
    d_head = rng.choice((8, 10, 12, 16, 20))
    half = d_head // 2  # mrope_section: three parts of d_head / 2, in general uneven (positive in the default draws)
    cut = sorted(rng.sample(range(1, half), 2) if index < N_DEFAULT else rng.choices(range(half + 1), k=2))
    factor = patch * merge  # the processor resizes to multiples of this; the budget is in merged tokens
    kw = dict(
        version=version, seed=rng.randrange(10_000), vis_hidden=vis_hidden, vis_layers=vis_layers,
        vis_heads=vis_heads, patch=patch, merge=merge, temporal=rng.choice((1, 2, 3)), heads=heads,
        kv_heads=kv_heads, lm_hidden=heads * d_head, lm_layers=rng.randint(1, 3),
        mrope_section=(cut[0], cut[1] - cut[0], half - cut[1]), lm_inter=rng.randint(16, 150),
        lm_act=rng.choice(("silu", "gelu", "gelu_pytorch_tanh", "relu")),
        rope_theta=rng.choice((100.0, 10_000.0, 1_000_000.0)), vis_rope_theta=rng.choice((50.0, 10_000.0)),
        rms_norm_eps=rng.choice((1e-6, 1e-5, 1e-3, 0.05)),
        tie_word_embeddings=_pick(rng, index, QWEN_REQUIRED["tie"], order["tie"]),
        min_pixels=factor**2 * rng.randint(2, 4), max_pixels=factor**2 * rng.randint(8, 16),
    )
    if version == "2":
        kw["vis_inter"] = vis_hidden * rng.randint(1, 4)  # Qwen2-VL's whole mlp_ratio
        kw["vis_act"] = rng.choice(("quick_gelu", "gelu", "silu", "gelu_pytorch_tanh"))
    else:
        kw["vis_inter"] = rng.randint(8, 100)
        kw["vis_act"] = rng.choice(("silu", "gelu", "quick_gelu", "relu"))
        # a window of 1-3 merged tokens a side, in pixels, plus a remainder HF's integer division drops
        kw["window_size"] = rng.randint(1, 3) * factor + rng.randrange(factor)
        full = _pick(rng, index, QWEN_REQUIRED["full"], order["full"])
        layers = range(vis_layers)
        kw["fullatt_block_indexes"] = {"none": (), "all": tuple(layers),
                                       "some": tuple(sorted(rng.sample(layers, rng.randint(1, vis_layers))))}[full]
    return kw


def qwen_images(kw: dict, index: int) -> list:
    """Three images whose merged-token grids (rows x cols) differ and fit the processor's pixel budget, so that it
    keeps them: the first a 2-row strip (wider than any window), the others drawn; each side off a multiple of the
    resize factor by less than half of it (the processor rounds it back)."""
    rng = random.Random(1_000 + index)
    factor = kw["patch"] * kw["merge"]
    low, high = kw["min_pixels"] // factor**2, kw["max_pixels"] // factor**2  # in merged tokens
    grids = [(r, c) for r in range(1, high + 1) for c in range(1, high + 1) if low <= r * c <= high]
    first = (2, high // 2)
    grids = [first, *rng.sample([g for g in grids if g != first], 2)]
    sizes = [(c * factor + rng.randrange(-(factor // 2 - 1), factor // 2) if factor > 2 else c * factor, r * factor)
             for r, c in grids]
    return [random_image(size, seed=i) for i, size in enumerate(sizes)]


QWEN_IMG = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PROMPTS = [f"{QWEN_IMG}what is in the picture?", f"hi {QWEN_IMG} and {QWEN_IMG} compare them"]
QWEN_CASES = [(version, index) for version in ("2", "2.5") for index in range(N_DEFAULT + N_SLOW)]


def _case_param(family: str, index: int) -> pytest.param:
    marks = [pytest.mark.slow] if index >= N_DEFAULT else []
    return pytest.param((family, index), id=f"{family}-{index}", marks=marks)


@pytest.fixture(scope="module", params=[_case_param(v, i) for v, i in QWEN_CASES])
def qwen(request):
    version, index = request.param
    kw = draw_qwen(version, index)
    hf, processor = build_qwen2_vl(**kw)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=qwen_images(kw, index), text=QWEN_PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # HF's reference, computed once: logits, every layer's stream and pattern, vision included
        ref = hf(**inputs, output_hidden_states=True, output_attentions=True)
        vision = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)
    return hf, model, inputs, (ref, vision)


def test_qwen_inputs_cover_the_hard_cases(qwen):
    hf, model, inputs, _ = qwen
    assert not inputs["attention_mask"][0].all() and inputs["attention_mask"][1].all()  # row 0 left-padded
    assert len({tuple(g) for g in inputs["image_grid_thw"].tolist()}) == 3  # images of three sizes
    vision = model.cfg.vision
    if vision.window is not None and len(vision.full_attention_layers) < vision.n_layers:
        m, side = vision.merge_size, vision.window  # some image spans more than one window
        assert any(h // m > side or w // m > side for _, h, w in inputs["image_grid_thw"].tolist())


@pytest.mark.parametrize("fast", [False, True], ids=["explicit", "fast"])
def test_qwen_logits_match_hf(qwen, fast):
    hf, model, inputs, (out, _) = qwen
    model.set_fast_attention(fast)
    try:
        with torch.no_grad():
            ours, ref = model(**inputs), out.logits
    finally:
        model.set_fast_attention(True)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=QWEN_LOGITS_ATOL, rtol=0)


def _hf_window_order(model, grid):
    """Qwen2.5's HF vision stream is permuted window by window, in units of merged blocks (`window_index`)."""
    from transformers.vision_utils import get_vision_window_index

    vc = model.cfg.vision
    index, _ = get_vision_window_index(grid, vc.merge_size, vc.window * vc.merge_size * vc.patch_size, vc.patch_size)
    return index


def test_qwen_per_layer(qwen):
    hf, model, inputs, (out, vision) = qwen
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    valid = model.vision.valid(grid)
    group = model.cfg.vision.merge_size**2

    def packed(t):  # our [n, N, D] rows -> HF's packed [P, D] (Qwen2.5: in HF's window order)
        t = t[valid]
        if model.cfg.vision.window is not None:
            t = t.reshape(-1, group, t.shape[-1])[_hf_window_order(model, grid)].reshape(-1, t.shape[-1])
        return t

    atol = QWEN_STREAM_ATOL
    torch.testing.assert_close(packed(cache["vision.hook_embed"]), vision.hidden_states[0], atol=atol, rtol=0)
    for layer in range(model.cfg.vision.n_layers):
        torch.testing.assert_close(packed(cache["vision", layer, "resid_post"]), vision.hidden_states[layer + 1],
                                   atol=atol, rtol=0)
    counts = [int(t * h * w) // group for t, h, w in grid.tolist()]
    merged = torch.arange(cache["projector.hook_out"].shape[1])[None, :] < torch.tensor(counts)[:, None]
    # HF's merger output, back in the processor's order (Qwen2.5 undoes its window order), image after image
    torch.testing.assert_close(cache["projector.hook_out"][merged], vision.pooler_output, atol=atol, rtol=0)
    assert_lm_layers_match_hf(cache, out, inputs["attention_mask"].bool(), embeds_atol=atol, stream_atol=atol,
                              pattern_atol=QWEN_PATTERN_ATOL)


@pytest.mark.parametrize("qwen", [_case_param(*case) for case in (("2", 0), ("2.5", 2), ("2", 4), ("2.5", 6))],
                         indirect=True)
def test_qwen_generate_matches_hf(qwen):
    hf, model, inputs, _ = qwen
    assert torch.equal(model.generate(**inputs, max_new_tokens=5), hf.generate(**inputs, max_new_tokens=5,
                                                                                do_sample=False))


# ------------------------------------------------------------------------------------------ LLaVA-Phi
PHI_REQUIRED = {"rotary": (0.25, 0.5, 1.0), "gqa": GQA_RATIOS, "qk": (False, True, False), "tie": (False, True),
                "window": (None, "binds")}


def draw_phi(lm: str, index: int) -> dict:
    """The builder keywords of draw `index` of the Phi-2 (`lm="phi"`) or Phi-3 (`"phi3"`) family."""
    family_seed = 300 if lm == "phi" else 400
    rng = random.Random(family_seed + 1 + index)
    order = _orders(family_seed, PHI_REQUIRED)
    rotary = _pick(rng, index, PHI_REQUIRED["rotary"] + ((0.4, 0.75) if index >= N_DEFAULT else ()), order["rotary"])
    # a head width whose rotated part is a positive even number of dims
    d_head = rng.choice([d for d in (8, 12, 16, 20, 24, 40) if int(d * rotary) % 2 == 0 and int(d * rotary) > 0])
    ratio = _pick(rng, index, GQA_RATIOS, order["gqa"])
    kv_heads = rng.choice((1, 2))
    heads = kv_heads * ratio
    kw = dict(
        lm=lm, seed=rng.randrange(10_000), heads=heads, kv_heads=kv_heads, lm_hidden=heads * d_head,
        lm_layers=rng.randint(1, 3), partial_rotary_factor=rotary, lm_inter=rng.randint(16, 200),
        rope_theta=rng.choice((100.0, 10_000.0, 1_000_000.0)), norm_eps=rng.choice((1e-6, 1e-5, 1e-3, 0.05)),
        tie_word_embeddings=_pick(rng, index, PHI_REQUIRED["tie"], order["tie"]),
        vis_hidden=heads * 8, vis_layers=rng.randint(2, 3),  # the CLIP tower shares the LM's head count
    )
    if lm == "phi":
        kw["qk_layernorm"] = _pick(rng, index, PHI_REQUIRED["qk"], order["qk"])
        kw["lm_act"] = rng.choice(("gelu_new", "gelu", "gelu_pytorch_tanh", "relu"))
    else:
        window = _pick(rng, index, PHI_REQUIRED["window"], order["window"])  # the prompts are ~30 tokens long
        kw["sliding_window"] = None if window is None else rng.randint(4, 24)
        kw["lm_act"] = rng.choice(("silu", "gelu", "gelu_pytorch_tanh"))
    if not kw.get("qk_layernorm") and rng.random() < 0.4:  # a head width HF reads from head_dim, not d_model / H
        kw["head_dim"], kw["lm_hidden"] = d_head, heads * d_head + rng.choice((-8, 8, 24))
    return kw


PHI_IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
PHI_PROMPTS = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
PHI_CASES = [(lm, index) for lm in ("phi", "phi3") for index in range(N_DEFAULT + N_SLOW)]


def mask_positions(inputs):
    """HF's generate numbering (cumsum of the mask, pads 0), which hooked_vlm uses by default."""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=[_case_param(lm, i) for lm, i in PHI_CASES])
def phi(request):
    lm, index = request.param
    hf, processor = build_llava_phi(**draw_phi(lm, index))
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=PHI_IMAGES, text=PHI_PROMPTS, padding=True, return_tensors="pt")  # left-padded
    with torch.no_grad():  # HF's reference, computed once
        ref = hf(**inputs, position_ids=mask_positions(inputs), output_hidden_states=True, output_attentions=True)
    return hf, model, inputs, ref


@pytest.mark.parametrize("fast", [False, True], ids=["explicit", "fast"])
def test_phi_logits_match_hf(phi, fast):
    hf, model, inputs, out = phi
    assert not inputs["attention_mask"].all()
    model.set_fast_attention(fast)
    try:
        with torch.no_grad():
            ours, ref = model(**inputs), out.logits
    finally:
        model.set_fast_attention(True)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=PHI_LOGITS_ATOL[fast], rtol=0)


def test_phi_per_layer(phi):
    hf, model, inputs, out = phi
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    assert_lm_layers_match_hf(cache, out, inputs["attention_mask"].bool(), embeds_atol=PHI_STREAM_ATOL,
                              stream_atol=PHI_STREAM_ATOL, pattern_atol=PHI_PATTERN_ATOL)


@pytest.mark.parametrize("phi", [_case_param(*case) for case in (("phi", 1), ("phi3", 1), ("phi", 4), ("phi3", 5))],
                         indirect=True)
def test_phi_generate_matches_hf(phi):
    hf, model, inputs, _ = phi
    assert torch.equal(model.generate(**inputs, max_new_tokens=5), hf.generate(**inputs, max_new_tokens=5,
                                                                                do_sample=False))


# ------------------------------------------------------------------------------------------ the draws themselves
def test_default_draws_cover_the_required_values():
    qwen = {v: [draw_qwen(v, i) for i in range(N_DEFAULT)] for v in ("2", "2.5")}
    for draws in qwen.values():
        assert {kw["merge"] for kw in draws} == {2, 3}
        assert {kw["heads"] // kw["kv_heads"] for kw in draws} == set(GQA_RATIOS)
        assert {kw["tie_word_embeddings"] for kw in draws} == {False, True}
        assert any(len(set(kw["mrope_section"])) == 3 for kw in draws)  # uneven sections
        assert len({kw["temporal"] for kw in draws} | {kw["patch"] for kw in draws}) > 2
    full = [(len(kw["fullatt_block_indexes"]), kw["vis_layers"]) for kw in qwen["2.5"]]
    assert any(n == 0 for n, _ in full) and any(n == depth for n, depth in full) and any(0 < n < depth for n, depth
                                                                                              in full)
    phi = {lm: [draw_phi(lm, i) for i in range(N_DEFAULT)] for lm in ("phi", "phi3")}
    for draws in phi.values():
        assert {kw["partial_rotary_factor"] for kw in draws} == {0.25, 0.5, 1.0}
        assert {kw["heads"] // kw["kv_heads"] for kw in draws} == set(GQA_RATIOS)
        assert {kw["tie_word_embeddings"] for kw in draws} == {False, True}
    assert {kw["qk_layernorm"] for kw in phi["phi"]} == {False, True}
    assert {kw["sliding_window"] is None for kw in phi["phi3"]} == {False, True}
    # the draws are pure functions of their index: the same configuration on every run
    assert draw_qwen("2.5", 1) == draw_qwen("2.5", 1) and draw_phi("phi3", 2) == draw_phi("phi3", 2)


def _assert_randomised(hf):
    """HF's init leaves norm weights at 1 and biases at 0, which would hide a dropped bias or a swapped norm."""
    for name, p in hf.named_parameters():
        assert not torch.all(p == 0) and not torch.all(p == 1), name


def test_qwen_build_randomises_every_parameter(qwen):
    _assert_randomised(qwen[0])


def test_phi_build_randomises_every_parameter(phi):
    _assert_randomised(phi[0])


@pytest.mark.parametrize("version,kw,match", [
    ("2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("2", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
     "rope_type='linear'"),
    ("2.5", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4,
                                 "mrope_section": [2, 3, 3]}}, "rope_type='dynamic'"),
    ("2.5", {"window_size": 6}, "window_size=6"),  # under one merged token (patch 4 x merge 2): HF divides by 0
])
def test_qwen_unsupported_knobs_are_refused_by_name(version, kw, match):
    hf, _ = build_qwen2_vl(version=version, seed=9, **kw)  # transformers builds all of them
    with pytest.raises(ValueError, match=match):
        HookedVLM.from_hf(hf)


def test_phi2_qk_layernorm_with_a_separate_head_dim_is_refused():
    """HF sizes Phi-2's q/k LayerNorms by hidden_size // heads, not head_dim: such a model fails in HF's forward."""
    hf, _ = build_llava_phi("phi", seed=9, qk_layernorm=True, head_dim=12, lm_hidden=64, heads=4)
    with pytest.raises(ValueError, match=r"qk_layernorm=True .* head_dim 12"):
        HookedVLM.from_hf(hf)
