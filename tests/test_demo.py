"""The README's main job runs end to end on the embedded tiny model."""

from hooked_vlm import demo


def test_demo_runs_on_the_tiny_model(capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # as if nothing is cached
    assert demo.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "weights are RANDOM" in out
    assert "text_encoder.blocks.1.cross_attn.hook_z" in out and "corrupted + clean head" in out
