"""COCO-QA (Ren et al. 2015) questions as Palit et al. ship them and V-SEAM reuses them.

`vedantpalit/Towards-Vision-Language-Mechanistic-Interpretability` `Datasets/{color,count,location}_coco_qa.csv`: a
pandas-written CSV whose first, unnamed column is the row index, then `train_image_id_count,question_count,
answer_count` (the same header in all three files), e.g. `0,23004,what is the color of the horses,brown`. The image id
is a COCO (2014 train) image id; the images themselves are not shipped. The file name of an image is a format string
over `image_id`: by default COCO 2017's `{image_id:012d}.jpg` (the naming of the sample image in Palit's repository;
an assumption, the notebooks' loading cell was not read), `COCO_train2014_{image_id:012d}.jpg` for the 2014 folders.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..arguments import strict
from .example import Example, ImageFile, check_limit, image_folder, source_file
from .gqa import image_name

IMAGE_NAME = "{image_id:012d}.jpg"


def _column(header: list[str], prefixes: tuple[str, ...], what: str, path: Path) -> str:
    found = [name for name in header if name.strip().lower().startswith(prefixes)]
    if len(found) != 1:
        raise ValueError(f"{path}: {'no' if not found else 'more than one'} {what} column among {header}; COCO-QA "
                         "CSVs have the columns train_image_id_count, question_count, answer_count")
    return found[0]


@strict
def coco_qa(csv_path: str | Path, image_root: str | Path | None = None, *, image_name_pattern: str = IMAGE_NAME,
            limit: int | None = None) -> list[Example]:
    """The questions of a COCO-QA CSV, in file order, as `Example`s: `id` the row index (the unnamed first column;
    the row number where there is none), `question`, `answer`, `image` `image_root / image_name_pattern` (None
    without an image_root), `meta` {"image_id": int}. `limit` keeps the first questions."""
    path, root = source_file(csv_path, "COCO-QA CSV"), image_folder(image_root)
    check_limit(limit)
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        image_col = _column(header, ("train_image_id", "image_id"), "image id", path)
        question_col = _column(header, ("question",), "question", path)
        answer_col = _column(header, ("answer",), "answer", path)
        index_col = header[0] if header and header[0].strip() == "" else None
        for number, row in enumerate(reader):
            if limit is not None and len(out) >= limit:
                break
            where = f"{path.name}, row {number}"
            try:
                image_id = int(row[image_col])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: image id {row[image_col]!r} is not a number") from None
            image = None if root is None else ImageFile(root / image_name(image_name_pattern, {"image_id": image_id},
                                                                          where))
            out.append(Example(id=str(row[index_col]) if index_col is not None else str(number),
                               question=row[question_col], image=image, answer=row[answer_col],
                               meta={"image_id": image_id}))
    return out
