"""ActivationCache: indexing, residual-stream views, head results, moving and sizing."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_blip, random_image


@pytest.fixture(scope="module")
def run():
    hf, processor = build_blip("vqa", seed=2)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=3), random_image(seed=4)], text=["what color is it", "how many cats"],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    return model, inputs, logits, cache


def test_run_with_cache_returns_the_forward_output(run):
    model, inputs, logits, _ = run
    with torch.no_grad():
        torch.testing.assert_close(logits, model(**inputs), atol=1e-5, rtol=0)


def test_shorthand_indexing(run):
    _, _, _, cache = run
    assert cache["text_encoder", 1, "pattern"] is cache["text_encoder.blocks.1.attn.hook_pattern"]
    assert cache["text_encoder", -1, "resid_post"] is cache["text_encoder.blocks.1.hook_resid_post"]
    assert cache["text_decoder", 0, "cross_attn.z"] is cache["text_decoder.blocks.0.cross_attn.hook_z"]
    assert cache["vision", 0, "ln1.scale"] is cache["vision.blocks.0.ln1.hook_scale"]
    assert cache["vision", 0, "mlp_out"] is cache["vision.blocks.0.hook_mlp_out"]
    assert cache["vision", 0, "pre"] is cache["vision.blocks.0.mlp.hook_pre"]
    assert cache["vision", "embed"] is cache["vision.hook_embed"]
    assert ("lm", 0, "resid_pre") not in cache
    with pytest.raises(KeyError, match="closest cached names"):
        cache["text_encoder.blocks.1.attn.hook_patern"]


def test_positions_travel_with_the_cache(run):
    _, inputs, _, cache = run
    assert torch.equal(cache.positions.attention_mask, inputs["attention_mask"])
    assert cache.positions.last.tolist() == (inputs["attention_mask"].sum(1) - 1).tolist()


def test_accumulated_resid(run):
    model, _, _, cache = run
    stack, labels = cache.accumulated_resid("text_encoder", return_labels=True)
    n = model.tower_info("text_encoder").n_layers
    assert stack.shape[0] == n + 1 and labels[-1] == "final_post"
    assert torch.equal(stack[0], cache["text_encoder", 0, "resid_pre"])
    assert torch.equal(stack[-1], cache["text_encoder", n - 1, "resid_post"])
    mid, mid_labels = cache.accumulated_resid("text_encoder", 1, incl_mid=True, return_labels=True)
    assert mid_labels == ["0_pre", "0_mid", "0_mid_cross"]


def test_decompose_resid_sums_to_the_stream(run):
    model, _, _, cache = run
    parts, labels = cache.decompose_resid("vision", return_labels=True)
    n = model.tower_info("vision").n_layers
    assert len(labels) == 1 + 2 * n
    torch.testing.assert_close(parts.sum(0), cache["vision", n - 1, "resid_post"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="post-LN"):
        cache.decompose_resid("text_encoder")


@pytest.mark.parametrize("attention", ["attn", "cross_attn"])
def test_stack_head_results(run, attention):
    """Both sources of the stack: `hook_result` (cached by `run`) and the `z @ W_O` fallback (a cache without
    hook_result), each against routes that use neither: the sum over a layer's heads (+ b_O) against the attention
    output of a run where hook_result is not hooked (the fused o-projection), and each head against its own slice of
    the o-projection weight applied to its z."""
    model, inputs, _, cache = run
    stack, labels = cache.stack_head_results("text_encoder", attention=attention, return_labels=True)
    info = model.tower_info("text_encoder")
    assert stack.shape[0] == info.n_layers * info.n_heads and labels[1] == "L0H1"
    out_name = "attn_out" if attention == "attn" else "cross_attn_out"
    with torch.no_grad():
        _, plain = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("text_encoder.")
                                        and not n.endswith("hook_result"))
    assert not any(n.endswith("hook_result") for n in plain)
    fallback = plain.stack_head_results("text_encoder", attention=attention)
    H = info.n_heads
    atol = 2e-6  # float32 summation order (einsum per head vs one linear): measured up to 6e-7 on tiny BLIP
    for layer in range(info.n_layers):
        attn = getattr(model.text_encoder.blocks[layer], attention)
        z = plain["text_encoder", layer, f"{attention}.z"]
        d = z.shape[-1]
        for source in (stack, fallback):
            heads = source[layer * H: (layer + 1) * H]
            torch.testing.assert_close(heads.sum(0) + attn.b_O, plain["text_encoder", layer, out_name],
                                       atol=atol, rtol=0)
            for h in range(H):
                own = torch.nn.functional.linear(z[..., h, :], attn.o_weight[:, h * d: (h + 1) * d])
                torch.testing.assert_close(heads[h], own, atol=atol, rtol=0)


def test_to_remove_batch_dim_and_size(run):
    model, inputs, _, cache = run
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.values()) > 0
    assert all(t.device.type == "meta" for t in cache.to("meta").values())
    with pytest.raises(ValueError, match="batch of one"):
        cache.remove_batch_dim()
    single = {k: v[:1] for k, v in inputs.items()}
    _, one = model.run_with_cache(**single, names_filter="text_encoder.blocks.0.hook_resid_post",
                                  remove_batch_dim=True)
    assert one["text_encoder.blocks.0.hook_resid_post"].shape == (single["input_ids"].shape[1], 64)


def test_cache_streams_to_the_requested_device(run):
    model, inputs, _, _ = run
    seen = []

    def watch(t, hook):
        seen.append(t.device.type)

    # the meta device stands in for "cpu" on a GPU machine: each activation is moved as soon as it is made
    with torch.no_grad(), model.hooks([("text_encoder.blocks.1.hook_resid_post", watch)]):
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: "resid" in n, device="meta")
    assert seen == ["cpu"] and all(t.device.type == "meta" for t in cache.values())


def test_names_filter_forms(run):
    model, inputs, _, _ = run
    with torch.no_grad():
        _, one = model.run_with_cache(**inputs, names_filter="vision.hook_embed")
        _, two = model.run_with_cache(**inputs, names_filter=["vision.hook_embed", "text_encoder.hook_embed"])
        _, pred = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert list(one) == ["vision.hook_embed"] and len(two) == 2
    assert len(pred) == sum(model.tower_info(t).n_layers for t in model.tower_names)
