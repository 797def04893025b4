"""The tokenizer conveniences (`model.tokenizer`, `to_tokens`, `to_str_tokens`, `to_string`, `to_single_token`):
ids equal to the processor's, one label per position of the LM's sequence with the image positions labelled by their
image token (checked against `model.positions`, which the forward uses), round trips, and the errors."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
LLAVA_TEXT = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
IB_TEXT = ["what is in the picture of the street?", "a cat"]


@pytest.fixture(scope="module", params=["default", "full"])
def llava(request):
    hf, processor = build_llava(seed=5, vision_feature_select_strategy=request.param)
    return HookedVLM.from_hf(hf, processor=processor), processor


@pytest.fixture(scope="module", params=["llama", "t5"])
def instructblip(request):
    hf, processor = build_instructblip(request.param, seed=3)
    return HookedVLM.from_hf(hf, processor=processor), processor


@pytest.fixture(scope="module", params=["caption", "vqa"])
def blip(request):
    hf, processor = build_blip(request.param, seed=3)
    return HookedVLM.from_hf(hf, processor=processor), processor


def _lm_length(model, inputs):
    """The length of the sequence the LM's first block reads."""
    name = f"{model.prompt_tower}.blocks.0.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=name)
    return cache[name].shape[1]


def _image_labels(model, inputs, labels_of_span):
    """Per row, {position: label} from the model's own positions (the spans the forward writes the image into)."""
    positions = model.positions(**inputs)
    expected = []
    for row in positions.image:
        expected.append({span.start + k: labels_of_span(i, span, k) for i, span in enumerate(row)
                         for k in range(span.stop - span.start)})
    return expected


def _check_labels(str_tokens, expected):
    for labels, image in zip(str_tokens, expected):
        assert {k: labels[k] for k in image} == image
        assert not [k for k, label in enumerate(labels) if label.startswith("<image") and k not in image]


# ------------------------------------------------------------------------------------------ LLaVA
def test_llava_tokens_equal_the_processor_and_labels_line_up(llava):
    model, processor = llava
    inputs = processor(images=IMAGES, text=LLAVA_TEXT, padding=True, return_tensors="pt")  # left-padded
    assert torch.equal(model.to_tokens(LLAVA_TEXT), inputs["input_ids"])
    str_tokens = model.to_str_tokens(inputs)
    assert [len(row) for row in str_tokens] == [_lm_length(model, inputs)] * 2

    def label(i, span, k):
        r, c = int(span.rows[k]), int(span.cols[k])
        return f"<image {i}:cls>" if r < 0 else f"<image {i}:{r},{c}>"

    _check_labels(str_tokens, _image_labels(model, inputs, label))
    # the text around the image keeps the tokenizer's pieces, each token decoded alone
    ids = inputs["input_ids"][1]
    text = [k for k in range(len(ids)) if ids[k] != model.cfg.image_token_id]
    assert [str_tokens[1][k] for k in text] == [processor.tokenizer.decode([int(ids[k])]) for k in text]
    # one prompt alone: a flat list, the same labels as its row without the pads
    alone = model.to_str_tokens(LLAVA_TEXT[1])
    assert alone == str_tokens[1][-len(alone):]
    assert model.to_str_tokens(inputs["input_ids"][1]) == str_tokens[1]


def test_llava_round_trip(llava):
    model, processor = llava
    text = "USER: <image>\nthere ASSISTANT:"
    ids = model.to_tokens(text, prepend_bos=False)
    assert ids.shape[1] > model.cfg.tokens_per_image  # the placeholder was expanded
    assert model.to_string(ids[0]) == text  # and is written back once
    assert model.to_string(model.to_tokens(text)) == ["<s> " + text]
    two = "USER: <image><image>\nthere ASSISTANT:"  # two images side by side: two placeholders back
    assert model.to_string(model.to_tokens(two, prepend_bos=False)[0]) == two
    ids = model.to_tokens(LLAVA_TEXT)
    assert torch.equal(model.to_tokens(model.to_string(ids[1]), prepend_bos=False), ids[1:])
    expanded = text.replace("<image>", "<image>" * model.cfg.tokens_per_image)  # the tokenizer's own decode
    assert processor.tokenizer.decode(model.to_tokens(text, prepend_bos=False)[0]) == expanded


