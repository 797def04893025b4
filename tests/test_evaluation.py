"""Generation- and first-token evaluation: left-padded batches give each example what it gets alone, with and
without per-batch interventions; the word matching is Neo et al.'s."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, evaluation, interventions, spatial
from hooked_vlm.tiny import build_llava, make_llama_tokenizer, random_image

QUESTIONS = ["Describe this image.", "hi", "is there a car on the table in this picture?"]
CLASSES = ["car", "table", "couch"]


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=1, image_size=32, patch=8)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=i) for i in range(3)]
    return model, images


def one_by_one(model, images, prompts, edit, **kw):
    """Each example in a batch of its own, its edit built for its index."""
    out = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        single = None if edit is None else (lambda positions, rows, i=i: edit(positions, [i]))
        out.append(evaluation.generate(model, [image], [prompt], edit=single, **kw).tokens[0])
    return out


def edits(model):
    mean = torch.linspace(-1, 1, model.cfg.lm.d_model)
    patches = torch.zeros(4, 4, dtype=torch.bool)
    patches[1:3, 2] = True
    objects = [{b: spatial.dilate(patches, b) for b in (0, 1, 2)}] * 3
    return {
        "none": None,
        "mean ablation": evaluation.replace_image_tokens(model, [patches, [0, 5, 15], torch.tensor([3])], mean),
        "zero ablation, every step": evaluation.replace_image_tokens(model, [[0], [1, 2], [4]], 0.0,
                                                                     prefill_only=False),
        "knockout": evaluation.knockout(model, objects, "object+1->last", range(2)),
    }


@pytest.mark.parametrize("name", ["none", "mean ablation", "zero ablation, every step", "knockout"])
def test_left_padded_batches_generate_what_each_example_gets_alone(llava, name):
    model, images = llava
    edit = edits(model)[name]
    prompts = [evaluation.prompt(model, q) for q in QUESTIONS]
    batched = evaluation.generate(model, images, prompts, max_new_tokens=6, batch_size=3, edit=edit)
    for got, alone in zip(batched.tokens, one_by_one(model, images, prompts, edit, max_new_tokens=6)):
        assert torch.equal(got, alone)
    in_twos = evaluation.generate(model, images, prompts, max_new_tokens=6, batch_size=2, edit=edit)
    assert in_twos.texts == batched.texts
    if edit is not None:  # the edit changes something (the comparison is not between two unedited runs)
        plain = evaluation.generate(model, images, prompts, max_new_tokens=6, batch_size=3)
        assert any(not torch.equal(a, b) for a, b in zip(plain.tokens, batched.tokens))


def test_mean_ablation_edits_the_prompt_only_at_the_example_positions(llava):
    model, images = llava
    mean = torch.full((model.cfg.lm.d_model,), 0.5)
    edit = evaluation.replace_image_tokens(model, [[0, 1], [2], [15]], mean)
    seen = []
    record = ("lm.hook_inputs_embeds", lambda t, hook: seen.append(t.clone()))
    prompts = [evaluation.prompt(model, q) for q in QUESTIONS]
    evaluation.generate(model, images, prompts, max_new_tokens=3, batch_size=3,
                        edit=evaluation.combine(edit, lambda positions, rows: [record]))
    first = seen[0]
    positions = next(evaluation.batches(model, images, prompts, 3))[1]
    spans = [s[0] for s in model.positions(**positions).image]
    for b, idx in enumerate([[0, 1], [2], [15]]):
        where = [spans[b].start + i for i in idx]
        assert (first[b, where] == 0.5).all()
        others = [p for p in range(spans[b].start, spans[b].stop) if p not in where]
        assert not (first[b, others] == 0.5).all(-1).any()
    assert all(not (t == 0.5).all(-1).any() for t in seen[1:])  # generation steps are not edited


def test_first_token_batched_equals_alone_and_reads_the_last_token(llava):
    model, images = llava
    batched = evaluation.first_token(model, images, QUESTIONS, CLASSES, batch_size=3, keep_probs=True)
    for i in range(3):
        alone = evaluation.first_token(model, [images[i]], [QUESTIONS[i]], [CLASSES[i]])
        assert alone.token[0] == batched.token[i] and alone.text[0] == batched.text[i]
        torch.testing.assert_close(alone.p_class[0], batched.p_class[i], atol=1e-5, rtol=0)
    inputs = next(evaluation.batches(model, images[:1], [evaluation.prompt(model, QUESTIONS[0], " It is a")], 1))[1]
    assert model.processor.tokenizer.decode(inputs["input_ids"][0]).endswith("ASSISTANT: It is a")
    with torch.no_grad():
        probs = model(**inputs)[0, -1].softmax(-1)
    torch.testing.assert_close(batched.probs[0], probs, atol=1e-5, rtol=0)
    assert batched.p_of(batched.token)[0] == batched.p_token[0]


def test_knockout_edit_equals_attention_knockout_by_hand(llava):
    model, images = llava
    patches = torch.zeros(4, 4, dtype=torch.bool)
    patches[0, 0] = True
    objects = [{b: spatial.dilate(patches, b) for b in (0, 1, 2)}] * 3
    edit = evaluation.knockout(model, objects, "object->last", [1])
    prompts = [evaluation.prompt(model, q, " It is a") for q in QUESTIONS]
    rows, inputs = next(evaluation.batches(model, images, prompts, 3))
    positions = model.positions(**inputs)
    hooks = interventions.attention_knockout(model, [[int(p)] for p in positions.last],
                                             [[s[0].start] for s in positions.image], [1])
    with torch.no_grad():
        ours, theirs = (model.run_with_hooks(**inputs, fwd_hooks=h) for h in (edit(positions, rows), hooks))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_word_matching_follows_the_authors():
    tok = make_llama_tokenizer()
    assert evaluation.mentions("two dogs on a couch", "dog") and evaluation.mentions("a hotdog", "dog")
    assert not evaluation.mentions("Dog on a couch", "dog")  # case-sensitive
    assert not evaluation.mentions("three mice", "mouse")  # no plural forms
    assert evaluation.says_yes("Yes, there is.") and evaluation.says_yes("I see his eyes")
    assert not evaluation.says_yes("No.")
    assert evaluation.first_token_correct(tok, "car", "car") and evaluation.first_token_correct(tok, " Car ", "car")
    assert evaluation.first_token_correct(tok, "ca", "car")  # a prefix of the first sub-word counts
    assert not evaluation.first_token_correct(tok, "cars", "car")
    assert evaluation.first_token_correct(tok, " ", "car")  # an empty token "is a prefix" in their code
    assert not evaluation.first_token_correct(tok, " ", "car", empty_counts=False)
    assert tok.convert_ids_to_tokens(evaluation.class_token(tok, "Car")) == "▁car"


def test_identification_reads_generations(llava, monkeypatch):
    model, images = llava
    calls = []

    def fake(model_, images_, prompts, *, max_new_tokens, batch_size, edit):
        calls.append((prompts, max_new_tokens))
        texts = ["a red car and a table", "a Couch", "nothing"] if max_new_tokens == 200 else ["Yes", "no", "eyes"]
        return evaluation.Generated(texts, [torch.empty(0)] * 3)

    monkeypatch.setattr(evaluation, "generate", fake)
    result = evaluation.identification(model, images, CLASSES)
    assert result.generative.tolist() == [True, False, False] and result.polling.tolist() == [True, False, True]
    assert calls[0][0][0] == "USER: <image>\nDescribe this image. ASSISTANT:" and calls[0][1] == 200
    assert calls[1][0][2] == "USER: <image>\nIs there a couch in this image? ASSISTANT:" and calls[1][1] == 10
