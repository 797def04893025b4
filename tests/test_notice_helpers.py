"""NOTICE's helpers: the token of interest, head selection as NOTICE's notebook (np.std), universal heads, head
overlays against a naive computation from the cache, and the sweeps NOTICE's protocol runs checked against the
naive loop (one head at the token of interest; all heads' z at a position = the attention output there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm import HookedVLM, analysis, metrics, overlays, patching
from hooked_vlm.head_selection import universal_heads
from hooked_vlm.tiny import build_blip, build_llava, random_image


@pytest.fixture(scope="module")
def blip():
    hf, processor = build_blip("vqa", seed=3, image_size=64, patch=16)
    model = HookedVLM.from_hf(hf, processor=processor)
    texts = ["is the cat red or blue?", "the cats are blue, the cat is red"]
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=texts, padding=True,
                      return_tensors="pt")
    corrupt = processor(images=[random_image(seed=2), random_image(seed=3)], text=texts, padding=True,
                        return_tensors="pt")
    return model, clean, corrupt


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=3, image_size=48, patch=8)
    model = HookedVLM.from_hf(hf, processor=processor)
    texts = ["USER: <image>\nis the cat red or blue? ASSISTANT:", "USER: <image>\nblue ASSISTANT:"]
    inputs = processor(images=[random_image(seed=0), random_image(seed=1)], text=texts, padding=True,
                       return_tensors="pt")
    return model, inputs


# ------------------------------------------------------------------------------------------ token of interest
def test_token_of_interest_blip(blip):
    model, clean, _ = blip
    tok = model.processor.tokenizer
    positions = model.positions(**clean)
    toi = positions.find_each(tok, ["blue", "cat"], sub_token="first")
    tokens = [tok.convert_ids_to_tokens(row) for row in clean["input_ids"]]
    assert tokens[0][toi[0]] == "blue" and tokens[1][toi[1]] == "cat"
    assert tokens[1][toi[1] - 1] == "the" and toi[1] == 7  # the whole word "cat", not the "cats" at 2
    assert positions.find_each(tok, "cat", sub_token="first", occurrence=0).tolist() == [3, 7]
    with pytest.raises(ValueError, match=r"'dog' does not occur 1 time\(s\) as a whole word in example 0, whose "
                                         r"tokens are \['\[CLS\]', 'is'"):
        positions.find_each(tok, "dog", sub_token="first")
    with pytest.raises(ValueError, match="1 words for 2 examples"):
        positions.find_each(tok, ["cat"], sub_token="first")


def test_token_of_interest_llava_left_padded_sub_tokens(llava):
    model, inputs = llava
    tok = model.processor.tokenizer
    positions = model.positions(**inputs)
    assert inputs["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    first = positions.find_each(tok, "blue", sub_token="first")
    last = positions.find_each(tok, "blue", sub_token="last")
    for b in range(2):  # "blue" is "▁" "b" "l" "u" "e": the lone word-boundary piece is not part of the word
        assert tok.convert_ids_to_tokens(inputs["input_ids"][b, first[b]:last[b] + 1].tolist()) == list("blue")
    assert (last > positions.image[0][0].stop).all()  # positions in the sequence with the image tokens
    cat = positions.find_each(tok, ["cat", "blue"], sub_token="last")
    assert tok.convert_ids_to_tokens(inputs["input_ids"][0, cat[0] - 1:cat[0] + 1].tolist()) == ["▁ca", "t"]
    with pytest.raises(ValueError, match="'ca' does not occur"):  # "▁ca" alone is no word: "t" is glued on
        positions.find_each(tok, ["ca", "blue"], sub_token="first")


# ------------------------------------------------------------------------------------------ head selection
def test_select_heads_population_std_as_numpy():
    scores = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(0)) - 0.5
    scores[:, 2, 3] += 1.5
    magnitude = scores.abs().mean(0).numpy()
    for std, ddof in (("population", 0), ("sample", 1)):
        for k in (0.5, 1.0, 2.0):
            threshold = magnitude.mean() + k * np.std(magnitude, ddof=ddof)  # NOTICE: 2 * np.std + mean
            expected = {tuple(map(int, x)) for x in np.argwhere(magnitude >= threshold)}
            assert set(analysis.select_heads(scores, k_std=k, std=std)) == expected
    assert analysis.select_heads(scores) == analysis.select_heads(scores, k_std=2, std="population")
    # a head that passes the population threshold only (np.std is the smaller)
    flat = torch.zeros(1, 5)
    flat[0, 0] = 1.0
    assert analysis.select_heads(flat, k_std=2.0, std="population") == [(0, 0)]
    assert analysis.select_heads(flat, k_std=2.0, std="sample") == []


def test_universal_heads():
    a, b, c = torch.zeros(3, 4, 5), torch.zeros(4, 5), torch.zeros(2, 4, 5)
    a[:, 1, 2], a[:, 3, 0] = 5.0, 4.0
    b[1, 2], b[0, 4] = -5.0, 6.0
    c[:, 1, 2], c[:, 0, 4], c[:, 3, 0] = 3.0, 3.0, 3.0
    result = universal_heads({"SIP svo": a, "STR svo": b, "SIP fer": c})
    assert result.selected == {"SIP svo": [(1, 2), (3, 0)], "STR svo": [(0, 4), (1, 2)],
                               "SIP fer": [(0, 4), (1, 2), (3, 0)]}
    assert result.heads == [(1, 2)]
    assert result.counts == {(1, 2): 3, (0, 4): 2, (3, 0): 2}
    assert universal_heads({"a": a, "b": b, "c": c}, min_sets=2).heads == [(0, 4), (1, 2), (3, 0)]
    listed = universal_heads({"from scores": a, "given": [(3, 0), (1, 2), (3, 0)]})
    assert listed.heads == [(1, 2), (3, 0)] and listed.selected["given"] == [(3, 0), (1, 2)]
    with pytest.raises(ValueError, match="different"):
        universal_heads({"a": a, "other model": torch.zeros(2, 2, 3)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        universal_heads({})
    with pytest.raises(ValueError, match="min_sets=3"):
        universal_heads({"a": a, "b": b}, min_sets=3)


@pytest.mark.no_typecheck
def test_bad_choices_are_named(blip):
    model, clean, _ = blip
    with pytest.raises(ValueError, match="sub_token must be 'first' or 'last', got 'middle'"):
        model.positions(**clean).find_each(model.processor.tokenizer, "cat", sub_token="middle")
    with pytest.raises(ValueError, match=r"std must be 'population' \(np.std, NOTICE\) or 'sample'"):
        analysis.select_heads(torch.rand(2, 3), std="unbiased")


# ------------------------------------------------------------------------------------------ overlays
def naive_overlay(cache, tower, attention, layer, head, q, keys, example=0):
    n_layers = sum(1 for name in cache.keys() if name.endswith(f"{attention}.hook_pattern"))
    maps = [[cache[f"{tower}.blocks.{i}.{attention}.hook_pattern"][example, h, q, keys] for h in range(
        cache[f"{tower}.blocks.{i}.{attention}.hook_pattern"].shape[1])] for i in range(n_layers)]
    everything = torch.stack([torch.stack(row) for row in maps])
    x = everything[layer, head] - everything.mean((0, 1))
    return (x - x.min()) / (x.max() - x.min())


def test_overlay_blip_equals_naive(blip):
    model, clean, _ = blip
    _, cache = model.run_with_cache(**clean, names_filter=overlays.overlay_names(model))
    grid = model.cfg.vision.grid
    toi = model.positions(**clean).find_each(model.processor.tokenizer, ["red", "cat"], sub_token="first")
    for example in (0, 1):
        got = overlays.head_overlay(model, cache, (1, 2), toi, example=example)
        assert got.shape == (grid, grid)
        keys = torch.arange(1, 1 + grid * grid)  # the class token (key 0) dropped
        expected = naive_overlay(cache, "text_encoder", "cross_attn", 1, 2, int(toi[example]), keys, example)
        torch.testing.assert_close(got, expected.view(grid, grid))
        assert got.min() == 0 and got.max() == 1
    raw = overlays.head_overlay(model, cache, (0, 1), 3, subtract_mean=False, normalize=False)
    torch.testing.assert_close(raw.flatten(), cache["text_encoder", 0, "cross_attn.pattern"][0, 1, 3, 1:])
    with pytest.raises(ValueError, match="not a cross_attn head"):
        overlays.head_overlay(model, cache, (9, 0), 3)
    _, partial = model.run_with_cache(**clean, names_filter="text_encoder.blocks.0.cross_attn.hook_pattern")
    with pytest.raises(KeyError, match="overlay_names"):
        overlays.head_overlay(model, partial, (0, 0), 3)


def test_overlay_llava_self_attention_to_the_image_span(llava):
    model, inputs = llava
    _, cache = model.run_with_cache(**inputs, names_filter=overlays.overlay_names(model, "lm", "attn"))
    grid = model.cfg.vision.grid
    span = cache.positions.image[1][0]
    q = int(cache.positions.last[1])
    got = overlays.head_overlay(model, cache, (1, 3), q, example=1, attention="attn")
    expected = naive_overlay(cache, "lm", "attn", 1, 3, q, span.indices, example=1)
    torch.testing.assert_close(got, expected.view(grid, grid))  # the span's tokens are the patches, row-major


# ------------------------------------------------------------------------------------------ the protocol's sweeps
def test_one_head_at_the_token_of_interest_equals_naive(blip):
    """N4: `patch_heads(positions=toi[:, None], by_position=True)` patches one head at each example's TOI."""
    model, clean, corrupt = blip
    toi = model.positions(**clean).find_each(model.processor.tokenizer, ["red", "cat"], sub_token="first")
    metric = metrics.logit_diff(3, 4)
    got = patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", attention="cross_attn",
                               positions=toi[:, None], by_position=True, progress=False)
    info = model.tower_info("text_encoder")
    assert got.shape == (info.n_layers, info.n_heads, 1)
    rows = torch.arange(2)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=lambda n: n.endswith("cross_attn.hook_z"))
        for layer in range(info.n_layers):
            name = f"text_encoder.blocks.{layer}.cross_attn.hook_z"
            for head in range(info.n_heads):
                def edit(z, hook):
                    z = z.clone()
                    z[rows, toi, head] = cache[name][rows, toi, head]
                    return z

                logits = model.run_with_hooks(**corrupt, fwd_hooks=[(name, edit)])
                torch.testing.assert_close(got[layer, head, 0], metric(logits, rows).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["attn", "cross_attn"])
def test_all_heads_z_at_a_position_is_the_attention_output_there(blip, attention):
    """N3's `attention.self` / `crossattention.self` sites (every head's z at a token) patch as the attention's
    output at that token (z -> W_O, per position), which `patch_resid(hook="attn_out" / "cross_attn_out")` runs."""
    model, clean, corrupt = blip
    metric = metrics.logit_diff(3, 4)
    got = patching.patch_resid(model, clean, corrupt, metric, tower="text_encoder", hook=f"{attention}_out",
                               progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=lambda n: n.endswith(f".{attention}.hook_z"))
        for layer in range(got.shape[0]):
            name = f"text_encoder.blocks.{layer}.{attention}.hook_z"
            for p in range(got.shape[1]):
                def edit(z, hook):
                    z = z.clone()
                    z[:, p] = cache[name][:, p]
                    return z

                logits = model.run_with_hooks(**corrupt, fwd_hooks=[(name, edit)])
                torch.testing.assert_close(got[layer, p], metric(logits, torch.arange(2)).mean(), atol=1e-5,
                                           rtol=1e-5)
