"""TransformerLens's hook conveniences with TransformerLens's semantics (issue 13, item 3): `utils.get_act_name`,
`utils.Slice`, `add_perma_hook`, `remove_all_hook_fns`, `reset_hooks`'s arguments, `get_caching_hooks`,
`run_with_cache(pos_slice=, incl_bwd=, return_cache_object=)`, and the processor's output passed positionally.

TransformerLens is not installed: each expectation is TL's documented behaviour (its docstrings and code, 4.x),
written out by hand here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hooked_vlm import HookedRootModule, HookedVLM, HookPoint, names
from hooked_vlm.tiny import build_blip, build_llava, random_image
from hooked_vlm.utils import Slice, get_act_name

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.txt"))


@pytest.fixture(scope="module")
def vqa():
    hf, processor = build_blip("vqa", seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=1), random_image(seed=2)], text=["what color is it", "how many"],
                       padding=True, return_tensors="pt")
    inputs["decoder_input_ids"] = torch.tensor([[model.cfg.bos_token_id, 7, 9]] * 2)
    return model, inputs


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(seed=3), random_image(seed=4)],
                       text=["USER: <image>\nwhat is it? ASSISTANT:", "USER: <image>\ncolour? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    return model, inputs


# ------------------------------------------------------------------------------------------ get_act_name
@pytest.mark.parametrize("args, tl_name", [
    # the examples of TransformerLens's docstring, and its aliases
    (("k", 6, "a"), "blocks.6.attn.hook_k"),
    (("pre", 2), "blocks.2.mlp.hook_pre"),
    (("embed",), "hook_embed"),
    (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
    (("k6",), "blocks.6.attn.hook_k"),
    (("scale4ln1",), "blocks.4.ln1.hook_scale"),
    (("pre5",), "blocks.5.mlp.hook_pre"),
    (("attn", 1), "blocks.1.attn.hook_pattern"),
    (("attn_logits", 1), "blocks.1.attn.hook_attn_scores"),
    (("key", 0), "blocks.0.attn.hook_k"), (("query", 0), "blocks.0.attn.hook_q"), (("value", 0), "blocks.0.attn.hook_v"),
    (("mlp_pre", 3), "blocks.3.mlp.hook_pre"), (("mlp_post", 3), "blocks.3.mlp.hook_post"),
    (("post", 3, "m"), "blocks.3.mlp.hook_post"), (("pre_linear", 3), "blocks.3.mlp.hook_pre_linear"),
    (("z", 2, "attention"), "blocks.2.attn.hook_z"), (("result", 2), "blocks.2.attn.hook_result"),
    (("rot_q", 2), "blocks.2.attn.hook_rot_q"), (("rot_k", 2), "blocks.2.attn.hook_rot_k"),
    (("resid_pre", 4), "blocks.4.hook_resid_pre"), (("resid_mid", 4, "b"), "blocks.4.hook_resid_mid"),
    (("resid_post", 4, "block"), "blocks.4.hook_resid_post"), (("attn_out", 1), "blocks.1.hook_attn_out"),
    (("mlp_out", 1), "blocks.1.hook_mlp_out"), (("pos_embed",), "hook_pos_embed"),
    (("scale",), "ln_final.hook_scale"), (("normalized",), "ln_final.hook_normalized"),
    (("resid_post", "3"), "blocks.3.hook_resid_post"),  # TL takes the layer as a string too
    (("pattern0",), "blocks.0.attn.hook_pattern"),
])
def test_get_act_name_is_transformerlens_behind_a_tower(args, tl_name):
    assert get_act_name(*args, tower="lm") == f"lm.{tl_name}"


@pytest.mark.parametrize("args, kwargs, name", [
    (("pattern", 2, "cross_attn"), {"tower": "text_decoder"}, "text_decoder.blocks.2.cross_attn.hook_pattern"),
    (("z1cross_attn",), {"tower": "qformer"}, "qformer.blocks.1.cross_attn.hook_z"),
    (("post", 0, "mlp_text"), {"tower": "qformer"}, "qformer.blocks.0.mlp_text.hook_post"),
    (("scale", 0, "ln_cross"), {"tower": "text_encoder"}, "text_encoder.blocks.0.ln_cross.hook_scale"),
    (("normalized", None, "ln_post"), {"tower": "vision"}, "vision.ln_post.hook_normalized"),
    (("resid_mid_cross", 1), {"tower": "lm_decoder"}, "lm_decoder.blocks.1.hook_resid_mid_cross"),
    (("cross_attn_out", 1), {"tower": "lm_decoder"}, "lm_decoder.blocks.1.hook_cross_attn_out"),
    (("inputs_embeds",), {"tower": "lm"}, "lm.hook_inputs_embeds"),
    # the per-head q/k norms: TL's layer_type "attn.q_norm" (its string: blocks.{L}.{layer_type}.hook_{name}), or short
    (("scale", 0, "attn.q_norm"), {"tower": "lm"}, "lm.blocks.0.attn.q_norm.hook_scale"),
    (("normalized", 1, "k_norm"), {"tower": "lm"}, "lm.blocks.1.attn.k_norm.hook_normalized"),
    (("scale2q_norm",), {"tower": "lm"}, "lm.blocks.2.attn.q_norm.hook_scale"),
    # full names: TransformerLens's get the tower; hooked_vlm's come back as they are
    (("blocks.3.attn.hook_pattern",), {"tower": "lm"}, "lm.blocks.3.attn.hook_pattern"),
    (("hook_embed",), {"tower": "vision"}, "vision.hook_embed"),
    (("ln_final.hook_scale",), {"tower": "lm"}, "lm.ln_final.hook_scale"),
    (("lm.blocks.3.attn.hook_z",), {}, "lm.blocks.3.attn.hook_z"),
    (("lm.blocks.3.attn.hook_z",), {"tower": "lm"}, "lm.blocks.3.attn.hook_z"),
    (("projector.hook_out",), {}, "projector.hook_out"),
])
def test_get_act_name_hooked_vlm_extensions(args, kwargs, name):
    assert get_act_name(*args, **kwargs) == name


# every call get_act_name takes, without the tower (layer 0 where the name is in the blocks)
# (rotary embeddings are in self-attention only; gated MLPs are not in the Q-Former)
CALLS = [*[(n, 0, m) for n in ("q", "k", "v", "attn_scores", "pattern", "z", "result") for m in ("attn", "cross_attn")],
         ("rot_q", 0, "attn"), ("rot_k", 0, "attn"), ("pre_linear", 0, "mlp"),
         *[(n, 0, m) for n in ("pre", "post") for m in ("mlp", "mlp_text")],
         *[(n, 0, m) for n in ("scale", "normalized") for m in ("ln1", "ln2", "ln_cross", "ln_attn", "ln_mlp",
                                                                "ln_mlp_text", "attn.q_norm", "attn.k_norm")],
         *[(n, None, m) for n in ("scale", "normalized") for m in ("ln_final", "ln_pre", "ln_post", "ln_embed")],
         *[(n, 0, None) for n in ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post", "attn_out",
                                  "cross_attn_out", "mlp_out")],
         *[(n, None, None) for n in ("embed", "pos_embed", "inputs_embeds", "query_tokens")]]
# hooks outside TransformerLens's vocabulary: reached by their full names
NOT_TL = {"projector.hook_in", "projector.hook_mid", "projector.hook_out", "projector.ln.hook_scale",
          "projector.ln.hook_normalized", "qformer.hook_out",
          "text_decoder.head.hook_post", "text_decoder.head.ln.hook_scale", "text_decoder.head.ln.hook_normalized"}


def test_get_act_name_reaches_every_hook_and_only_real_ones():
    """On the golden lists of every family: each hook of block 0 and each tower-level hook (but the projectors'
    and heads') is some get_act_name call, and each call names a hook of some tower of some model."""
    used = set()
    for path in GOLDEN:
        listed = set(path.read_text().split())
        towers = {names.parse(n).tower for n in listed}
        made = {get_act_name(*call, tower=t): call for t in towers for call in CALLS}
        wanted = {n for n in listed if names.parse(n).layer in (None, 0)} - NOT_TL
        assert wanted <= made.keys(), f"{path.stem}: no get_act_name call names {sorted(wanted - made.keys())}"
        used |= {call for name, call in made.items() if name in listed}
    assert used == set(CALLS), f"these calls name no hook of any model: {sorted(set(CALLS) - used, key=str)}"


@pytest.mark.parametrize("args, kwargs, error, words", [
    (("pattern", 3), {}, TypeError, "needs tower="),
    (("blocks.3.attn.hook_pattern",), {}, TypeError, "pass tower="),
    (("mid", 0), {"tower": "lm"}, ValueError, "mlp.hook_pre_linear"),
    (("mlp_mid", 0), {"tower": "lm"}, ValueError, "mlp.hook_pre_linear"),
    (("mlp_in", 0), {"tower": "lm"}, ValueError, "ln2.hook_normalized"),
    (("attn_in", 0), {"tower": "lm"}, ValueError, "ln1.hook_normalized"),
    (("k_input", 0), {"tower": "lm"}, ValueError, "ln1.hook_normalized"),
    (("blocks.0.hook_mlp_in",), {"tower": "lm"}, ValueError, "ln2.hook_normalized"),
    (("tokens",), {"tower": "lm"}, ValueError, "hook_embed"),
    (("patern", 0), {"tower": "lm"}, ValueError, "did you mean 'pattern'"),
    (("pattern",), {"tower": "lm"}, ValueError, "needs a layer"),
    (("embed", 2), {"tower": "lm"}, ValueError, "tower-level"),
    (("pattern", -1), {"tower": "lm"}, ValueError, "negative"),
    (("k6", 2), {"tower": "lm"}, ValueError, "already holds a layer"),
    (("pattern", 0, "mlp"), {"tower": "lm"}, ValueError, "attn, cross_attn"),
    (("scale", 0), {"tower": "lm"}, ValueError, "ln1"),
    (("scale", 0, "v_norm"), {"tower": "lm"}, ValueError, "attn.q_norm, attn.k_norm"),
    (("scale", None, "q_norm"), {"tower": "lm"}, ValueError, "ln_final"),  # in the blocks only
    (("lm.blocks.0.hook_z",), {"tower": "vision"}, ValueError, "in tower 'lm'"),
    (("hook_z", 0), {"tower": "lm"}, ValueError, "full name takes no layer"),
])
def test_get_act_name_refuses_what_names_no_hook(args, kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        get_act_name(*args, **kwargs)


# ------------------------------------------------------------------------------------------ Slice
def test_slice_follows_transformerlens():
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    assert Slice().mode == "identity" and torch.equal(Slice(None).apply(x, 1), x)
    assert torch.equal(Slice(2).apply(x, 1), x[:, 2])  # Slice(int) drops the dimension
    assert torch.equal(Slice((1, 4)).apply(x, -2), x[:, 1:4])  # a tuple is slice(*t)
    assert torch.equal(Slice(slice(None, None, 2)).apply(x, 1), x[:, ::2])
    assert torch.equal(Slice([0, 3]).apply(x, 1), x[:, [0, 3]])
    assert torch.equal(Slice(torch.tensor([4, 1])).apply(x, -2), x[:, [4, 1]])
    assert torch.equal(Slice(np.array([1])).apply(x, 0), x[[1]])
    # unwrap, what pos_slice goes through: an int keeps its dimension
    assert torch.equal(Slice.unwrap(-1).apply(x, 1), x[:, -1:]) and Slice.unwrap(-1).mode == "array"
    kept = Slice((0, 2))
    assert Slice.unwrap(kept) is kept
    assert Slice(3).indices().tolist() == [3] and Slice((1, 4)).indices(5).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="max_ctx"):
        Slice((1, 4)).indices()


@pytest.mark.no_typecheck  # the message users see, not jaxtyping's
def test_slice_refuses_what_is_not_a_slice():
    for bad in ("last", 1.5, True, [[0, 1]]):
        with pytest.raises(TypeError, match="a slice must be|one-dimensional integers"):
            Slice(bad)


# ------------------------------------------------------------------------------------------ run_with_cache(pos_slice=)
HEAD_LAST = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")


def by_hand(x, name, select):
    """TransformerLens's rule, written out: per-head tensors [B, T, H, d] by their positions (third from last),
    everything else by its second from last (for patterns and scores: the query positions)."""
    head_last = name.rpartition(".")[2] in HEAD_LAST
    return x[..., select, :, :] if head_last else x[..., select, :]


@pytest.mark.parametrize("family", ["vqa", "llava"])
@pytest.mark.parametrize("pos_slice, select", [
    (-1, [-1]), ((1, 3), slice(1, 3)), ([0, 2], [0, 2]), (slice(None, None, 2), slice(None, None, 2)),
    (torch.tensor([1, 0]), [1, 0]), (None, slice(None)),
])
def test_pos_slice_equals_slicing_the_full_cache(request, family, pos_slice, select):
    model, inputs = request.getfixturevalue(family)
    with torch.no_grad():
        logits, full = model.run_with_cache(**inputs)
        out, sliced = model.run_with_cache(**inputs, pos_slice=pos_slice)
    torch.testing.assert_close(out, logits, atol=0, rtol=0)
    assert sliced.keys() == full.keys()
    for name, x in full.items():
        torch.testing.assert_close(sliced[name], by_hand(x, name, select), atol=0, rtol=0, msg=name)
        if name.endswith("hook_pattern"):  # the keys are never sliced
            assert sliced[name].shape[-1] == x.shape[-1]
        if pos_slice is not None:  # a copy, not a view keeping the whole activation alive
            assert sliced[name].untyped_storage().nbytes() == sliced[name].numel() * x.element_size()


def test_pos_slice_with_remove_batch_dim_and_device(vqa):
    model, inputs = vqa
    one = {k: v[:1] for k, v in inputs.items()}
    name, z = "text_encoder.blocks.1.hook_resid_post", "text_encoder.blocks.1.cross_attn.hook_z"
    with torch.no_grad():
        _, full = model.run_with_cache(**one, names_filter=[name, z])
        _, cache = model.run_with_cache(**one, names_filter=[name, z], pos_slice=-1, remove_batch_dim=True,
                                        device="meta")
    assert not cache.has_batch_dim and cache[name].device.type == "meta"
    assert cache[name].shape == full[name][0, -1:].shape and cache[z].shape == full[z][0, -1:].shape
    with pytest.raises(ValueError, match="batch of one example; input_ids holds 2"):
        model.run_with_cache(**inputs, names_filter=name, remove_batch_dim=True)


def test_remove_batch_dim_with_two_images_in_one_prompt(llava):
    """One example may hold several images: the LM's hooks lose their batch dimension; the vision tower's, one row
    per image, are refused by name instead of keeping the first image only (TransformerLens's `[0]`)."""
    model, _ = llava
    inputs = model.processor(images=[random_image(seed=5), random_image(seed=6)],
                             text=["USER: <image> and <image>\ncompare ASSISTANT:"], return_tensors="pt")
    name = "lm.blocks.1.hook_resid_post"
    with torch.no_grad():
        _, full = model.run_with_cache(**inputs, names_filter=name)
        _, one = model.run_with_cache(**inputs, names_filter=name, remove_batch_dim=True)
        torch.testing.assert_close(one[name], full[name][0])
        with pytest.raises(ValueError, match="vision.hook_embed has batch size 2"):
            model.run_with_cache(**inputs, names_filter="vision.hook_embed", remove_batch_dim=True)


# ------------------------------------------------------------------------------------------ get_caching_hooks
def test_get_caching_hooks_returns_hooks_and_attaches_none(vqa):
    model, inputs = vqa
    name = "text_encoder.blocks.0.attn.hook_pattern"
    mine = {"kept": torch.ones(1)}
    cache, fwd, bwd = model.get_caching_hooks([name], cache=mine, pos_slice=(0, 2))
    assert cache is mine and [n for n, _ in fwd] == [name] and bwd == []
    assert not any(p.has_hooks for p in model.hook_points())  # TL: "It does not add the hooks to the model"
    with torch.no_grad():
        with model.hooks(fwd):
            model(**inputs)
        _, ref = model.run_with_cache(**inputs, names_filter=name)
    assert set(cache) == {"kept", name}
    torch.testing.assert_close(cache[name], ref[name][:, :, 0:2])
    _, fwd, bwd = model.get_caching_hooks(lambda n: n.endswith("hook_z"), incl_bwd=True)
    assert [n for n, _ in bwd] == [n for n, _ in fwd] == [n for n in model.hook_dict if n.endswith("hook_z")]


@pytest.mark.no_typecheck
def test_get_caching_hooks_misuse_is_refused(vqa):
    model, inputs = vqa
    with pytest.raises(TypeError, match="cache must be a dict"):
        model.get_caching_hooks("vision.hook_embed", cache=[])
    with pytest.raises(TypeError, match="a slice must be"):
        model.get_caching_hooks("vision.hook_embed", pos_slice="last")
    _, fwd, _ = model.get_caching_hooks("vision.hook_embed", remove_batch_dim=True)
    with pytest.raises(ValueError, match="batch of one example; vision.hook_embed has batch size 2"):
        with torch.no_grad(), model.hooks(fwd):
            model(**inputs)
    assert not any(p.has_hooks for p in model.hook_points())


def test_get_caching_hooks_gradients_equal_a_manual_backward(vqa):
    model, inputs = vqa
    names_ = ["text_encoder.blocks.1.hook_resid_post", "text_decoder.blocks.0.cross_attn.hook_z"]
    grads = {}
    out = model.run_with_hooks(**inputs, bwd_hooks=[(n, lambda g, hook: grads.__setitem__(hook.name, g.clone()))
                                                    for n in names_])
    out[:, -1, 3].sum().backward()
    cache, fwd, bwd = model.get_caching_hooks(names_, incl_bwd=True, pos_slice=-1)
    with model.hooks(fwd, bwd):
        model(**inputs)[:, -1, 3].sum().backward()
    model.zero_grad(set_to_none=True)
    for n in names_:
        torch.testing.assert_close(cache[n + "_grad"], by_hand(grads[n], n, [-1]))


# ------------------------------------------------------------------------------------------ incl_bwd
class Scalar(HookedRootModule):
    """A model whose output is a scalar, as TransformerLens's return_type="loss": sum(w * x) through two points."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -2.0, 3.0]]))
        self.hook_in, self.hook_out = HookPoint(), HookPoint()
        self.setup()

    def forward(self, x):
        return self.hook_out(self.w * self.hook_in(x)).sum()


def test_incl_bwd_calls_backward_on_the_output_as_transformerlens():
    model = Scalar()
    x = torch.tensor([[0.5, 1.0, 2.0]], requires_grad=True)
    out, cache = model.run_with_cache(x=x, incl_bwd=True)
    assert out.item() == pytest.approx(0.5 - 2.0 + 6.0)
    torch.testing.assert_close(cache["hook_in_grad"], model.w.detach())  # d sum(w x) / dx = w
    torch.testing.assert_close(cache["hook_out_grad"], torch.ones(1, 3))
    torch.testing.assert_close(model.w.grad, x.detach())  # the backward ran: parameters hold their gradients
    torch.testing.assert_close(x.grad, model.w.detach())
    assert not any(p.has_hooks for p in model.hook_points())


def test_incl_bwd_on_a_one_element_output(vqa):
    """BLIP ITM's similarity of one image and one text is one element: TL's incl_bwd works on it; gradients equal
    those of a manual backward through backward hooks."""
    hf, processor = build_blip("itm", seed=2)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=5)], text=["a photo"], return_tensors="pt")
    inputs["use_itm_head"] = False
    name = "text_encoder.blocks.1.hook_resid_mid"
    grads = []
    model.run_with_hooks(**inputs, bwd_hooks=[(name, lambda g, hook: grads.append(g.clone()))]).backward()
    manual = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out, cache = model.run_with_cache(**inputs, names_filter=name, incl_bwd=True)
    assert out.shape == (1, 1)
    torch.testing.assert_close(cache[name + "_grad"], grads[0])
    torch.testing.assert_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, manual)


def test_incl_bwd_on_logits_says_what_to_do(vqa):
    model, inputs = vqa
    with pytest.raises(RuntimeError, match=r"needs one element .* shape \(2, 3, \d+\).*get_caching_hooks"):
        model.run_with_cache(**inputs, names_filter="vision.hook_embed", incl_bwd=True)
    assert not any(p.has_hooks for p in model.hook_points())
    assert all(p.grad is None for p in model.parameters())


def test_return_cache_object_false_gives_the_dict(vqa):
    model, inputs = vqa
    with torch.no_grad():
        _, store = model.run_with_cache(**inputs, names_filter="vision.hook_embed", return_cache_object=False)
    assert type(store) is dict and list(store) == ["vision.hook_embed"]


# ------------------------------------------------------------------------------------------ permanent hooks, removal
def test_perma_hooks_survive_resets_until_including_permanent(vqa):
    model, _ = vqa
    a, b = "vision.hook_embed", "text_encoder.hook_embed"
    point = model.hook_dict[a]
    try:
        model.add_perma_hook(a, lambda t, hook: None)
        point.add_perma_hook(lambda g, hook: None, dir="bwd")
        model.add_hook(a, lambda t, hook: None)
        model.add_hook(b, lambda t, hook: None, "bwd")
        assert len(point.fwd_hooks) == 2 and len(point.bwd_hooks) == 1
        model.reset_hooks()
        assert len(point.fwd_hooks) == len(point.bwd_hooks) == 1 and not model.hook_dict[b].has_hooks
        with model.hooks([(a, lambda t, hook: None)]):
            assert len(point.fwd_hooks) == 2
        model.remove_all_hook_fns()
        assert len(point.fwd_hooks) == len(point.bwd_hooks) == 1
        model.remove_all_hook_fns("fwd", including_permanent=True)
        assert not point.fwd_hooks and len(point.bwd_hooks) == 1
        model.add_perma_hook(a, lambda t, hook: None)
        model.reset_hooks(including_permanent=True)
        assert not point.has_hooks
    finally:
        model.reset_hooks(including_permanent=True)


def test_remove_all_hook_fns_keeps_contexts_and_reset_hooks_clears_them(vqa):
    model, inputs = vqa
    point = model.hook_dict["vision.hook_embed"]

    def count(t, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1

    try:
        model.add_hook("vision.hook_embed", count)
        with torch.no_grad():
            model(**inputs)
        model.remove_all_hook_fns()
        assert point.ctx == {"calls": 1} and not point.has_hooks
        model.reset_hooks(clear_contexts=False)
        assert point.ctx == {"calls": 1}
        model.reset_hooks()
        assert point.ctx == {}
        with torch.no_grad():
            model.run_with_hooks(**inputs, fwd_hooks=[("vision.hook_embed", count)])
            assert point.ctx == {"calls": 1}  # TL: clear_contexts=False by default
            model.run_with_hooks(**inputs, fwd_hooks=[("vision.hook_embed", count)], clear_contexts=True)
        assert point.ctx == {}
    finally:
        model.reset_hooks()


def test_remove_by_level_removes_one_block_of_this_thread(vqa):
    model, _ = vqa
    a = "vision.hook_embed"
    point = model.hook_dict[a]
    glob = model.add_hook(a, lambda t, hook: "global")
    try:
        with model.hooks([(a, lambda t, hook: "outer")]):
            with model.hooks([(a, lambda t, hook: "inner")]):
                assert [h.fn(None, None) for h in point.fwd_hooks] == ["global", "outer", "inner"]
                model.remove_all_hook_fns(level=1)
                assert [h.fn(None, None) for h in point.fwd_hooks] == ["global", "inner"]
                point.remove_hooks(level=2)
                assert point.fwd_hooks == tuple(glob)
                with pytest.raises(ValueError, match="2 are open"):
                    model.remove_all_hook_fns(level=3)
                with pytest.raises(ValueError, match="not both"):
                    model.reset_hooks(including_permanent=True, level=1)
        with pytest.raises(ValueError, match="none is open"):
            model.remove_all_hook_fns(level=1)
        assert point.fwd_hooks == tuple(glob)
    finally:
        model.reset_hooks()


def test_hook_point_remove_hooks_defaults_to_forward(vqa):
    model, _ = vqa
    point = model.hook_dict["vision.hook_embed"]
    try:
        point.add_hook(lambda t, hook: None)
        point.add_hook(lambda g, hook: None, "bwd")
        point.remove_hooks()  # TransformerLens's default direction: "fwd"
        assert not point.fwd_hooks and len(point.bwd_hooks) == 1
    finally:
        model.reset_hooks()


@pytest.mark.no_typecheck
def test_removal_misuse_is_refused(vqa):
    model, _ = vqa
    point = model.hook_dict["vision.hook_embed"]
    with pytest.raises(ValueError, match="dir must be 'fwd', 'bwd' or 'both'"):
        point.remove_hooks("forward")
    with pytest.raises(ValueError, match="direction must be 'fwd', 'bwd' or 'both'"):
        model.remove_all_hook_fns("forward")
    with pytest.raises(TypeError, match="clear_contexts must be True or False"):
        model.reset_hooks("yes")
    with model.hooks([("vision.hook_embed", lambda t, hook: None)]):
        with pytest.raises(ValueError, match="is not an open hooks"):
            model.remove_all_hook_fns(level="1")
        assert point.has_hooks  # nothing removed by a refused call


def test_hook_layer_is_transformerlens_after_the_tower(vqa):
    """TL's `HookPoint.layer()` is `int(name.split(".")[1])` of `blocks.{L}...`; here the tower comes first."""
    model, _ = vqa
    for name, point in model.hook_dict.items():
        parts = name.split(".")
        if parts[1] == "blocks":
            assert point.layer() == int(".".join(parts[1:]).split(".")[1])
        else:
            with pytest.raises(ValueError, match="tower-level"):
                point.layer()


# ------------------------------------------------------------------------------------------ model(inputs)
@pytest.mark.parametrize("family", ["vqa", "llava"])
def test_processor_output_positionally_equals_keywords(request, family):
    model, inputs = request.getfixturevalue(family)
    name = next(n for n in model.hook_dict if n.endswith("blocks.0.hook_resid_post") and not n.startswith("vision"))

    def edit(t, hook):
        return t * 0.5

    with torch.no_grad():
        torch.testing.assert_close(model(inputs), model(**inputs), atol=0, rtol=0)
        torch.testing.assert_close(model.run_with_hooks(inputs, fwd_hooks=[(name, edit)]),
                                   model.run_with_hooks(**inputs, fwd_hooks=[(name, edit)]), atol=0, rtol=0)
        out, cache = model.run_with_cache(inputs, names_filter=name)
        ref_out, ref = model.run_with_cache(**inputs, names_filter=name)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(cache[name], ref[name], atol=0, rtol=0)
    assert cache.positions is not None and repr(cache.positions) == repr(ref.positions)  # holds tensors: no ==
    assert repr(model.positions(inputs)) == repr(model.positions(**inputs)) == repr(ref.positions)
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}  # generate makes the answer itself
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=3), model.generate(**prompt, max_new_tokens=3))


def test_other_positional_inputs_are_refused_clearly(vqa):
    model, inputs = vqa
    with pytest.raises(TypeError, match=r"model\(input_ids=tokens"):
        model(inputs["input_ids"])
    with pytest.raises(TypeError, match="got positional BatchFeature, dict"):
        model.run_with_cache(inputs, {}, names_filter="vision.hook_embed")
    with pytest.raises(TypeError, match="'input_ids' twice"):
        model.run_with_hooks(inputs, input_ids=inputs["input_ids"])
    with pytest.raises(TypeError, match=r"generate\(\) takes the processor's output"):
        model.generate(inputs["pixel_values"], max_new_tokens=1)
    assert not any(p.has_hooks for p in model.hook_points())
