"""Interventions addressed at positions while generating, on every tower that decodes with a KV cache (BLIP's caption
and answer decoders, LLaVA's and InstructBLIP-Vicuna's `lm`, InstructBLIP-Flan-T5's `lm_decoder`).

After the prompt's forward each step runs one new token, so an intervention must know where that token sits: the
references below count the tower's forwards themselves (step k > 0 runs the token at prompt length + k - 1) and
never read `Tower.position_offset`, which the interventions rely on."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, interventions
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

STEPS = 4  # the prompt's forward and three one-token steps
IMAGES = [random_image(seed=0), random_image(seed=1)]


def _blip(kind, texts):
    hf, processor = build_blip(kind, seed=1)
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


def _caption():  # a text prompt: the decoder's prompt has several tokens
    return _blip("caption", ["a picture of", "a dog"])


def _vqa():  # the decoder's prompt is [DEC] alone
    return _blip("vqa", ["what color is the car", "how many"])


def _llava():  # left-padded: the second row starts with pads
    hf, processor = build_llava(seed=1)
    texts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


def _instructblip(lm):
    hf, processor = build_instructblip(lm, seed=1)
    texts = ["what is in the picture?", "describe this image"]
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


BUILDERS = {"blip_caption": _caption, "blip_vqa": _vqa, "llava": _llava,
            "instructblip_llama": lambda: _instructblip("llama"), "instructblip_t5": lambda: _instructblip("t5")}
CROSS = {"blip_caption", "blip_vqa", "instructblip_t5"}  # decoders that also cross-attend (image, question, encoder)


@pytest.fixture(scope="module")
def built():
    """(model, inputs) per case, each built on first use and shared by the module's tests."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = BUILDERS[case]()
        return cache[case]

    return get


def generate(model, inputs, hooks, record):
    """Generated ids and, per step, a clone of each hook in `record` (after the hooks before it have edited it)."""
    seen = {name: [] for name in record}
    spies = [(name, lambda t, hook, name=name: seen[name].append(t.clone())) for name in record]
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=STEPS, fwd_hooks=[*hooks, *spies])
    return ids, seen


def clean_run(built, case):
    """The model, its inputs, the output tower, and its prompt length (the stream's length in the first forward)."""
    model, inputs = built(case)
    tower = model.output_tower
    stream = f"{tower}.blocks.0.hook_resid_pre"
    _, seen = generate(model, inputs, [], [stream])
    assert len(seen[stream]) == STEPS, f"{case}: generation ended after {len(seen[stream])} steps; pick another seed"
    assert [t.shape[1] for t in seen[stream][1:]] == [1] * (STEPS - 1), "each step after the prompt runs one token"
    return model, inputs, tower, seen[stream][0].shape[1]


def assert_same_runs(ours, ref):
    ids, seen = ours
    ref_ids, ref_seen = ref
    assert torch.equal(ids, ref_ids)
    for name in seen:
        assert len(seen[name]) == len(ref_seen[name]) == STEPS, name
        for step, (a, b) in enumerate(zip(seen[name], ref_seen[name])):
            assert torch.equal(a, b), f"{name} differs from the reference at step {step}"


def counting_hook(edit, dim=1):
    """A hook calling edit(t, step, offset): step counts this hook point's calls, offset sums the earlier calls'
    lengths along `dim` (the tokens: the absolute position of t's first token)."""
    calls = []

    def hook(t, hook):
        out = edit(t, len(calls), sum(calls))
        calls.append(t.shape[dim])
        return out

    return hook


