"""Symmetric token replacement (NOTICE's STR) on whole words, all at once, with the token count checked in context;
text pairs given whole (NOTICE's files) and their loader."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import corruption
from hooked_vlm.tiny import build_blip, build_llava, random_image


@pytest.fixture(scope="module")
def blip():
    return build_blip("vqa", seed=0, image_size=64, patch=16)[1]  # BERT wordpiece (uncased)


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=0, image_size=48, patch=8)[1]  # Llama byte-fallback BPE ("▁" pieces)


def corrupted_tokens(processor, text, replacements, **kw):
    tok = processor.tokenizer
    clean, corrupt = corruption.symmetric_token_replacement(tok, text, replacements, **kw)
    return tok.convert_ids_to_tokens(clean["input_ids"][0]), tok.convert_ids_to_tokens(corrupt["input_ids"][0])


def test_whole_words_only(blip):
    clean, corrupt = corrupted_tokens(blip, "the cat and the cats", {"cat": "dog"})
    assert clean == ["[CLS]", "the", "cat", "[UNK]", "the", "cats", "[SEP]"]
    assert corrupt == ["[CLS]", "the", "dog", "[UNK]", "the", "cats", "[SEP]"]  # "cats" untouched
    # "at" inside "cat" is no word of the text: refused, naming where it does occur
    with pytest.raises(ValueError, match=r"'at' does not occur as a whole word.*only inside other words: \['cat'\]"):
        corruption.symmetric_token_replacement(blip.tokenizer, "the cat", {"at": "on"})
    _, corrupt = corrupted_tokens(blip, "a cat at the table", {"at": "on"})
    assert corrupt == ["[CLS]", "a", "cat", "on", "the", "table", "[SEP]"]
    # a phrase is matched as a whole, and wins over a shorter key at the same place
    _, corrupt = corrupted_tokens(blip, "the red car and the red cat", {"red car": "blue dog", "red": "green"})
    assert corrupt == ["[CLS]", "the", "blue", "dog", "[UNK]", "the", "green", "cat", "[SEP]"]


def test_replacements_are_simultaneous(blip):
    _, corrupt = corrupted_tokens(blip, "the cat and the dog", {"cat": "dog", "dog": "car"})  # a chain
    assert corrupt == ["[CLS]", "the", "dog", "[UNK]", "the", "car", "[SEP]"]
    clean, corrupt = corrupted_tokens(blip, "a red car and a blue cat", {"red": "blue", "blue": "red"})  # a swap
    assert corrupt == ["[CLS]", "a", "blue", "car", "[UNK]", "a", "red", "cat", "[SEP]"]
    assert [c != k for c, k in zip(clean, corrupt)].count(True) == 2


def test_token_count_is_checked_and_both_tokenizations_named(blip, llava):
    with pytest.raises(ValueError, match=r"replacing 'car' \(1 tokens: \['car'\]\) by 'cars' \(2 tokens: \['car', "
                                         r"'##s'\]\).*tokenize to \[.*\] and \[.*'##s'\]"):
        corruption.symmetric_token_replacement(blip.tokenizer, "what color is the car", {"car": "cars"})
    # compensating replacements keep the total but shift the positions between them: still refused
    with pytest.raises(ValueError, match=r"replacing 'red car' \(2 tokens.*'dog' \(1 tokens"):
        corruption.symmetric_token_replacement(blip.tokenizer, "the red car and the cat",
                                               {"cat": "cars", "red car": "dog"})
    with pytest.raises(ValueError, match=r"replacing 'red' \(1 tokens: \['▁red'\]\) by 'blue' \(5 tokens"):
        corruption.symmetric_token_replacement(llava, "USER: <image>\nis it red? ASSISTANT:", {"red": "blue"},
                                               images=random_image())
    with pytest.raises(ValueError, match="does not occur"):
        corruption.symmetric_token_replacement(blip.tokenizer, "what color is the car", {"bus": "car"})
    with pytest.raises(TypeError, match="pass the processor"):
        corruption.symmetric_token_replacement(blip.tokenizer, "the car", {"car": "dog"}, images=random_image())


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_with_processor_and_images(family, blip, llava):
    processor = blip if family == "blip" else llava
    text = "is the car red or blue?" if family == "blip" else "USER: <image>\nis the car blue or red? ASSISTANT:"
    # llava's tiny tokenizer spells "blue" and "gray" in 5 pieces each ("▁" + letters) and "car" / "man" in one
    replacements = {"car": "man", "blue": "red", "red": "blue"} if family == "blip" else {"car": "man", "blue": "gray"}
    clean, corrupt = corruption.symmetric_token_replacement(processor, text, replacements, images=random_image())
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    assert torch.equal(clean["pixel_values"], corrupt["pixel_values"])
    changed = (clean["input_ids"] != corrupt["input_ids"]).sum().item()
    assert changed == (3 if family == "blip" else 5)  # llava: "car", then b l u e -> g r a y


def test_text_pair_inputs_checks_counts_and_names_the_words(blip, llava):
    clean, corrupt = corruption.text_pair_inputs(blip, "is the cat red?", "is the dog blue?", images=random_image())
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    with pytest.raises(ValueError, match=r"'red' \(1\) -> 'blue' \(5 tokens\)"):
        corruption.text_pair_inputs(llava.tokenizer, "is it red?", "is it blue?")


def test_text_pairs_load_from_a_notice_file(tmp_path, blip):
    for name, seed in (("a.png", 0), ("b.png", 1)):
        random_image(seed=seed).save(tmp_path / name)
    rows = ["clean_image_path,correct_answer,clean_prompt,incorrect_answer,corrupt_image_path,generated_text,"
            "correct_first,corrupt_prompt",
            "a.png,happy,Is this person feeling happy or sad?,sad,b.png,happy,True,Is this person feeling "
            "calm or grumpy?",
            "b.png,sad,Is this person feeling happy or sad?,happy,a.png,sad,False,"]  # no corrupted prompt
    (tmp_path / "BLIP_final_facial_expressions.csv").write_text("\n".join(rows) + "\n")
    pairs = corruption.load_text_pairs(tmp_path / "BLIP_final_facial_expressions.csv")
    assert len(pairs) == 1 and pairs[0].corrupt == "Is this person feeling calm or grumpy?"
    assert pairs[0].answer == "happy" and pairs[0].wrong_answer == "sad" and pairs[0].id == "0"
    clean, corrupt = pairs[0].inputs(blip)
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
