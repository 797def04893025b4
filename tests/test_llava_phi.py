"""LLaVA with Phi language models (Phi-2: HF `phi`, Phi-3: HF `phi3`) against transformers' own model, built tiny and
fully randomised (LayerNorm weights and biases included) in the test: parity per layer and of the logits, half
precision, generation, hook edits, conversion both ways, and the analyses on Phi-2's parallel block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedLlava, HookedVLM, analysis, interventions, metrics, patching
from hooked_vlm.tiny import build_llava_phi, random_image
from lm_parity import assert_lm_layers_match_hf, half_precision_error, inert_hook_points

GOLDEN = Path(__file__).parent / "golden"
IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
PROMPTS = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]

# Phi-2 (partial rotary 0.4: 8 of 20 dims), with HF's per-head q/k LayerNorms and grouped-query heads; Phi-3 as
# Phi-3-mini (full rotary, no window) and with partial rotary and a sliding window that binds on these prompts
CONFIGS = {
    "phi2": ("phi", {}),
    "phi2_qk_gqa": ("phi", {"qk_layernorm": True, "kv_heads": 2}),
    "phi3": ("phi3", {}),
    "phi3_partial_window": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8, "kv_heads": 2}),
}


def mask_positions(inputs):
    """HF's generate numbering (cumsum of the mask, pads 0), which hooked_vlm uses by default."""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=list(CONFIGS))
def phi(request):
    lm, kw = CONFIGS[request.param]
    hf, processor = build_llava_phi(lm, seed=5, **kw)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")  # left-padded
    return hf, model, inputs


@pytest.fixture(scope="module")
def phi2():
    hf, processor = build_llava_phi("phi", seed=3, qk_layernorm=True)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    return hf, model, inputs


def hf_text_model(hf):
    return hf.model.language_model


# ------------------------------------------------------------------------------------------ parity
# Largest |hooked - HF| over the real logits (float32), measured for seeds 5..7 in the four CONFIGS: explicit path 0
# (bit for bit), fast path (sdpa) 1.8e-6 - 3.0e-6. Tolerances: 1e-6 (explicit; any rounding change would show) and
# 1e-5 (fast), against logits of magnitude ~4.
FLOAT32_ATOL = {False: 1e-6, True: 1e-5}


@pytest.mark.parametrize("fast", [False, True], ids=["explicit", "fast"])
def test_logits_match_hf(phi, fast):
    hf, model, inputs = phi
    assert isinstance(model, HookedLlava) and not inputs["attention_mask"].all()
    model.set_fast_attention(fast)
    try:
        with torch.no_grad():
            ours = model(**inputs)
            ref = hf(**inputs, position_ids=mask_positions(inputs)).logits
    finally:
        model.set_fast_attention(True)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=FLOAT32_ATOL[fast], rtol=0)


def test_config_is_read_as_hf_reads_it(phi):
    hf, model, _ = phi
    tc, lm = hf.config.text_config, model.lm.cfg
    d_head = tc.hidden_size // tc.num_attention_heads
    rotated = int(d_head * tc.rope_parameters["partial_rotary_factor"])
    assert model.lm.rotary.d_head == rotated  # the rotary tables cover the rotated dims only
    assert lm.block.parallel == (tc.model_type == "phi")
    assert lm.sliding_window == getattr(tc, "sliding_window", None)
    assert (lm.block.attn.qk_norm is not None) == bool(getattr(tc, "qk_layernorm", False))
    flat = model.cfg_of("lm")  # TransformerLens's names
    assert flat.rotary_dim == rotated and flat.parallel_attn_mlp == lm.block.parallel
    assert flat.normalization_type == ("LN" if tc.model_type == "phi" else "RMS")


# run_with_cache of every hook runs the explicit attention, norm and hook_result paths (the vision tower's too), so
# the cached streams are not bit-exact: measured for seeds 5 and 6 in the four CONFIGS, image embeddings up to 5.4e-7,
# LM streams up to 3.4e-6, patterns up to 4.8e-7. Tolerances 2e-6, 1e-5 and 2e-6.
def test_per_layer(phi):
    hf, model, inputs = phi
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
        out = hf(**inputs, position_ids=mask_positions(inputs), output_hidden_states=True, output_attentions=True)
    assert_lm_layers_match_hf(cache, out, inputs["attention_mask"].bool(), embeds_atol=2e-6, stream_atol=1e-5,
                              pattern_atol=2e-6)


