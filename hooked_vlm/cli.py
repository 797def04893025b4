"""`hooked-vlm`: the analyses from the command line.

    hooked-vlm info  [--model M]
    hooked-vlm convert SOURCE OUT_DIR [--dtype bfloat16] [--overwrite]
    hooked-vlm patch [--model M] [--clean-image A --corrupt-image B | --corrupt-prompt Q'] [--prompt Q]
                     [--answer X --wrong-answer Y] [--heads | --resid] [--tower T] [--attention attn|cross_attn]
    hooked-vlm trace [--model M] [--image A] [--prompt Q] [--tower T] [--kind resid] [--window 1] [--samples 1]
                     [--corruption gaussian [--noise 3] | multiplicative [--noise-mean 1] [--noise-std 5]
                      | scale --factor F] [--redraw sample|forward]
    hooked-vlm lens  [--model M] [--image A] [--prompt Q] [--tower T] [--k 5] [--html --out DIR]

Every command that loads a model takes `--device` and `--dtype float32|float16|bfloat16` (the weights are read
straight into that dtype; default: the checkpoint's own); patch and trace take `--batch-size` (patched variants per
forward pass: lower it when the device runs out of memory).
`--model` is a hub id or a local directory, or one of the tiny models built offline with RANDOM weights (to try the
commands; their numbers mean nothing): tiny (BLIP-VQA), tiny-llava, tiny-instructblip, tiny-instructblip-t5.
The question is wrapped in the family's prompt template (LLaVA-1.5: "USER: <image>\\n{question} ASSISTANT:").
Without images, a synthetic minimal pair (a drawn shape that changes colour) is used. Results go to `--out` (PNG
heatmap, JSON and CSV); JSON never holds NaN or Infinity (non-finite scores are written as null, with a warning).
`--html` (patch, trace, lens) also writes an interactive self-contained HTML view there (hooked_vlm.view).

Every error, bad input or not, is one line on stderr and exit status 2; an unexpected one (a bug) says so and how
to see its traceback: set HOOKED_VLM_DEBUG=1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from weights_conversion.__main__ import DTYPES, convert

from . import analysis, corruption, metrics, names, patching, plot, tiny
from . import view as view_
from .metrics import answer_token
from .models.base import HookedVLM

TINY = "tiny"
DEBUG_ENV = "HOOKED_VLM_DEBUG"  # set to 1 to get the traceback of an error instead of its one line
# Exceptions that report a problem with the input (the user's or a file's); anything else is a bug.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError)


class CLIError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


@dataclass(frozen=True)
class TinyModel:
    description: str
    build: Callable[[], tuple[Any, Any]]  # -> (HF model, processor)


def _tiny(builder: str, *args: Any) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        return getattr(tiny, builder)(*args, seed=0)

    return build


TINY_MODELS = {
    "tiny": TinyModel("a tiny BLIP-VQA", _tiny("build_blip", "vqa")),
    "tiny-llava": TinyModel("a tiny LLaVA-1.5 (CLIP + Llama)", _tiny("build_llava")),
    "tiny-instructblip": TinyModel("a tiny InstructBLIP with a Llama LM", _tiny("build_instructblip", "llama")),
    "tiny-instructblip-t5": TinyModel("a tiny InstructBLIP with a T5 LM", _tiny("build_instructblip", "t5")),
    "tiny-llava-phi": TinyModel("a tiny LLaVA with a Phi-2 LM", _tiny("build_llava_phi", "phi")),
    "tiny-qwen2-vl": TinyModel("a tiny Qwen2-VL", _tiny("build_qwen2_vl")),
    "tiny-qwen2.5-vl": TinyModel("a tiny Qwen2.5-VL", lambda: tiny.build_qwen2_vl(seed=0, version="2.5")),
}


# ---------------------------------------------------------------------------------------------- checks, up front
def _check_device(name: str) -> None:
    """Refuse a device this machine does not have before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device name; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name!r}: no CUDA GPU is available on this machine; pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); pass "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {name!r}: MPS is not available on this machine; pass --device cpu")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r}: the command line runs on cpu, cuda or mps; pass one of them")


