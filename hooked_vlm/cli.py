"""`hooked-vlm`: the analyses from the command line.

    hooked-vlm info  [--model M]
    hooked-vlm convert SOURCE OUT_DIR [--dtype bfloat16]
    hooked-vlm patch [--model M] [--clean-image A --corrupt-image B | --corrupt-prompt Q'] [--prompt Q]
                     [--answer X --wrong-answer Y] [--heads | --resid] [--tower T] [--attention cross_attn]
    hooked-vlm trace [--model M] [--image A] [--prompt Q] [--tower T] [--kind resid] [--window 1] [--samples 1]
    hooked-vlm lens  [--model M] [--image A] [--prompt Q] [--k 5]

`--model` is a hub id or local directory; without it, a tiny BLIP-VQA with random weights built offline (to try
the commands; its numbers mean nothing). Without images, a synthetic minimal pair (a drawn shape that changes
colour) is used. Results go to `--out` (PNG heatmap, JSON and CSV). Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

TINY = "tiny"


class CLIError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def _load_model(name: str, device: str):
    from .models.base import HookedVLM

    if name == TINY:
        from .tiny import build_blip

        hf, processor = build_blip("vqa", seed=0)
        return HookedVLM.from_hf(hf, processor=processor, device=device)
    if not Path(name).exists() and name.count("/") != 1:
        raise CLIError(f"--model {name!r} is neither a local directory nor a hub id (owner/name)")
    try:
        return HookedVLM.from_pretrained(name, device=device)
    except OSError as e:
        raise CLIError(f"cannot load --model {name!r}: {str(e).splitlines()[0]}") from e


def _image(path: str | None):
    from PIL import Image

    if path is None:
        return None
    if not Path(path).is_file():
        raise CLIError(f"image file not found: {path}")
    return Image.open(path).convert("RGB")


def _token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise CLIError(f"{word!r} tokenizes to nothing; pass another answer")
    return ids[0]


def _to(inputs: Any, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def _write(out: Path, name: str, scores: torch.Tensor, meta: dict, xlabel: str, labels: list[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    values = scores.tolist()
    (out / f"{name}.json").write_text(json.dumps({**meta, "scores": values}, indent=1))
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer"] + (labels or [str(i) for i in range(scores.shape[1])]))
        for layer, row in enumerate(values):
            writer.writerow([layer] + row)
    try:
        from . import plot

        plot.heatmap(scores, out / f"{name}.png", title=meta.get("title", name), xlabel=xlabel,
                     xticklabels=labels)
    except ImportError:
        print("(matplotlib is not installed: wrote JSON and CSV, no PNG)", file=sys.stderr)
    print(f"wrote {out / name}.{{json,csv,png}}")


# ---------------------------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> None:
    model = _load_model(args.model, args.device)
    print(f"{type(model).__name__}: {len(model.hook_dict)} hook points, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    for name in model.tower_names:
        try:
            info = model.tower_info(name)
        except ValueError:
            print(f"  {name}: no transformer blocks")
            continue
        cross = sum(info.has_cross_attn)
        print(f"  {name}: {info.n_layers} layers, {info.n_heads} heads, {info.layout}-LN"
              + (f", cross-attention in {cross} layers" if cross else ""))


def _pair(args: argparse.Namespace, model) -> tuple[dict, dict, str, str]:
    from . import corruption

    processor = model.processor
    if args.corrupt_prompt:
        if not args.prompt:
            raise CLIError("--corrupt-prompt needs --prompt, the clean text it corrupts")
        image = _image(args.clean_image) or corruption.synthetic_pairs(1, "color", seed=args.seed)[0].clean_image
        clean = processor(images=image, text=args.prompt, return_tensors="pt")
        corrupt = processor(images=image, text=args.corrupt_prompt, return_tensors="pt")
        if clean["input_ids"].shape != corrupt["input_ids"].shape:
            raise CLIError(f"--prompt and --corrupt-prompt tokenize to {clean['input_ids'].shape[-1]} and "
                           f"{corrupt['input_ids'].shape[-1]} tokens; swap words of equal token length")
        return clean, corrupt, args.answer or "yes", args.wrong_answer or "no"
    if bool(args.clean_image) != bool(args.corrupt_image):
        raise CLIError("give both --clean-image and --corrupt-image, or neither (a synthetic pair)")
    if args.clean_image:
        clean_image, corrupt_image = _image(args.clean_image), _image(args.corrupt_image)
        if not (args.answer and args.wrong_answer and args.prompt):
            raise CLIError("with your own images, give --prompt, --answer and --wrong-answer (the two images' answers)")
        answer, wrong = args.answer, args.wrong_answer
    else:
        pair = corruption.synthetic_pairs(1, "color", seed=args.seed)[0]
        clean_image, corrupt_image, answer, wrong = pair.clean_image, pair.corrupt_image, pair.answer, pair.wrong_answer
        args.prompt = args.prompt or pair.prompt
    clean = processor(images=clean_image, text=args.prompt, return_tensors="pt")
    corrupt = processor(images=corrupt_image, text=args.prompt, return_tensors="pt")
    return clean, corrupt, answer, wrong


def cmd_patch(args: argparse.Namespace) -> None:
    from . import metrics, patching

    model = _load_model(args.model, args.device)
    clean, corrupt, answer, wrong = _pair(args, model)
    clean, corrupt = _to(clean, args.device), _to(corrupt, args.device)
    tok = model.processor.tokenizer
    metric = metrics.logit_diff(_token(tok, answer), _token(tok, wrong))
    tower = args.tower or model.prompt_tower
    common = dict(tower=tower, normalize=True, batch_size=args.batch_size, progress=True)
    if args.resid:
        scores = patching.patch_resid(model, clean, corrupt, metric, hook=args.hook, **common)
        labels, xlabel = tok.convert_ids_to_tokens(clean["input_ids"][0]), "position"
        if len(labels) != scores.shape[1]:
            labels = None
    else:
        scores = patching.patch_heads(model, clean, corrupt, metric, attention=args.attention, **common)
        labels, xlabel = None, "head"
    kind = f"{args.hook} per position" if args.resid else f"{args.attention} heads"
    meta = {"model": args.model, "tower": tower, "kind": kind, "answer": answer, "wrong_answer": wrong,
            "metric": "normalised logit difference", "title": f"{tower} {kind}: patched clean into corrupted"}
    _write(args.out, "patch", scores, meta, xlabel, labels)


def _single_input(args: argparse.Namespace, model) -> dict:
    from . import corruption

    image = _image(args.image)
    if image is None:
        pair = corruption.synthetic_pairs(1, "color", seed=args.seed)[0]
        image, args.prompt = pair.clean_image, args.prompt or pair.prompt
    if not args.prompt:
        raise CLIError("give --prompt (the question about --image)")
    return _to(model.processor(images=image, text=args.prompt, return_tensors="pt"), args.device)


def cmd_trace(args: argparse.Namespace) -> None:
    from . import patching

    model = _load_model(args.model, args.device)
    inputs = _single_input(args, model)
    with torch.no_grad():
        target = model(**inputs)[:, -1].argmax(-1)
    tower = args.tower or model.prompt_tower
    scores = patching.causal_trace(model, inputs, target, tower=tower, kind=args.kind, window=args.window,
                                   noise=args.noise, samples=args.samples, seed=args.seed, normalize=True,
                                   batch_size=args.batch_size)
    tok = model.processor.tokenizer
    labels = tok.convert_ids_to_tokens(inputs["input_ids"][0]) if tower == model.prompt_tower else None
    if labels is not None and len(labels) != scores.shape[1]:
        labels = None
    meta = {"model": args.model, "tower": tower, "kind": args.kind, "window": args.window, "noise": args.noise,
            "samples": args.samples, "seed": args.seed, "target": tok.convert_ids_to_tokens(target.tolist()),
            "title": f"causal trace of {tower} ({args.kind}, window {args.window}), normalised"}
    _write(args.out, "trace", scores, meta, "position", labels)


def cmd_lens(args: argparse.Namespace) -> None:
    from . import analysis

    model = _load_model(args.model, args.device)
    if not model.output_tower:
        raise CLIError(f"{type(model).__name__} has no token-predicting tower for a logit lens")
    lens = analysis.logit_lens(model, _single_input(args, model), tower=model.output_tower, k=args.k)
    print(f"logit lens of {model.output_tower}, last position, top {args.k} per layer:")
    for layer, per_example in enumerate(lens.tokens):
        row = per_example[0][-1]
        probs = lens.probs[layer, 0, -1].tolist()
        print(f"  layer {layer:3d}: " + "  ".join(f"{t} {p:.3f}" for t, p in zip(row, probs)))


def cmd_convert(args: argparse.Namespace) -> None:
    from weights_conversion.__main__ import main as convert

    argv = [args.source, args.out_dir] + (["--dtype", args.dtype] if args.dtype else []) + (
        ["--overwrite"] if args.overwrite else [])
    if convert(argv) != 0:
        raise CLIError(f"could not convert {args.source!r} (see the message above)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        p.add_argument("--model", default=TINY, help="hub id or local directory (default: a tiny random BLIP-VQA)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        return p

    add("info", cmd_info, "towers, layers, heads and hook count of a model")
    convert = sub.add_parser("convert", help="an HF checkpoint -> hooked_vlm's own format (safetensors)")
    convert.set_defaults(fn=cmd_convert)
    convert.add_argument("source", help="hub id or local HF directory")
    convert.add_argument("out_dir")
    convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    convert.add_argument("--overwrite", action="store_true")
    for name, fn, help in (("patch", cmd_patch, "head or residual patching on an image pair or a text pair"),
                           ("trace", cmd_trace, "causal tracing with noised image embeddings"),
                           ("lens", cmd_lens, "logit lens table")):
        p = add(name, fn, help)
        p.add_argument("--prompt", default=None, help="the question")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=Path("hooked_vlm_out"))
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--tower", default=None, help="the tower to sweep (default: the one reading the prompt)")
        if name == "patch":
            p.add_argument("--clean-image")
            p.add_argument("--corrupt-image")
            p.add_argument("--corrupt-prompt", help="a text corruption of --prompt (equal token count)")
            p.add_argument("--answer")
            p.add_argument("--wrong-answer")
            what = p.add_mutually_exclusive_group()
            what.add_argument("--heads", action="store_true", help="patch heads (default)")
            what.add_argument("--resid", action="store_true", help="patch one position of a stream at a time")
            p.add_argument("--hook", default="resid_post", help="with --resid: the stream hook")
            p.add_argument("--attention", default="cross_attn", choices=["attn", "cross_attn"])
        else:
            p.add_argument("--image")
        if name == "trace":
            p.add_argument("--kind", default="resid", choices=["resid", "attn", "mlp", "cross_attn"])
            p.add_argument("--window", type=int, default=1)
            p.add_argument("--noise", type=float, default=3.0)
            p.add_argument("--samples", type=int, default=1)
        if name == "lens":
            p.add_argument("--k", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (CLIError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"hooked-vlm {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
