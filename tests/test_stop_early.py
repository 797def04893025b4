"""Stopping the forward early (issue 15, item 2): `run_with_cache` / `run_with_hooks(stop_at_hook=...)` end the
forward right after one hook point, cache exactly what a full run caches up to there, run nothing after it (a
projector's output never runs the LM), and leave no hook attached, whether they stop, finish or fail."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]


def _blip():
    hf, processor = build_blip("vqa", seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=["what color is it", "how many"], padding=True, return_tensors="pt")
    inputs["decoder_input_ids"] = torch.tensor([[model.cfg.bos_token_id, 7, 9]] * 2)
    return model, dict(inputs)


def _llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=IMAGES, text=["USER: <image>\nwhat is it? ASSISTANT:", "USER: <image>\nhue? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    return model, dict(inputs)


def _instructblip(lm):
    hf, processor = build_instructblip(lm, seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = dict(processor(images=IMAGES, text=["what is in the street?", "a cat"], padding=True,
                            return_tensors="pt"))
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 7], [0, 4, 6]])
    return model, inputs


FAMILIES = {"blip": _blip, "llava": _llava, "instructblip-llama": lambda: _instructblip("llama"),
            "instructblip-t5": lambda: _instructblip("t5")}
# per family: points to stop at, one on the image side and one in a text tower's block
STOPS = {
    "blip": ["vision.blocks.0.attn.hook_pattern", "text_encoder.blocks.1.cross_attn.hook_z"],
    "llava": ["projector.hook_out", "lm.blocks.1.attn.hook_pattern"],
    "instructblip-llama": ["qformer.blocks.0.cross_attn.hook_pattern", "lm.blocks.0.hook_mlp_out"],
    "instructblip-t5": ["projector.hook_out", "lm_decoder.blocks.0.cross_attn.hook_z"],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, inputs = FAMILIES[request.param]()
    with torch.no_grad():
        logits, full = model.run_with_cache(inputs)
    return request.param, model, inputs, logits, full


def no_hooks(model):
    return not any(point.has_hooks for point in model.hook_dict.values())


def test_hook_dict_is_execution_order(family):
    """`stop_at_hook=True` takes the last needed name in `hook_dict` order: that must be the order points run in."""
    _, model, inputs, _, _ = family
    fired = []
    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: fired.append(hook.name))])
    assert fired == [name for name in model.hook_dict if name in fired]
    assert len(fired) == len(set(fired)) == len(model.hook_dict)  # each point once: the first time is the last


def test_stopped_cache_equals_full_run(family):
    name, model, inputs, _, full = family
    order = list(model.hook_dict)
    for stop in STOPS[name]:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, stop_at_hook=stop)
        assert out is None and no_hooks(model)
        assert list(cache.keys()) == order[:order.index(stop) + 1]  # everything up to the stop point, itself included
        for key in cache.keys():
            assert torch.equal(cache[key], full[key]), key
        assert torch.equal(cache.positions.last, full.positions.last)
    # True: stop after the last name asked for, which the cache holds. The full run to compare with caches the
    # same names: hooking fewer points keeps more attentions on the fused path, equal only up to rounding
    asked = [order[0], STOPS[name][0], stop]
    with torch.no_grad():
        out, cache = model.run_with_cache(inputs, names_filter=asked, stop_at_hook=True)
        _, same = model.run_with_cache(inputs, names_filter=asked)
    assert out is None and list(cache.keys()) == asked
    assert all(torch.equal(cache[key], same[key]) for key in asked)


def test_stopped_hooks_see_the_full_runs_tensors(family):
    """run_with_hooks: a hook at the stop point runs (before the stop) and sees what a full run's hook sees."""
    name, model, inputs, _, _ = family
    stop = STOPS[name][-1]
    with torch.no_grad():
        _, full = model.run_with_cache(inputs, names_filter=stop)
        seen = {}
        out = model.run_with_hooks(inputs, fwd_hooks=[(stop, lambda x, hook: seen.setdefault(hook.name, x.clone()))],
                                   stop_at_hook=True)
    assert out is None and torch.equal(seen[stop], full[stop]) and no_hooks(model)


@pytest.mark.parametrize("name, tower", [("llava", "lm"), ("instructblip-llama", "lm"),
                                         ("instructblip-t5", "lm_encoder")])
def test_a_projector_stop_never_runs_the_lm(name, tower):
    model, inputs = FAMILIES[name]()
    calls = []
    handle = model.tower(tower).blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            _, full = model.run_with_cache(inputs, names_filter="projector.hook_out")
            assert len(calls) == 1  # the spy sees a full run
            _, cache = model.run_with_cache(inputs, names_filter="projector.hook_out", stop_at_hook=True)
            means = analysis.mean_activation(model, [inputs, inputs], "projector.hook_out")
        assert len(calls) == 1  # neither the stopped run nor the mean ran the LM
    finally:
        handle.remove()
    assert torch.equal(cache["projector.hook_out"], full["projector.hook_out"])
    expect = full["projector.hook_out"].double().mean(0).to(model.dtype)
    torch.testing.assert_close(means["projector.hook_out"], expect, atol=1e-7, rtol=0)


