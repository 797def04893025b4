"""Hook core: names, lifecycle, editing semantics, errors; on the tiny BLIP models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_blip, random_image

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def vqa():
    hf, processor = build_blip("vqa", seed=1)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=0), random_image(seed=1)], text=["what color is the car", "how many"],
                       padding=True, return_tensors="pt")
    # an answer of three tokens: with [DEC] alone the decoder's self-attention pattern would be 1 whatever q and k
    inputs["decoder_input_ids"] = torch.tensor([[model.cfg.bos_token_id, 7, 9]] * 2)
    return model, inputs


@pytest.mark.parametrize("kind", ["caption", "vqa", "itm"])
def test_hook_names_are_pinned(kind):
    """The ordered list of hook names is a public API: a change must be deliberate (update tests/golden)."""
    model = HookedVLM.from_hf(build_blip(kind)[0])
    expected = (GOLDEN / f"blip_{kind}_hook_names.txt").read_text().split()
    assert list(model.hook_dict) == expected


def test_hook_names_follow_execution_order(vqa):
    model, inputs = vqa
    fired = []
    with model.hooks([(lambda n: True, lambda t, hook: fired.append(hook.name))]):
        with torch.no_grad():
            model(**inputs)
    assert fired == list(model.hook_dict)  # every hook point fires, once, in registration order


def test_every_hook_point_can_edit(vqa):
    """Zero-ablating any single hook point changes the output (scales: doubling, since zero divides by zero)."""
    model, inputs = vqa
    with torch.no_grad():
        clean = model(**inputs)
        inert = []
        for name in model.hook_dict:
            edit = (lambda t, hook: t * 2) if name.endswith("hook_scale") else (lambda t, hook: torch.zeros_like(t))
            out = model.run_with_hooks(**inputs, fwd_hooks=[(name, edit)])
            if torch.allclose(out, clean):
                inert.append(name)
    assert not inert, f"editing these hook points does not change the output: {inert}"


def test_returned_tensor_replaces_activation(vqa):
    model, inputs = vqa
    name = "text_encoder.blocks.1.hook_resid_post"
    captured = {}
    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda t, hook: t + 1.0),
                                                  (name, lambda t, hook: captured.setdefault("x", t))])
        _, cache = model.run_with_cache(**inputs, names_filter=name)
    torch.testing.assert_close(captured["x"], cache[name] + 1.0)


def test_hooks_are_removed_after_run_and_on_exception(vqa):
    model, inputs = vqa
    name = "vision.blocks.0.attn.hook_pattern"
    model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda t, hook: None)])
    assert not any(p.has_hooks for p in model.hook_dict.values())

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(**inputs, fwd_hooks=[(name, boom)])
    assert not any(p.has_hooks for p in model.hook_dict.values())
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([(name, boom)]):
            model(**inputs)
    assert not any(p.has_hooks for p in model.hook_dict.values())


def test_nested_contexts_remove_only_their_own_hooks(vqa):
    model, _ = vqa
    a, b = "vision.hook_embed", "text_encoder.hook_embed"
    permanent = model.add_hook(a, lambda t, hook: None, is_permanent=True)
    try:
        with model.hooks([(a, lambda t, hook: None)]):
            with model.hooks([(a, lambda t, hook: None), (b, lambda t, hook: None)]):
                assert len(model.hook_dict[a].fwd_hooks) == 3
            assert len(model.hook_dict[a].fwd_hooks) == 2 and not model.hook_dict[b].has_hooks
        assert model.hook_dict[a].fwd_hooks == tuple(permanent)
        model.reset_hooks()
        assert model.hook_dict[a].fwd_hooks == tuple(permanent)  # reset keeps permanent hooks unless asked
    finally:
        model.reset_hooks(including_permanent=True)
    assert not model.hook_dict[a].has_hooks


def test_reset_hooks_end_false_keeps_hooks(vqa):
    model, inputs = vqa
    calls = []
    model.run_with_hooks(**inputs, fwd_hooks=[("vision.hook_embed", lambda t, hook: calls.append(1))],
                         reset_hooks_end=False)
    model(**inputs)
    assert len(calls) == 2
    model.reset_hooks()
    model(**inputs)
    assert len(calls) == 2


def test_backward_hooks_and_gradient_cache(vqa):
    model, inputs = vqa
    name = "text_encoder.blocks.0.hook_resid_post"
    grads = []
    logits = model.run_with_hooks(**inputs, bwd_hooks=[(name, lambda g, hook: grads.append(g.clone()))])
    assert not model.hook_dict[name].has_hooks  # bound to this forward's tensors, not left attached
    logits[:, -1, 5].sum().backward()
    assert len(grads) == 1 and grads[0].shape == (2, inputs["input_ids"].shape[1], 64) and grads[0].abs().sum() > 0

    cache, fwd, bwd = model.get_caching_hooks(name, incl_bwd=True)  # run_with_cache(incl_bwd) needs a scalar output
    with model.hooks(fwd, bwd):
        model(**inputs)[:, -1, 5].sum().backward()
    torch.testing.assert_close(cache[name + "_grad"], grads[0])
    model.zero_grad(set_to_none=True)


def test_backward_hook_can_replace_gradient(vqa):
    model, inputs = vqa
    pv = inputs["pixel_values"].clone().requires_grad_(True)
    kwargs = {**inputs, "pixel_values": pv}
    model.run_with_hooks(**kwargs, bwd_hooks=[("vision.hook_embed", lambda g, hook: torch.zeros_like(g))]
                         )[:, -1].sum().backward()
    assert pv.grad is not None and pv.grad.abs().sum() == 0  # the only path to the pixels is through the embeddings
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ errors
def test_unknown_hook_name_lists_closest(vqa):
    model, inputs = vqa
    with pytest.raises(KeyError, match=re.escape("text_encoder.blocks.0.attn.hook_pattern")):
        model.run_with_hooks(**inputs, fwd_hooks=[("text_encoder.blocks.0.attn.hook_patern", lambda t, hook: None)])


def test_names_filter_matching_nothing_is_an_error(vqa):
    model, inputs = vqa
    with pytest.raises(ValueError, match="matched no hook point"):
        model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_nothing"))
    with pytest.raises(KeyError, match="no hook point named"):
        model.run_with_cache(**inputs, names_filter=["vision.hook_embedd"])


def test_hook_returning_wrong_shape_or_dtype_names_both(vqa):
    model, inputs = vqa
    name = "text_encoder.blocks.0.hook_attn_out"
    with pytest.raises(ValueError, match=re.escape(name) + r".*shape \(2, \d+, 63\).*shape \(2, \d+, 64\)"):
        model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda t, hook: t[..., :63])])
    with pytest.raises(ValueError, match="float64"):
        model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda t, hook: t.double())])
    assert not model.hook_dict[name].has_hooks


@pytest.mark.no_typecheck  # the library's own messages, which the jaxtyping checks would pre-empt
def test_bad_inputs_have_clear_errors(vqa):
    model, inputs = vqa
    with pytest.raises(ValueError, match="pixel_values is missing"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="pixel_values is missing"):
        model.generate(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"expected \[batch, 3, 32, 32\]"):
        model(**{**inputs, "pixel_values": torch.zeros(2, 3, 48, 48)})
    with pytest.raises(ValueError, match="one image per text"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})
    with pytest.raises(ValueError, match="input_ids is missing"):
        model(pixel_values=inputs["pixel_values"])


# ------------------------------------------------------------------------------------------ paying for hooks
def test_explicit_attention_only_where_hooked(vqa, monkeypatch):
    """Unhooked attention takes scaled_dot_product_attention; a pattern hook switches only its own module."""
    model, inputs = vqa
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    n_attn = sum(1 for n in model.hook_dict if n.endswith("hook_pattern"))
    with torch.no_grad():
        model(**inputs)
        assert len(calls) == n_attn
        calls.clear()
        model.run_with_hooks(**inputs, fwd_hooks=[("text_encoder.blocks.1.attn.hook_pattern", lambda t, hook: None)])
        assert len(calls) == n_attn - 1


def test_result_hook_equals_attention_output(vqa):
    """hook_result against routes that do not use it: the sum over heads (+ b_O) against hook_cross_attn_out of a
    run where hook_result is not hooked (the fused o-projection, F.linear), and each head against the output of a
    run where every other head's z is zeroed (minus b_O)."""
    model, inputs = vqa
    attn = model.text_encoder.blocks[0].cross_attn
    out_name = "text_encoder.blocks.0.hook_cross_attn_out"
    z_name, result_name = "text_encoder.blocks.0.cross_attn.hook_z", "text_encoder.blocks.0.cross_attn.hook_result"
    with torch.no_grad():
        _, plain = model.run_with_cache(**inputs, names_filter=[out_name])
        _, hooked = model.run_with_cache(**inputs, names_filter=[out_name, result_name])
    assert not attn.hook_result.has_hooks
    result = hooked["text_encoder", 0, "cross_attn.result"]
    atol = 2e-6  # float32 summation order (einsum per head vs one linear): measured up to 6e-7 on tiny BLIP
    torch.testing.assert_close(result.sum(2) + attn.b_O, plain[out_name], atol=atol, rtol=0)
    for h in range(attn.n_heads):
        def keep_one(z, hook, h=h):
            kept = torch.zeros_like(z)
            kept[:, :, h] = z[:, :, h]
            return kept

        with torch.no_grad(), model.hooks([(z_name, keep_one)]):
            _, alone = model.run_with_cache(**inputs, names_filter=[out_name])
        torch.testing.assert_close(result[:, :, h], alone[out_name] - attn.b_O, atol=atol, rtol=0)