def test_partial_rotary_passes_the_other_dims_through(phi):
    hf, model, inputs = phi
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("lm.blocks.0.attn.hook_"))
    rotated = model.lm.rotary.d_head
    q, rot_q = cache["lm.blocks.0.attn.hook_q"], cache["lm.blocks.0.attn.hook_rot_q"]
    if model.lm.cfg.block.attn.qk_norm is not None:  # the norm sits between hook_q and the rotary
        q = model.lm.blocks[0].attn.q_norm(q)
    assert torch.equal(rot_q[..., rotated:], q[..., rotated:])
    assert not torch.allclose(rot_q[..., :rotated], q[..., :rotated])


def test_sliding_window_binds():
    """Without the window the logits differ from HF's: the window (8) is shorter than these prompts."""
    lm, kw = CONFIGS["phi3_partial_window"]
    hf, processor = build_llava_phi(lm, seed=6, **kw)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**inputs, position_ids=mask_positions(inputs)).logits
        torch.testing.assert_close(model(**inputs)[keep], ref[keep], atol=1e-5, rtol=0)
        model.lm.cfg.sliding_window = None
        assert not torch.allclose(model(**inputs)[keep], ref[keep], atol=1e-3)


# Largest |half - HF float32| over the real logits, measured for seeds 5..7 in the four CONFIGS (the fixture's is 5):
# bfloat16 0.035-0.067, float16 0.0045-0.0093; each tolerance is 1.5x the largest of the twelve. Scaling the LM's last
# MLP by 0.9 moves them by 0.157-0.202 (test_half_precision_tolerance_catches_a_scaled_mlp checks it fails these).
HALF_MEASURED = {torch.bfloat16: 0.067, torch.float16: 0.0093}
HALF_ATOL = {dtype: 1.5 * value for dtype, value in HALF_MEASURED.items()}


def _half_error(hf, half, inputs, dtype):
    return half_precision_error(hf, half, inputs, dtype, mask_positions(inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(phi, dtype):
    hf, model, inputs = phi
    assert _half_error(hf, HookedVLM.from_hf(hf, dtype=dtype), inputs, dtype) < HALF_ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tolerance_catches_a_scaled_mlp(phi, dtype):
    hf, model, inputs = phi
    planted = HookedVLM.from_hf(hf, dtype=dtype)
    mlp = planted.lm.blocks[-1].mlp
    with torch.no_grad():
        mlp.out_weight.mul_(0.9)
        if mlp.out_bias is not None:
            mlp.out_bias.mul_(0.9)
    assert _half_error(hf, planted, inputs, dtype) > HALF_ATOL[dtype]


# ------------------------------------------------------------------------------------------ generation and hooks
@pytest.mark.parametrize("with_hook", [False, True])
def test_generate_matches_hf(phi, with_hook):
    hf, model, inputs = phi
    name = "lm.blocks.0.hook_mlp_out"
    if not with_hook:
        ours = model.generate(**inputs, max_new_tokens=6)
        ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    else:
        ours = model.generate(**inputs, max_new_tokens=6, fwd_hooks=[(name, lambda t, hook: t * 3)])
        handle = hf_text_model(hf).layers[0].mlp.register_forward_hook(lambda m, i, o: o * 3)
        try:
            ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
        finally:
            handle.remove()
    assert torch.equal(ours, ref)
    assert not model.hook_dict[name].has_hooks


def _attn_output_module(hf, layer):
    attn = hf_text_model(hf).layers[layer].self_attn
    return attn.dense if hasattr(attn, "dense") else attn.o_proj  # Phi-2 names it dense, Phi-3 o_proj


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_hook_edit_equals_hf_forward_hook(phi, site):
    """Scaling a sub-layer's output in one block: the same edit through an HF forward hook gives the same logits
    (in Phi-2's parallel block the attention and MLP outputs are added to the stream together)."""
    hf, model, inputs = phi
    with torch.no_grad():
        ours = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.1.hook_{site}", lambda t, hook: t * 2.5)])
        module = _attn_output_module(hf, 1) if site == "attn_out" else hf_text_model(hf).layers[1].mlp
        handle = module.register_forward_hook(lambda m, i, o: o * 2.5)
        try:
            ref = hf(**inputs, position_ids=mask_positions(inputs)).logits
        finally:
            handle.remove()
        clean = model(**inputs)
    keep = inputs["attention_mask"].bool()
    assert not torch.allclose(ours[keep], clean[keep], atol=1e-3)
    torch.testing.assert_close(ours[keep], ref[keep], atol=FLOAT32_ATOL[True], rtol=0)


@pytest.mark.parametrize("lm, kw, golden", [
    ("phi", {"qk_layernorm": True}, "llava_phi2_hook_names.txt"),  # with HF's q/k norms, so that they are listed
    ("phi3", {}, "llava_phi3_hook_names.txt"),
], ids=["phi2", "phi3"])
def test_every_hook_point_can_edit(lm, kw, golden):
    """The ordered list of hook names is a public API: a change must be deliberate (update tests/golden); every hook
    point, edited, changes the logits (none is computed and thrown away)."""
    hf, processor = build_llava_phi(lm, seed=8, **kw)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES[:1], text=PROMPTS[:1], return_tensors="pt")  # one example: ~90 forwards
    assert list(model.hook_dict) == (GOLDEN / golden).read_text().split()
    inert = inert_hook_points(model, inputs)
    assert not inert, inert


def test_parallel_block_hooks(phi2):
    """Phi-2's block: one norm (ln1) read by attention and MLP, no hook_resid_mid and no ln2 (that every hook
    point edits the output is test_every_hook_point_can_edit's)."""
    hf, model, inputs = phi2
    block = [name.removeprefix("lm.blocks.0.") for name in model.hook_dict if name.startswith("lm.blocks.0.")]
    assert block == ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                     "attn.hook_v", "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized",
                     "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized", "attn.hook_rot_q", "attn.hook_rot_k",
                     "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
                     "hook_attn_out", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]


