"""The data a view embeds: arrays as base64 in a JSON object, in the precision the view needs, and read back.

An array is `{"dtype", "shape", "data"}` (little-endian bytes, base64). Attention rows may be quantised to uint8
(`quantize_rows`): each row of keys is split in two segments (the image-patch keys and the others), each scaled by
its own maximum, so a 1/576 attention spread over 24x24 patches keeps 8 bits of its own range even when the row's
mass sits on one text token. `decode` and `read_payload` give the numbers back in Python, as the page reads them.
"""

from __future__ import annotations

import base64
import html as html_
import io
import json
import re
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

FORMAT = "hooked_vlm.view/1"
PRECISIONS = ("float32", "float16", "uint8")
_NUMPY = {"float32": "<f4", "float16": "<f2", "uint8": "u1", "int32": "<i4"}
_PAYLOAD = re.compile(r'<script type="application/json" id="hv-data">(.*?)</script>', re.S)


def encode(values: Tensor | np.ndarray, dtype: str) -> dict[str, Any]:
    """An array as `{"dtype", "shape", "data"}` in `dtype` (float32, float16, uint8, int32)."""
    if dtype not in _NUMPY:
        raise ValueError(f"dtype must be one of {', '.join(_NUMPY)}, got {dtype!r}")
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if dtype == "float16":  # via float32, as torch's `.float().half()` rounds: the tests compare against that
        array = array.astype(np.float32)
    raw = np.ascontiguousarray(array.astype(_NUMPY[dtype]))
    return {"dtype": dtype, "shape": list(raw.shape), "data": base64.b64encode(raw.tobytes()).decode("ascii")}


def decode(entry: dict[str, Any]) -> np.ndarray:
    """The array an `encode` entry holds (as stored: uint8 stays uint8; see `dequantize`)."""
    raw = base64.b64decode(entry["data"])
    return np.frombuffer(raw, dtype=_NUMPY[entry["dtype"]]).reshape(entry["shape"])


def quantize_rows(rows: Float[Tensor, "*rows S"], segment: Bool[Tensor, "S"]
                  ) -> tuple[Tensor, Float[Tensor, "*rows 2"]]:
    """Rows of non-negative values (attention probabilities) as uint8 codes and two scales per row: segment 1
    (`segment` True, the image-patch keys) and segment 0 (the others), each divided by its own maximum. A value is
    `code / 255 * scale`, within `scale / 510` of the original."""
    x = rows.detach().float()
    if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
        raise ValueError("uint8 quantisation takes finite non-negative rows (attention probabilities); pass "
                         "precision='float16' for other values")
    seg = segment.to(x.device).bool()
    scales = torch.stack([x[..., ~seg].amax(-1) if bool((~seg).any()) else x.new_zeros(x.shape[:-1]),
                          x[..., seg].amax(-1) if bool(seg.any()) else x.new_zeros(x.shape[:-1])], -1)
    per_key = torch.where(seg, scales[..., 1:2], scales[..., 0:1])  # [*rows, S]
    codes = torch.where(per_key > 0, x / per_key.clamp_min(torch.finfo(torch.float32).tiny) * 255, 0.0)
    return codes.round().clamp(0, 255).to(torch.uint8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """The values `quantize_rows` encoded, as float32 (what the page draws)."""
    per_key = np.where(np.asarray(segment, bool), scales[..., 1:2], scales[..., 0:1])
    return codes.astype(np.float32) / np.float32(255) * per_key.astype(np.float32)


def encoded_size(n_values: int, itemsize: int) -> int:
    """Bytes of `n_values` values of `itemsize` bytes once base64-encoded."""
    return 4 * ((n_values * itemsize + 2) // 3)


def image_data_uri(image: Image.Image, max_side: int = 448) -> tuple[str, tuple[int, int]]:
    """The image as a data: URI (PNG for small images, JPEG above 128 px a side: a 336 px photo is ~30 KB), at most
    `max_side` px a side; and its size."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    if max(image.size) <= 128:
        image.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        image.save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", image.size


def image_from_pixels(pixel_values: Float[Tensor, "3 H W"], processor: Any) -> Image.Image:
    """The image as the model sees it (resized, cropped), from the processor's normalised `pixel_values`: times
    the processor's `image_std`, plus its `image_mean`."""
    image_processor = getattr(processor, "image_processor", processor)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError("the processor has no image_mean / image_std to undo its normalisation; pass image= (the "
                         "image as the model sees it)")
    x = pixel_values.detach().float().cpu()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"pixel_values of one image must be [3, H, W], got {tuple(x.shape)}")
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def to_json(payload: dict[str, Any]) -> str:
    """JSON safe to put inside a <script> element: no "<" (so no "</script>"), no NaN (written as null)."""
    return json.dumps(_no_nan(payload), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def read_payload(html: str) -> dict[str, Any]:
    """The JSON payload of a view's HTML (or of its notebook form, whose page sits in an iframe's srcdoc)."""
    match = _PAYLOAD.search(html)
    if match is None:  # the notebook form: the page is escaped inside the iframe's srcdoc
        match = _PAYLOAD.search(html_.unescape(html))
    if match is None:
        raise ValueError("no hooked_vlm view payload (<script id=\"hv-data\">) in this HTML")
    payload = json.loads(match.group(1))
    if payload.get("format") != FORMAT:
        raise ValueError(f"payload format {payload.get('format')!r}, expected {FORMAT!r}")
    return payload
