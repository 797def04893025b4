"""Misuses of the hooked-vlm command: each exits with status 2 and one line on stderr that names what to fix.

Most rows call `cli.main(argv)` in-process; the last rows run the installed `hooked-vlm` script in a subprocess to
show that no traceback reaches the user. In argv, "{tmp}" is a folder with a text file `notes.png`, an image
`a.png`, a plain file `file`, and bad checkpoints `list_header/` (a safetensors header that is a JSON list) and
`bad_pickle/` (a pickle-only checkpoint whose weights file is not a pickle).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badcase import expect_error

from hooked_vlm import cli
from hooked_vlm.tiny import random_image

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


class CLIFailed(Exception):
    """The command's one line of stderr, raised when it exited with status 2 (for `expect_error`)."""


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, families) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "file").write_text("a file, not a folder\n")
    random_image(seed=0).save(folder / "a.png")
    blip = families["blip"]
    good = folder / "good"
    blip.hf.save_pretrained(good)
    blip.processor.save_pretrained(good)
    shutil.copytree(good, folder / "list_header")
    header = b"[1, 2, 3]"
    shard = next((folder / "list_header").glob("*.safetensors"))
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    shutil.copytree(good, folder / "bad_pickle")
    next((folder / "bad_pickle").glob("*.safetensors")).unlink()
    (folder / "bad_pickle" / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    return folder


def fail(argv: list[str], capsys) -> None:
    """Run the command; raise CLIFailed with its stderr line when it exits 2 with exactly one line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit status {code}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, f"stderr is not one line: {err!r}"
    raise CLIFailed(lines[0])


ROWS = [
    # images
    pytest.param(["patch", "--clean-image", "{tmp}/notes.png", "--corrupt-image", "{tmp}/a.png", "--prompt", "q",
                  "--answer", "red", "--wrong-answer", "blue"], ["--clean-image", "not an image"], id="non-image"),
    pytest.param(["trace", "--image", "{tmp}/notes.png", "--prompt", "q"], ["--image", "not an image"],
                 id="trace-non-image"),
    pytest.param(["lens", "--image", "{tmp}/missing.png", "--prompt", "q"], ["image file not found"],
                 id="missing-image"),
    pytest.param(["trace", "--image", "{tmp}/a.png"], ["--prompt"], id="image-without-prompt"),
    pytest.param(["patch", "--clean-image", "{tmp}/a.png"], ["give both --clean-image and --corrupt-image"],
                 id="one-image"),
    pytest.param(["patch", "--clean-image", "{tmp}/a.png", "--corrupt-image", "{tmp}/a.png"],
                 ["--prompt", "--answer", "--wrong-answer"], id="own-images-without-answers"),
    # device and output
    pytest.param(["info", "--device", "cuda"], ["no CUDA GPU", "--device cpu"], id="cuda-without-gpu",
                 marks=NO_GPU),
    pytest.param(["info", "--device", "gpu0"], ["not a device name"], id="bad-device"),
    pytest.param(["patch", "--out", "{tmp}/file"], ["--out", "is a file"], id="out-is-a-file"),
    pytest.param(["trace", "--out", "{tmp}/file/sub"], ["--out", "cannot be created"], id="out-under-a-file"),
    pytest.param(["patch", "--out", "/proc/hooked-vlm-out"], ["--out", "not writable"], id="out-read-only"),
    # models and checkpoints
    pytest.param(["info", "--model", "/no/such/checkpoint"], ["no such local directory"], id="missing-local-path"),
    pytest.param(["info", "--model", "{tmp}/file"], ["--model", "is a file"], id="model-is-a-file"),
    pytest.param(["info", "--model", "hooked-vlm-tests/no-such-model"], ["not in the local HF cache", "network"],
                 id="unreachable-hub-id"),
    pytest.param(["info", "--model", "{tmp}/list_header"], ["cannot load --model"], id="safetensors-list-header"),
    pytest.param(["info", "--model", "{tmp}/bad_pickle"], ["cannot load --model"], id="bad-pickle-only"),
    pytest.param(["convert", "/no/such/checkpoint", "{tmp}/converted"], ["source", "no such local directory"],
                 id="convert-missing-source"),
    pytest.param(["convert", "{tmp}/good", "{tmp}/list_header"], ["exists"], id="convert-onto-existing-folder"),
    # answers
    pytest.param(["patch", "--answer", ""], ["--answer", "empty"], id="empty-answer"),
    pytest.param(["patch", "--wrong-answer", "zebra"], ["--wrong-answer", "unknown token"], id="unknown-answer"),
    pytest.param(["patch", "--model", "tiny-llava", "--answer", "\u2581"], ["--answer", "word-boundary"],
                 id="lone-boundary-answer"),
    pytest.param(["patch", "--model", "tiny-llava", "--answer", "yes", "--wrong-answer", "yellow"],
                 ["both measured by the token", "'y'"], id="answers-share-a-token"),
    # prompts and templates
    pytest.param(["patch", "--corrupt-prompt", "what color is it"], ["--corrupt-prompt needs --prompt"],
                 id="corrupt-prompt-alone"),
    pytest.param(["patch", "--prompt", "what color is it", "--corrupt-prompt", "what color is it"],
                 ["equals --prompt"], id="corrupt-prompt-unchanged"),
    pytest.param(["patch", "--prompt", "what color is the car", "--corrupt-prompt", "what is it"],
                 ["equal token length"], id="corrupt-prompt-other-length"),
    pytest.param(["trace", "--template", "USER: <image> ASSISTANT:"], ["--template", "{question}"],
                 id="template-without-question"),
    pytest.param(["lens", "--template", "{prompt}: {question}"], ["--template", "{question}"],
                 id="template-other-field"),
    # towers and attention
    pytest.param(["patch", "--tower", "lm"], ["--tower 'lm'", "no tower 'lm'"], id="unknown-tower"),
    pytest.param(["patch", "--model", "tiny-llava", "--tower", "projector"], ["--tower 'projector'", "no transformer blocks"],
                 id="tower-without-blocks"),
    pytest.param(["patch", "--model", "tiny-llava", "--attention", "cross_attn"],
                 ["--attention cross_attn", "no cross-attention", "--attention attn"], id="llava-cross-attn-heads"),
    pytest.param(["trace", "--model", "tiny-llava", "--kind", "cross_attn"],
                 ["--kind cross_attn", "no cross-attention"], id="llava-trace-cross-attn"),
    pytest.param(["trace", "--model", "tiny-llava", "--kind", "resid_mid_cross"],
                 ["--kind resid_mid_cross", "no cross-attention", "resid_mid"], id="llava-trace-resid-mid-cross"),
    pytest.param(["lens", "--tower", "vision"], ["--tower 'vision'", "predicts no tokens"], id="lens-vision-tower"),
    # numbers
    pytest.param(["lens", "--k", "100000"], ["--k 100000", "vocabulary"], id="lens-k-above-vocab"),
    pytest.param(["lens", "--k", "0"], ["--k", "above 0"], id="lens-k-zero"),
    pytest.param(["trace", "--noise", "0"], ["--noise", "above 0"], id="trace-zero-noise"),
    pytest.param(["trace", "--noise", "nan"], ["--noise", "finite"], id="trace-nan-noise"),
    pytest.param(["trace", "--corruption", "multiplicative", "--noise-std=-1"], ["--noise-std", "above 0"],
                 id="trace-negative-noise-std"),
    # options of another corruption, checked before the model loads: they would be silently ignored
    pytest.param(["trace", "--factor", "0.5"], ["--factor goes with --corruption scale", "--corruption gaussian"],
                 id="trace-factor-with-gaussian"),
    pytest.param(["trace", "--corruption", "multiplicative", "--noise", "2"],
                 ["--noise goes with --corruption gaussian"], id="trace-noise-with-multiplicative"),
    pytest.param(["trace", "--corruption", "scale"], ["--corruption scale needs --factor"],
                 id="trace-scale-without-factor"),
    pytest.param(["trace", "--window", "1.5"], ["--window", "not an integer"], id="trace-fractional-window"),
    pytest.param(["patch", "--batch-size", "-1"], ["--batch-size", "above 0"], id="negative-batch-size"),
    pytest.param(["trace", "--seed", "-1"], ["--seed", "at least 0"], id="negative-seed"),
    # argparse's own
    pytest.param(["trace", "--kind", "bogus"], ["--kind", "invalid choice"], id="unknown-kind"),
    pytest.param(["patch", "--atention", "attn"], ["unrecognized arguments", "--atention"], id="misspelt-option"),
    pytest.param(["patch", "--heads", "--resid"], ["not allowed with"], id="heads-and-resid"),
]


@pytest.mark.parametrize("argv,words", ROWS)
def test_cli_misuse_is_one_line_with_status_2(argv, words, tmp, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub-id row must not wait on the network
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    expect_error(lambda: fail(argv, capsys), CLIFailed, *words)


def test_a_bug_is_one_line_naming_how_to_get_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_info", broken)
    expect_error(lambda: fail(["info"], capsys), CLIFailed, "internal error", "ZeroDivisionError", cli.DEBUG_ENV)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # and the traceback is there when asked for
    with pytest.raises(ZeroDivisionError):
        cli.main(["info"])


SCRIPT = Path(sys.executable).with_name("hooked-vlm")


@pytest.mark.skipif(not SCRIPT.exists(), reason="the hooked-vlm script is not installed next to this python")
@pytest.mark.parametrize("argv,words", [
    pytest.param(["trace", "--image", "{tmp}/notes.png", "--prompt", "q"], ["not an image"], id="non-image"),
    pytest.param(["info", "--model", "{tmp}/list_header"], ["cannot load --model"], id="list-header",
                 marks=pytest.mark.slow),  # ~5 s each (a fresh interpreter): one case is enough by default
])
def test_the_installed_script_prints_no_traceback(argv, words, tmp):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(SCRIPT)] + [a.replace("{tmp}", str(tmp)) for a in argv], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(w in lines[0] for w in words), lines[0]
