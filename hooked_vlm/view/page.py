"""One self-contained HTML page per view: the payload (JSON), the styles and the scripts inlined, nothing fetched.

The page's scripts live beside this module (`static/`), are read once and written into every page; the image is a
data: URI inside the payload. In a notebook, `View._repr_html_` wraps the page in an iframe's `srcdoc`, so that
several views in one notebook keep their own scripts and styles apart.
"""

from __future__ import annotations

import html as html_
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .payload import FORMAT, read_payload, to_json


@cache
def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


class View:
    """A rendered view: `html` (the whole page), `payload` (the data it embeds), `holds` (what the file holds, in
    words). `save(path)` writes the file; in Jupyter the view displays itself inline."""

    def __init__(self, kind: str, payload: dict[str, Any], holds: str, title: str):
        self.kind = kind
        self.payload = {"format": FORMAT, "view": kind, "title": title, "holds": holds, **payload}
        self.holds = holds
        self.title = title
        self.html = _page(kind, self.payload, holds, title)

    @property
    def nbytes(self) -> int:
        """The size of the HTML file, in bytes."""
        return len(self.html.encode("utf-8"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to `path` (a reader never sees half a file). Returns the path."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"a view is an HTML file: give a path ending in .html, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.html, encoding="utf-8")
        tmp.replace(path)
        return path

    def _repr_html_(self) -> str:
        height = 760 if self.kind != "sweep" else 820
        return (f'<iframe class="hooked-vlm-view" srcdoc="{html_.escape(self.html, quote=True)}" '
                f'style="width:100%;height:{height}px;border:1px solid #ddd" '
                'sandbox="allow-scripts"></iframe>')

    def __repr__(self) -> str:
        return f"View({self.kind!r}, {self.nbytes / 2**20:.2f} MiB: {self.holds})"


def load_payload(path_or_html: str | os.PathLike) -> dict[str, Any]:
    """The payload of a saved view (a path) or of its HTML text."""
    text = str(path_or_html)
    if not text.lstrip().startswith("<"):
        text = Path(path_or_html).read_text(encoding="utf-8")
    return read_payload(text)


def _page(kind: str, payload: dict[str, Any], holds: str, title: str) -> str:
    safe_title = html_.escape(title)
    return f"""<!DOCTYPE html>
<!-- hooked_vlm view ({kind}). This file holds {html_.escape(holds).replace("--", "- -")}.
     It is self-contained: no server, no network; open it in any browser. -->
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{safe_title}</title>
<style>{_static("view.css")}</style>
</head><body data-view="{kind}">
<header><h1>{safe_title}</h1><p class="hv-holds">This file holds {html_.escape(holds)}.</p></header>
<main id="hv-root"></main>
<div id="hv-tip" hidden></div>
<script type="application/json" id="hv-data">{to_json(payload)}</script>
<script>{_static("common.js")}</script>
<script>{_static(f"{kind}.js")}</script>
</body></html>
"""
