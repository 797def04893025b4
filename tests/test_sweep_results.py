"""Results over a data set, per example with their metadata, aligned by role: prompts of different lengths put the
same token at different positions, so a mean over absolute positions mixes roles; `SweepResults.aligned(anchor)`
lines them up (the last token, the image's first token, a token of interest per example)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.tiny import build_blip, build_llava, random_image


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["USER: <image>\nwhat? ASSISTANT:", "USER: <image>\nwhat colour is it today? ASSISTANT:"]
    examples = []
    for i, prompt in enumerate(prompts):
        clean, corrupt = (processor(images=random_image(seed=2 * i + k), text=prompt, return_tensors="pt")
                          for k in range(2))
        examples.append((clean, corrupt, metrics.logit_diff(7, 9)))
    assert examples[0][0]["input_ids"].shape[1] < examples[1][0]["input_ids"].shape[1]
    return model, examples


def test_results_keep_each_example_and_align_by_role(llava):
    model, examples = llava
    results = patching.sweep_results(patching.patch_resid, model, examples, tower="lm", hook="resid_post",
                                     ids=["q1", "q2"], answers=["red", "blue"], progress=False)
    singles = [patching.patch_resid(model, *e, tower="lm", hook="resid_post", progress=False) for e in examples]
    assert len(results) == 2 and results.ids == ["q1", "q2"] and results.answers == ["red", "blue"]
    for value, single, (clean, _, _) in zip(results.values, singles, examples):
        assert torch.equal(value, single)
    assert results.corruption == [{"kind": "inputs"}] * 2
    assert results.settings == {"tower": "lm", "hook": "resid_post"} and results.sweep == "patch_resid"
    assert [len(t) for t in results.tokens] == [e[0]["input_ids"].shape[1] for e in examples]
    # the tensor sweep_dataset returns: padded at the end, positions not aligned
    stacked = patching.sweep_dataset(patching.patch_resid, model, examples, tower="lm", hook="resid_post",
                                     progress=False)
    torch.testing.assert_close(results.stacked(), stacked, equal_nan=True, atol=0, rtol=0)
    with pytest.raises(ValueError, match="anchor"):
        results.mean()

    lasts = [int(model.positions(**e[0]).last[0]) for e in examples]
    aligned = results.aligned("last")
    zero = aligned.offsets.tolist().index(0)
    for i, single in enumerate(singles):  # offset 0 is each example's last token
        assert torch.equal(aligned.values[i, :, zero], single[:, lasts[i]])
        assert torch.equal(aligned.values[i, :, zero - 1], single[:, lasts[i] - 1])
    assert aligned.offsets.max() == 0 and aligned.offsets.min() == -max(lasts)
    assert aligned.labels()[zero] == "last" and aligned.labels()[zero - 2] == "last-2"
    assert aligned.count()[zero] == 2 and aligned.count()[0] == 1  # only the longer prompt reaches that far back
    torch.testing.assert_close(results.mean("last"), aligned.values.nanmean(0), equal_nan=True)
    near = results.aligned("last", window=(-3, 0))
    assert near.offsets.tolist() == [-3, -2, -1, 0] and not near.values.isnan().any()

    # the image's first token, and a token of interest given per example
    starts = [model.positions(**e[0]).image[0][0].start for e in examples]
    image = results.aligned("image_start")
    k = image.offsets.tolist().index(0)
    assert all(torch.equal(image.values[i, :, k], singles[i][:, starts[i]]) for i in range(2))
    interest = results.aligned([lasts[0] - 1, lasts[1] - 3])
    k = interest.offsets.tolist().index(0)
    assert torch.equal(interest.values[1, :, k], singles[1][:, lasts[1] - 3])
    with pytest.raises(ValueError, match="one per example"):
        results.aligned([1, 2, 3])
    with pytest.raises(ValueError, match="anchor must be"):
        results.aligned("middle")


def test_results_of_heads_and_groups_have_no_positions_to_align(llava):
    model, examples = llava
    heads = patching.sweep_results(patching.patch_heads, model, examples, tower="lm", progress=False)
    assert heads.cell_positions == [None, None]
    torch.testing.assert_close(heads.mean(), torch.stack(heads.values).mean(0))
    with pytest.raises(ValueError, match="no axis of positions"):
        heads.aligned("last")
    groups = patching.sweep_results(patching.patch_resid, model, examples, tower="lm", groups=["image", "last"],
                                    progress=False)
    assert groups.mean().shape == (model.tower_info("lm").n_layers, 2)  # groups line up by construction


def test_results_record_the_corruption_of_a_trace():
    hf, processor = build_blip("vqa", seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    examples = []
    for i, question in enumerate(["what color is the car on the street", "how many cats"]):
        inputs = processor(images=random_image(seed=i), text=question, return_tensors="pt")
        with torch.no_grad():
            examples.append((inputs, model(**inputs)[:, -1].argmax(-1)))
    c = corruption.multiplicative(1.0, 5.0, redraw="forward", seed=3)
    results = patching.sweep_results(patching.causal_trace, model, examples, tower="text_encoder", corrupt=c,
                                     samples=2, progress=False)
    assert results.corruption == [{**c.describe(), "samples": 2}] * 2
    assert results.settings["corrupt"] == c.describe()
    legacy = patching.sweep_results(patching.causal_trace, model, examples, tower="text_encoder", noise=2.0,
                                    progress=False)
    assert legacy.corruption[0]["kind"] == "gaussian" and legacy.corruption[0]["scale"] == 2.0
    last = legacy.aligned("last")
    assert last.values.shape == (2, model.tower_info("text_encoder").n_layers, len(last.offsets))
    decoder = patching.sweep_results(patching.causal_trace, model, examples, tower="text_decoder", progress=False)
    assert decoder.tokens == [None, None] and decoder.mean().shape == (model.tower_info("text_decoder").n_layers, 1)