def test_per_head_weight_views_share_storage(vqa):
    model, _ = vqa
    attn = model.text_encoder.blocks[0].attn
    H, d = attn.n_heads, attn.d_head
    assert attn.W_Q.shape == (H, 64, d) and attn.W_O.shape == (H, d, 64) and attn.b_V.shape == (H, d)
    # W_Q[h] maps the stream to head h's query: compare with the fused projection
    x = torch.randn(3, 64)
    q = torch.nn.functional.linear(x, attn.qkv_weight, attn.qkv_bias)[:, : H * d].view(3, H, d)
    torch.testing.assert_close(torch.einsum("td,hde->the", x, attn.W_Q) + attn.b_Q, q, atol=1e-6, rtol=0)
    assert attn.W_O.data_ptr() == attn.o_weight.data_ptr()


# ------------------------------------------------------------------------------------------ never aliasing weights
def _family(kind):
    """A tiny model of each family with one batch of two examples (hook points on parameter views are expanded
    over the batch), for the aliasing checks."""
    from hooked_vlm.tiny import build_instructblip, build_llava

    images = [random_image(seed=0), random_image(seed=1)]
    if kind.startswith("blip"):
        hf, processor = build_blip(kind.split("-")[1], seed=2)
        texts = ["what color is the car", "how many"]
    elif kind == "llava":
        hf, processor = build_llava(seed=2)
        texts = ["USER: <image>\nwhat is it? ASSISTANT:"] * 2
    else:
        hf, processor = build_instructblip(kind.split("-")[1], seed=2)
        texts = ["what is in the picture?", "describe it"]
    model = HookedVLM.from_hf(hf, processor=processor)
    return model, dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