def test_to_single_token(llava):
    model, processor = llava
    tokenizer = processor.tokenizer
    assert model.to_single_token("there") == tokenizer.convert_tokens_to_ids("▁there")
    assert model.to_single_token("<image>") == model.cfg.image_token_id  # not expanded: one token
    for multi in ["hi", "what is", "there there"]:
        with pytest.raises(ValueError, match="not a single token"):
            model.to_single_token(multi)


# ------------------------------------------------------------------------------------------ InstructBLIP
def test_instructblip_tokens_equal_the_processor_and_labels_line_up(instructblip):
    model, processor = instructblip
    inputs = processor(images=IMAGES, text=IB_TEXT, padding=True, return_tensors="pt")
    assert torch.equal(model.to_tokens(IB_TEXT), inputs["input_ids"])
    str_tokens = model.to_str_tokens(inputs)
    assert [len(row) for row in str_tokens] == [_lm_length(model, inputs)] * 2
    _check_labels(str_tokens, _image_labels(model, inputs, lambda i, span, k: f"<image {i}:query {k}>"))
    assert model.to_str_tokens(IB_TEXT) == [model.to_str_tokens(t) for t in IB_TEXT]  # each alone, unpadded
    # round trip: the placeholders in front are the processor's, not the text's
    assert model.to_string(inputs["input_ids"][0]) == processor.tokenizer.decode(
        processor.tokenizer(IB_TEXT[0])["input_ids"], clean_up_tokenization_spaces=False)
    ids = model.to_tokens(IB_TEXT[1])
    assert torch.equal(model.to_tokens(model.to_string(ids[0]), prepend_bos=False), ids)


# ------------------------------------------------------------------------------------------ BLIP
def test_blip_tokens_equal_the_processor(blip):
    model, processor = blip
    text = ["how many dogs are in the photo", "what color"]
    inputs = processor(images=IMAGES, text=text, padding=True, return_tensors="pt")
    assert torch.equal(model.to_tokens(text), inputs["input_ids"])
    str_tokens = model.to_str_tokens(inputs)
    assert str_tokens[1] == processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][1])
    assert len(str_tokens[0]) == inputs["input_ids"].shape[1]
    assert model.to_string(model.to_tokens("how many dogs", prepend_bos=False)[0]) == "how many dogs"
    assert model.to_string(model.to_tokens("how many dogs")[0]) == "[CLS] how many dogs [SEP]"


def test_truncation_to_learned_positions(blip):
    model, _ = blip
    n_ctx = model.token_layout().n_ctx
    long = " ".join(["dogs"] * (n_ctx + 10))
    assert model.to_tokens(long).shape == (1, n_ctx)
    assert model.to_tokens(long, truncate=False).shape == (1, n_ctx + 12)  # [CLS], [SEP]


# ------------------------------------------------------------------------------------------ shared
def test_inputs_of_every_form(llava):
    model, processor = llava
    ids = model.to_tokens(LLAVA_TEXT[1])
    labels = model.to_str_tokens(ids)
    assert model.to_str_tokens(ids[0]) == model.to_str_tokens(ids[0].tolist()) == model.to_str_tokens(ids.numpy())
    assert model.to_str_tokens(int(ids[0, 0])) == labels[:1] == ["<s>"]
    assert model.to_string(int(ids[0, -1])) == labels[-1]
    assert model.to_string(ids) == [model.to_string(ids[0])]
    assert torch.equal(model.to_tokens({"input_ids": ids}), ids)
    assert model.to_tokens(LLAVA_TEXT, padding_side="right")[1, -1] == processor.tokenizer.pad_token_id


@pytest.mark.no_typecheck  # what a user sees: the library's message, not jaxtyping's
def test_bad_inputs_are_named(llava):
    model, _ = llava
    with pytest.raises(TypeError, match="to_tokens takes a string"):
        model.to_tokens(3)
    with pytest.raises(TypeError, match="integer token ids"):
        model.to_string(torch.ones(3))
    with pytest.raises(ValueError, match="padding_side"):
        model.to_tokens("x", padding_side="middle")


def test_tokenizer_is_the_processors_and_its_absence_is_explained():
    hf, processor = build_blip("caption", seed=0)
    model = HookedVLM.from_hf(hf, processor=processor)
    assert model.tokenizer is processor.tokenizer
    model.processor = None
    with pytest.raises(ValueError, match=r"no processor.*model\.processor = transformers\.AutoProcessor"):
        model.tokenizer
    with pytest.raises(ValueError, match="no processor"):
        model.to_tokens("a dog")