def test_image_features_by_stopping():
    """Every family's image-side output without the LM (`model.image_features`) equals the stop-early recipe
    docs/hooks.md gives."""
    model, inputs = _blip()
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="vision.ln_post.hook_normalized", stop_at_hook=True)
        assert torch.equal(cache["vision.ln_post.hook_normalized"], model.image_features(inputs["pixel_values"]))
    model, inputs = _llava()
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="projector.hook_out", stop_at_hook=True,
                                        tower_outputs=True)
        assert torch.equal(cache["projector.hook_out"], model.image_features(inputs["pixel_values"]))
        assert torch.equal(cache.tower_outputs["vision"], model.vision(inputs["pixel_values"],
                                                                       feature_layers=model.cfg.feature_layers))
        assert set(cache.tower_outputs) == {"vision"}  # the LM never ran, so recorded nothing
    model, inputs = _instructblip("llama")
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="projector.hook_out", stop_at_hook=True)
        expect = model.image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                      inputs["qformer_attention_mask"])
    assert torch.equal(cache["projector.hook_out"], expect)


def test_no_hook_left_after_a_stop_or_an_exception():
    model, inputs = _llava()
    with torch.no_grad():
        logits = model(inputs)
        kept = []
        # reset_hooks_end=False keeps the caller's hooks (global), never the stop
        out = model.run_with_hooks(inputs, fwd_hooks=[("projector.hook_out", lambda x, hook: kept.append(1))],
                                   stop_at_hook=True, reset_hooks_end=False)
        assert out is None and len(kept) == 1
        assert torch.equal(model(inputs), logits) and len(kept) == 2  # not stopped; the caller's hook still runs
        model.reset_hooks()
        assert no_hooks(model)

        def fail(x, hook):
            raise RuntimeError("a hook failed")

        for stop in ("lm.blocks.1.hook_resid_post", True):
            with pytest.raises(RuntimeError, match="a hook failed"):
                model.run_with_hooks(inputs, fwd_hooks=[("lm.blocks.0.hook_resid_pre", fail)], stop_at_hook=stop)
            assert no_hooks(model)
            with model.hooks([("lm.blocks.0.hook_resid_pre", fail)]):  # the caller's hook fails mid-run
                with pytest.raises(RuntimeError, match="a hook failed"):
                    model.run_with_cache(inputs, names_filter=["lm.blocks.1.hook_resid_post"], stop_at_hook=stop)
                left = [name for name, point in model.hook_dict.items() if point.has_hooks]
                assert left == ["lm.blocks.0.hook_resid_pre"]  # the caller's: the cache's and the stop's are gone
            assert no_hooks(model)
        assert torch.equal(model(inputs), logits)


def test_a_stop_inside_another_calls_hook_stops_only_that_call():
    """A hook of an outer run that runs a stopped inner run: the inner stop ends the inner forward only."""
    model, inputs = _llava()
    inner = []

    def nested(x, hook):
        inner.append(model.run_with_hooks(inputs, fwd_hooks=[("vision.hook_embed", lambda t, hook: None)],
                                          stop_at_hook=True))

    with torch.no_grad():
        logits = model(inputs)
        out = model.run_with_hooks(inputs, fwd_hooks=[("lm.blocks.0.hook_resid_pre", nested)])
    assert inner == [None] and torch.equal(out, logits) and no_hooks(model)


@pytest.mark.no_typecheck
def test_bad_stops_raise_one_line():
    model, inputs = _llava()
    with pytest.raises(KeyError, match="closest names: lm.blocks.0.hook_resid_pre"):
        model.run_with_cache(inputs, stop_at_hook="lm.blocks.0.hook_resid_pr")
    with pytest.raises(TypeError, match="stop_at_hook must be a hook name, True"):
        model.run_with_cache(inputs, stop_at_hook=3)
    with pytest.raises(ValueError, match="runs after stop_at_hook='projector.hook_out'"):
        model.run_with_cache(inputs, names_filter=["lm.blocks.0.hook_resid_pre"], stop_at_hook="projector.hook_out")
    with pytest.raises(ValueError, match="runs after stop_at_hook='projector.hook_out'"):
        model.run_with_hooks(inputs, fwd_hooks=[("lm.hook_embed", lambda x, hook: None)],
                             stop_at_hook="projector.hook_out")
    with pytest.raises(ValueError, match="every name names_filter selects runs after"):
        model.run_with_cache(inputs, names_filter=lambda n: n.startswith("lm."), stop_at_hook="projector.hook_out")
    with pytest.raises(ValueError, match="there is none"):
        model.run_with_hooks(inputs, stop_at_hook=True)
    with pytest.raises(ValueError, match="drop bwd_hooks or stop_at_hook"):
        model.run_with_hooks(inputs, bwd_hooks=[("lm.hook_embed", lambda x, hook: None)], stop_at_hook=True)
    with pytest.raises(ValueError, match="pass one of them"):
        model.run_with_cache(inputs, incl_bwd=True, stop_at_hook=True)
    with pytest.raises(TypeError, match="did you mean 'stop_at_hook'"):
        model.run_with_cache(inputs, stop_at_hok=True)
    assert no_hooks(model)
