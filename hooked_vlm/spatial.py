"""Where an object is among a model's image tokens: COCO masks (polygons, RLE, boxes) mapped onto the patch grid
through the processor's own resize and crop, dilated by a buffer of patches, and turned into the sequence positions
of the image's tokens; and the high-norm ("register") image tokens.

    geometry = spatial.processor_geometry(model.processor, image.size)       # resize, then crop, as the processor
    mask = spatial.annotation_mask(annotation, image.height, image.width)    # the object, in the image's pixels
    patches = spatial.object_patches(mask, geometry, grid=24, buffer=1)      # [24, 24] bool, dilated by one patch
    where = spatial.patch_positions(model.positions(**inputs).image[0][0], patches)  # LM positions of those tokens

Qwen2-VL's processor sets each image's grid (its merged grid of LM tokens) from the image's size, and the geometry
carries it: `spatial.object_patches(mask, spatial.processor_geometry(model.processor, image.size))`, no `grid`.

A patch is the object's if any of its area overlaps the object (`min_coverage=0`), as Neo et al.'s released code
selects patches (`pycocotools.mask.iou(patch, object) > 0`: any shared pixel). Their code maps the mask onto the grid
by its own square crop of the original image with integer patches of `side // 24` pixels; `neo_object_patches`
reproduces that mapping, and `object_patches` follows the processor (docs/neo.md compares the two).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from PIL import Image, ImageDraw
from torch import Tensor

from .positions import ImageSpan, Positions

__all__ = ["ImageGeometry", "processor_geometry", "annotation_mask", "polygon_mask", "rle_mask", "box_mask",
           "decode_rle", "patch_coverage", "object_patches", "neo_object_patches", "dilate", "patch_positions",
           "image_token_indices", "register_tokens", "noise_patches"]


# ------------------------------------------------------------------------------------------ processor geometry
@dataclass(frozen=True)
class ImageGeometry:
    """How a processor turns an image of `size` (width, height) into the model's input: resized to `resized`
    (width, height), then the window `crop` = (left, top, width, height) of the resized image is kept (the model
    sees `crop[2]` x `crop[3]` pixels). A window reaching past the resized image is zero padding there.

    `grid`: the image's token grid (rows, cols) where the processor sets it per image (Qwen2-VL: the merged grid,
    one LM token per `patch * merge` pixels square), so the functions below need no `grid` argument; None where
    the model fixes it (LLaVA-1.5: pass grid=24)."""

    size: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    grid: tuple[int, int] | None = None

    def grid_shape(self, grid: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(rows, cols) of the token grid: `grid` (an int: square) or, if None, the geometry's own."""
        grid = self.grid if grid is None else grid
        if grid is None:
            raise ValueError("this geometry has no token grid of its own (the processor's grid is fixed by the "
                             "model): pass grid, e.g. grid=24 for LLaVA-1.5's 336 / 14 patches")
        rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if rows <= 0 or cols <= 0:
            raise ValueError(f"grid {grid!r} must be positive (rows, cols)")
        return rows, cols

    def patch_box(self, row: int, col: int, grid: int | tuple[int, int] | None = None
                  ) -> tuple[float, float, float, float]:
        """The area of patch (row, col) of the token grid (`grid_shape(grid)`) in the original image's continuous
        pixel coordinates (x0, y0, x1, y1): pixel (i, j) covers [j, j+1) x [i, i+1), as PIL's resize maps them."""
        left, top, width, height = self.crop
        sx, sy = self.size[0] / self.resized[0], self.size[1] / self.resized[1]
        rows, cols = self.grid_shape(grid)
        pw, ph = width / cols, height / rows
        return ((left + col * pw) * sx, (top + row * ph) * sy, (left + (col + 1) * pw) * sx,
                (top + (row + 1) * ph) * sy)


