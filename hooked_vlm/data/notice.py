"""NOTICE's data files (Golovanevsky et al., NAACL 2025; github.com/wrudman/NOTICE): the pair CSVs its patching
scripts read, `BLIP_final_{task}.csv` and `LLAVA_final_{task}.csv` for the tasks `svo_probes`, `mit_states` and
`facial_expressions`, as its preprocessing notebooks write them (pandas `to_csv`, one row per example).

The columns read (every other column is kept in `Example.meta`):

| column | meaning | Example field |
|---|---|---|
| `clean_prompt` | the binary-choice question ("Is this person feeling happy or sad?") | `question` |
| `correct_answer` | the clean image's answer, one of the two options | `answer` |
| `incorrect_answer` | the other option (SVO files have none: the authors' `get_incorrect_answers`) | `wrong_answer` |
| `clean_image_path` (LLaVA files: `correct_image_path`) | the image (SVO: its URL) | `image` |
| `corrupt_image_path` (LLaVA: `incorrect_image_path`) | SIP's image, answered by the other option | `corrupt_image` |
| `corrupt_prompt` | STR's prompt: the options replaced by other words | `corrupt_question` |

`meta["task"]` says which task the file holds: "svo_probes" (it has `pos_triplet`/`neg_triplet`), "mit_states"
(`noun` and `state`), "facial_expressions" (its prompts ask "Is this person feeling ..."), else "unknown".
"""

from __future__ import annotations

import ast
import csv
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from .example import Example, ImageFile

_IMAGE = ("clean_image_path", "correct_image_path")  # BLIP files, LLaVA files
_CORRUPT_IMAGE = ("corrupt_image_path", "incorrect_image_path")
_NO_PROMPT = ("", "NO PROMPT MADE", "No negation found", "nan")  # what the SVO notebook writes when it fails


def notice_pairs(path: str | Path, image_root: str | Path | None = None, *,
                 resolve: Callable[[str], str | Path] | None = None) -> list[Example]:
    """The examples of a NOTICE pair CSV, each with its SIP side (`corrupt_image`) and STR side
    (`corrupt_question`) where the file has them; images are files, opened only when asked (`ImageFile.load`).

    Image paths are taken relative to `image_root` (default: the CSV's folder; absolute paths stay as they are).
    SVO-Probes rows name their images by URL (the authors keep the pixels in a pickle keyed by URL): a URL maps to
    `image_root / <the URL's file name>`, or pass `resolve`, a function from the path or URL in the file to the
    image's path, for any other layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no NOTICE CSV at {path}")
    root = path.parent if image_root is None else Path(image_root)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or ())
        rows = list(reader)
    image_col = next((c for c in _IMAGE if c in columns), None)
    missing = [c for c in ("clean_prompt", "correct_answer") if c not in columns] + ([] if image_col else [_IMAGE[0]])
    if missing:
        raise ValueError(f"{path} is not a NOTICE pair file: it lacks the columns {missing} (it has {columns})")
    corrupt_col = next((c for c in _CORRUPT_IMAGE if c in columns), None)
    svo = {"pos_triplet", "neg_triplet", "subj_neg", "verb_neg"} <= set(columns)
    if "incorrect_answer" not in columns and not svo:
        raise ValueError(f"{path} has no incorrect_answer column (and no SVO triplets to derive it from); it has "
                         f"{columns}")
    task = _task(columns, rows)

    def image(value: str | None) -> ImageFile | None:
        if value is None or value.strip() in ("", "nan"):
            return None
        if resolve is not None:
            return ImageFile(Path(resolve(value)))
        if urlparse(value).scheme in ("http", "https"):
            return ImageFile(root / unquote(Path(urlparse(value).path).name))
        p = Path(value)
        return ImageFile(p if p.is_absolute() else root / p)

    used = {"clean_prompt", "correct_answer", "incorrect_answer", image_col, corrupt_col, "corrupt_prompt"}
    examples, same = [], 0
    for i, row in enumerate(rows):
        wrong = row["incorrect_answer"] if "incorrect_answer" in columns else _svo_incorrect(row)
        same += wrong == row["correct_answer"]
        corrupt_prompt = row.get("corrupt_prompt")
        meta = {k: v for k, v in row.items() if k not in used}
        meta["task"] = task
        examples.append(Example(
            id=str(i), question=row["clean_prompt"], image=image(row[image_col]), answer=row["correct_answer"],
            wrong_answer=wrong, corrupt_image=image(row[corrupt_col]) if corrupt_col else None,
            corrupt_question=None if corrupt_prompt is None or corrupt_prompt.strip() in _NO_PROMPT else corrupt_prompt,
            meta=meta))
    if same:
        warnings.warn(f"{path}: {same} of {len(rows)} rows have incorrect_answer equal to correct_answer (SVO: the "
                      "authors' rule gives the correct answer when correct_answer != correct_answer_MC); a metric "
                      "contrasting the two is 0 for them", stacklevel=2)
    return examples


def _task(columns: list[str], rows: list[dict]) -> str:
    if {"pos_triplet", "neg_triplet"} <= set(columns):
        return "svo_probes"
    if {"noun", "state"} <= set(columns):
        return "mit_states"
    if rows and all("person feeling" in r["clean_prompt"] for r in rows):
        return "facial_expressions"
    return "unknown"


def _flag(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "1.0", "yes")


def _triplet(value: str) -> list[str]:
    """The first subject-verb-object triplet of an SVO-Probes cell ("man,ride,horse" or "['man,ride,horse', ...]"),
    as the authors' `parse_triplet`."""
    try:
        parsed = ast.literal_eval(value)
        if isinstance(parsed, list) and parsed:
            return str(parsed[0]).split(",")
    except (ValueError, SyntaxError):
        pass
    return value.split(",")


def _svo_incorrect(row: dict) -> str:
    """The authors' `get_incorrect_answers` (BLIP/patching_utils.py): the correct answer itself when
    correct_answer != correct_answer_MC, else the negative triplet's subject, verb or object (the one negated)."""
    if "correct_answer_MC" in row and row["correct_answer"] != row["correct_answer_MC"]:
        return row["correct_answer"]
    index = 0 if _flag(row["subj_neg"]) else (1 if _flag(row["verb_neg"]) else 2)
    triplet = _triplet(row["neg_triplet"])
    if index >= len(triplet):
        raise ValueError(f"neg_triplet {row['neg_triplet']!r} has no element {index} (subject, verb, object)")
    return triplet[index]