def _check_out(out: Path) -> None:
    """`--out` must be a folder we can create or write to: checked before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder; pass a folder path (it is created if missing)")
    existing = out
    while not existing.exists():  # the nearest existing ancestor, where the folder would be created
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file; pass another folder")
    try:  # a real write (os.access says yes to root even on a read-only filesystem)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CLIError(f"--out {str(out)!r} is not writable ({e.strerror} in {str(existing)!r}); pass a folder "
                       "you can write to") from None


def _check_model_name(name: str, option: str = "--model") -> None:
    """A tiny model, an existing directory or something shaped like a hub id (owner/name); a missing local path is
    named as such (rather than as an invalid repo id)."""
    path = Path(name).expanduser()
    if name in TINY_MODELS or path.is_dir():
        return
    if path.exists():
        raise CLIError(f"{option} {name!r} is a file; pass a checkpoint folder, a hub id (owner/name) or one of "
                       f"{', '.join(TINY_MODELS)}")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CLIError(f"{option} {name!r}: no such local directory, and it is not a hub id (owner/name); pass a "
                       f"checkpoint folder, a hub id or one of {', '.join(TINY_MODELS)}")


def _read_image(path: str, option: str):
    """The image at `path` as RGB, or a one-line error naming the option and the file."""
    from PIL import Image

    if not Path(path).is_file():
        raise CLIError(f"{option}: image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CLIError(f"{option} {path!r} is not an image PIL can read ({type(e).__name__}); pass a PNG or JPEG "
                       "file") from None


# ---------------------------------------------------------------------------------------------- the model
def _load_model(name: str, device: str, dtype: str | None = None):
    """`--model` on `device`, its weights in `dtype` (None: the checkpoint's own; the tiny models are float32). A
    checkpoint is read straight into `dtype`, so a float32-stored 7B never needs its 28 GB."""
    if name in TINY_MODELS:
        hf, processor = TINY_MODELS[name].build()
        return HookedVLM.from_hf(hf, processor=processor, device=device, dtype=dtype)
    try:
        local = Path(name).expanduser()
        return HookedVLM.from_pretrained(str(local) if local.is_dir() else name, device=device, dtype=dtype)
    except Exception as e:
        if Path(name).expanduser().is_dir():  # a broken or foreign folder: say which and what broke
            raise CLIError(f"cannot load --model {name!r} ({type(e).__name__}: {_one_line(e)}); pass a complete HF or "
                           "hooked_vlm checkpoint folder") from e
        if isinstance(e, OSError):  # huggingface_hub's errors are OSErrors, with advice that does not apply here
            raise CLIError(f"--model {name!r} is not in the local HF cache and could not be fetched from the hub (no "
                           "network, or no such repo); check the id, connect to the network, or pass a local "
                           "directory") from e
        raise


def _dtype_names(model) -> str:
    """The dtypes of the model's floating-point weights, e.g. "bfloat16" (more than one only if a family keeps some
    module in float32)."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    return "+".join(sorted(dtypes))


def _check_template(template: str | None) -> None:
    """`--template` must hold {question} once and no other field (a template without it would drop the question)."""
    if template is None:
        return
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise CLIError(f"--template {template!r} is not a template with only {{question}} in braces ({_one_line(e)}); "
                       "write literal braces as {{ and }}") from None
    if filled.count("\0") != 1:
        raise CLIError(f"--template {template!r} must contain {{question}} exactly once, where the question goes")


def _template(model, question: str, template: str | None) -> str:
    """The question in the family's prompt template (or `--template`)."""
    return (template if template is not None else model.prompt_template).format(question=question)


def _answer(tokenizer, word: str, option: str) -> tuple[int, str]:
    """The token an answer is measured by, and its piece (what the metadata names)."""
    try:
        token = answer_token(tokenizer, word)
    except (ValueError, TypeError) as e:
        raise CLIError(f"{option}: {e}") from None
    return token, tokenizer.convert_ids_to_tokens(token)


def _has_cross_attn(model, tower: str) -> bool:
    return any(model.tower_info(tower).has_cross_attn)


