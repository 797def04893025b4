"""Unless HOOKED_VLM_TYPECHECK=0, the jaxtyping import hook of conftest.py is on: hooked_vlm's shape annotations are checked in every test."""

import os

import pytest
import torch

from hooked_vlm.components.masks import padding_mask

jaxtyping = pytest.importorskip("jaxtyping")
pytestmark = pytest.mark.skipif(os.environ.get("HOOKED_VLM_TYPECHECK", "1") == "0",
                                reason="HOOKED_VLM_TYPECHECK=0 turned the runtime checks off (see conftest.py)")


def test_shape_annotations_are_checked_at_runtime():
    assert padding_mask(torch.ones(2, 5, dtype=torch.long), torch.float32).shape == (2, 1, 1, 5)
    with pytest.raises(jaxtyping.TypeCheckError, match="attention_mask"):
        padding_mask(torch.ones(2, 5, 3, dtype=torch.long), torch.float32)  # "B S" given a 3-D mask
    with pytest.raises(jaxtyping.TypeCheckError, match="attention_mask"):
        padding_mask(torch.ones(2, 5), torch.float32)  # Int given floats
