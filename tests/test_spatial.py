"""COCO masks -> patch grid -> sequence positions, checked against what the processor itself makes of the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

from hooked_vlm import HookedVLM, spatial
from hooked_vlm.positions import ImageSpan, Positions
from hooked_vlm.tiny import build_llava, random_image

CLIP_336 = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})  # LLaVA-1.5's processor


def draw_object(size, polygon):
    """A white image of `size` with the polygon's mask (as spatial rasterises it) painted pure red."""
    W, H = size
    mask = spatial.annotation_mask({"segmentation": [polygon]}, H, W)
    image = Image.new("RGB", (W, H), (255, 255, 255))
    ImageDraw.Draw(image).bitmap((0, 0), Image.fromarray((mask.numpy() * 255).astype(np.uint8)), fill=(255, 0, 0))
    return image, mask


def shown(processor, image, grid):
    """[grid, grid]: per patch of pixel_values, the most red any of its pixels is (0 white .. 1 pure red)."""
    pv = processor(images=image, return_tensors="pt")["pixel_values"][0]
    rgb = pv * torch.tensor(processor.image_std)[:, None, None] + torch.tensor(processor.image_mean)[:, None, None]
    red = (1 - rgb[1]).clamp(0, 1)  # the green channel falls from 1 to 0 where the object is
    p = red.shape[0] // grid
    return red.view(grid, p, grid, p).amax(dim=(1, 3))


def polygons(size, n, seed):
    rng = np.random.default_rng(seed)
    W, H = size
    out = []
    for _ in range(n):
        w, h = rng.uniform(6, 90, 2)
        x, y = rng.uniform(-10, W - w + 10), rng.uniform(-10, H - h + 10)  # some reach the crop's edges
        out.append([x, y, x + w, y + 0.2 * h, x + 0.8 * w, y + h, x + 0.1 * w, y + 0.7 * h])
    return out


def agrees(selected_coverage, shows):
    """The mapping selects every patch whose pixels show the object, and a patch a quarter covered shows it."""
    return bool(((shows > 0.5) <= (selected_coverage > 0)).all() and (shows[selected_coverage >= 0.25] > 0.5).all())


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (500, 333), (333, 500)])
def test_patches_are_the_ones_the_processor_shows_the_object_in(size):
    processor = CLIPImageProcessorPil(**CLIP_336)
    geometry = spatial.processor_geometry(processor, size)
    assert geometry.resized == ((336, int(336 * size[1] / size[0])) if size[0] < size[1]
                                else (int(336 * size[0] / size[1]), 336))
    selected_any = 0
    for polygon in polygons(size, 12, seed=sum(size)):
        image, mask = draw_object(size, polygon)
        coverage = spatial.patch_coverage(mask, geometry, 24)
        shows = shown(processor, image, 24)
        assert agrees(coverage, shows), polygon
        selected_any += int((coverage > 0).sum())
    assert selected_any > 20  # the objects were seen at all


def test_a_mapping_that_ignores_the_crop_disagrees_with_the_processor():
    """The check above can fail: the same images mapped as if squashed to a square (no crop) disagree."""
    processor = CLIPImageProcessorPil(**CLIP_336)
    size = (640, 427)
    squashed = spatial.ImageGeometry(size, (336, 336), (0, 0, 336, 336))
    right = spatial.processor_geometry(processor, size)
    wrong = 0
    for polygon in polygons(size, 12, seed=3):
        image, mask = draw_object(size, polygon)
        shows = shown(processor, image, 24)
        assert agrees(spatial.patch_coverage(mask, right, 24), shows)
        wrong += not agrees(spatial.patch_coverage(mask, squashed, 24), shows)
    assert wrong > 0


def test_blip_resizes_to_a_square_without_crop():
    processor = BlipImageProcessorPil(size={"height": 384, "width": 384})
    size = (640, 427)
    geometry = spatial.processor_geometry(processor, size)
    assert geometry.resized == (384, 384) and geometry.crop == (0, 0, 384, 384)
    for polygon in polygons(size, 8, seed=5):
        image, mask = draw_object(size, polygon)
        assert agrees(spatial.patch_coverage(mask, geometry, 24), shown(processor, image, 24))


