"""The hooked-vlm command on the embedded tiny model: outputs, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from hooked_vlm import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and "text_encoder: 2 layers, 4 heads, post-LN" in out and "167 hook points" in out


@pytest.mark.parametrize("extra", [[], ["--resid"], ["--prompt", "what color is the dog?", "--corrupt-prompt",
                                                     "what color is the car?", "--attention", "attn"]])
def test_patch_writes_heatmap_json_csv(capsys, tmp_path, extra):
    code, out, err = run(capsys, "patch", "--out", str(tmp_path), *extra)
    assert code == 0, err
    data = json.loads((tmp_path / "patch.json").read_text())
    assert len(data["scores"]) == 2 and (tmp_path / "patch.csv").read_text().startswith("layer,")
    assert (tmp_path / "patch.png").stat().st_size > 1000


def test_trace_and_lens(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "--out", str(tmp_path), "--kind", "attn", "--window", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "trace.json").read_text())["window"] == 2
    code, out, _ = run(capsys, "lens", "--k", "3")
    assert code == 0 and "layer   1:" in out


@pytest.mark.parametrize("argv,message", [
    (["patch", "--clean-image", "/no/such.png", "--corrupt-image", "/no/other.png"], "image file not found"),
    (["patch", "--clean-image", "/no/such.png"], "give both --clean-image and --corrupt-image"),
    (["info", "--model", "not-a-model"], "neither a local directory nor a hub id"),
    (["patch", "--tower", "lm"], "no tower 'lm'"),
    (["patch", "--corrupt-prompt", "what color is it"], "--corrupt-prompt needs --prompt"),
])
def test_errors_are_one_line_with_status_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trace", "--kind", "bogus"])
    assert e.value.code == 2