def _field(config: Any, key: str) -> Any:
    """`key` of a processor size setting (a dict in older transformers, a SizeDict in 5.x)."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def processor_geometry(processor: Any, size: tuple[int, int]) -> ImageGeometry:
    """The geometry the image processor of `processor` (a model's processor, or its `image_processor`) applies to
    an image of `size` = (width, height), read from its settings as its code computes them (transformers 5.x,
    `image_processing_backends` and `image_transforms`):

    - `size={"shortest_edge": s}` (CLIP, LLaVA-1.5): the short side becomes s and the long side
      `int(s * long / short)`; `size={"height": h, "width": w}` (BLIP): resized to w x h, aspect ratio not kept.
    - `do_center_crop` with `crop_size={"height": ch, "width": cw}`: the window at top `(H' - ch) // 2`, left
      `(W' - cw) // 2` of the resized image (HF's `center_crop`; a negative offset is zero padding).

    - Qwen2-VL / Qwen2.5-VL (an image processor with `patch_size` and `merge_size`): HF's `smart_resize`, each
      side rounded to a multiple of `patch_size * merge_size`, rescaled within `size={"shortest_edge": min_pixels,
      "longest_edge": max_pixels}` (total pixels), no crop; `grid` is the merged grid (rows, cols) of LM tokens,
      `image_grid_thw[1:] // merge_size`.

    Other resize modes (`longest_edge`, `max_height`, padding to a square) are refused rather than guessed.
    """
    image_processor = getattr(processor, "image_processor", processor)
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {size} must be (width, height) in pixels, both positive")
    if getattr(image_processor, "merge_size", None) and getattr(image_processor, "patch_size", None):
        return _merged_patch_geometry(image_processor, width, height)
    resized = (width, height)
    if getattr(image_processor, "do_resize", True):
        setting = getattr(image_processor, "size", None)
        short, long_edge = _field(setting, "shortest_edge"), _field(setting, "longest_edge")
        h, w = _field(setting, "height"), _field(setting, "width")
        if short and not long_edge:
            if width <= height:
                resized = (int(short), int(short * height / width))
            else:
                resized = (int(short * width / height), int(short))
        elif h and w and not short:
            resized = (int(w), int(h))
        else:
            raise ValueError(f"processor_geometry: the resize setting {setting!r} of "
                             f"{type(image_processor).__name__} is not supported (shortest_edge alone, as CLIP's, or "
                             "height and width, as BLIP's): pass the processor of a LLaVA-1.5, BLIP, InstructBLIP or "
                             "Qwen2-VL model")
    if getattr(image_processor, "do_pad", False):
        raise ValueError(f"processor_geometry: {type(image_processor).__name__} pads images (do_pad=True), which "
                         "moves the patches in a way this mapping does not follow; set do_pad=False or pass the "
                         "processor of a LLaVA-1.5, BLIP or InstructBLIP model")
    crop = (0, 0, *resized)
    if getattr(image_processor, "do_center_crop", False):
        setting = getattr(image_processor, "crop_size", None)
        ch, cw = _field(setting, "height"), _field(setting, "width")
        if not ch or not cw:
            raise ValueError(f"processor_geometry: crop_size {setting!r} has no height and width: give the "
                             "processor a crop_size {'height': H, 'width': W}")
        crop = ((resized[0] - int(cw)) // 2, (resized[1] - int(ch)) // 2, int(cw), int(ch))
    return ImageGeometry((width, height), resized, crop)


def _merged_patch_geometry(image_processor: Any, width: int, height: int) -> ImageGeometry:
    """Qwen2-VL's image processor: HF's `smart_resize` (models/qwen2_vl/image_processing_qwen2_vl.py), written
    out: sides rounded (Python's round, half to even) to multiples of factor = patch * merge; above `longest_edge`
    total pixels both shrink by sqrt(area / max) and round down, below `shortest_edge` both grow and round up."""
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    if getattr(image_processor, "do_resize", True):
        setting = getattr(image_processor, "size", None)
        min_pixels, max_pixels = _field(setting, "shortest_edge"), _field(setting, "longest_edge")
        if not min_pixels or not max_pixels:
            raise ValueError(f"processor_geometry: {type(image_processor).__name__}'s size {setting!r} needs "
                             "'shortest_edge' (min pixels) and 'longest_edge' (max pixels), as HF's Qwen2-VL "
                             "processor has")
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"image size {(width, height)}: the processor refuses aspect ratios above 200")
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if h * w > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    else:
        h, w = height, width
        if h % factor or w % factor:
            raise ValueError(f"processor_geometry: do_resize=False needs an image whose sides are multiples of "
                             f"patch_size * merge_size = {factor}, got {width} x {height}")
    return ImageGeometry((width, height), (w, h), (0, 0, w, h), grid=(h // factor, w // factor))


# ------------------------------------------------------------------------------------------ masks
def polygon_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> Float[Tensor, "H W"]:
    """A COCO polygon segmentation ([[x0, y0, x1, y1, ...], ...], several parts allowed) as a 0/1 mask of an
    image of `height` x `width`: a pixel is in if its centre (j + 0.5, i + 0.5) is inside a part (PIL's polygon
    fill, edges included). pycocotools rasterises polygons with its own rule; the two differ only along edges."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for part in polygons:
        coords = [float(v) for v in part]
        if len(coords) < 6 or len(coords) % 2:
            raise ValueError(f"a polygon part needs at least three (x, y) points, got {len(coords)} numbers")
        # PIL's pixel (j, i) is the integer point (j, i); COCO's pixel (j, i) covers [j, j+1) x [i, i+1)
        draw.polygon([(x - 0.5, y - 0.5) for x, y in zip(coords[::2], coords[1::2])], fill=1, outline=1)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32).copy())


def decode_rle(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`: 5 bits per character, offset
    48, continuation bit 0x20, sign bit 0x10; from the fourth run on, each run is stored as the difference to the
    run two before)."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE ends in the middle of a number")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_mask(rle: Mapping[str, Any]) -> Float[Tensor, "H W"]:
    """A COCO RLE ({"size": [height, width], "counts": [...] or "compressed string"}) as a 0/1 mask. Runs alternate
    background and object, starting with background, over the pixels in column-major order."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_rle(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs sum to {sum(runs)} (negative runs: {any(r < 0 for r in runs)}), but the mask has "
                         f"{height} x {width} = {height * width} pixels")
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.float32)
    return torch.from_numpy(flat.reshape(width, height).T.copy())  # column-major (Fortran) order


def box_mask(box: Sequence[float], height: int, width: int) -> Float[Tensor, "H W"]:
    """A COCO box [x, y, w, h] as the fraction of each pixel it covers (1 inside, fractions along its edges)."""
    x, y, w, h = (float(v) for v in box)

    def cover(lo: float, hi: float, n: int) -> Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64)
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(min=0)

    return (cover(y, y + h, height)[:, None] * cover(x, x + w, width)[None, :]).float()


def annotation_mask(annotation: Mapping[str, Any], height: int, width: int, *, use: str = "segmentation"
                    ) -> Float[Tensor, "H W"]:
    """The object of a COCO annotation as a mask of its image (`height` x `width`): its segmentation (polygons,
    or RLE for crowd annotations), or with `use="bbox"` its box. A segmentation that is absent falls back to the
    box only if `use="auto"`."""
    if use not in ("segmentation", "bbox", "auto"):
        raise ValueError(f"use={use!r}: pass 'segmentation', 'bbox' or 'auto'")
    seg = annotation.get("segmentation")
    if use == "bbox" or (use == "auto" and not seg):
        if "bbox" not in annotation:
            raise ValueError("the annotation has no bbox")
        return box_mask(annotation["bbox"], height, width)
    if not seg:
        raise ValueError("the annotation has no segmentation; pass use='bbox' (or 'auto') to use its box")
    if isinstance(seg, Mapping):
        mask = rle_mask(seg)
        if tuple(mask.shape) != (height, width):
            raise ValueError(f"the RLE is {tuple(mask.shape)}, the image {height} x {width}")
        return mask
    return polygon_mask(seg, height, width)


# ------------------------------------------------------------------------------------------ masks -> patches
def _overlaps(lo: Tensor, hi: Tensor, n: int) -> Tensor:
    """[grid, n]: how much of pixel j ([j, j+1)) lies in [lo[g], hi[g]); slivers below 1e-6 pixel (rounding of the
    patch edges) count as none."""
    edges = torch.arange(n + 1, dtype=torch.float64)
    w = (torch.minimum(edges[None, 1:], hi[:, None]) - torch.maximum(edges[None, :-1], lo[:, None])).clamp(min=0)
    return torch.where(w > 1e-6, w, torch.zeros(()))


def patch_coverage(mask: Tensor | np.ndarray, geometry: ImageGeometry, grid: int | tuple[int, int] | None = None
                   ) -> Float[Tensor, "rows cols"]:
    """The fraction of each patch's area that the object covers: `mask` [H, W] (0/1, or per-pixel fractions) over
    the original image, each patch of the model's token grid (`grid`: an int for a square grid, (rows, cols), or
    None for the geometry's own, as Qwen2-VL's) mapped back through `geometry` (area weighted; padding counts as
    background)."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).double()
    W, H = geometry.size
    if tuple(mask.shape) != (H, W):
        raise ValueError(f"mask is {tuple(mask.shape)} but the image is {H} x {W} (height x width)")
    left, top, width, height = geometry.crop
    sx, sy = W / geometry.resized[0], H / geometry.resized[1]
    rows, cols = geometry.grid_shape(grid)
    kx, ky = torch.arange(cols + 1, dtype=torch.float64), torch.arange(rows + 1, dtype=torch.float64)
    xs, ys = (left + kx * width / cols) * sx, (top + ky * height / rows) * sy  # patch edges in original pixels
    wx, wy = _overlaps(xs[:-1], xs[1:], W), _overlaps(ys[:-1], ys[1:], H)  # [grid, W], [grid, H]
    area = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :]
    return (wy @ mask @ wx.T / area).float()


def dilate(patches: Bool[Tensor, "rows cols"], buffer: int) -> Bool[Tensor, "rows cols"]:
    """The patches within `buffer` patches of a selected one, diagonals included (Chebyshev distance): Neo et al.'s
    buffer, which adds the 8 neighbours of every patch `buffer` times."""
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
        raise ValueError(f"buffer={buffer!r}: pass a number of patches >= 0")
    if buffer == 0:
        return patches.clone()
    x = patches.float()[None, None]
    return F.max_pool2d(x, 2 * buffer + 1, stride=1, padding=buffer)[0, 0] > 0


def object_patches(mask: Tensor | np.ndarray, geometry: ImageGeometry, grid: int | tuple[int, int] | None = None, *,
                   buffer: int = 0, min_coverage: float = 0.0) -> Bool[Tensor, "rows cols"]:
    """The patches showing the object: coverage above `min_coverage` (0: any overlap, the authors' rule for a
    partly covered patch), then dilated by `buffer` patches. `grid` as in `patch_coverage`."""
    return dilate(patch_coverage(mask, geometry, grid) > min_coverage, buffer)


def neo_object_patches(annotation: Mapping[str, Any], size: tuple[int, int], grid: int = 24, *,
                       buffer: int = 0) -> Bool[Tensor, "grid grid"]:
    """Neo et al.'s mapping (`utils.correct_annotations_for_crop` + `find_overlapping_patches`), for comparison:
    the original image cropped to its centred square (side s = min(W, H), left (W - s) // 2), polygon points outside
    the square dropped (not clipped; parts left with fewer than 3 points dropped), and `grid` x `grid` patches of
    `s // grid` original pixels from the square's corner (the last `s % grid` pixels belong to no patch); a patch
    is the object's if it shares a pixel with it. Polygons only (their code); PIL rasterises them here."""
    W, H = (int(v) for v in size)
    side = min(W, H)
    left, top = (W - side) // 2, (H - side) // 2
    parts = []
    for part in annotation["segmentation"]:
        kept = [(x - left, y - top) for x, y in zip(part[::2], part[1::2])
                if 0 <= x - left < side and 0 <= y - top < side]
        if len(kept) >= 3:
            parts.append([v for point in kept for v in point])
    mask = polygon_mask(parts, side, side) if parts else torch.zeros(side, side)
    p = side // grid
    cells = mask[: grid * p, : grid * p].reshape(grid, p, grid, p)
    return dilate(cells.amax(dim=(1, 3)) > 0, buffer)


# ------------------------------------------------------------------------------------------ patches -> positions
def _grid_mask(patches: Tensor | Sequence[int], rows: int, cols: int) -> Tensor:
    t = torch.as_tensor(patches)
    if t.dtype == torch.bool:
        if t.ndim != 2:
            raise ValueError(f"a patch mask must be [rows, cols], got shape {tuple(t.shape)}")
        return t
    flat = torch.zeros(rows * cols, dtype=torch.bool)
    flat[t.long().flatten()] = True  # row-major patch indices r * cols + c
    return flat.view(rows, cols)


def patch_positions(span: ImageSpan, patches: Tensor | Sequence[int]) -> Tensor:
    """The sequence positions of the image tokens of `span` that show the given patches: a [rows, cols] bool mask
    or row-major patch indices (r * cols + c), rows and cols the span's grid (Qwen2-VL: each image's merged grid).
    Positions come from the span's own patch labels, never from an assumed offset."""
    is_patch = span.rows >= 0
    if not is_patch.any():
        raise ValueError("this image span has no patch tokens (e.g. InstructBLIP's queries): patches have no position")
    rows, cols = int(span.rows.max()) + 1, int(span.cols.max()) + 1
    mask = _grid_mask(patches, rows, cols)
    if tuple(mask.shape) != (rows, cols):
        raise ValueError(f"the patch mask is {tuple(mask.shape)} but the image has a {rows} x {cols} grid")
    keep = torch.zeros_like(is_patch)
    keep[is_patch] = mask[span.rows[is_patch], span.cols[is_patch]]
    return span.indices[keep]


def image_token_indices(span: ImageSpan, positions: Tensor | Sequence[int]) -> Tensor:
    """Sequence positions inside `span` -> indices of the image's tokens (position - span.start), the form in which a
    token set carries over to the same image in another batch (other padding, another prompt)."""
    p = torch.as_tensor(positions, dtype=torch.long).flatten()
    if p.numel() and (int(p.min()) < span.start or int(p.max()) >= span.stop):
        raise ValueError(f"positions {p.tolist()[:8]} are not all in the image span [{span.start}, {span.stop})")
    return p - span.start


# ------------------------------------------------------------------------------------------ register tokens
def register_tokens(embeddings: Float[Tensor, "B T D"], positions: Positions, *, k: float = 2.0) -> list[Tensor]:
    """Per example, the positions of its image tokens whose norm is an outlier: ||e|| > mean + k std of the norms
    over that example's image tokens (torch.std, Bessel-corrected, as Neo et al.'s `get_register_indices`, with
    k=2). `embeddings`: the stream the image tokens enter the text model with (LLaVA: `lm.hook_inputs_embeds`, i.e.
    `model.image_embeddings_hook`, from `run_with_cache`); `positions`: its `cache.positions`."""
    if embeddings.ndim != 3 or embeddings.shape[:2] != positions.input_ids.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match the positions' sequences "
                         f"{tuple(positions.input_ids.shape)}: pass the cached stream these positions label")
    out = []
    for b in range(embeddings.shape[0]):
        spans = positions.image[b] if positions.image else []
        if not spans:
            raise ValueError(f"example {b} has no image tokens in this sequence")
        idx = torch.cat([span.indices for span in spans])
        norms = embeddings[b, idx.to(embeddings.device)].float().norm(dim=-1).cpu()
        out.append(idx[norms > norms.mean() + k * norms.std()])
    return out


# ------------------------------------------------------------------------------------------ pixel-space control
def noise_patches(image: Image.Image, patches: Bool[Tensor, "rows cols"], geometry: ImageGeometry, *,
                  seed: int = 0) -> Image.Image:
    """A copy of `image` whose pixels under the given patches (as the processor maps them, `geometry`) are
    replaced by uniform noise (seeded): Neo et al.'s pixel-space control, which noises the object's patches of the
    image itself before the model sees it (`replace_image_regions_with_patches`, on their own square crop)."""
    grid = tuple(patches.shape)
    pixels = np.array(image.convert("RGB"))
    rng = np.random.default_rng(seed)
    H, W = pixels.shape[:2]
    for r, c in torch.nonzero(patches).tolist():
        x0, y0, x1, y1 = geometry.patch_box(r, c, grid)
        j0, i0 = max(0, math.floor(x0 + 1e-6)), max(0, math.floor(y0 + 1e-6))
        j1, i1 = min(W, math.ceil(x1 - 1e-6)), min(H, math.ceil(y1 - 1e-6))
        if j1 > j0 and i1 > i0:
            pixels[i0:i1, j0:j1] = rng.integers(0, 256, size=(i1 - i0, j1 - j0, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