def test_geometry_refuses_what_it_does_not_model():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336, "longest_edge": 500},
                                      crop_size={"height": 336, "width": 336})
    with pytest.raises(ValueError, match="not supported"):
        spatial.processor_geometry(processor, (640, 427))
    padding = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    padding.do_pad = True  # padded images shift the patches: refused, not mapped as if unpadded
    with pytest.raises(ValueError, match="do_pad"):
        spatial.processor_geometry(padding, (640, 427))


def test_coverage_is_the_covered_fraction_and_any_overlap_selects():
    geometry = spatial.ImageGeometry((48, 48), (48, 48), (0, 0, 48, 48))  # 6 x 6 patches of 8 pixels
    mask = torch.zeros(48, 48)
    mask[0:8, 0:4] = 1  # half of patch (0, 0)
    mask[20, 20] = 1  # one pixel of patch (2, 2)
    coverage = spatial.patch_coverage(mask, geometry, 6)
    assert coverage[0, 0] == pytest.approx(0.5) and coverage[2, 2] == pytest.approx(1 / 64)
    assert coverage.sum() == pytest.approx(0.5 + 1 / 64)
    assert spatial.object_patches(mask, geometry, 6).nonzero().tolist() == [[0, 0], [2, 2]]
    assert spatial.object_patches(mask, geometry, 6, min_coverage=0.25).nonzero().tolist() == [[0, 0]]
    # a box covers fractions of its edge pixels, and its patch coverage adds up to its area
    box = spatial.box_mask([3.5, 2.25, 10.0, 4.5], 48, 48)
    assert box.sum().item() == pytest.approx(45.0)
    assert (spatial.patch_coverage(box, geometry, 6) * 64).sum().item() == pytest.approx(45.0)


def neo_buffer(indices, buffer, width=24, height=24):
    """Neo et al.'s `_add_buffer` (utils.get_object_patch_indices), as released."""
    if buffer <= 0:
        return set(indices)
    new = neo_buffer(indices, buffer - 1) if buffer > 1 else set(indices)
    extra = set()
    for idx in new:
        row, col = divmod(idx, width)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr or dc) and 0 <= row + dr < height and 0 <= col + dc < width:
                    extra.add((row + dr) * width + col + dc)
    return new | extra


@pytest.mark.parametrize("buffer", [0, 1, 2, 3])
def test_dilation_equals_the_authors_buffer(buffer):
    generator = torch.Generator().manual_seed(buffer)
    patches = torch.rand(24, 24, generator=generator) > 0.97
    patches[0, 0] = patches[23, 12] = True  # corners and edges
    ours = set(torch.nonzero(spatial.dilate(patches, buffer).flatten()).flatten().tolist())
    assert ours == neo_buffer(torch.nonzero(patches.flatten()).flatten().tolist(), buffer)


def rle_encode(mask: torch.Tensor) -> str:
    """pycocotools' `rleEncode` + `rleToString`, as its C code does them (for the test only)."""
    flat = mask.T.flatten().int().tolist()  # column-major
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_masks():
    assert spatial.decode_rle("04") == [0, 4]
    full = spatial.rle_mask({"size": [2, 2], "counts": "04"})
    assert torch.equal(full, torch.ones(2, 2))
    # uncompressed runs are column-major: 1 background pixel, then 2 object pixels, ...
    mask = spatial.rle_mask({"size": [2, 3], "counts": [1, 2, 3]})
    assert torch.equal(mask, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    _, polygon_mask = draw_object((64, 40), [5.0, 3.0, 50.0, 8.0, 40.0, 35.0, 9.0, 30.0])
    rle = {"size": [40, 64], "counts": rle_encode(polygon_mask)}
    assert torch.equal(spatial.annotation_mask({"segmentation": rle}, 40, 64), polygon_mask)
    with pytest.raises(ValueError, match="sum to"):
        spatial.rle_mask({"size": [2, 2], "counts": [1, 2]})


def test_neo_mapping_agrees_where_the_grid_divides_and_drifts_where_it_does_not():
    processor = CLIPImageProcessorPil(**CLIP_336)
    # 640 x 480: the crop is 480 = 24 x 20 pixels, the processor's patches are 20 original pixels too
    polygon = [300.0, 200.0, 360.0, 210.0, 340.0, 260.0]
    ann = {"segmentation": [polygon]}
    mask = spatial.annotation_mask(ann, 480, 640)
    ours = spatial.object_patches(mask, spatial.processor_geometry(processor, (640, 480)), 24)
    assert torch.equal(spatial.neo_object_patches(ann, (640, 480)), ours)
    # 640 x 427: their patches are 427 // 24 = 17 pixels, the processor's 17.8; near the far edge they part
    polygon = [500.0, 390.0, 520.0, 390.0, 520.0, 420.0, 500.0, 420.0]
    ann = {"segmentation": [polygon]}
    image, mask = draw_object((640, 427), polygon)
    ours = spatial.object_patches(mask, spatial.processor_geometry(processor, (640, 427)), 24)
    theirs = spatial.neo_object_patches(ann, (640, 427))
    assert not torch.equal(ours, theirs)
    assert agrees(spatial.patch_coverage(mask, spatial.processor_geometry(processor, (640, 427)), 24),
                  shown(processor, image, 24))


def test_patch_positions_follow_the_image_span_of_a_padded_batch():
    hf, processor = build_llava(seed=0, image_size=48, patch=8)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=0), random_image(seed=1)],
                       text=["USER: <image>\nis there a car in the picture? ASSISTANT:",
                             "USER: <image>\nhi ASSISTANT:"],
                       padding=True, return_tensors="pt")
    positions = model.positions(**inputs)
    patches = torch.zeros(6, 6, dtype=torch.bool)
    patches[2, 3] = patches[5, 0] = True
    starts = []
    for b in range(2):
        span = positions.image[b][0]
        where = spatial.patch_positions(span, patches)
        assert where.tolist() == [span.start + 2 * 6 + 3, span.start + 5 * 6 + 0]
        assert (inputs["input_ids"][b, where] == model.cfg.image_token_id).all()
        assert torch.equal(spatial.patch_positions(span, [15, 30]), where)  # row-major indices
        assert torch.equal(spatial.image_token_indices(span, where), torch.tensor([15, 30]))
        starts.append(span.start)
    assert starts[0] != starts[1]  # the second prompt is left-padded: no fixed offset would serve both


