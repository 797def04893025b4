"""NOTICE's pair CSVs (wrudman/NOTICE preprocessing notebooks: BLIP_final_{task}.csv, LLAVA_final_{task}.csv) read
into lazily loaded Examples; the files below are written with the columns those notebooks write, in their order."""

from __future__ import annotations

import csv

import pytest

from hooked_vlm.data import Example, ImageFile, notice_pairs
from hooked_vlm.tiny import random_image


def write(path, columns, rows):
    with path.open("w", newline="") as f:  # as pandas' to_csv(index=False): a header, quoted where needed
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


# 1_preprocessing_mit_states (correct_answer, noun, clean_image_path, clean_prompt, incorrect_answer, state,
# corrupt_image_path, corrupt_prompt), 2_evaluate_BLIP (generated_text), 3_select_final_samples (correct_first)
MIT = ["correct_answer", "noun", "clean_image_path", "clean_prompt", "incorrect_answer", "state",
       "corrupt_image_path", "corrupt_prompt", "generated_text", "correct_first"]
# 1_preprocessing_facial_expressions, 2_evaluate_BLIP, 3_select_final_samples_facial_expressions
FER = ["clean_image_path", "correct_answer", "clean_prompt", "incorrect_answer", "corrupt_image_path",
       "generated_text", "correct_first", "corrupt_prompt"]
# DeepMind's svo_probes.csv, then 1_preprocessing_svo_probes (clean_prompt, correct_answer, url -> clean_image_path,
# corrupt_image_path, clean_prompt_gpt), 2_evaluate_BLIP (generated_text), 3_select (corrupt_prompt)
SVO = ["sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg", "pos_url", "neg_url",
       "pos_image_id", "neg_image_id", "clean_prompt", "correct_answer", "clean_image_path", "corrupt_image_path",
       "clean_prompt_gpt", "generated_text", "corrupt_prompt"]


def test_mit_states(tmp_path):
    (tmp_path / "MIT_states" / "images" / "ancient bike").mkdir(parents=True)
    random_image().save(tmp_path / "MIT_states" / "images" / "ancient bike" / "1.jpg")
    (tmp_path / "run").mkdir()  # where the authors ran the notebooks: the paths are relative to it
    path = write(tmp_path / "run" / "BLIP_final_mit_states.csv", MIT, [
        ["ancient", "bike", "../MIT_states/images/ancient bike/1.jpg", "Is this bike ancient or diced?", "diced",
         "color", "../MIT_states/images/diced bike/7.jpg", "Is this bike molten or thin?", "ancient", "True"],
        ["thin", "bike", "../MIT_states/images/thin bike/2.jpg", "Is this bike mossy or thin?", "mossy", "shape",
         "../MIT_states/images/mossy bike/3.jpg", "Is this bike brushed or wet?", "thin", "False"],
    ])
    examples = notice_pairs(path)  # image paths relative to the CSV's folder, as the notebooks ran
    assert len(examples) == 2 and all(isinstance(e, Example) for e in examples)
    e = examples[0]
    assert (e.id, e.question, e.answer, e.wrong_answer) == ("0", "Is this bike ancient or diced?", "ancient", "diced")
    assert e.corrupt_question == "Is this bike molten or thin?"
    assert e.image == ImageFile(tmp_path / "run" / "../MIT_states/images/ancient bike/1.jpg")
    assert e.image.load().size == random_image().size
    assert e.corrupt_image.path.name == "7.jpg"  # not opened: the file does not exist, and loading is lazy
    with pytest.raises(FileNotFoundError, match="does not exist"):
        e.corrupt_image.load()
    assert e.meta == {"noun": "bike", "state": "color", "generated_text": "ancient", "correct_first": "True",
                      "task": "mit_states"}
    other = notice_pairs(path, image_root=tmp_path / "elsewhere")
    assert other[1].image.path == tmp_path / "elsewhere" / "../MIT_states/images/thin bike/2.jpg"