# ------------------------------------------------------------------------------------------ replace_positions
@pytest.mark.parametrize("case", list(BUILDERS))
def test_replace_positions_prefill_only_edits_only_the_prompt(built, case):
    model, inputs, tower, prompt_len = clean_run(built, case)
    name, record = f"{tower}.blocks.0.hook_resid_post", f"{tower}.blocks.1.hook_resid_post"
    value = torch.randn(model.tower(tower).cfg.d_model, generator=torch.Generator().manual_seed(0))
    per_example = [[0], [-1]]  # the first and the last prompt token; -1 is the newest token at every step

    def by_hand(t, step, offset):
        if step > 0:
            return t
        t = t.clone()
        t[0, 0], t[1, prompt_len - 1] = value, value
        return t

    hook = interventions.replace_positions(model, name, per_example, value, prefill_only=True)
    ours = generate(model, inputs, [hook], [name, record])
    ref = generate(model, inputs, [(name, counting_hook(by_hand))], [name, record])
    assert_same_runs(ours, ref)
    clean = generate(model, inputs, [], [name])[1][name]
    assert not torch.equal(ref[1][name][0], clean[0])  # the edit did something


@pytest.mark.parametrize("case", list(BUILDERS))
def test_replace_positions_at_generated_positions_edits_those_steps(built, case):
    """Absolute positions past the prompt are the tokens of later steps: prompt_len + 1 is step 2's token."""
    model, inputs, tower, prompt_len = clean_run(built, case)
    name, record = f"{tower}.blocks.0.hook_resid_post", f"{tower}.blocks.1.hook_resid_post"
    targets = [prompt_len - 1, prompt_len + 1]

    def by_hand(t, step, offset):
        where = [p - offset for p in targets if offset <= p < offset + t.shape[1]]
        t = t.clone()
        t[:, where] = 0.0
        return t

    hook = interventions.replace_positions(model, name, targets, 0.0)
    ours = generate(model, inputs, [hook], [name, record])
    ref = generate(model, inputs, [(name, counting_hook(by_hand))], [name, record])
    assert_same_runs(ours, ref)
    edited = [bool((t == 0).all(-1).any()) for t in ours[1][name]]
    assert edited == [True, False, True, False]


# ------------------------------------------------------------------------------------------ attention knockout
KNOCKOUTS = [(case, "attn") for case in BUILDERS] + [(case, "cross_attn") for case in BUILDERS if case in CROSS]


@pytest.mark.parametrize("case,attention", KNOCKOUTS)
def test_knockout_hits_absolute_positions_at_every_step(built, case, attention):
    model, inputs, tower, prompt_len = clean_run(built, case)
    layers = range(model.tower_info(tower).n_layers)
    if attention == "attn":
        # keys: the first and the last prompt token (real in every row; pads are on the left or in the middle);
        # queries: steps 1 and 3, and a prompt token when it keeps other keys to attend to
        keys = [0, prompt_len - 1]
        queries = [prompt_len, prompt_len + 2] + ([prompt_len - 1] if prompt_len >= 3 else [])
    else:  # keys: the first image / question / encoder tokens; the first query is always a prompt token
        keys, queries = [0, 1, 2], [0, prompt_len, prompt_len + 2]

    def by_hand(scores, step, offset):  # [B, H, T, S]: the queries at offset..offset+T-1
        blocked = torch.zeros_like(scores, dtype=torch.bool)
        for t in range(scores.shape[2]):
            if offset + t in queries:
                blocked[:, :, t, keys] = True
        return scores.masked_fill(blocked, float("-inf"))

    reference = [(f"{tower}.blocks.{layer}.{attention}.hook_attn_scores", counting_hook(by_hand, dim=2))
                 for layer in layers]
    pattern = f"{tower}.blocks.0.{attention}.hook_pattern"
    record = [pattern, f"{tower}.blocks.{layers[-1]}.hook_resid_post"]  # the last stream decides the logits
    hooks = interventions.attention_knockout(model, queries, keys, layers, tower=tower, attention=attention)
    ours = generate(model, inputs, hooks, record)
    ref = generate(model, inputs, reference, record)
    assert_same_runs(ours, ref)
    steps = ours[1][pattern]
    assert all(torch.all(steps[k][:, :, 0, keys] == 0) for k in (1, 3))  # steps 1 and 3: the query is blocked
    assert torch.all((steps[2][:, :, 0, keys] > 0).any(-1))  # step 2's query still reads them
