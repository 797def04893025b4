"""Corruption helpers: STR length check, seeded noise, minimal pairs and their loaders."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm import corruption
from hooked_vlm.tiny import build_blip, random_image


@pytest.fixture(scope="module")
def processor():
    return build_blip("vqa")[1]


def test_symmetric_token_replacement(processor):
    clean, corrupt = corruption.symmetric_token_replacement(processor, "what color is the car", {"car": "dog"},
                                                            images=random_image())
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    assert (clean["input_ids"] != corrupt["input_ids"]).sum() == 1
    assert torch.equal(clean["pixel_values"], corrupt["pixel_values"])
    with pytest.raises(ValueError, match=r"replacing 'car' \(1 tokens.*'cars' \(2 tokens"):
        corruption.symmetric_token_replacement(processor.tokenizer, "what color is the car", {"car": "cars"})
    with pytest.raises(ValueError, match="does not occur"):
        corruption.symmetric_token_replacement(processor.tokenizer, "what color is the car", {"bus": "car"})


def test_gaussian_noise_is_seeded_and_scaled():
    values = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)) * 4
    sites = torch.zeros(2, 5, dtype=torch.bool)
    sites[:, 1:3] = True
    a = corruption.gaussian_noise(values, 3.0, sites=sites, seed=1)
    assert torch.equal(a, corruption.gaussian_noise(values, 3.0, sites=sites, seed=1))
    assert not torch.equal(a, corruption.gaussian_noise(values, 3.0, sites=sites, seed=2))
    assert torch.all(a[~sites] == 0) and torch.all(a[sites] != 0)
    big = corruption.gaussian_noise(torch.randn(64, 64, 16) * 2, 3.0, seed=0)
    assert abs(big.std().item() - 6.0) < 0.2


def test_synthetic_pairs_are_deterministic_and_differ_in_one_attribute():
    for attribute in corruption.ATTRIBUTES:
        a = corruption.synthetic_pairs(3, attribute, seed=5, size=64)
        b = corruption.synthetic_pairs(3, attribute, seed=5, size=64)
        for p, q in zip(a, b):
            assert p.answer == q.answer and p.wrong_answer == q.wrong_answer and p.prompt == q.prompt
            assert p.clean_image.tobytes() == q.clean_image.tobytes()
            assert p.answer != p.wrong_answer and p.clean_image.tobytes() != p.corrupt_image.tobytes()
    with pytest.raises(ValueError, match="attribute must be one of"):
        corruption.synthetic_pairs(1, "texture")


def test_pair_loaders_round_trip(tmp_path, processor):
    pairs = corruption.synthetic_pairs(2, "color", seed=0, size=48)
    rows = ["clean_image,corrupt_image,prompt,answer,wrong_answer"]
    for i, pair in enumerate(pairs):
        sub = tmp_path / "folder" / f"{i:02d}"
        sub.mkdir(parents=True)
        pair.clean_image.save(sub / "clean.png")
        pair.corrupt_image.save(sub / "corrupt.png")
        (sub / "pair.json").write_text(json.dumps({"prompt": pair.prompt, "answer": pair.answer,
                                                   "wrong_answer": pair.wrong_answer}))
        rows.append(f"folder/{i:02d}/clean.png,folder/{i:02d}/corrupt.png,{pair.prompt},{pair.answer},"
                    f"{pair.wrong_answer}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    for loaded in (corruption.load_pairs_folder(tmp_path / "folder"), corruption.load_pairs_csv(tmp_path / "pairs.csv")):
        assert [p.answer for p in loaded] == [p.answer for p in pairs]
        assert loaded[1].clean_image.tobytes() == pairs[1].clean_image.tobytes()
    clean, corrupt = pairs[0].inputs(processor)
    assert torch.equal(clean["input_ids"], corrupt["input_ids"]) and not torch.equal(clean["pixel_values"],
                                                                                      corrupt["pixel_values"])
    with pytest.raises(FileNotFoundError, match="no CSV"):
        corruption.load_pairs_csv(tmp_path / "missing.csv")
