"""The language-model adapter shared by LLaVA and InstructBLIP (decoder-only and encoder-decoder), the one image-span
algorithm, and `model.positions(**inputs)`: a pure function of the inputs that labels every cache."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.components.masks import generation_positions
from hooked_vlm.models.language_model import (DecoderOnlyLM, EncoderDecoderLM, LanguageModel, LMPrompt,
                                              language_model)
from hooked_vlm.positions import Positions, image_spans
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]


def _llava():
    hf, processor = build_llava(seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    # A: two adjacent images in one prompt (one run of <image> tokens) and a text-only prompt, left-padded
    a = processor(images=IMAGES, text=["USER: <image><image>\ncompare them ASSISTANT:", "USER: hello ASSISTANT:"],
                  padding=True, return_tensors="pt")
    # B: one image per prompt, another length
    b = processor(images=IMAGES, text=["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi"
                                       " ASSISTANT:"], padding=True, return_tensors="pt")
    return model, a, b


def _instructblip(lm):
    hf, processor = build_instructblip(lm, seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    a = processor(images=IMAGES, text=["what is in the picture of the street?", "a cat"], padding=True,
                  return_tensors="pt")
    b = processor(images=IMAGES[::-1], text=["hi", "describe the picture in a few words please"], padding=True,
                  return_tensors="pt")
    if lm == "t5":
        a["decoder_input_ids"] = torch.tensor([[0, 5, 7], [0, 4, 6]])
    return model, a, b


def _blip():
    hf, processor = build_blip("vqa", seed=0)
    model = HookedVLM.from_hf(hf, processor=processor)
    a = processor(images=IMAGES, text=["what is this?", "is the cat on the left of the red car?"], padding=True,
                  return_tensors="pt")
    b = processor(images=IMAGES, text=["how many?", "why"], padding=True, return_tensors="pt")
    return model, a, b


BUILDERS = {"llava": _llava, "instructblip-llama": lambda: _instructblip("llama"),
            "instructblip-t5": lambda: _instructblip("t5"), "blip-vqa": _blip}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    return BUILDERS[request.param]()


def assert_same_positions(got: Positions, want: Positions) -> None:
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert [[(s.start, s.stop) for s in row] for row in got.image] == \
        [[(s.start, s.stop) for s in row] for row in want.image]
    for row_got, row_want in zip(got.image, want.image):
        for s, t in zip(row_got, row_want):
            assert torch.equal(s.rows, t.rows) and torch.equal(s.cols, t.cols)
    assert got.towers.keys() == want.towers.keys()
    for name in want.towers:
        assert_same_positions(got.towers[name], want.towers[name])


# ------------------------------------------------------------------------------------------ positions()
@torch.no_grad()
def test_positions_are_a_pure_function_of_the_inputs(family):
    """`positions(A)` is what a cached run of A labels, and stays so after runs of B (plain, cached, resumed)."""
    model, a, b = family
    first = model.positions(**a)
    assert first.input_ids.shape == a["input_ids"].shape
    _, cache_a = model.run_with_cache(**a, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert_same_positions(cache_a.positions, first)

    _, cache_b = model.run_with_cache(**b, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert_same_positions(cache_b.positions, model.positions(**b))
    assert cache_b.positions.input_ids.shape != first.input_ids.shape or \
        not torch.equal(cache_b.positions.input_ids, first.input_ids)  # B really is another prompt
    assert_same_positions(model.positions(**a), first)  # not the last run's
    assert_same_positions(cache_a.positions, first)  # a cache keeps its own label

    # a resumed run (the prompt tower started at block 1 from A's stream) is labelled with A's positions too
    tower = model.prompt_tower
    name = f"{tower}.blocks.1.hook_resid_pre"
    model(**b)
    with model.resume(tower, 1, cache_a[name]):
        _, resumed = model.run_with_cache(**a, names_filter=name)
    assert_same_positions(resumed.positions, first)


@pytest.mark.no_typecheck  # the library's own messages
def test_positions_check_their_inputs_as_forward_does(family):
    model, a, _ = family
    with pytest.raises(TypeError, match="did you mean 'attention_mask'"):
        model.positions(**{k: v for k, v in a.items() if k != "attention_mask"}, atention_mask=a["attention_mask"])
    with pytest.raises(ValueError, match="input_ids"):
        model.positions(**{**a, "input_ids": a["input_ids"][:, :0]})


# ------------------------------------------------------------------------------------------ image spans
def test_image_spans_cut_adjacent_images_by_count_with_patch_grid():
    """LLaVA: two images in one run of placeholders are two spans, each with its patch rows and columns."""
    is_image = torch.zeros(2, 12, dtype=torch.bool)
    is_image[0, 2:10] = True  # two 4-token images, adjacent
    is_image[1, 1:5] = True  # one image
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    spans = image_spans(is_image, 4, rows, cols)
    assert [[(s.start, s.stop) for s in row] for row in spans] == [[(2, 6), (6, 10)], [(1, 5)]]
    assert all(torch.equal(s.rows, rows) and torch.equal(s.cols, cols) for row in spans for s in row)
    assert spans[0][1].patches([1], [0]).tolist() == [8]


def test_image_spans_split_an_image_whose_placeholders_are_not_consecutive():
    """InstructBLIP: the queries fill the placeholders in order; a gap splits the image into consecutive runs."""
    is_image = torch.zeros(1, 10, dtype=torch.bool)
    is_image[0, [0, 1, 2, 5, 6]] = True  # five queries, a gap after the third
    spans = image_spans(is_image, 5)
    assert [(s.start, s.stop) for s in spans[0]] == [(0, 3), (5, 7)]
    assert all((s.rows == -1).all() and (s.cols == -1).all() for s in spans[0])
    assert [len(s.rows) for s in spans[0]] == [3, 2]
    assert image_spans(torch.zeros(1, 4, dtype=torch.bool), 5) == [[]]


def test_one_span_algorithm_gives_llava_and_instructblip_spans():
    model, a, _ = _llava()
    per_image, grid = model.cfg.tokens_per_image, model.cfg.vision.grid
    idx = torch.nonzero(a["input_ids"][0] == model.cfg.image_token_id).flatten()
    assert len(idx) == 2 * per_image and (idx.diff() == 1).all()  # one run of two images
    spans = model.positions(**a).image
    assert [(s.start, s.stop) for s in spans[0]] == [(int(idx[0]), int(idx[0]) + per_image),
                                                     (int(idx[0]) + per_image, int(idx[-1]) + 1)]
    assert spans[1] == []  # text only
    corner = spans[0][1].patches([grid - 1], [grid - 1])
    assert corner.tolist() == [spans[0][1].stop - 1]

    for lm in ("llama", "t5"):
        model, a, _ = _instructblip(lm)
        n = model.cfg.qformer.n_query
        for b, row in enumerate(model.positions(**a).image):
            idx = torch.nonzero(a["input_ids"][b] == model.cfg.image_token_id).flatten()
            assert [(s.start, s.stop) for s in row] == [(int(idx[0]), int(idx[0]) + n)]
            assert (row[0].rows == -1).all()


# ------------------------------------------------------------------------------------------ the adapter
def test_the_lm_kind_is_looked_up_from_the_config_types():
    llava, _, _ = _llava()
    llama, _, _ = _instructblip("llama")
    t5, _, _ = _instructblip("t5")
    assert type(llava.language) is DecoderOnlyLM and type(llama.language) is DecoderOnlyLM
    assert type(t5.language) is EncoderDecoderLM
    assert type(language_model(t5.cfg.lm_encoder, t5.cfg.lm_decoder, image_token_id=1)) is EncoderDecoderLM
    with pytest.raises(ValueError, match="no language model is built from"):
        language_model(t5.cfg.lm_encoder, image_token_id=1)
    for model in (llava, llama, t5):  # the towers sit on the model under the adapter's names: hook names unchanged
        assert model.tower_names[-len(model.language.tower_names):] == model.language.tower_names
        for name, tower in model.language.towers.items():
            assert getattr(model, name) is tower
            assert any(k.startswith(f"{name}.") for k in model.state_dict())
        assert (model.prompt_tower, model.output_tower) == (model.language.prompt_tower, model.language.output_tower)


@pytest.mark.parametrize("kind", ["llava", "instructblip-llama", "instructblip-t5"])
@torch.no_grad()
def test_both_lm_kinds_go_through_one_interface(kind):
    """The same calls, whatever the LM: check -> inputs_embeds -> logits is the model's forward, and the first
    decoding step predicts what the forward's last position predicts (padded batches: masks and positions matter)."""
    model, a, _ = BUILDERS[kind]()
    lm: LanguageModel = model.language
    inputs = {k: v for k, v in a.items() if k != "decoder_input_ids"}
    prompt = lm.check(inputs["input_ids"], inputs["attention_mask"])
    assert isinstance(prompt, LMPrompt)
    assert torch.equal(prompt.is_image, inputs["input_ids"] == model.cfg.image_token_id)
    if kind == "llava":
        image = model.image_features(inputs["pixel_values"])
    else:
        image = model.image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                   inputs["qformer_attention_mask"])
    embeds = lm.inputs_embeds(prompt, image)
    logits = lm.logits(prompt, embeds)
    torch.testing.assert_close(logits, model(**inputs), atol=0, rtol=0)

    step, ids, mask = lm.decoding(prompt, embeds)
    first = step(ids, mask if mask is not None else torch.ones_like(ids),
                 generation_positions(mask if mask is not None else torch.ones_like(ids)))
    torch.testing.assert_close(first, logits[:, -1], atol=1e-5, rtol=0)
    generated = lm.generate(prompt, embeds, 3, eos_token_id=[], pad_token_id=None)
    assert torch.equal(generated, model.generate(**inputs, max_new_tokens=3, eos_token_id=[], pad_token_id=None))


def test_each_kind_refuses_the_other_kinds_inputs():
    llama, a, _ = _instructblip("llama")
    t5, b, _ = _instructblip("t5")
    with pytest.raises(ValueError, match="decoder-only: append the tokens to input_ids"):
        llama.language.check(a["input_ids"], a["attention_mask"], decoder_input_ids=a["input_ids"][:, :1])
    with pytest.raises(ValueError, match="T5 has relative positions"):
        t5.language.check(b["input_ids"], b["attention_mask"], position_ids=torch.zeros_like(b["input_ids"]))
    right_padded = a["attention_mask"].clone()
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="right-padded"):
        llama.language.check(a["input_ids"], right_padded, generating=True)
    llama.language.check(a["input_ids"], right_padded)  # the forward takes it
    right_padded = b["attention_mask"].clone()
    right_padded[0, -1] = 0
    t5.language.check(b["input_ids"], right_padded, generating=True)  # an encoder reads any padding