def test_facial_expressions_and_the_llava_column_names(tmp_path):
    row = ["images/train/happy/1.jpg", "happy", "Is this person feeling happy or sad?", "sad",
           "images/train/sad/9.jpg", "happy", "True", "Is this person feeling grumpy or content?"]
    blip = notice_pairs(write(tmp_path / "BLIP_final_facial_expressions.csv", FER, [row]))
    # LLAVA_patching.py reads correct_image_path / incorrect_image_path for these tasks
    llava_cols = [{"clean_image_path": "correct_image_path", "corrupt_image_path": "incorrect_image_path"}.get(c, c)
                  for c in FER]
    llava = notice_pairs(write(tmp_path / "LLAVA_final_facial_expressions.csv", llava_cols, [row]))
    for e in (blip[0], llava[0]):
        assert e.image.path == tmp_path / "images/train/happy/1.jpg"
        assert e.corrupt_image.path == tmp_path / "images/train/sad/9.jpg"
        assert e.wrong_answer == "sad" and e.corrupt_question == "Is this person feeling grumpy or content?"
        assert e.meta["task"] == "facial_expressions"


def test_svo_probes_urls_and_derived_incorrect_answers(tmp_path):
    url_pos, url_neg = "https://example.org/a/man%20horse.jpg", "https://example.org/b/woman.jpg"
    rows = [  # subject negative, verb negative, object negative (with the list form of a triplet cell)
        ["a man riding a horse", "man,ride,horse", "woman,ride,horse", "True", "False", "False", url_pos, url_neg,
         "1", "2", "Is the man or the woman riding the horse?", "man", url_pos, url_neg, "gpt", "man",
         "Is the boy or the girl riding the horse?"],
        ["a dog runs", "dog,run,grass", "dog,sit,grass", "False", "True", "False", url_pos, url_neg, "3", "4",
         "Is the dog running or sitting?", "run", url_pos, url_neg, "gpt", "run", "NO PROMPT MADE"],
        ["a cat on a couch", "['cat,lie,couch', 'cat,sleep,couch']", "['cat,lie,floor']", "False", "False", "True",
         url_pos, url_neg, "5", "6", "Is the cat on the couch or the floor?", "couch", url_pos, url_neg, "gpt",
         "couch", "Is the cat on the car or the table?"],
    ]
    path = write(tmp_path / "BLIP_final_svo_probes.csv", SVO, rows)
    examples = notice_pairs(path, image_root=tmp_path / "svo")
    assert [e.wrong_answer for e in examples] == ["woman", "sit", "floor"]  # the negated element, as the authors
    assert examples[0].image.path == tmp_path / "svo" / "man horse.jpg"  # a URL names a file under image_root
    assert examples[0].corrupt_image.path == tmp_path / "svo" / "woman.jpg"
    assert examples[1].corrupt_question is None  # the notebook's marker of a failed corruption
    assert examples[2].meta["pos_triplet"] == "['cat,lie,couch', 'cat,sleep,couch']"
    assert {e.meta["task"] for e in examples} == {"svo_probes"}
    resolved = notice_pairs(path, resolve=lambda url: tmp_path / url.rsplit("/", 2)[1])
    assert resolved[0].image.path == tmp_path / "a"
    # get_incorrect_answers: where correct_answer differs from correct_answer_MC, the "incorrect" answer is the
    # correct one; reproduced, with a warning that the contrast is 0 for those rows
    mc = write(tmp_path / "mc.csv", SVO + ["correct_answer_MC"], [rows[0] + ["woman"], rows[1] + ["run"]])
    with pytest.warns(UserWarning, match="1 of 2 rows have incorrect_answer equal to correct_answer"):
        assert [e.wrong_answer for e in notice_pairs(mc)] == ["man", "sit"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NOTICE CSV"):
        notice_pairs(tmp_path / "missing.csv")
    bad = write(tmp_path / "bad.csv", ["prompt", "answer"], [["q", "a"]])
    with pytest.raises(ValueError, match=r"lacks the columns \['clean_prompt', 'correct_answer', 'clean_image_path'\]"):
        notice_pairs(bad)
    no_wrong = write(tmp_path / "no_wrong.csv", ["clean_prompt", "correct_answer", "clean_image_path"],
                     [["q", "a", "x"]])
    with pytest.raises(ValueError, match="no incorrect_answer column"):
        notice_pairs(no_wrong)
