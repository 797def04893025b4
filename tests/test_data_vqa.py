"""The GQA / V-SEAM, POPE and COCO-QA loaders on small files written in exactly the released formats, with tiny PNGs:
fields land where they belong, images open only when asked, and malformed files fail with the file and row named."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from hooked_vlm import data


def png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path)


# Two questions as V-SEAM's Color.json holds them: a dict keyed by question id (fields trimmed, names and nesting kept)
COLOR = {
    "09143711": {"semantic": [{"operation": "select", "dependencies": [], "argument": "pants (715737)"},
                              {"operation": "query", "dependencies": [0], "argument": "color"}],
                 "entailed": ["09143709"], "equivalent": ["09143711"], "question": "Are the pants purple?",
                 "imageId": "2377940", "isBalanced": True, "groups": {"global": "color", "local": "10q-pants_color"},
                 "answer": "Yes", "semanticStr": "select: pants (715737)->query: color [0]",
                 "types": {"detailed": "directWhich", "semantic": "attr", "structural": "query"},
                 "fullAnswer": "The trousers are purple.", "involved_objects": ["pants"],
                 "object_positions": [{"x": 123, "y": 181, "w": 95, "h": 66}]},
    "10972110": {"question": "Is the vest gray?", "imageId": "2404766", "answer": "No",
                 "fullAnswer": "The vest is cream colored.", "types": {"semantic": "attr"}},
}
# ... and as its other subsets (Animal.json): a list whose questions carry "question_id"
ANIMAL = [
    {"question": "Is there a bird in this picture?", "imageId": "2337735", "answer": "Yes", "isBalanced": True,
     "fullAnswer": "Yes, there is a bird in this picture.", "relevant_objects": ["bird"], "question_id": "14903529",
     "object_positions": [{"x": 103, "y": 297, "w": 129, "h": 61}]},
    {"question": "Is there a cow in this picture?", "imageId": "2411302", "answer": "Yes", "question_id": "19625432"},
]


def test_gqa_dict_layout_with_vseam_folders(tmp_path):
    path = tmp_path / "Color" / "Color.json"
    path.parent.mkdir()
    path.write_text(json.dumps(COLOR, indent=4))
    png(path.parent / "clean" / "2377940.png")
    png(path.parent / "corrupt" / "09143711" / "09143711.png", (30, 30, 200))
    got = data.gqa(path, clean_dir=path.parent / "clean", corrupt_dir=path.parent / "corrupt")
    assert [e.id for e in got] == ["09143711", "10972110"]
    first = got[0]
    assert (first.question, first.answer) == ("Are the pants purple?", "Yes")
    assert first.meta["imageId"] == "2377940" and first.meta["fullAnswer"] == "The trousers are purple."
    assert first.meta["object_positions"] == [{"x": 123, "y": 181, "w": 95, "h": 66}]
    assert first.image.load().getpixel((0, 0)) == (200, 30, 30)
    assert first.corrupt_image.load().getpixel((0, 0)) == (30, 30, 200)
    # lazily loaded: the second question's images are missing, which only loading it reveals
    assert got[1].image.path == path.parent / "clean" / "2404766.png"
    with pytest.raises(FileNotFoundError, match="2404766.png"):
        got[1].image.load()
    assert [e.id for e in data.gqa(path, limit=1)] == ["09143711"] and got[0].wrong_answer is None
    assert data.gqa(path)[0].image is None


def test_gqa_list_layout_and_gqa_own_image_names(tmp_path):
    path = tmp_path / "Animal.json"
    path.write_text(json.dumps(ANIMAL, indent=2))
    png(tmp_path / "images" / "2337735.jpg")
    got = data.gqa(path, clean_dir=tmp_path / "images", clean_name="{imageId}.jpg")
    assert [e.id for e in got] == ["14903529", "19625432"]
    assert got[0].image.load().size == (4, 3) and got[0].meta["relevant_objects"] == ["bird"]
    assert "question_id" not in got[0].meta and got[0].corrupt_image is None
    with pytest.raises(ValueError, match="'objectId'.*fields are"):
        data.gqa(path, clean_dir=tmp_path / "images", clean_name="{objectId}.png")


@pytest.mark.no_typecheck
def test_gqa_refuses_what_it_cannot_read(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "Is it?", "imageId": "1", "answer": "Yes"}]))
    with pytest.raises(ValueError, match="question 0 has no 'question_id'"):
        data.gqa(path)
    path.write_text(json.dumps({"7": {"question": "Is it?", "answer": "Yes"}}))
    with pytest.raises(ValueError, match=r"question 7 lacks \['imageId'\]"):
        data.gqa(path)
    path.write_text("[")
    with pytest.raises(ValueError, match="not JSON"):
        data.gqa(path)
    path.write_text(json.dumps(COLOR))
    with pytest.raises(FileNotFoundError, match="clean image folder"):
        data.gqa(path, clean_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no GQA questions file"):
        data.gqa(tmp_path / "missing.json")


# POPE's coco_pope_random.json: JSON Lines
POPE = ('{"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882, "text": "Is there a dining '
        'table in the image?", "label": "yes"}\n'
        '{"question_id": 3, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882, "text": "Is there a tv in '
        'the image?", "label": "no"}\n\n')


def test_pope_jsonl(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(POPE)
    png(tmp_path / "val2014" / "COCO_val2014_000000548882.jpg")
    got = data.pope(path, tmp_path / "val2014")
    assert [(e.id, e.question, e.answer) for e in got] == [
        ("0", "Is there a dining table in the image?", "yes"), ("3", "Is there a tv in the image?", "no")]
    assert got[1].meta == {"image": "COCO_val2014_000000548882.jpg", "image_id": 548882}
    assert got[0].image.load().size == (4, 3)
    assert len(data.pope(path, limit=1)) == 1 and data.pope(path)[0].image is None


@pytest.mark.no_typecheck
def test_pope_names_the_bad_line(tmp_path):
    path = tmp_path / "pope.json"
    path.write_text(POPE + '{"question_id": 9, "image": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"line 4: lacks \['text', 'label'\]"):
        data.pope(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        data.pope(path)


# Palit et al.'s Datasets/color_coco_qa.csv (and count_/location_, same header): pandas' unnamed index column first
COCO_QA = [["", "train_image_id_count", "question_count", "answer_count"],
           ["0", "23004", "what is the color of the horses", "brown"],
           ["1", "220218", "what is the color of the character", "purple"],
           ["17", "578567", "how many boy pitching , one boy on base on a baseball field", "one"]]


def test_coco_qa_csv(tmp_path):
    path = tmp_path / "color_coco_qa.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(COCO_QA)
    assert '"how many boy pitching , one boy on base on a baseball field"' in path.read_text()  # quoted as shipped
    png(tmp_path / "train2017" / "000000023004.jpg")
    got = data.coco_qa(path, tmp_path / "train2017")
    assert [(e.id, e.question, e.answer, e.meta["image_id"]) for e in got] == [
        ("0", "what is the color of the horses", "brown", 23004),
        ("1", "what is the color of the character", "purple", 220218),
        ("17", "how many boy pitching , one boy on base on a baseball field", "one", 578567)]
    assert got[0].image.load().size == (4, 3)
    assert got[1].image.path.name == "000000220218.jpg"
    named = data.coco_qa(path, tmp_path, image_name_pattern="COCO_train2014_{image_id:012d}.jpg", limit=1)
    assert len(named) == 1 and named[0].image.path.name == "COCO_train2014_000000023004.jpg"


@pytest.mark.no_typecheck
def test_coco_qa_refuses_other_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,img,q,a\n0,1,what,red\n")
    with pytest.raises(ValueError, match="no image id column"):
        data.coco_qa(path)
    path.write_text(",train_image_id_count,question_count,answer_count\n0,abc,what,red\n")
    with pytest.raises(ValueError, match="row 0: image id 'abc'"):
        data.coco_qa(path, tmp_path)