def test_resid_post_is_resid_pre_plus_both_outputs(phi2):
    hf, model, inputs = phi2
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    for layer in range(model.tower_info("lm").n_layers):
        total = cache["lm", layer, "attn_out"] + cache["lm", layer, "mlp_out"] + cache["lm", layer, "resid_pre"]
        assert torch.equal(total, cache["lm", layer, "resid_post"])


# ------------------------------------------------------------------------------------------ analyses
def _metric(model, inputs):
    with torch.no_grad():
        logits = model(**inputs)
    answer = logits[:, -1].argmax(-1)
    return metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])


def _naive(model, target, source, metric, hook_name, edit, n_cells):
    """One fresh forward per cell (run_with_hooks only)."""
    examples = torch.arange(target["input_ids"].shape[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=hook_name)
        return torch.stack([metric(model.run_with_hooks(**target, fwd_hooks=[
            (hook_name, lambda act, hook: edit(act.clone(), cache[hook_name], cell))]), examples).mean()
            for cell in range(n_cells)])


def _corrupt(model):
    return model.processor(images=[random_image(seed=2), random_image(seed=3)], text=PROMPTS, padding=True,
                           return_tensors="pt")


@pytest.mark.parametrize("hook", ["resid_pre", "attn_out", "mlp_out"])
def test_patch_resid_equals_naive_loop(phi2, hook):
    hf, model, clean = phi2
    corrupt, metric = _corrupt(model), _metric(model, clean)
    positions = [3, 9, clean["input_ids"].shape[1] - 1]  # two image tokens (both rows) and the last token
    result = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook=hook, positions=positions,
                                  batch_size=4, progress=False)

    def edit(act, src, cell):
        act[:, positions[cell]] = src[:, positions[cell]]
        return act

    for layer in range(model.tower_info("lm").n_layers):
        expected = _naive(model, corrupt, clean, metric, f"lm.blocks.{layer}.hook_{hook}", edit, len(positions))
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)
    assert result.abs().sum() > 0


def test_patch_heads_equals_naive_loop(phi2):
    hf, model, clean = phi2
    corrupt, metric = _corrupt(model), _metric(model, clean)
    result = patching.patch_heads(model, clean, corrupt, metric, tower="lm", batch_size=4, progress=False)
    n_heads = model.tower_info("lm").n_heads

    def edit(act, src, head):
        act[:, :, head] = src[:, :, head]
        return act

    for layer in range(model.tower_info("lm").n_layers):
        expected = _naive(model, corrupt, clean, metric, f"lm.blocks.{layer}.attn.hook_z", edit, n_heads)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


def test_knockout_and_head_ablation_run_on_the_parallel_block(phi2):
    hf, model, inputs = phi2
    positions = model.positions(**inputs)
    spans = [spans[0] for spans in positions.image]
    last = positions.last.tolist()
    image = [list(range(s.start, s.stop)) for s in spans]
    hooks = interventions.attention_knockout(model, [[p] for p in last], image, range(2))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    for b in range(2):
        assert torch.all(cache["lm", 1, "pattern"][b, :, last[b], image[b]] == 0)
        assert torch.all(cache["lm", 1, "pattern"][b, :, last[b]].sum(-1).sub(1).abs() < 1e-5)

    def zero(head):
        def hook(t, hook):
            t = t.clone()
            t[:, :, head] = 0
            return t
        return hook

    with torch.no_grad():
        ablated = model.run_with_hooks(**inputs, fwd_hooks=interventions.ablate_heads(model, [(0, 1), (1, 2)]))
        ref = model.run_with_hooks(**inputs, fwd_hooks=[("lm.blocks.0.attn.hook_z", zero(1)),
                                                        ("lm.blocks.1.attn.hook_z", zero(2))])
    assert torch.equal(ablated, ref) and not torch.equal(ablated, model(**inputs))


