"""Look inside in a browser: self-contained interactive HTML views (no server, no network, nothing fetched).

    view.attention(model, cache, "attn.html", inputs=inputs)      # tower / layer / head, hover a query token
    view.sweep(scores, "sweep.html", kind="heads", model=model, cache=cache, tower="lm")
    view.lens(model, analysis.logit_lens(model, inputs, tower="lm"), "lens.html", inputs=inputs)

Each returns a `View` (`.save(path)`, `.html`, `.payload`, `.holds`) that displays inline in Jupyter.
`load_payload(path)` reads back the numbers a view embeds. See docs/view.md.
"""

from .attention import MAX_BYTES, HeadSet, attention, attention_names
from .lens import lens
from .page import View, load_payload
from .payload import decode, dequantize
from .sweep import sweep
from .tokens import TokenAxis

__all__ = ["MAX_BYTES", "HeadSet", "TokenAxis", "View", "attention", "attention_names", "decode", "dequantize",
           "lens", "load_payload", "sweep"]
