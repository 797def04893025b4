"""Span patching: groups of positions patched jointly, one cell per group (named from `cache.positions`: "image",
"text", "last", an object's patches; or any positions per example, ragged), equal to the naive loop on BLIP, LLaVA
and InstructBLIP; resuming after the KV prefix still works (the cut is the group's first position)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.patching import ImagePatches, resolve_groups
from hooked_vlm.tiny import build_blip, build_instructblip, random_image


def naive_groups(model, clean, corrupt, metric, hook_name, members, direction, normalize=False, heads=None,
                 pattern=False):
    """One full forward per cell: group g of example b patched at positions members[g][b] (and, with `heads`,
    head by head: cell (h, g) in head-major order)."""
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    B = len(members[0])
    examples = torch.arange(B)
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=hook_name)
        m_clean, m_corrupt = metric(model(**clean), examples), metric(model(**corrupt), examples)
    cells = [(None, g) for g in range(len(members))] if heads is None else [
        (h, g) for h in range(heads) for g in range(len(members))]
    out = []
    for head, g in cells:
        def edit(act, hook, g=g, head=head):
            act = act.clone()
            view, src = (act.transpose(1, 2), cache[hook.name].transpose(1, 2)) if pattern else (act, cache[hook.name])
            for b in range(B):
                idx = torch.as_tensor(members[g][b], dtype=torch.long)
                if head is None:
                    view[b, idx] = src[b, idx]
                else:
                    view[b, idx, head] = src[b, idx, head]
            return act

        with torch.no_grad():
            value = metric(model.run_with_hooks(**target, fwd_hooks=[(hook_name, edit)]), examples)
        out.append((metrics.normalized(value, m_clean, m_corrupt) if normalize else value).mean())
    out = torch.stack(out)
    return out if heads is None else out.view(heads, len(members))


# ------------------------------------------------------------------------------------------ BLIP
@pytest.fixture(scope="module")
def blip():
    hf, processor = build_blip("vqa", seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=0), random_image(seed=1)]
    questions = ["what color is the car on the street", "how many cats"]
    clean = processor(images=images, text=questions, padding=True, return_tensors="pt")
    corrupt = processor(images=[random_image(seed=2), random_image(seed=3)], text=questions, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)
    return model, clean, corrupt, metrics.logit_diff(answer, (answer + 1) % 30), answer


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_blip_groups_equal_naive_loop(blip, direction):
    model, clean, corrupt, metric, _ = blip
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter="text_encoder.hook_embed")
    T = clean["input_ids"].shape[1]
    last = cache.positions.last.tolist()
    groups = {"first two": [0, 1], "ragged": [[1, 2, 5], [3]], "last": "last", "all": "all",
              "tensor": torch.tensor([[4, 0], [2, 2]])}
    members = [[[0, 1]] * 2, [[1, 2, 5], [3]], [[last[0]], [last[1]]], [list(range(T))] * 2, [[0, 4], [2]]]
    result = patching.patch_resid(model, clean, corrupt, metric, tower="text_encoder", hook="resid_post",
                                  groups=groups, direction=direction, normalize=True, batch_size=5, progress=False)
    assert result.shape == (model.tower_info("text_encoder").n_layers, len(groups))
    for layer in range(result.shape[0]):
        expected = naive_groups(model, clean, corrupt, metric, f"text_encoder.blocks.{layer}.hook_resid_post",
                                members, direction, normalize=True)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)
    # every position of the last block's output at once: the source run's answer (normalised: 1 clean, 0 corrupted)
    assert abs(result[-1, 3].item() - (1.0 if direction == "denoise" else 0.0)) < 1e-4


@pytest.mark.parametrize("activation", ["z", "k", "pattern"])
def test_blip_head_groups_equal_naive_loop(blip, activation):
    model, clean, corrupt, metric, _ = blip
    groups = [[0, 1], [[2], [1, 3]]]
    result = patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", attention="attn",
                                  activation=activation, groups=groups, batch_size=7, progress=False)
    info = model.tower_info("text_encoder")
    assert result.shape == (info.n_layers, info.n_heads, 2)
    members = [[[0, 1]] * 2, [[2], [1, 3]]]
    for layer in range(info.n_layers):
        expected = naive_groups(model, clean, corrupt, metric, f"text_encoder.blocks.{layer}.attn.hook_{activation}",
                                members, "denoise", heads=info.n_heads, pattern=activation == "pattern")
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", groups=groups, by_position=True,
                             progress=False)


def test_blip_causal_trace_over_spans(blip):
    """A causal trace restoring a span (the question's last two tokens, the whole question) over windows of 3."""
    model, clean, _, _, answer = blip
    c = corruption.gaussian(3.0, seed=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter="vision.ln_post.hook_normalized")
    last = cache.positions.last
    tail = torch.stack([last - 1, last], 1)  # per example: its last two real tokens
    result = patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=c, kind="resid_mid",
                                   window=3, groups={"tail": tail, "text": "text"}, progress=False)
    values = cache["vision.ln_post.hook_normalized"]
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(4)) * 3.0 * values.std()
    members = [[t.tolist() for t in tail], [t.tolist() for t in cache.positions.text]]
    n_layers = model.tower_info("text_encoder").n_layers
    with torch.no_grad():
        _, full = model.run_with_cache(**clean)
    for layer in range(n_layers):
        span = range(max(0, layer - 1), min(n_layers, layer + 2))
        for g in range(2):
            def restore(act, hook, g=g):
                act = act.clone()
                for b in range(2):
                    act[b, members[g][b]] = full[hook.name][b, members[g][b]]
                return act

            hooks = [("vision.ln_post.hook_normalized", lambda t, hook: t + noise)] + [
                (f"text_encoder.blocks.{i}.hook_resid_mid", restore) for i in span]
            with torch.no_grad():
                p = metrics.prob(answer)(model.run_with_hooks(**clean, fwd_hooks=hooks), torch.arange(2)).mean()
            torch.testing.assert_close(result[layer, g], p, atol=1e-6, rtol=1e-5)