def test_logit_lens_runs_and_its_last_layer_is_the_model(phi2):
    hf, model, inputs = phi2
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    lens = analysis.logit_lens(model, cache, tower="lm", k=3)
    T = inputs["input_ids"].shape[1]
    assert lens.ids.shape == (model.tower_info("lm").n_layers, 2, T, 3)
    assert torch.equal(lens.ids[-1, :, :, 0], logits.argmax(-1))
    for hook in ("attn_out", "mlp_out", "embed"):
        analysis.logit_lens(model, cache, tower="lm", hook=hook)


def test_missing_resid_mid_is_named(phi2):
    """The parallel block has no stream between attention and MLP: every way to ask for it names the hook."""
    hf, model, inputs = phi2
    corrupt, metric = _corrupt(model), _metric(model, inputs)
    with pytest.raises(ValueError, match="no layer of tower 'lm' has a hook 'hook_resid_mid'"):
        patching.patch_resid(model, inputs, corrupt, metric, tower="lm", hook="resid_mid", progress=False)
    with pytest.raises(ValueError, match="hook_resid_mid"):
        patching.causal_trace(model, inputs, metric, tower="lm", kind="resid_mid", progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    with pytest.raises(ValueError, match="hook_resid_mid"):
        analysis.logit_lens(model, cache, tower="lm", hook="resid_mid")
    with pytest.raises(KeyError, match="lm.blocks.0.hook_resid_mid"):
        cache.accumulated_resid(incl_mid=True, tower="lm")
    with pytest.raises(KeyError, match="lm.blocks.1.ln2.hook_scale"):
        cache.apply_ln_to_stack(cache.accumulated_resid(tower="lm"), 1, mlp_input=True, tower="lm")
    with pytest.raises(KeyError, match="no hook point named"):
        model.run_with_hooks(**inputs, fwd_hooks=[("lm.blocks.0.hook_resid_mid", lambda t, hook: t)])


def test_direct_logit_attribution_sums_to_the_logit_less_the_norm_bias(phi2):
    """The stream's parts (embeddings, each block's attention and MLP outputs) through the final LayerNorm, frozen,
    sum to the logit less `ln_final.b @ W_U[:, token]`: Phi-2's final norm has a bias, which no part carries."""
    hf, model, inputs = phi2
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    stack = cache.decompose_resid(tower="lm")
    token = logits[:, -1].argmax(-1)
    attrs = cache.logit_attrs(stack[:, :, -1], token, tower="lm", pos_slice=-1)
    bias = model.lm.unembed.weight[token] @ model.lm.ln_final.b
    torch.testing.assert_close(attrs.sum(0) + bias, logits[torch.arange(2), -1, token], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("config", list(CONFIGS))
def test_conversion_both_ways_is_exact(config, tmp_path):
    lm, kw = CONFIGS[config]
    hf, processor = build_llava_phi(lm, seed=7, **kw)
    model = HookedVLM.from_hf(hf, processor=processor)
    hf_state = hf.state_dict()
    exported = model.hf_state_dict()
    assert exported.keys() == hf_state.keys()
    for k, v in hf_state.items():
        assert torch.equal(exported[k], v), k
    back = model.to_hf()
    assert type(back.model.language_model) is type(hf.model.language_model)
    back.set_attn_implementation("eager")  # as the reference was built; to_hf's default is sdpa
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, hf(**inputs).logits)


@pytest.mark.parametrize("lm", ["phi", "phi3"])
def test_from_pretrained_local_directories(lm, tmp_path):
    hf, processor = build_llava_phi(lm, seed=8, kv_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**inputs, position_ids=mask_positions(inputs)).logits
    loaded = HookedVLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert isinstance(loaded, HookedLlava)
    loaded.save_pretrained(tmp_path / "hooked")
    for model in (loaded, HookedVLM.from_pretrained(tmp_path / "hooked")):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "longrope", "rope_theta": 10_000.0, "short_factor": [1.0] * 10, "long_factor": [2.0] * 10,
      "original_max_position_embeddings": 256}, "rope_type='longrope'"),
    ({"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.45}, "partial_rotary_factor=0.45"),
])
def test_unsupported_rotary_is_refused_by_name(rope, match):
    hf, _ = build_llava_phi("phi3", seed=9, rope_parameters=rope)
    with pytest.raises(ValueError, match=match):
        HookedVLM.from_hf(hf)


