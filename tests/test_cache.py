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
    stack, labels = cache.accumulated_resid(tower="text_encoder", return_labels=True)
    n = model.tower_info("text_encoder").n_layers
    assert stack.shape[0] == n + 1 and labels[-1] == "final_post"
    assert torch.equal(stack[0], cache["text_encoder", 0, "resid_pre"])
    assert torch.equal(stack[-1], cache["text_encoder", n - 1, "resid_post"])
    mid, mid_labels = cache.accumulated_resid(1, incl_mid=True, return_labels=True, tower="text_encoder")
    assert mid_labels == ["0_pre", "0_mid", "0_mid_cross", "1_pre"]  # TL: layer 1's input is included


def test_decompose_resid_sums_to_the_stream(run):
    model, _, _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True, tower="vision")
    n = model.tower_info("vision").n_layers
    assert labels == ["embed", "pos_embed"] + [f"{i}_{s}_out" for i in range(n) for s in ("attn", "mlp")]
    torch.testing.assert_close(parts.sum(0), cache["vision", n - 1, "resid_post"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="post-LN"):
        cache.decompose_resid(tower="text_encoder")


@pytest.mark.parametrize("attention", ["attn", "cross_attn"])
def test_stack_head_results(run, attention):
    """Both sources of the stack: `hook_result` (cached by `run`) and the `z @ W_O` fallback (a cache without
    hook_result), each against routes that use neither: the sum over a layer's heads (+ b_O) against the attention
    output of a run where hook_result is not hooked (the fused o-projection), and each head against its own slice of
    the o-projection weight applied to its z."""
    model, inputs, _, cache = run
    stack, labels = cache.stack_head_results(tower="text_encoder", attention=attention, return_labels=True)
    info = model.tower_info("text_encoder")
    assert stack.shape[0] == info.n_layers * info.n_heads
    assert labels[1] == ("L0H1" if attention == "attn" else "L0H1_cross")
    out_name = "attn_out" if attention == "attn" else "cross_attn_out"
    with torch.no_grad():
        _, plain = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("text_encoder.")
                                        and not n.endswith("hook_result"))
    assert not any(n.endswith("hook_result") for n in plain)
    fallback = plain.stack_head_results(tower="text_encoder", attention=attention)
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


