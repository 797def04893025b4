"""POPE (Li et al. 2023, `AoiDragon/POPE`): yes/no object-probing questions about COCO val2014 images.

Each file (`output/coco/coco_pope_{random,popular,adversarial}.json`) is JSON Lines, one question a line:
`{"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882, "text": "Is there a dining table
in the image?", "label": "yes"}` (`image_id` is not in every release).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arguments import strict
from .example import Example, ImageFile, check_limit, image_folder, source_file


@strict
def pope(jsonl: str | Path, image_root: str | Path | None = None, *, limit: int | None = None) -> list[Example]:
    """The questions of a POPE file, in file order, as `Example`s: `id` the question id, `question` the text,
    `answer` the label ("yes" / "no"), `image` `image_root / image` (None without an image_root), `meta` the other
    fields (`image`, `image_id`). Blank lines are skipped; `limit` keeps the first questions."""
    path, root = source_file(jsonl, "POPE file"), image_folder(image_root)
    check_limit(limit)
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e}); a POPE file has one JSON object a line") \
                    from None
            missing = [key for key in ("question_id", "image", "text", "label") if key not in row] \
                if isinstance(row, dict) else ["question_id", "image", "text", "label"]
            if missing:
                raise ValueError(f"{path}, line {number}: lacks {missing}; a POPE line is {{\"question_id\", \"image\", "
                                 "\"text\", \"label\"}")
            out.append(Example(id=str(row["question_id"]), question=str(row["text"]),
                               image=None if root is None else ImageFile(root / str(row["image"])),
                               answer=str(row["label"]),
                               meta={k: v for k, v in row.items() if k not in ("question_id", "text", "label")}))
    return out