def test_resolve_groups_names_and_errors(blip):
    model, clean, _, _, _ = blip
    pos = model.positions(**clean)
    T = clean["input_ids"].shape[1]
    names, members = resolve_groups(["last", {"a": 1}.get("a"), [[0], [2, -1]]], pos, 2, T)
    assert names == ["last", "group1", "group2"]
    assert [m.tolist() for m in members[1]] == [[1], [1]]
    assert [m.tolist() for m in members[2]] == [[0], [2, T - 1]]
    names, members = resolve_groups({"question": "text", "everything": "all"}, pos, 2, T)
    assert names == ["question", "everything"] and members[1][0].tolist() == list(range(T))
    assert members[0][1].tolist() == pos.text[1].tolist()
    for bad, error, words in [
        ("image", ValueError, "cross-attention"), ([[[0], [1], [2]]], ValueError, "3 examples"),
        ([99], ValueError, "out of range"), ([], ValueError, "empty"), (["nose"], ValueError, "not one of"),
        ({"a": [[], []]}, ValueError, "no position"), (["last", "last"], ValueError, "two groups"),
    ]:
        with pytest.raises(error, match=words):
            resolve_groups(bad, pos, 2, T)
    with pytest.raises(ValueError, match="prompt's sequence"):
        resolve_groups(["text"], None, 2, T)


# ------------------------------------------------------------------------------------------ LLaVA
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_llava_named_groups_equal_naive_loop(llava_minimal_pair, direction):
    model, clean, corrupt, metric = llava_minimal_pair
    pos = model.positions(**clean)
    spans = [s[0] for s in pos.image]
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    obj = ImagePatches(rows=[0, 1], cols=[grid - 1])  # the top-right corner's patches
    members = [[s.indices.tolist() for s in spans], [t.tolist() for t in pos.text],
               [[int(i)] for i in pos.last], [s.patches([0, 1], [grid - 1]).tolist() for s in spans]]
    assert all(len(m) == 2 for m in members[3])
    result = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_pre",
                                  groups={"image": "image", "text": "text", "last": "last", "object": obj},
                                  direction=direction, batch_size=4, progress=False)
    for layer in range(model.tower_info("lm").n_layers):
        expected = naive_groups(model, clean, corrupt, metric, f"lm.blocks.{layer}.hook_resid_pre", members,
                                direction)
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)


def test_llava_late_groups_resume_after_the_prefix(llava_minimal_pair):
    """Groups that all start late (the last two tokens, the last token) resume on the positions from the first of
    them: the cut is the minimum over the groups' positions."""
    model, clean, corrupt, metric = llava_minimal_pair
    T = clean["input_ids"].shape[1]
    lengths = []
    counter = model.lm.register_forward_hook(lambda tower, args, out: lengths.append(out.shape[1]))
    try:
        heads = patching.patch_heads(model, clean, corrupt, metric, tower="lm", groups=[[T - 2, T - 1], [T - 1]],
                                     progress=False)
    finally:
        counter.remove()
    assert set(lengths[2:]) == {2}
    info = model.tower_info("lm")
    for layer in range(info.n_layers):
        expected = naive_groups(model, clean, corrupt, metric, f"lm.blocks.{layer}.attn.hook_z",
                                [[[T - 2, T - 1]] * 2, [[T - 1]] * 2], "denoise", heads=info.n_heads)
        torch.testing.assert_close(heads[layer], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ InstructBLIP
def test_instructblip_image_and_last_groups_equal_naive_loop():
    hf, processor = build_instructblip("llama", seed=2, qf_layers=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["what is in the picture?", "describe this image"]
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=prompts, padding=True,
                      return_tensors="pt")
    corrupt = processor(images=[random_image(seed=2), random_image(seed=3)], text=prompts, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    pos = model.positions(**clean)
    members = [[torch.cat([s.indices for s in spans]).tolist() for spans in pos.image], [[int(i)] for i in pos.last]]
    result = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_post",
                                  groups=["image", "last"], progress=False)
    for layer in range(model.tower_info("lm").n_layers):
        expected = naive_groups(model, clean, corrupt, metric, f"lm.blocks.{layer}.hook_resid_post", members,
                                "denoise")
        torch.testing.assert_close(result[layer], expected, atol=1e-5, rtol=1e-5)