def test_phi_rope_scaling_is_refused_by_name():
    hf, _ = build_llava_phi("phi", seed=9, rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0,
                                                           "factor": 2.0, "partial_rotary_factor": 0.4})
    with pytest.raises(ValueError, match="rope_type='linear'"):
        HookedVLM.from_hf(hf)


# ------------------------------------------------------------------------------------------ builders and CLI
@pytest.mark.parametrize("lm,kw", [("phi", {"qk_layernorm": True}), ("phi3", {})])
def test_builder_randomises_every_lm_parameter(lm, kw):
    """HF's init leaves norm weights at 1 and biases at 0, which would hide a dropped bias or a swapped norm."""
    hf, _ = build_llava_phi(lm, seed=0, **kw)
    base, _ = build_llava_phi(lm, seed=0, randomize=False, **kw)
    params = dict(hf_text_model(hf).named_parameters())
    assert any(name.endswith("layernorm.bias") or name.endswith("norm.weight") for name in params)
    for name, p in params.items():
        assert not torch.equal(p, dict(hf_text_model(base).named_parameters())[name]), name
        assert not torch.all(p == 1) and not torch.all(p == 0), name


def test_cli_commands_run_on_a_saved_llava_phi2(capsys, tmp_path):
    from hooked_vlm import cli

    hf, processor = build_llava_phi("phi", seed=1)
    hf.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    n_layers = hf.config.text_config.num_hidden_layers
    for argv, out_file in ((["patch"], "patch.json"), (["patch", "--resid"], "patch.json"), (["trace"], "trace.json")):
        out = tmp_path / "-".join(argv)
        assert cli.main([*argv, "--model", model, "--out", str(out), "--batch-size", "8"]) == 0, capsys.readouterr()
        result = json.loads((out / out_file).read_text())
        assert result["tower"] == "lm" and len(result["scores"]) == n_layers
    assert cli.main(["lens", "--model", model, "--k", "2"]) == 0
    assert f"layer {n_layers - 1:3d}:" in capsys.readouterr().out
    assert cli.main(["trace", "--model", model, "--kind", "resid_mid", "--out", str(tmp_path / "mid")]) == 2
    assert "hook_resid_mid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real widths, on meta
# the text configs of the checkpoints: Phi-2 (microsoft/phi-2) and Phi-3-mini-4k (xtuner/llava-phi-3-mini-hf's LM),
# cut to 2 layers; the meta device holds shapes only
REAL_TEXT = {
    "phi": dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
                layer_norm_eps=1e-5, hidden_act="gelu_new",
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.4}),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 rms_norm_eps=1e-5, sliding_window=2047, pad_token_id=32000,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0}),
}


@pytest.mark.parametrize("lm", ["phi", "phi3"])
def test_real_widths_convert_on_meta(lm):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Phi3Config, PhiConfig

    from hooked_vlm.loading import hooked_class, load_converted
    from weights_conversion import converter_for

    text = (PhiConfig if lm == "phi" else Phi3Config)(num_hidden_layers=2, **REAL_TEXT[lm])
    small, _ = build_llava_phi(lm, seed=0, randomize=False)  # the tiny CLIP tower and projector
    cfg = LlavaConfig(vision_config=small.config.vision_config.to_dict(), text_config=text.to_dict(),
                      image_token_index=small.config.image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(cfg)
    converter = converter_for(hf)
    hooked_cfg = converter.config(hf.config)
    with torch.device("meta"):
        model = hooked_class(converter)(hooked_cfg)
    state = hf.state_dict()
    load_converted(model, converter.plan(state, hooked_cfg).apply(state), f"real-shaped LLaVA-{lm}")
    lm_cfg = model.cfg_of("lm")
    assert (lm_cfg.d_model, lm_cfg.n_heads, lm_cfg.d_head) == (text.hidden_size, 32, text.hidden_size // 32)
    assert lm_cfg.rotary_dim == (32 if lm == "phi" else 96)  # Phi-2: int(80 * 0.4)
    assert model.lm.cfg.sliding_window == (None if lm == "phi" else 2047)
    assert model.lm.blocks[0].mlp.W_in.shape == (text.hidden_size, text.intermediate_size)
