"""The COCO instances loader reads the real file format, and Neo et al.'s filter selects as their `filter_fn`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hooked_vlm import spatial
from hooked_vlm.data import CocoImage, coco_instances, neo_filter

POLY = [10.0, 10.0, 60.0, 10.0, 60.0, 40.0, 10.0, 40.0]


def ann(id, image_id, category_id, area, **kw):
    return {"id": id, "image_id": image_id, "category_id": category_id, "segmentation": [POLY], "area": area,
            "bbox": [10.0, 10.0, 50.0, 30.0], "iscrowd": 0, **kw}


@pytest.fixture
def coco(tmp_path):
    """A small file exactly in the COCO instances format (info, licenses, images, annotations, categories)."""
    images = [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": "", "height": 120, "width": 160,
               "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": i} for i in (139, 285, 632, 724, 776)]
    crowd = {"counts": [4000, 200, 15000], "size": [120, 160]}
    annotations = [
        ann(1, 139, 18, 1500.0), ann(2, 139, 1, 5000.0),  # one dog of 1500 px²: selected
        ann(3, 285, 18, 1500.0), ann(4, 285, 18, 1200.0), ann(5, 285, 3, 999.0),  # two dogs; the car is too small
        ann(6, 632, 1, 100.0), ann(7, 632, 1, 100.0), ann(8, 632, 3, 100.0), ann(9, 632, 18, 1900.0),  # 4 annotations
        ann(10, 724, 1, 1000.0), ann(11, 724, 3, 2000.0), ann(12, 724, 62, 1999.0),  # bounds are strict: the chair
        {"id": 13, "image_id": 776, "category_id": 1, "segmentation": crowd, "area": 200.0,
         "bbox": [25.0, 40.0, 2.0, 100.0], "iscrowd": 1},
    ]
    categories = [{"supercategory": "person", "id": 1, "name": "person"},
                  {"supercategory": "vehicle", "id": 3, "name": "car"},
                  {"supercategory": "animal", "id": 18, "name": "dog"},
                  {"supercategory": "furniture", "id": 62, "name": "chair"}]
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [{"id": 1, "name": "x", "url": ""}],
                                "images": images, "annotations": annotations, "categories": categories}))
    folder = tmp_path / "val2017"
    folder.mkdir()
    Image.new("RGB", (160, 120), (10, 20, 30)).save(folder / "000000000139.jpg")
    return path, folder


def test_loader_reads_images_and_annotations_in_file_order(coco):
    path, folder = coco
    images = coco_instances(path, folder)
    assert [im.id for im in images] == [139, 285, 632, 724, 776]
    first = images[0]
    assert isinstance(first, CocoImage) and first.size == (160, 120) and first.meta["license"] == 1
    assert [(a.id, a.category) for a in first.annotations] == [(1, "dog"), (2, "person")]
    dog = first.annotations[0]
    assert dog.bbox == (10.0, 10.0, 50.0, 30.0) and dog.area == 1500.0 and dog.segmentation == [POLY]
    assert not dog.iscrowd and dog.raw["id"] == 1
    assert first.image.load().size == (160, 120)  # opened only now
    with pytest.raises(FileNotFoundError, match="000000000285.jpg"):
        images[1].image.load()  # lazily: a missing image fails when it is opened, not when the file is read
    crowd = images[4].annotations[0]
    assert crowd.iscrowd and isinstance(crowd.segmentation, dict)
    mask = spatial.annotation_mask(crowd.raw, 120, 160)
    # column-major runs: 4000 background pixels fill columns 0-32 and rows 0-39 of column 33
    assert mask.sum() == 200 and mask[40:, 33].all() and mask[:40, 33].sum() == 0 and mask[:, 34].all()


def test_neo_filter_selects_as_the_authors_filter_fn(coco):
    path, folder = coco
    chosen = {im.id: neo_filter(im) for im in coco_instances(path, folder)}
    assert chosen[139].id == 1
    assert chosen[285] is None  # dog has 2 instances, car's area is 999
    assert chosen[632] is None  # 4 annotations
    assert chosen[724].id == 12  # 1000 and 2000 are outside (strict bounds), 1999 is inside
    assert chosen[776] is None
    image = coco_instances(path, folder)[2]
    assert neo_filter(image, max_annotations=4).category == "dog"
    assert neo_filter(coco_instances(path, folder)[0], area=(4000, 6000)).category == "person"


def test_loader_refuses_other_files(tmp_path):
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="lacks"):
        coco_instances(bad, tmp_path)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}],
                                  "annotations": [ann(1, 5, 1, 10.0)]}))
    with pytest.raises(ValueError, match="image 5"):
        coco_instances(orphan, tmp_path)
    with pytest.raises(FileNotFoundError):
        coco_instances(tmp_path / "missing.json", tmp_path)


def test_annotation_to_patches_end_to_end(coco):
    """The loader's annotation feeds the spatial mapping directly."""
    from transformers import CLIPImageProcessorPil

    path, folder = coco
    image = coco_instances(path, folder)[0]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    geometry = spatial.processor_geometry(processor, image.size)
    mask = spatial.annotation_mask(image.annotations[0].raw, image.height, image.width)
    patches = spatial.object_patches(mask, geometry, 6)
    # resized 64 x 48, crop left 8 (= 20 original px), patches of 20 original px: the box [10, 60) x [10, 40) lands
    # in columns 0-1 (x < 20 is cropped away) and rows 0-1 (row 2 starts at y = 40)
    assert patches.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert torch.equal(spatial.object_patches(spatial.annotation_mask(image.annotations[0].raw, 120, 160,
                                                                      use="bbox"), geometry, 6), patches)