def test_patch_positions_skip_a_class_token():
    span = ImageSpan(10, 15, torch.tensor([-1, 0, 0, 1, 1]), torch.tensor([-1, 0, 1, 0, 1]))
    assert spatial.patch_positions(span, torch.tensor([[False, True], [True, False]])).tolist() == [12, 13]


def test_register_tokens_match_the_authors_rule():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 30, 16, generator=generator)
    embeds[0, 7] *= 10
    embeds[1, 20] *= 10
    ids = torch.zeros(2, 30, dtype=torch.long)
    spans = [[ImageSpan(5, 25, torch.arange(20) // 5, torch.arange(20) % 5)],
             [ImageSpan(8, 28, torch.arange(20) // 5, torch.arange(20) % 5)]]
    positions = Positions(ids, torch.ones_like(ids), spans)
    found = spatial.register_tokens(embeds, positions)
    for b, (start, stop) in enumerate([(5, 25), (8, 28)]):
        norms = embeds[b, start:stop].norm(dim=-1)
        expected = torch.where(norms > norms.mean() + 2 * torch.std(norms))[0] + start  # get_register_indices
        assert torch.equal(found[b], expected)
    assert found[0].tolist() == [7] and found[1].tolist() == [20]


def test_noise_patches_changes_only_those_patches():
    processor = CLIPImageProcessorPil(**CLIP_336)
    image = Image.new("RGB", (640, 427), (200, 180, 160))
    geometry = spatial.processor_geometry(processor, image.size)
    patches = torch.zeros(24, 24, dtype=torch.bool)
    patches[10, 11] = True
    noised = spatial.noise_patches(image, patches, geometry, seed=1)
    before = processor(images=image, return_tensors="pt")["pixel_values"][0]
    after = processor(images=noised, return_tensors="pt")["pixel_values"][0]
    changed = (after - before).abs().amax(0).view(24, 14, 24, 14).amax(dim=(1, 3)) > 0.05
    assert changed[10, 11]
    assert changed.sum() <= 9  # the patch, and at most its neighbours through the resampling kernel
    assert not changed[~spatial.dilate(patches, 1)].any()


# ------------------------------------------------------------------------------------------ Qwen2-VL
def _qwen_processors():
    from transformers import Qwen2VLImageProcessorPil

    return {"default": Qwen2VLImageProcessorPil(),  # 14-pixel patches merged 2 x 2, HF's pixel budget
            "max_pixels": Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48},
                                                   patch_size=4, merge_size=2),  # build_qwen2_vl's: shrinks
            "min_pixels": Qwen2VLImageProcessorPil(size={"shortest_edge": 1200 * 1200, "longest_edge": 2000 * 2000},
                                                   patch_size=8, merge_size=2)}  # grows


@pytest.mark.parametrize("which", ["default", "max_pixels", "min_pixels"])
@pytest.mark.parametrize("size", [(640, 427), (427, 640), (500, 333), (333, 500), (98, 41)])
def test_qwen_geometry_is_the_processors_own_grid(which, size):
    """The resize and the merged grid equal what the processor itself outputs (image_grid_thw) for each size."""
    processor = _qwen_processors()[which]
    geometry = spatial.processor_geometry(processor, size)
    t, h, w = processor(images=Image.new("RGB", size), return_tensors="pt")["image_grid_thw"][0].tolist()
    p, m = processor.patch_size, processor.merge_size
    assert geometry.resized == (w * p, h * p) and geometry.crop == (0, 0, w * p, h * p)
    assert geometry.grid == (h // m, w // m)


def shown_merged(processor, image, grid):
    """[rows, cols]: per merged token (m x m consecutive patches of pixel_values, row-major over the merged grid),
    the most red any of its pixels is. Each patch row is (channel, temporal, p, p)."""
    pv = processor(images=image, return_tensors="pt")["pixel_values"]
    p, t = processor.patch_size, processor.temporal_patch_size
    rgb = pv.view(-1, 3, t, p * p) * torch.tensor(processor.image_std)[:, None, None] + torch.tensor(
        processor.image_mean)[:, None, None]
    red = (1 - rgb[:, 1]).clamp(0, 1).amax(dim=(1, 2))  # per patch
    return red.view(-1, processor.merge_size**2).amax(-1).view(grid)


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (500, 333)])
def test_qwen_patches_are_the_ones_the_processor_shows_the_object_in(size):
    processor = _qwen_processors()["default"]
    geometry = spatial.processor_geometry(processor, size)
    selected_any = 0
    for polygon in polygons(size, 8, seed=sum(size)):
        image, mask = draw_object(size, polygon)
        coverage = spatial.patch_coverage(mask, geometry)  # the geometry's own merged grid
        assert coverage.shape == geometry.grid
        assert agrees(coverage, shown_merged(processor, image, geometry.grid)), polygon
        selected_any += int((coverage > 0).sum())
    assert selected_any > 10


def test_qwen_box_patches_are_lm_positions_of_its_merged_tokens():
    """A box through the processor's resize onto each image's merged grid, then to LM positions of a left-padded
    batch of two images of different sizes; the reference scales the box by hand into the resized image and takes
    every token of `patch * merge` pixels it overlaps."""
    from hooked_vlm.tiny import build_qwen2_vl

    hf, processor = build_qwen2_vl(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [Image.new("RGB", (640, 427)), Image.new("RGB", (333, 500))]
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = processor(images=images, text=[f"{img}is there a car?", f"hi {img}"], padding=True, return_tensors="pt")
    positions = model.positions(**inputs)
    box = [101.3, 57.9, 230.2, 140.6]  # COCO x, y, w, h
    f = processor.image_processor.patch_size * processor.image_processor.merge_size
    for b, image in enumerate(images):
        geometry = spatial.processor_geometry(processor, image.size)
        span = positions.image[b][0]
        assert (int(span.rows.max()) + 1, int(span.cols.max()) + 1) == geometry.grid
        patches = spatial.object_patches(spatial.box_mask(box, image.height, image.width), geometry)
        sx, sy = geometry.resized[0] / image.width, geometry.resized[1] / image.height
        cols = range(int(box[0] * sx // f), int(np.ceil((box[0] + box[2]) * sx / f)))
        rows = range(int(box[1] * sy // f), int(np.ceil((box[1] + box[3]) * sy / f)))
        assert patches.nonzero().tolist() == [[r, c] for r in rows for c in cols]
        where = spatial.patch_positions(span, patches)
        assert torch.equal(where, span.patches(list(rows), list(cols)))
        assert (inputs["input_ids"][b, where] == hf.config.image_token_id).all()
        flat = [r * geometry.grid[1] + c for r in rows for c in cols]  # row-major over the rectangular grid
        assert torch.equal(spatial.patch_positions(span, flat), where)
    with pytest.raises(ValueError, match="pass grid"):
        spatial.patch_coverage(torch.zeros(427, 640), spatial.processor_geometry(CLIPImageProcessorPil(**CLIP_336),
                                                                                (640, 427)))