ALL_FAMILIES = ["blip-vqa", "blip-caption", "blip-itm", "llava", "instructblip-llama", "instructblip-t5"]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"weights changed: {changed}"


@pytest.mark.parametrize("kind", ALL_FAMILIES)
def test_cache_never_shares_memory_with_a_parameter(kind):
    """Every hook point, every family: no cached tensor is a view of a weight, and zeroing the whole cache in
    place leaves every weight as it was (vision.hook_pos_embed and qformer.hook_query_tokens were views)."""
    model, inputs = _family(kind)
    before = _weights(model)
    storages = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    assert len(cache.keys()) == len(model.hook_dict)
    shared = {name: storages[t.untyped_storage().data_ptr()] for name, t in cache.items()
              if t.untyped_storage().data_ptr() in storages}
    assert not shared, f"cached tensors share memory with parameters: {shared}"
    for name, t in cache.items():
        t.zero_()
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ALL_FAMILIES)
def test_in_place_hooks_never_change_a_weight(kind):
    """An in-place hook on every hook point at once, under no_grad (where autograd would not object): the weights
    stay as they were, and a second forward gives the clean output again."""
    model, inputs = _family(kind)
    before = _weights(model)
    with torch.no_grad():
        clean = model(**inputs)

        def in_place(t, hook):
            t.mul_(0.5).add_(1.0)

        model.run_with_hooks(**inputs, fwd_hooks=[(lambda n: True, in_place)])
        _assert_unchanged(model, before)
        torch.testing.assert_close(model(**inputs), clean)


def test_unhooked_parameter_view_is_not_copied(vqa):
    """The copy is paid only when the point is hooked: unhooked, the position table flows through as the view."""
    model, inputs = vqa
    point = model.hook_dict["vision.hook_pos_embed"]
    W_pos = model.vision.W_pos
    view = W_pos.expand(2, -1, -1)
    assert point(view) is view
    with model.hooks([("vision.hook_pos_embed", lambda t, hook: None)]):
        copy = point(view)
    assert copy.untyped_storage().data_ptr() != W_pos.untyped_storage().data_ptr()
    torch.testing.assert_close(copy, view)


def test_add_hook_inside_a_block_ends_with_the_block(vqa):
    """TransformerLens semantics: a hook added with add_hook inside `hooks()` belongs to that block; outside every
    block it is global and stays until reset_hooks."""
    model, _ = vqa
    a = "vision.hook_embed"
    with model.hooks([(a, lambda t, hook: None)]):
        inner = model.add_hook(a, lambda t, hook: None)
        assert len(model.hook_dict[a].fwd_hooks) == 2
    assert not model.hook_dict[a].has_hooks
    try:
        outer = model.add_hook(a, lambda t, hook: None)
        with model.hooks():
            assert model.hook_dict[a].fwd_hooks == tuple(outer)
        assert model.hook_dict[a].fwd_hooks == tuple(outer)
        inner[0].remove()  # a handle whose block has ended: nothing to do, no error
    finally:
        model.reset_hooks()
    assert not model.hook_dict[a].has_hooks
