"""What every data loader returns: examples that name their image files and open them only when asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class ImageFile:
    """An image on disk, opened (as RGB) by `load()`: a data set of thousands of examples holds paths, not pixels."""

    path: Path

    def load(self) -> Image.Image:
        if not self.path.is_file():
            raise FileNotFoundError(f"image {self.path} does not exist: check the image folder passed to the loader")
        with Image.open(self.path) as image:
            return image.convert("RGB")


@dataclass
class Example:
    """One question about an image, as the papers' files give it.

    `id`: the example's id in its source file (a question id, a row number); `answer` / `wrong_answer`: the
    expected answer and, for minimal pairs, the answer the corrupted input should get; `corrupt_image` / `corrupt_
    question`: the corrupted side of a minimal pair (NOTICE's SIP and STR, V-SEAM's edited images); `meta`: every
    other field of the source row, unchanged.
    """

    id: str
    question: str
    image: ImageFile | None = None
    answer: str | None = None
    wrong_answer: str | None = None
    corrupt_image: ImageFile | None = None
    corrupt_question: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def source_file(path: str | Path, what: str) -> Path:
    """The data file `path`, checked to exist (`what` names the format in the error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    return path


def image_folder(folder: str | Path | None, label: str = "image") -> Path | None:
    """An image folder, checked to exist (None: no images)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"the {label} folder {folder} does not exist")
    return folder


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}: pass a number of questions >= 0 or None")