# ------------------------------------------------------------------------------------------ TransformerLens semantics
def test_transformerlens_keys_resolve_in_the_default_tower(run):
    model, _, _, cache = run
    assert cache.default_tower == model.output_tower == "text_decoder"
    n = model.tower_info("text_decoder").n_layers
    assert cache["pattern", 1] is cache["text_decoder.blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["text_decoder", n - 1, "resid_post"]
    assert cache["z", 0, "attn"] is cache["text_decoder.blocks.0.attn.hook_z"]
    assert cache["z", 0, "cross_attn"] is cache["text_decoder.blocks.0.cross_attn.hook_z"]
    assert cache["k1"] is cache["text_decoder.blocks.1.attn.hook_k"]
    assert cache["blocks.0.hook_resid_pre"] is cache["text_decoder.blocks.0.hook_resid_pre"]
    assert cache["hook_embed"] is cache["embed"] is cache["text_decoder.hook_embed"]
    assert cache["text_encoder", 1, "pattern"] is cache["text_encoder.blocks.1.attn.hook_pattern"]  # tower first
    with pytest.raises(KeyError, match="ambiguous.*ln_attn.*ln_cross.*ln_mlp"):
        cache["scale", 0]
    assert cache["scale", 0, "ln_mlp"] is cache["text_decoder.blocks.0.ln_mlp.hook_scale"]
    other = cache.to("cpu")
    other.default_tower = "vision"
    assert other["pattern", 0] is other["vision.blocks.0.attn.hook_pattern"]
    assert cache["pattern", 0] is cache["text_decoder.blocks.0.attn.hook_pattern"]  # per cache


@pytest.fixture(scope="module")
def llava_run():
    from hooked_vlm.tiny import build_llava

    hf, processor = build_llava(seed=4, lm_layers=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=0), random_image(seed=1)],
                       text=["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = hf(**inputs, position_ids=positions, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(**inputs)
    return model, inputs, cache, hidden


def test_accumulated_resid_layer_semantics_against_hf(llava_run):
    """TL: layer L gives the streams entering blocks 0..L; None / -1 / n_layers all of them plus `final_post`.
    HF's hidden_states[i] is the stream entering layer i (its last is after the final norm)."""
    model, inputs, cache, hidden = llava_run
    n = model.tower_info("lm").n_layers
    assert n == 3
    full, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    assert torch.equal(cache.accumulated_resid(-1), full) and torch.equal(cache.accumulated_resid(n), full)
    assert cache.accumulated_resid(0, return_labels=True)[1] == ["0_pre"]
    assert cache.accumulated_resid(1, return_labels=True)[1] == ["0_pre", "1_pre"]
    assert cache.accumulated_resid(1, incl_mid=True, return_labels=True)[1] == ["0_pre", "0_mid", "1_pre"]
    assert cache.accumulated_resid(1, mlp_input=True, return_labels=True)[1] == ["0_pre", "1_pre", "1_mid"]
    real = inputs["attention_mask"].bool()
    for i in range(n):
        torch.testing.assert_close(full[i][real], hidden[i][real], atol=1e-5, rtol=0)
    # apply_ln: divided by the final norm's scale of this run (RMS: no centring); times its weight, HF's last state
    final = cache["lm", n - 1, "resid_post"]
    scale = (final.pow(2).mean(-1, keepdim=True) + model.lm.ln_final.eps).sqrt()
    normed = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(normed, full / scale, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((normed[-1] * model.lm.ln_final.w)[real], hidden[-1][real], atol=1e-5, rtol=0)
    # a layer's apply_ln uses that layer's ln1 (ln2 with mlp_input) scale, frozen, for every state
    at1 = cache.accumulated_resid(1, apply_ln=True, mlp_input=True)
    mid = cache["lm", 1, "resid_mid"]
    torch.testing.assert_close(at1, torch.stack([hidden[0], cache["lm", 1, "resid_pre"], mid]) /
                               (mid.pow(2).mean(-1, keepdim=True) + model.lm.blocks[1].ln2.eps).sqrt(),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer=4 is out of range"):
        cache.accumulated_resid(4)


@pytest.mark.parametrize("pos_slice,index", [(-1, -1), ([0, 3], [0, 3]), ((2, 6), slice(2, 6)),
                                             (slice(None, None, 2), slice(None, None, 2)),
                                             (torch.tensor([5, 1]), [5, 1])])
def test_pos_slice_is_transformerlens_slice(llava_run, pos_slice, index):
    _, _, cache, _ = llava_run
    full = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(cache.accumulated_resid(apply_ln=True, pos_slice=pos_slice), full[:, :, index])
    parts = cache.decompose_resid(apply_ln=True)
    torch.testing.assert_close(cache.decompose_resid(apply_ln=True, pos_slice=pos_slice), parts[:, :, index])
    heads = cache.stack_head_results(apply_ln=True, incl_remainder=True)
    torch.testing.assert_close(cache.stack_head_results(apply_ln=True, incl_remainder=True, pos_slice=pos_slice),
                               heads[:, :, index], atol=1e-6, rtol=1e-5)


def test_decompositions_sum_to_the_stream(llava_run):
    """decompose_resid, stack_head_results(incl_remainder), get_full_resid_decomposition and stack_neuron_results
    against the raw hooks, for every TL layer (0..n, -1, None), with and without mlp_input."""
    model, _, cache, _ = llava_run
    n = model.tower_info("lm").n_layers
    for layer in range(n + 1):
        target = cache["lm", layer, "resid_pre"] if layer < n else cache["lm", n - 1, "resid_post"]
        parts, labels = cache.decompose_resid(layer, return_labels=True)
        assert labels == ["embed"] + [f"{i}_{s}_out" for i in range(layer) for s in ("attn", "mlp")]
        torch.testing.assert_close(parts.sum(0), target, atol=1e-5, rtol=0)
        heads, head_labels = cache.stack_head_results(layer, return_labels=True, incl_remainder=True)
        assert len(head_labels) == layer * 4 + 1 and head_labels[-1] == "remainder"
        torch.testing.assert_close(heads.sum(0), target, atol=1e-5, rtol=0)
        for expand in (True, False):
            full, full_labels = cache.get_full_resid_decomposition(layer, expand_neurons=expand, return_labels=True)
            assert full_labels[-2:] == ["embed", "bias"] and len(full_labels) == full.shape[0]
            torch.testing.assert_close(full.sum(0), target, atol=1e-5, rtol=0)
        if layer < n:
            mid = cache.decompose_resid(layer, mlp_input=True, return_labels=True)
            assert mid[1][-1] == f"{layer}_attn_out"
            torch.testing.assert_close(mid[0].sum(0), cache["lm", layer, "resid_mid"], atol=1e-5, rtol=0)
            full = cache.get_full_resid_decomposition(layer, mlp_input=True)
            torch.testing.assert_close(full.sum(0), cache["lm", layer, "resid_mid"], atol=1e-5, rtol=0)
    assert torch.equal(cache.decompose_resid(-1), cache.decompose_resid())
    attn_only = cache.decompose_resid(mode="attn", return_labels=True)[1]
    assert attn_only == ["embed"] + [f"{i}_attn_out" for i in range(n)]
    neurons, neuron_labels = cache.stack_neuron_results(2, return_labels=True)
    d_mlp = model.lm.blocks[0].mlp.d_mlp
    assert neurons.shape[0] == 2 * d_mlp and neuron_labels[d_mlp] == "L1N0"
    torch.testing.assert_close(neurons[d_mlp:].sum(0), cache["lm", 1, "mlp_out"], atol=1e-5, rtol=0)
    assert torch.equal(cache.stack_activation("pattern"), torch.stack([cache["pattern", i] for i in range(n)]))
    assert cache.stack_activation("resid_pre", 2).shape[0] == 2


def test_apply_ln_to_stack_is_the_frozen_layernorm(run):
    """A LayerNorm tower (BLIP's ViT): centred and divided by the cached scale, so that weight and bias on top give
    the norm's own output; the pos_slice / batch_slice pick the matching scale."""
    model, _, _, cache = run
    ln = model.vision.blocks[1].ln1
    stream = cache["vision", 1, "resid_pre"]
    out = cache.apply_ln_to_stack(stream[None], 1, tower="vision")[0]
    torch.testing.assert_close(out * ln.w + ln.b, cache["vision", 1, "ln1.normalized"], atol=1e-5, rtol=0)
    # TL: the stack comes position-sliced already; batch_slice slices both the stack and the scale
    some = cache.apply_ln_to_stack(stream[None, :, 3], 1, pos_slice=3, batch_slice=[1], tower="vision")
    torch.testing.assert_close(some, out[None, [1], 3])
    final = cache.accumulated_resid(apply_ln=True, tower="vision")[-1]
    torch.testing.assert_close(final * model.vision.ln_post.w + model.vision.ln_post.b,
                               cache["vision.ln_post.hook_normalized"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="post-LN"):
        cache.apply_ln_to_stack(stream[None], tower="text_encoder")
    with pytest.raises(ValueError, match="post-LN"):
        cache.get_full_resid_decomposition(tower="text_decoder")


def test_full_decomposition_with_biases_and_position_embeddings(run):
    """BLIP's ViT has attention and MLP biases and separate position embeddings: every row is needed for the sum."""
    model, _, _, cache = run
    n = model.tower_info("vision").n_layers
    for layer, mlp_input in [(None, False), (1, True), (0, False)]:
        full, labels = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, return_labels=True,
                                                          tower="vision")
        assert labels[-3:] == ["embed", "pos_embed", "bias"]
        target = {None: cache["vision", n - 1, "resid_post"], 1: cache["vision", 1, "resid_mid"],
                  0: cache["vision", 0, "resid_pre"]}[layer]
        torch.testing.assert_close(full.sum(0), target, atol=1e-5, rtol=0)


def test_compute_head_results_fills_the_cache(llava_run):
    model, inputs, cache, _ = llava_run
    with torch.no_grad():
        _, plain = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("lm.") and "result" not in n)
    plain.compute_head_results()
    for layer in range(model.tower_info("lm").n_layers):
        torch.testing.assert_close(plain["result", layer], cache["lm", layer, "attn.result"], atol=1e-6, rtol=0)