def _tower(model, name: str | None, default: str) -> str:
    """`--tower` (or the command's default), checked: it exists and has transformer blocks to sweep."""
    tower = name or default
    try:
        model.tower_info(tower)
    except (KeyError, ValueError) as e:
        raise CLIError(f"--tower {tower!r}: {_one_line(e)}") from None
    return tower


def _to(inputs: Any, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


# ---------------------------------------------------------------------------------------------- output
def _finite(values: Any) -> tuple[Any, int, int]:
    """`values` (nested lists of floats) with every NaN/inf replaced by None, the count replaced and the total."""
    if isinstance(values, list):
        parts = [_finite(v) for v in values]
        return [p[0] for p in parts], sum(p[1] for p in parts), sum(p[2] for p in parts)
    if isinstance(values, float) and not math.isfinite(values):
        return None, 1, 1
    return values, 0, 1


def _why_not_finite(model, tower: str, leaf: str, scores: Float[Tensor, "n_layers n_cells"],
                    normalisation: Callable[[], str]) -> str:
    """Why some of `scores` are NaN or inf: layers of `tower` without the hook `leaf` (nothing to patch there), and
    for the other layers the normalisation (`normalisation()` says with which numbers)."""
    absent = [layer for layer in range(scores.shape[0]) if names.block(tower, layer, leaf) not in model.hook_dict]
    reasons = [f"layers {absent} of {tower!r} have no {leaf} to patch"] if absent else []
    bad_layers = torch.nonzero(~torch.isfinite(scores).flatten(1).all(1)).flatten().tolist()
    if set(bad_layers) - set(absent):
        reasons.append(normalisation())
    return "; ".join(reasons)


def _write(out: Path, name: str, scores: Float[Tensor, "n_layers n_cells"], meta: dict, xlabel: str,
           labels: list[str] | None, why_not_finite: Callable[[], str]) -> None:
    """JSON, CSV and (with matplotlib) a PNG heatmap of `scores`. Non-finite scores become null in the JSON and
    empty cells in the CSV, with a warning naming how many and `why_not_finite()`."""
    values, n_bad, n_all = _finite(scores.tolist())
    if n_bad:
        print(f"hooked-vlm: warning: {n_bad} of {n_all} scores are not finite (NaN or inf) and are written as null: "
              f"{why_not_finite()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**meta, "scores": values}, indent=1, allow_nan=False)  # a NaN left anywhere raises
    (out / f"{name}.json").write_text(text)
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer"] + (labels or [str(i) for i in range(scores.shape[1])]))
        for layer, row in enumerate(values):
            writer.writerow([layer] + ["" if v is None else v for v in row])
    try:
        plot.heatmap(scores, out / f"{name}.png", title=meta.get("title", name), xlabel=xlabel,
                     xticklabels=labels)
    except ImportError:
        print("(matplotlib is not installed: wrote JSON and CSV, no PNG)", file=sys.stderr)
        print(f"wrote {out / name}.{{json,csv}}")
        return
    print(f"wrote {out / name}.{{json,csv,png}}")


# ---------------------------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> None:
    model = _load_model(args.model, args.device, args.dtype)
    if args.model in TINY_MODELS:
        print(f"model: {args.model}, {TINY_MODELS[args.model].description} built offline with RANDOM weights "
              "(seed 0): its outputs mean nothing; pass --model with a hub id or a folder for a real one")
    else:
        print(f"model: {args.model}")
    print(f"{type(model).__name__}: {len(model.hook_dict)} hook points, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters in {_dtype_names(model)}")
    print(f"  prompt template: {model.prompt_template!r}")
    for name in model.tower_names:
        try:
            info = model.tower_info(name)
        except ValueError:
            print(f"  {name}: no transformer blocks")
            continue
        cross = sum(info.has_cross_attn)
        print(f"  {name}: {info.n_layers} layers, {info.n_heads} heads, {info.layout}-LN"
              + (f", cross-attention in {cross} layers" if cross else ""))


def _check_patch_args(args: argparse.Namespace) -> None:
    """What can be checked without the model: the pairing of the options, and the image files (read here: the
    paths in `args` are replaced by the images)."""
    if args.corrupt_prompt is not None:
        if args.prompt is None:
            raise CLIError("--corrupt-prompt needs --prompt, the clean text it corrupts")
        if args.corrupt_prompt == args.prompt:
            raise CLIError("--corrupt-prompt equals --prompt: nothing differs to patch; change a word of it")
        if args.corrupt_image is not None:
            raise CLIError("--corrupt-prompt corrupts the text of one image: pass --clean-image (or no image), not "
                           "--corrupt-image")
        if args.clean_image is not None:
            args.clean_image = _read_image(args.clean_image, "--clean-image")
        return
    if (args.clean_image is None) != (args.corrupt_image is None):
        raise CLIError("give both --clean-image and --corrupt-image, or neither (a synthetic pair)")
    if args.clean_image is not None:
        if args.prompt is None or args.answer is None or args.wrong_answer is None:
            raise CLIError("with your own images, give --prompt, --answer and --wrong-answer (the two images' answers)")
        args.clean_image = _read_image(args.clean_image, "--clean-image")
        args.corrupt_image = _read_image(args.corrupt_image, "--corrupt-image")


def _synthetic_pair(tokenizer, seed: int):
    """The first of the seed's synthetic colour pairs whose two answers this tokenizer can tell apart (a tiny
    vocabulary lacks some colours; a real one has them all, so the first pair is taken)."""
    pairs = corruption.synthetic_pairs(16, "color", seed=seed)
    for pair in pairs:
        try:
            if answer_token(tokenizer, pair.answer) != answer_token(tokenizer, pair.wrong_answer):
                return pair
        except ValueError:
            continue
    return pairs[0]  # none: the answers' own check then says what is wrong


def _pair(args: argparse.Namespace, model) -> tuple[Mapping, Mapping, str, str]:  # processor BatchFeatures
    """The clean and corrupted inputs and the two answers."""
    processor = model.processor
    pair = _synthetic_pair(processor.tokenizer, args.seed)
    if args.corrupt_prompt is not None:
        image = args.clean_image or pair.clean_image
        clean_text, corrupt_text = args.prompt, args.corrupt_prompt
        clean_image = corrupt_image = image
        answer, wrong = ("yes", "no")
    else:
        clean_image, corrupt_image = args.clean_image or pair.clean_image, args.corrupt_image or pair.corrupt_image
        clean_text = corrupt_text = args.prompt if args.prompt is not None else pair.prompt
        answer, wrong = (pair.answer, pair.wrong_answer) if args.clean_image is None else (None, None)
    answer = args.answer if args.answer is not None else answer
    wrong = args.wrong_answer if args.wrong_answer is not None else wrong
    clean = processor(images=clean_image, text=_template(model, clean_text, args.template), return_tensors="pt")
    corrupt = processor(images=corrupt_image, text=_template(model, corrupt_text, args.template), return_tensors="pt")
    for key, value in clean.items():  # a sweep pairs the runs position by position
        if isinstance(value, torch.Tensor) and value.shape != corrupt[key].shape:
            raise CLIError(f"--prompt and --corrupt-prompt give {key} of {value.shape[-1]} and "
                           f"{corrupt[key].shape[-1]} tokens; swap words of equal token length")
    return clean, corrupt, answer, wrong


def cmd_patch(args: argparse.Namespace) -> None:
    _check_patch_args(args)
    model = _load_model(args.model, args.device, args.dtype)
    tower = _tower(model, args.tower, model.prompt_tower)
    attention = args.attention or ("cross_attn" if _has_cross_attn(model, tower) else "attn")
    if attention == "cross_attn" and not _has_cross_attn(model, tower):
        raise CLIError(f"--attention cross_attn: tower {tower!r} of {type(model).__name__} has no cross-attention; "
                       "pass --attention attn")
    clean, corrupt, answer, wrong = _pair(args, model)
    tok = model.processor.tokenizer
    (good_id, good_piece), (bad_id, bad_piece) = _answer(tok, answer, "--answer"), _answer(tok, wrong, "--wrong-answer")
    if good_id == bad_id:
        raise CLIError(f"--answer {answer!r} and --wrong-answer {wrong!r} are both measured by the token "
                       f"{good_piece!r}: their logit difference is always 0; pass answers whose first tokens differ")
    clean, corrupt = _to(clean, args.device), _to(corrupt, args.device)
    metric = metrics.logit_diff(good_id, bad_id)
    common = dict(tower=tower, normalize=True, batch_size=args.batch_size, progress=True)
    if args.resid:
        scores = patching.patch_resid(model, clean, corrupt, metric, hook=args.hook, **common)
        labels, xlabel = tok.convert_ids_to_tokens(clean["input_ids"][0]), "position"
        if len(labels) != scores.shape[1]:
            labels = None
    else:
        scores = patching.patch_heads(model, clean, corrupt, metric, attention=attention, **common)
        labels, xlabel = None, "head"

    def normalisation() -> str:
        with torch.no_grad():
            m_clean, m_corrupt = (float(metric(model(**x), torch.zeros(1, dtype=torch.long))) for x in (clean, corrupt))
        return (f"each score is divided by metric(clean) - metric(corrupted) = {m_clean:.4g} - {m_corrupt:.4g}, which "
                "is 0 (or not finite) here; pick a pair the model answers differently")

    leaf = names.leaf(args.hook) if args.resid else names.leaf(attention, "z")

    kind = f"{args.hook} per position" if args.resid else f"{attention} heads"
    meta = {"model": args.model, "dtype": _dtype_names(model), "tower": tower, "kind": kind, "answer": answer,
            "answer_token": good_piece, "answer_token_id": good_id, "wrong_answer": wrong, "wrong_answer_token": bad_piece,
            "wrong_answer_token_id": bad_id, "metric": "normalised logit difference",
            "title": f"{tower} {kind}: patched clean into corrupted"}
    _write(args.out, "patch", scores, meta, xlabel, labels,
           lambda: _why_not_finite(model, tower, leaf, scores, normalisation))
    if args.html:
        _sweep_view(args.out / "patch.html", model, scores, clean, tower, attention, resid=args.resid,
                    title=meta["title"])


def _single_input(args: argparse.Namespace, model) -> dict:
    image, prompt = args.image, args.prompt
    if image is None:
        pair = corruption.synthetic_pairs(1, "color", seed=args.seed)[0]
        image, prompt = pair.clean_image, prompt if prompt is not None else pair.prompt
    text = _template(model, prompt, args.template)
    return _to(model.processor(images=image, text=text, return_tensors="pt"), args.device)


def _check_single_args(args: argparse.Namespace) -> None:
    if args.image is not None:
        if args.prompt is None:
            raise CLIError("with --image, give --prompt (the question about it)")
        args.image = _read_image(args.image, "--image")


# --corruption -> the options it takes, with their defaults (None: required)
CORRUPTION_OPTIONS = {"gaussian": {"noise": 3.0, "redraw": "sample"},
                      "multiplicative": {"noise_mean": 1.0, "noise_std": 5.0, "redraw": "sample"},
                      "scale": {"factor": None}}


def _trace_corruption(args: argparse.Namespace) -> corruption.Corruption:
    """The image-embedding corruption `--corruption` names, from the options that go with it (checked before any
    model is loaded: an option of another kind would be silently ignored). Fills in `args`' defaults."""
    taken = CORRUPTION_OPTIONS[args.corruption]
    for name in dict.fromkeys(name for options in CORRUPTION_OPTIONS.values() for name in options):
        if name not in taken and getattr(args, name) is not None:
            kinds = " or ".join(kind for kind, options in CORRUPTION_OPTIONS.items() if name in options)
            raise CLIError(f"--{name.replace('_', '-')} goes with --corruption {kinds}, not --corruption "
                           f"{args.corruption}; drop it or pass --corruption {kinds.split()[0]}")
    for name, default in taken.items():
        if getattr(args, name) is None:
            if default is None:
                raise CLIError(f"--corruption {args.corruption} needs --{name.replace('_', '-')}")
            setattr(args, name, default)
    if args.corruption == "gaussian":
        return corruption.gaussian(args.noise, seed=args.seed, redraw=args.redraw)
    if args.corruption == "multiplicative":
        return corruption.multiplicative(args.noise_mean, args.noise_std, seed=args.seed, redraw=args.redraw)
    return corruption.scale(args.factor)


def cmd_trace(args: argparse.Namespace) -> None:
    _check_single_args(args)
    corrupt = _trace_corruption(args)
    model = _load_model(args.model, args.device, args.dtype)
    tower = _tower(model, args.tower, model.prompt_tower)
    if "cross" in patching.TRACE_KINDS[args.kind] and not _has_cross_attn(model, tower):
        others = [k for k, leaf in patching.TRACE_KINDS.items() if "cross" not in leaf]
        raise CLIError(f"--kind {args.kind}: tower {tower!r} of {type(model).__name__} has no cross-attention; pass "
                       f"--kind {', '.join(others[:-1])} or {others[-1]}")
    inputs = _single_input(args, model)
    with torch.no_grad():
        target = model(**inputs)[:, -1].argmax(-1)
    scores = patching.causal_trace(model, inputs, target, tower=tower, corrupt=corrupt, kind=args.kind,
                                   window=args.window, samples=args.samples, normalize=True,
                                   batch_size=args.batch_size)
    tok = model.processor.tokenizer
    labels = tok.convert_ids_to_tokens(inputs["input_ids"][0]) if tower == model.prompt_tower else None
    if labels is not None and len(labels) != scores.shape[1]:
        labels = None

    def normalisation() -> str:
        stronger = {"gaussian": "raise --noise", "multiplicative": "raise --noise-std",
                    "scale": "move --factor further from 1"}[args.corruption]
        return ("each score is divided by P(target | clean) - P(target | noised image), which is 0 (or not finite) "
                f"when the noise does not change the prediction; {stronger}")

    meta = {"model": args.model, "dtype": _dtype_names(model), "tower": tower, "kind": args.kind, "window": args.window,
            "noise": args.noise, "corruption": corrupt.describe(), "samples": args.samples, "seed": args.seed,
            "target": tok.convert_ids_to_tokens(target.tolist()),
            "title": f"causal trace of {tower} ({args.kind}, window {args.window}), normalised"}
    _write(args.out, "trace", scores, meta, "position", labels,
           lambda: _why_not_finite(model, tower, patching.TRACE_KINDS[args.kind], scores, normalisation))
    if args.html:
        _sweep_view(args.out / "trace.html", model, scores, inputs, tower, "attn", resid=True, title=meta["title"])


def cmd_lens(args: argparse.Namespace) -> None:
    _check_single_args(args)
    model = _load_model(args.model, args.device, args.dtype)
    if not model.output_tower and args.tower is None:
        raise CLIError(f"{type(model).__name__} has no token-predicting tower for a logit lens")
    tower = _tower(model, args.tower, model.output_tower)
    unembed = getattr(model.tower(tower), "unembed", None)
    if unembed is None:
        raise CLIError(f"--tower {tower!r} predicts no tokens; the logit lens reads {model.output_tower!r}")
    vocab = unembed.weight.shape[0]
    if args.k > vocab:
        raise CLIError(f"--k {args.k} is more than the {vocab} tokens of the vocabulary; pass at most {vocab}")
    inputs = _single_input(args, model)
    lens = analysis.logit_lens(model, inputs, tower=tower, k=args.k)
    print(f"logit lens of {tower}, last position, top {args.k} per layer:")
    for layer, per_example in enumerate(lens.tokens):
        row = per_example[0][-1]
        probs = lens.probs[layer, 0, -1].tolist()
        print(f"  layer {layer:3d}: " + "  ".join(f"{t} {p:.3f}" for t, p in zip(row, probs)))
    if args.html:
        path = view_.lens(model, lens, inputs=inputs, tower=tower,
                          title=f"logit lens of {tower} ({args.model})").save(args.out / "lens.html")
        print(f"wrote {path}")


def _sweep_view(path: Path, model, scores: Tensor, inputs: Mapping, tower: str, attention: str, *, resid: bool,
                title: str) -> None:
    """`--html`: the interactive view of a sweep, beside its PNG; a head sweep's view shows each head's pattern
    from the last token (one more forward of the clean inputs, caching the tower's patterns)."""
    cache = None
    if not resid:
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=view_.attention_names(model, [tower]))
    view_.sweep(scores, path, kind="positions" if resid else "heads", model=model, cache=cache, inputs=inputs,
                tower=tower, attention=attention, title=title)
    print(f"wrote {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    _check_model_name(args.source, "source")
    out = convert(args.source, args.out_dir, dtype=DTYPES[args.dtype] if args.dtype else None,
                  overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB of safetensors)")


# ---------------------------------------------------------------------------------------------- parsing
class _UsageError(Exception):
    """argparse's complaint, reported in one line like every other error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage and the message on two lines; we print one
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that has one (options without one say in their help what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _number(kind: type, minimum: float = 0, above: bool = True) -> Callable[[str], Any]:
    """An argparse type: a finite number of `kind` (int or float) above `minimum` (or at least it; -inf: any)."""
    bound = f" {'above' if above else 'at least'} {minimum}" if math.isfinite(minimum) else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number{bound}")
        return value

    parse.__name__ = f"{kind.__name__}{bound}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hooked-vlm", description=__doc__.split("\n\n")[0], formatter_class=_Help,
                     epilog=f"Errors are one line with exit status 2; set {DEBUG_ENV}=1 for a traceback.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        p.set_defaults(fn=fn)
        p.add_argument("--model", default=TINY, help="hub id, local directory, or a tiny model with random weights: "
                                                     + ", ".join(TINY_MODELS))
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda or cuda:N")
        p.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="load the weights in this dtype (default: the checkpoint's own; float32 for the tiny "
                            "models); float16 or bfloat16 halves a 7B model's memory")
        return p

    add("info", cmd_info, "towers, layers, heads and hook count of a model")
    convert = sub.add_parser("convert", help="an HF checkpoint -> hooked_vlm's own format (safetensors)",
                             formatter_class=_Help)
    convert.set_defaults(fn=cmd_convert)
    convert.add_argument("source", help="hub id or local HF directory")
    convert.add_argument("out_dir", help="the folder to write")
    convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                         help="store the weights in this dtype (default: the checkpoint's own)")
    convert.add_argument("--overwrite", action="store_true", help="replace out_dir if it is a hooked_vlm checkpoint")
    for name, fn, help in (("patch", cmd_patch, "head or residual patching on an image pair or a text pair"),
                           ("trace", cmd_trace, "causal tracing with noised image embeddings"),
                           ("lens", cmd_lens, "logit lens table")):
        p = add(name, fn, help)
        p.add_argument("--prompt", default=None,
                       help="the question (default: the synthetic pair's 'what color is the shape?')")
        p.add_argument("--template", default=None,
                       help="the prompt around the question, with {question} (default: the family's own, e.g. "
                            "LLaVA-1.5's 'USER: <image>\\n{question} ASSISTANT:'; '{question}' for none)")
        p.add_argument("--seed", type=_number(int, 0, above=False), default=0,
                       help="seed of the synthetic pair" + (" and of the noise" if name == "trace" else ""))
        if name != "lens":
            p.add_argument("--out", type=Path, default=Path("hooked_vlm_out"),
                           help="the folder for the PNG, JSON and CSV (created if missing)")
            p.add_argument("--batch-size", type=_number(int), default=64, help="variants per forward pass")
        else:
            p.add_argument("--out", type=Path, default=Path("hooked_vlm_out"),
                           help="with --html: the folder for the HTML view (created if missing)")
        p.add_argument("--html", action="store_true",
                       help="also write an interactive, self-contained HTML view (hooked_vlm.view) to --out: "
                            + {"patch": "patch.html (click a cell: that head's attention)",
                               "trace": "trace.html (click a cell: that layer over the image)",
                               "lens": "lens.html (the top-1 token on each image patch, per layer)"}[name])
        towers = {"patch": "the one reading the prompt", "trace": "the one reading the prompt",
                  "lens": "the one predicting tokens"}
        p.add_argument("--tower", default=None, help=f"the tower to {'read' if name == 'lens' else 'sweep'} "
                                                     f"(default: {towers[name]})")
        if name == "patch":
            p.add_argument("--clean-image", help="the clean image file (default: a synthetic pair)")
            p.add_argument("--corrupt-image", help="the corrupted image file (default: a synthetic pair)")
            p.add_argument("--corrupt-prompt", help="a text corruption of --prompt (equal token count)")
            p.add_argument("--answer", help="the clean answer (default: the synthetic pair's, or 'yes' with "
                                            "--corrupt-prompt); measured by its first token")
            p.add_argument("--wrong-answer", help="the corrupted answer (default: the synthetic pair's, or 'no' with "
                                                  "--corrupt-prompt)")
            what = p.add_mutually_exclusive_group()
            what.add_argument("--heads", action="store_true", help="patch heads (the default)")
            what.add_argument("--resid", action="store_true", help="patch one position of a stream at a time")
            p.add_argument("--hook", default="resid_post", help="with --resid: the stream hook")
            p.add_argument("--attention", default=None, choices=["attn", "cross_attn"],
                           help="with --heads: which attention (default: cross_attn where the tower has it, else attn)")
        else:
            p.add_argument("--image", help="the image file (default: a synthetic scene, with its question)")
        if name == "trace":
            p.add_argument("--kind", default="resid", choices=list(patching.TRACE_KINDS),
                           help="what each cell restores: the block output (resid), the stream after the attention "
                                "(resid_mid) or the cross-attention (resid_mid_cross), or a sub-layer's output "
                                "(cross-attention kinds only on towers with cross-attention)")
            p.add_argument("--window", type=_number(int), default=1, help="layers restored together per cell")
            p.add_argument("--corruption", default="gaussian", choices=list(CORRUPTION_OPTIONS),
                           help="how the image embeddings are corrupted: add Gaussian noise (ROME), multiply each "
                                "element by its own eps ~ N(mean, std), or scale them all by a factor")
            p.add_argument("--noise", type=_number(float), default=None,
                           help="gaussian: noise scale, in standard deviations of the image embeddings (default 3.0)")
            p.add_argument("--noise-mean", type=_number(float, -math.inf), default=None,
                           help="multiplicative: the mean of eps (default 1.0)")
            p.add_argument("--noise-std", type=_number(float), default=None,
                           help="multiplicative: the standard deviation of eps (default 5.0)")
            p.add_argument("--redraw", choices=["sample", "forward"], default=None,
                           help="gaussian or multiplicative: one draw per sample, shared by every cell, or a new draw "
                                "in every forward (default sample)")
            p.add_argument("--factor", type=_number(float, -math.inf), default=None,
                           help="scale: what every element is multiplied by (required with --corruption scale)")
            p.add_argument("--samples", type=_number(int), default=1, help="noise samples averaged")
        if name == "lens":
            p.add_argument("--k", type=_number(int), default=5, help="top tokens shown per layer")
    return parser


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"hooked-vlm: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    command = "hooked-vlm"
    try:
        args = build_parser().parse_args(argv)
        command = f"hooked-vlm {args.command}"
        # what needs no model is checked before any is loaded (`convert` has none of these options)
        if hasattr(args, "model"):
            _check_device(args.device)
            _check_model_name(args.model)
        if hasattr(args, "out"):
            _check_out(args.out)
        if hasattr(args, "template"):
            _check_template(args.template)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each, restored on exit
            args.fn(args)
    except _UsageError as e:
        if debug:
            raise
        print(e, file=sys.stderr)
        return 2
    except (CLIError, *USER_ERRORS) as e:
        if debug:
            raise
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, and how to see where it comes from
        if debug:
            raise
        print(f"{command}: internal error (a bug, please report it): {type(e).__name__}: {_one_line(e)}; set "
              f"{DEBUG_ENV}=1 for the traceback", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
