"""Shared tiny models for the adversarial suite (tests/bad_inputs/): one per family, built once per session.

Each test file here (test_bad_*.py) holds a table of bad inputs and misuses, one row per case: what is called, the
error type expected, and words its message must contain, so that the message says what to fix, not only that
something broke (`badcase.expect_error` checks one row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

LLAVA_PROMPT = "USER: <image>\nwhat is in the picture? ASSISTANT:"


@dataclass
class Family:
    """A tiny hooked model of one family, its HF twin, its processor and one ready batch of inputs."""

    name: str
    model: HookedVLM
    hf: Any
    processor: Any
    inputs: dict[str, Any]


def _family(name: str) -> Family:
    image = random_image(seed=0)
    if name == "blip":
        hf, processor = build_blip("vqa", seed=3)
        inputs = processor(images=image, text="what color is the car", return_tensors="pt")
    elif name == "llava":
        hf, processor = build_llava(seed=3)
        inputs = processor(images=image, text=LLAVA_PROMPT, return_tensors="pt")
    else:
        hf, processor = build_instructblip(name.split("-")[1], seed=3)
        inputs = processor(images=image, text="what is in the picture?", return_tensors="pt")
    model = HookedVLM.from_hf(hf, processor=processor)
    return Family(name, model, hf, processor, dict(inputs))


FAMILIES = ("blip", "llava", "instructblip-llama", "instructblip-t5")


@pytest.fixture(scope="session")
def families() -> dict[str, Family]:
    """Every family, built lazily on first use (a test that needs one family does not pay for the others)."""
    built: dict[str, Family] = {}

    class Lazy(dict):
        def __missing__(self, key: str) -> Family:
            if key not in FAMILIES:
                raise KeyError(key)
            built[key] = _family(key)
            self[key] = built[key]
            return built[key]

    return Lazy()


@pytest.fixture(autouse=True)
def _no_hooks_left(request):
    """After every case, no hook may stay attached to a model of this suite (an error must not leak hooks)."""
    yield
    fams = request.getfixturevalue("families") if "families" in request.fixturenames else {}
    for fam in dict(fams).values():
        left = [n for n, p in fam.model.hook_dict.items() if p.fwd_hooks or p.bwd_hooks]
        assert not left, f"hooks left attached on {fam.name}: {left[:5]}"
