"""GQA questions (Hudson & Manning 2019) and V-SEAM's GQA subsets with their clean and concept-edited images.

Two layouts of the questions file, both read as they are:

- a dict keyed by question id, each value a question (`{"imageId", "question", "answer", "fullAnswer", "types",
  "semantic", ...}`): GQA's own `*_questions.json` and V-SEAM's `Attribute_Level/Color/Color.json`;
- a list of questions that carry their id as `"question_id"`: V-SEAM's other subsets (`Object_Level/Animal/Animal.json`,
  `Attribute_Level/Material/Material.json`, ...).

V-SEAM keeps each subset's images beside its JSON: `clean/{imageId}.png` and the edited `corrupt/{question_id}/
{question_id}.png` (the paths its `ImageToken_Patch.py` and `TokenwiseAttention_Patch.py` open); GQA's own images are
`images/{imageId}.jpg`. The file names are format strings over the question's fields, so either layout is a keyword.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..arguments import strict
from .example import Example, ImageFile, check_limit, image_folder, source_file

CLEAN_NAME = "{imageId}.png"
CORRUPT_NAME = "{question_id}/{question_id}.png"


def image_name(pattern: str, fields: dict[str, Any], where: str) -> str:
    """`pattern` filled with a row's fields; a KeyError becomes a one-line error naming the fields there are."""
    try:
        return pattern.format(**fields)
    except KeyError as e:
        raise ValueError(f"{where}: the image name pattern {pattern!r} uses the field {e.args[0]!r}, which this row "
                         f"lacks; its fields are {sorted(fields)}") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"{where}: the image name pattern {pattern!r} does not format ({e}); use named fields such "
                         "as '{imageId}.png'") from None


@strict
def gqa(questions_json: str | Path, clean_dir: str | Path | None = None, corrupt_dir: str | Path | None = None, *,
        clean_name: str = CLEAN_NAME, corrupt_name: str = CORRUPT_NAME, limit: int | None = None) -> list[Example]:
    """The questions of a GQA / V-SEAM questions file, in file order, as `Example`s whose images load when asked.

    Args:
        questions_json: a dict keyed by question id or a list of questions with "question_id" (see the module).
        clean_dir: the folder of the images the questions are about (V-SEAM's `clean/`); None: no image.
        corrupt_dir: the folder of the edited images (V-SEAM's `corrupt/`); None: no corrupted image.
        clean_name, corrupt_name: file names inside those folders, format strings over the question's fields
            and `question_id` (GQA's own images: clean_name="{imageId}.jpg").
        limit: keep the first `limit` questions (V-SEAM runs `data[:1000]`).

    `Example.id` is the question id, `answer` the short answer ("Yes", "purple"), `meta` every other field.
    """
    path = source_file(questions_json, "GQA questions file")
    check_limit(limit)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): pass a GQA questions file") from None
    if isinstance(data, dict):
        rows = [(str(qid), row) for qid, row in data.items()]
    elif isinstance(data, list):
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "question_id" not in row:
                raise ValueError(f"{path}: question {i} has no 'question_id'; a list of questions must carry their ids "
                                 "(V-SEAM's subsets do), or the file must be a dict keyed by question id")
            rows.append((str(row["question_id"]), row))
    else:
        raise ValueError(f"{path} holds a {type(data).__name__}: a GQA questions file is a dict keyed by question id "
                         "or a list of questions")
    rows = rows if limit is None else rows[:limit]
    folders = {"clean": image_folder(clean_dir, "clean image"), "corrupt": image_folder(corrupt_dir, "corrupt image")}
    out = []
    for qid, row in rows:
        where = f"{path.name}, question {qid}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is a {type(row).__name__}, not a question")
        missing = [key for key in ("question", "answer", "imageId") if key not in row]
        if missing:
            raise ValueError(f"{where} lacks {missing}; a GQA question has 'question', 'answer' and 'imageId'")
        fields = {**row, "question_id": qid}
        image, corrupt = (None if folder is None else ImageFile(folder / image_name(pattern, fields, where))
                          for folder, pattern in ((folders["clean"], clean_name), (folders["corrupt"], corrupt_name)))
        meta = {key: value for key, value in row.items() if key not in ("question", "answer", "question_id")}
        out.append(Example(id=qid, question=str(row["question"]), image=image, answer=str(row["answer"]),
                           corrupt_image=corrupt, meta=meta))
    return out
