"""Loading: from a live HF model, a local directory and the local HF cache; conversion errors name the tensors."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedBlipVQA, HookedVLM
from hooked_vlm.loading import hooked_class, load_converted
from hooked_vlm.tiny import build_blip, random_image
from weights_conversion import converter_for


@pytest.fixture(scope="module")
def saved_vqa(tmp_path_factory):
    hf, processor = build_blip("vqa", seed=5)
    path = tmp_path_factory.mktemp("blip-vqa")
    hf.save_pretrained(path)
    processor.save_pretrained(path)
    inputs = processor(images=random_image(seed=2), text="what is on the table", return_tensors="pt")
    with torch.no_grad():
        ref = HookedVLM.from_hf(hf)(**inputs)
    return path, inputs, ref


def test_from_pretrained_local_directory(saved_vqa):
    path, inputs, ref = saved_vqa
    model = HookedVLM.from_pretrained(path)
    assert isinstance(model, HookedBlipVQA) and model.processor is not None
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), ref, atol=1e-6, rtol=0)
    again = model.processor(images=random_image(seed=2), text="what is on the table", return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])


def test_from_pretrained_local_hf_cache(saved_vqa, tmp_path):
    """A hub id whose files are in the HF cache layout loads without network."""
    path, inputs, ref = saved_vqa
    snapshot = tmp_path / "models--tiny-org--blip-vqa" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in path.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "models--tiny-org--blip-vqa" / "refs").mkdir()
    (tmp_path / "models--tiny-org--blip-vqa" / "refs" / "main").write_text("0123abc")
    model = HookedVLM.from_pretrained("tiny-org/blip-vqa", cache_dir=tmp_path, local_files_only=True,
                                      dtype=torch.float64)
    assert model.dtype == torch.float64
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs64).float(), ref, atol=1e-5, rtol=0)


def test_from_hf_copies_weights_and_options():
    hf, _ = build_blip("vqa", seed=6)
    model = HookedVLM.from_hf(hf, mask_cross_attention=True)
    assert model.cfg.mask_cross_attention
    with torch.no_grad():
        model.vision.W_pos.zero_()
    assert hf.vision_model.embeddings.position_embedding.abs().sum() > 0  # the HF model is untouched


def _convert(hf, state):
    converter = converter_for(hf)
    cfg = converter.config(hf.config)
    return converter.convert(state, cfg)


def test_unknown_missing_and_misshaped_weights_are_named():
    hf, _ = build_blip("caption")
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match=r"does not know these tensors: \['text_decoder.extra.weight'\]"):
        _convert(hf, {**state, "text_decoder.extra.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(KeyError, match="vision_model.encoder.layers.1.mlp.fc2.bias"):
        _convert(hf, missing)

    converted = _convert(hf, state)
    converted["text_decoder.blocks.0.mlp.in_weight"] = converted["text_decoder.blocks.0.mlp.in_weight"][:-1]
    with torch.device("meta"):
        model = hooked_class(converter_for(hf))(converter_for(hf).config(hf.config))
    with pytest.raises(ValueError, match=r"mis-shaped.*text_decoder.blocks.0.mlp.in_weight"):
        load_converted(model, converted, "test")
    del converted["vision.W_pos"]
    with pytest.raises(ValueError, match=r"missing \['vision.W_pos'\]"):
        load_converted(model, converted, "test")


def test_untied_blip_decoder_bias_is_an_error():
    hf, _ = build_blip("caption")
    state = dict(hf.state_dict())
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match="expected to be tied"):
        _convert(hf, state)


def test_unsupported_model_class_is_named():
    with pytest.raises(ValueError, match="cannot convert Linear; supported HF classes: .*BlipForQuestionAnswering"):
        HookedVLM.from_hf(torch.nn.Linear(2, 2))
