"""Direct logit attribution on each language model (LLaVA's and InstructBLIP-Vicuna's `lm`, Flan-T5's
`lm_decoder`): components sum to the model's logit difference; a head's attribution is the logit change of removing
its output from the final stream with the final norm's scale frozen, computed here by hand from raw hook tensors;
per-source attributions sum to the head's."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.attribution import direct_logit_attribution
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]


def _llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=["USER: <image>\nwhat is in the picture? ASSISTANT:",
                                            "USER: <image>\nhi ASSISTANT:"], padding=True, return_tensors="pt")
    return model, inputs


def _instructblip(lm: str):
    hf, processor = build_instructblip(lm, seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=["what is in the picture?", "describe this image"], padding=True,
                       return_tensors="pt")
    if lm == "t5":  # right-padded decoder prompts of two lengths: two answer positions
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 0]])
        inputs["decoder_attention_mask"] = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return model, inputs


BUILDERS = {"llava": _llava, "instructblip-llama": lambda: _instructblip("llama"),
            "instructblip-t5": lambda: _instructblip("t5")}


@pytest.fixture(scope="module", params=list(BUILDERS))
def lm_run(request):
    model, inputs = BUILDERS[request.param]()
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    return model, inputs, logits, cache


def _logit_diff(logits, positions, right, wrong):
    rows = torch.arange(logits.shape[0])
    return logits[rows, positions, right] - logits[rows, positions, wrong]


@pytest.mark.parametrize("by", ["component", "head"])
def test_components_sum_to_the_logit_difference(lm_run, by):
    model, inputs, logits, cache = lm_run
    right, wrong = torch.tensor([5, 11]), torch.tensor([9, 3])
    dla = direct_logit_attribution(model, cache, right, wrong, by=by)
    tower = model.output_tower
    n, H = model.tower_info(tower).n_layers, model.tower_info(tower).n_heads
    cross = any(model.tower_info(tower).has_cross_attn)
    if by == "component":
        assert dla.labels[0] == "embed" and dla.labels[-1] == f"{n - 1}_mlp_out"
        assert len(dla.labels) == 1 + n * (3 if cross else 2)
    else:
        assert dla.labels[:2] == ["L0H0", "L0H1"] and dla.labels[-2:] == ["embed", "bias"]
        assert ("L0H0_cross" in dla.labels) == cross and len(dla.labels) == n * H * (2 if cross else 1) + n + 2
    want = _logit_diff(logits, dla.positions, right, wrong)  # the model's own forward
    torch.testing.assert_close(dla.total, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(dla.values.sum(0), want, atol=1e-4, rtol=0)


def test_head_attribution_is_a_linearised_ablation(lm_run):
    """By hand: the final stream x at the answer position, the final norm's cached scale s, the norm's weight w and
    the unembedding; a head's output o = z_h @ W_O[h]; DLA(head) = f(x) - f(x - o), f(x) = (x / s * w) @ (u_a - u_b)."""
    model, inputs, logits, cache = lm_run
    tower_name = model.output_tower
    tower = model.tower(tower_name)
    n = model.tower_info(tower_name).n_layers
    dla = direct_logit_attribution(model, cache, 5, 9, by="head")
    rows, pos = torch.arange(2), dla.positions
    x = cache[f"{tower_name}.blocks.{n - 1}.hook_resid_post"][rows, pos]
    s = cache[f"{tower_name}.ln_final.hook_scale"][rows, pos]
    u = tower.unembed.weight[5] - tower.unembed.weight[9]
    if getattr(tower.cfg, "scale_outputs", False):
        u = u * tower.cfg.d_model**-0.5

    def f(stream):
        return (stream / s * tower.ln_final.w) @ u

    torch.testing.assert_close(f(x), _logit_diff(logits, pos, 5, 9), atol=1e-5, rtol=0)
    for layer, head, attention in [(0, 1, "attn"), (n - 1, 3, "attn"), (n - 1, 2, "cross_attn")]:
        name = f"{tower_name}.blocks.{layer}.{attention}.hook_z"
        if name not in cache:
            continue
        W_O = getattr(tower.blocks[layer], attention).o_weight  # [D, H * d]
        d = W_O.shape[1] // model.tower_info(tower_name).n_heads
        o = cache[name][rows, pos, head] @ W_O[:, head * d:(head + 1) * d].T
        label = f"L{layer}H{head}" + ("_cross" if attention == "cross_attn" else "")
        torch.testing.assert_close(dla[label], f(x) - f(x - o), atol=1e-5, rtol=0)
        sources = direct_logit_attribution(model, cache, 5, 9, by="source", layer=layer, head=head,
                                           attention=attention)
        S = cache[name.replace("hook_z", "hook_pattern")].shape[-1]
        assert sources.labels == [f"src{i}" for i in range(S)]
        torch.testing.assert_close(sources.values.sum(0), dla[label], atol=1e-5, rtol=0)


def test_t5_output_scaling_is_part_of_the_directions():
    """With scale_outputs (T5 with tied embeddings) the decoder multiplies the normalised stream by d_model^-0.5
    before the unembedding; DLA must follow the tower's own head."""
    model, inputs = _instructblip("t5")
    model.lm_decoder.cfg.scale_outputs = True
    with torch.no_grad():
        logits = model(**inputs)
    dla = direct_logit_attribution(model, inputs, 5, 9)
    torch.testing.assert_close(dla.values.sum(0), _logit_diff(logits, dla.positions, 5, 9), atol=1e-4, rtol=0)


def test_image_sources_of_a_llava_head():
    model, inputs = _llava()
    dla = direct_logit_attribution(model, inputs, "a", by="source", layer=1, head=0)
    span = model.positions(**inputs).image[0][0]
    assert dla.values.shape == (inputs["input_ids"].shape[1], 2)
    assert dla.values[span.start:span.stop, 0].abs().sum() > 0  # the image tokens write into the answer


def test_post_ln_and_bad_arguments_raise():
    hf, processor = build_blip("vqa", seed=2)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES[:1], text=["what is it"], return_tensors="pt")
    with pytest.raises(ValueError, match="post-LN"):
        direct_logit_attribution(model, inputs, 5)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    stack = cache.decompose_resid(tower="vision")
    with pytest.raises(ValueError, match="no linear map"):
        cache.logit_attrs(stack, 5, tower="vision")
    llava, llava_inputs = _llava()
    with pytest.raises(ValueError, match="layer= and head="):
        direct_logit_attribution(llava, llava_inputs, 5, by="source")
    with pytest.raises(ValueError, match="not one"):
        direct_logit_attribution(llava, llava_inputs, "what is in the picture")
