"""NOTICE (Golovanevsky, Rudman, Palit, Singh & Eickhoff, NAACL 2025) on BLIP-VQA and LLaVA-1.5, as the authors'
released code (wrudman/NOTICE) runs it, each experiment one library call (docs/notice.md):

N1 SIP, semantic image pairs: the same binary-choice question ("is this X A or B?") about two images, the second
  one's answer the other option. N2 STR, symmetric token replacement: the same image, the question's options
  replaced by other words of the same token length (word-safe, checked).
N3 module patching (denoising: the corrupted run with one clean activation), per question token x layer of BLIP's
  question encoder: the block output (resid_post), the self-attention's and the cross-attention's z (all heads at
  that token); metrics P(correct), dP, dLD and normalised LD; figures: P(correct), mean over examples, min-max
  normalised. N4 head patching: one head at the token of interest (the correct answer's word in the question),
  cross- and self-attention heads, P(correct). N5 universal heads: per set (task x modality) the heads with mean
  |score| >= mean + 2 std (np.std), and the heads every set selects. N6 their cross-attention from the token of
  interest over the patch grid, minus the mean head, min-max normalised. N7 LLaVA: module patching (block,
  attention, MLP outputs) at the text tokens, one head at a time at the token of interest (the answer word's last
  sub-token), metric at the last position.

    python examples/notice.py [--model Salesforce/blip-vqa-base] [--llava-model llava-hf/llava-1.5-7b-hf]
                              [--data BLIP_final_mit_states.csv [--llava-data LLAVA_final_mit_states.csv]
                               [--image-root DIR]] [--pairs 4]

N1-N6 need a --model whose question encoder reads the image by cross-attention (BLIP-VQA). A --model whose one LM
reads the image tokens and predicts the answer (LLaVA-1.5, LLaVA-Phi, Qwen2-VL, Qwen2.5-VL) runs N7 instead: the
BLIP parts are skipped, and --llava-model must then be left out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from _common import first_token, load, parser, to
from hooked_vlm import HookedVLM, corruption, data, evaluation, metrics, names, overlays, patching, plot, view
from hooked_vlm.head_selection import select_heads, universal_heads

COLOR_WORDS = ("red", "blue", "green", "yellow", "white", "black", "gray", "pink", "brown", "orange", "purple")
METRICS = ("p", "dp", "dld", "norm_ld")  # NOTICE's tuple per cell: P_patched(correct), dP, dLD, normalised LD


@dataclass
class Item:
    """One example: a question about an image, its SIP image and its STR question (given, or made by STR)."""

    id: str
    question: str
    image: Callable[[], Image.Image]
    answer: str
    wrong: str
    corrupt_image: Callable[[], Image.Image] | None = None
    corrupt_question: str | None = None  # None: replace the two options by other colour words (synthetic data)
    task: str = "synthetic"
    generated: str | None = None  # the model's own answer in the file (LLaVA's answer token is read from it)


@dataclass
class Family:
    """What differs between NOTICE's BLIP and LLaVA code."""

    name: str
    model: HookedVLM
    tower: str
    sites: tuple[str, ...]  # N3 / N7 module sites
    attentions: tuple[str, ...]  # N4 head kinds
    sub_token: str  # of the answer word: the token of interest and the answer's token id
    prompt: Callable[[str], str]
    text_only: bool  # N7: module patching at the text tokens only
    tokenizer: Any = field(init=False)

    def __post_init__(self):
        self.tokenizer = self.model.processor.tokenizer

    def answer_id(self, word: str) -> int:
        if self.sub_token == "first":  # BLIP: the answer's first wordpiece (one decoder step from [DEC])
            return first_token(self.tokenizer, word)
        return metrics.answer_tokens(self.tokenizer, word)[-1]  # LLaVA: the last sub-token


def synthetic_items(n: int) -> list[Item]:
    """Drawn scenes whose shape changes colour (SIP), asked as NOTICE asks: "is the shape A or B?", the correct
    option first or second in turn."""
    items = []
    for i, pair in enumerate(corruption.synthetic_pairs(n, "color", seed=1)):
        a, b = (pair.answer, pair.wrong_answer) if i % 2 == 0 else (pair.wrong_answer, pair.answer)
        items.append(Item(str(i), f"is the shape {a} or {b}?", lambda p=pair: p.clean_image, pair.answer,
                          pair.wrong_answer, lambda p=pair: p.corrupt_image))
    return items


def file_items(path: Path, image_root: Path | None) -> list[Item]:
    """A NOTICE pair CSV (BLIP_final_<task>.csv / LLAVA_final_<task>.csv) through `hooked_vlm.data.notice_pairs`."""
    return [Item(e.id, e.question, e.image.load, e.answer, e.wrong_answer,
                 e.corrupt_image.load if e.corrupt_image else None, e.corrupt_question, e.meta["task"],
                 e.meta.get("generated_text") or None)
            for e in data.notice_pairs(path, image_root)]


def pair_inputs(fam: Family, item: Item, mode: str) -> tuple[dict, dict]:
    """N1 (SIP): the question with the clean and the corrupted image. N2 (STR): the clean image with the clean and
    the corrupted question, their token counts checked (raises ValueError otherwise)."""
    processor = fam.model.processor
    question = fam.prompt(item.question)
    if mode == "sip":
        if item.corrupt_image is None:
            raise ValueError("no SIP image")
        return tuple(dict(processor(images=image, text=question, return_tensors="pt"))
                     for image in (item.image(), item.corrupt_image()))
    if item.corrupt_question is not None:
        return corruption.text_pair_inputs(processor, question, fam.prompt(item.corrupt_question),
                                           images=item.image())
    others = [w for w in COLOR_WORDS if w not in (item.answer, item.wrong)]  # both options replaced, as NOTICE
    for x in others:
        for y in others:
            if x != y:
                try:
                    return corruption.symmetric_token_replacement(processor, question, {item.answer: x, item.wrong: y},
                                                                  images=item.image())
                except ValueError:
                    continue  # another length: try the next replacement
    raise ValueError(f"no colour words of the token lengths of {item.answer!r} and {item.wrong!r}")


def run_mode(fam: Family, items: list[Item], mode: str, n: int, device: str, batch_size: int) -> dict:
    """N1/N2 then N3 (N7: module patching) and N4 (one head at the TOI) on the first `n` usable items."""
    model, tok = fam.model, fam.tokenizer
    out = {"items": [], "base": [], "tokens": [], **{f"{s}_{m}": [] for s in fam.sites for m in METRICS},
           **{f"heads_{a}": [] for a in fam.attentions}}
    for item in items:
        if len(out["items"]) == n:
            break
        try:
            clean, corrupt = (to(x, device) for x in pair_inputs(fam, item, mode))
            positions = model.positions(**clean)
            toi = positions.find_each(tok, item.answer, sub_token=fam.sub_token)  # [1]: NOTICE's token of interest
            # LLaVA's code reads the correct token from the model's own (cased) answer, `generated_text`
            said = item.generated if fam.sub_token == "last" and item.generated else item.answer
            correct, wrong = fam.answer_id(said), fam.answer_id(item.wrong)
        except ValueError as e:
            print(f"  ({fam.name} {mode}: skipping example {item.id}: {str(e)[:160]})")
            continue
        last = int(positions.last[0])  # BLIP: the answer decoder's one step; LLaVA: the prompt's last token
        p_metric, ld_metric = metrics.prob(correct, -1), metrics.logit_diff(correct, wrong, -1)
        with torch.no_grad():
            logits = {k: model(**x) for k, x in (("clean", clean), ("corrupt", corrupt))}
        rows = torch.zeros(1, dtype=torch.long, device=logits["clean"].device)
        base = {f"{m}_{k}": float(f(logits[k], rows)) for k in logits for m, f in (("p", p_metric), ("ld", ld_metric))}
        if base["ld_clean"] == base["ld_corrupt"] or correct == wrong:
            print(f"  ({fam.name} {mode}: skipping example {item.id}: the corruption leaves the logit difference)")
            continue
        # N3 / N7 module patching: every question token (BLIP) or every text token (LLaVA) x layer
        at = positions.text[0].tolist() if fam.text_only else None
        for site in fam.sites:
            sweep = {name: patching.patch_resid(model, clean, corrupt, metric, tower=fam.tower, hook=site,
                                                positions=at, batch_size=batch_size, progress=False).cpu()
                     for name, metric in (("p", p_metric), ("ld", ld_metric))}
            dld = sweep["ld"] - base["ld_corrupt"]
            cells = {"p": sweep["p"], "dp": sweep["p"] - base["p_corrupt"], "dld": dld,
                     "norm_ld": dld / (base["ld_clean"] - base["ld_corrupt"])}
            for m in METRICS:
                out[f"{site}_{m}"].append(cells[m])
        # N4 head patching: one head at a time at the token of interest, P(correct)
        for attention in fam.attentions:
            out[f"heads_{attention}"].append(patching.patch_heads(
                model, clean, corrupt, p_metric, tower=fam.tower, attention=attention, positions=toi[:, None],
                batch_size=batch_size, progress=False).cpu())
        ids = clean["input_ids"][0, at] if at is not None else clean["input_ids"][0]
        out["tokens"].append(tok.convert_ids_to_tokens(ids.tolist()))
        out["items"].append(item.id)
        out["base"].append({**base, "toi": int(toi[0]), "last": last})
    if len(out["items"]) < n:
        print(f"  ({fam.name} {mode}: {len(out['items'])} usable examples of the {n} asked)")
    return out


def mean_map(maps: list[torch.Tensor]) -> torch.Tensor:
    """The mean over examples of [layers, tokens] maps of different lengths, aligned on their last token (the
    question's end, "... A or B?", lines up across examples; a shorter prompt contributes nothing to the columns
    before its first token)."""
    width = max(m.shape[-1] for m in maps)
    padded = torch.stack([torch.nn.functional.pad(m, (width - m.shape[-1], 0), value=float("nan")) for m in maps])
    return padded.nanmean(0)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """NOTICE's figures: min-max normalised per figure."""
    lo, hi = x[torch.isfinite(x)].min(), x[torch.isfinite(x)].max()
    return (x - lo) / (hi - lo) if hi > lo else x - lo


def figures(fam: Family, mode: str, res: dict, out: Path, prefix: str, head_prefix: str) -> None:
    """The module maps (`prefix`: N3, N7) and the head maps (`head_prefix`: N4, N7) of one family and mode."""
    labels = max(res["tokens"], key=len)
    for site in fam.sites:
        maps = mean_map(res[f"{site}_p"])
        plot.heatmap(min_max(maps), out / f"{prefix}_{mode}_{site}.png", xlabel="token", centered=False, cmap="Reds",
                     xticklabels=[""] * (maps.shape[1] - len(labels)) + labels,
                     title=f"{prefix.upper()} {fam.name} {mode.upper()}: {site} patched per token x layer "
                           f"(P(correct), min-max normalised, {len(res['items'])} examples)")
    for attention in fam.attentions:
        plot.heatmap(min_max(torch.stack(res[f"heads_{attention}"]).mean(0)),
                     out / f"{head_prefix}_{mode}_{attention}_heads.png", xlabel="head", centered=False, cmap="Reds",
                     title=f"{head_prefix.upper()} {fam.name} {mode.upper()}: one {attention} head at the token of "
                           "interest (P(correct), min-max normalised)")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "notice")
    p.add_argument("--llava-model", default=None, help="a LLaVA hub id or directory; default: a tiny random LLaVA")
    p.add_argument("--data", type=Path, default=None, help="a NOTICE pair CSV (BLIP_final_<task>.csv); default: "
                   "drawn scenes whose shape changes colour")
    p.add_argument("--llava-data", type=Path, default=None, help="the CSV for LLaVA (LLAVA_final_<task>.csv); "
                   "default: --data")
    p.add_argument("--image-root", type=Path, default=None, help="the folder the CSV's image paths are relative to "
                   "(default: the CSV's folder)")
    p.add_argument("--k-std", type=float, default=2.0, help="N5: heads with mean |score| >= mean + k std")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pool = max(8 * args.pairs, 16)  # synthetic: candidates, since a tiny vocabulary cannot say every colour
    blip_items = file_items(args.data, args.image_root) if args.data else synthetic_items(pool)
    results: dict[str, Any] = {}

    model = load(args.model, "blip-vqa", args.device, args.dtype)
    if reads_image_by_cross_attention(model):
        blip_parts(args, model, blip_items, results)
        llava_model = load(args.llava_model, "llava", args.device, args.dtype)
    elif model.prompt_tower == model.output_tower:  # LLaVA-like: one LM reads the image tokens and answers
        if args.llava_model:
            raise SystemExit(f"--model {args.model} is a LLaVA-like model (N7), and so is --llava-model: pass one of "
                             "them, or a BLIP-VQA model as --model for N1-N6")
        print(f"N1-N6 skipped: they patch the cross-attention of BLIP's question encoder, and {args.model}'s "
              f"{model.prompt_tower!r} reads the image tokens in its own sequence; N7 runs on it")
        llava_model = model
    else:
        raise SystemExit(f"--model {args.model}: NOTICE runs on BLIP-VQA (its question encoder reads the image by "
                         "cross-attention: N1-N6) and on models whose one LM reads the image tokens and predicts the "
                         f"answer (LLaVA-1.5, LLaVA-Phi, Qwen2-VL: N7); this one reads the prompt in "
                         f"{model.prompt_tower!r} and answers in {model.output_tower!r}")

    # N7: LLaVA-like models, module and head patching in the LM
    llava = Family(type(llava_model).__name__.removeprefix("Hooked"), llava_model, llava_model.prompt_tower,
                   ("resid_post", "attn_out", "mlp_out"), ("attn",), "last",
                   lambda q: q if "<image>" in q else evaluation.prompt(llava_model, q), True)
    llava_items = (file_items(args.llava_data or args.data, args.image_root) if (args.llava_data or args.data)
                   else blip_items)
    for mode in ("sip", "str"):
        res = results[f"llava_{mode}"] = run_mode(llava, llava_items, mode, args.pairs, args.device, args.batch_size)
        if not res["items"]:
            print(f"N7 {llava.name} {mode.upper()}: no usable example; skipped")
            continue
        figures(llava, mode, res, args.out, "n7", "n7")
        print(f"N7 {llava.name} {mode.upper()} ({len(res['items'])} examples): heads at the token of interest, mean "
              f"+ {args.k_std:g} std: {select_heads(torch.stack(res['heads_attn']), k_std=args.k_std)}")
    torch.save(results, args.out / "notice_results.pt")
    print(f"figures and results (notice_results.pt) in {args.out}")
    return 0


def reads_image_by_cross_attention(model: HookedVLM) -> bool:
    """Whether the tower that reads the prompt attends to the image by cross-attention (BLIP's question encoder)."""
    leaf = names.leaf("cross_attn", "z")
    return any(names.block(model.prompt_tower, i, leaf) in model.hook_dict
               for i in range(model.tower_info(model.prompt_tower).n_layers))


def blip_parts(args, model: HookedVLM, blip_items: list[Item], results: dict[str, Any]) -> None:
    """N1-N6 on BLIP-VQA: module and head patching in the question encoder, universal heads, their overlays."""
    task = blip_items[0].task if blip_items else "none"
    blip = Family("BLIP", model, model.prompt_tower, ("resid_post", "attn_out", "cross_attn_out"),
                  ("cross_attn", "attn"), "first", lambda q: q, False)
    for mode in ("sip", "str"):
        res = results[f"blip_{mode}"] = run_mode(blip, blip_items, mode, args.pairs, args.device, args.batch_size)
        if not res["items"]:
            print(f"BLIP {mode.upper()}: no usable example; skipped")
            continue
        base = {k: sum(b[k] for b in res["base"]) / len(res["base"]) for k in ("p_clean", "p_corrupt", "ld_clean",
                                                                              "ld_corrupt")}
        print(f"N{1 if mode == 'sip' else 2} BLIP {mode.upper()} ({len(res['items'])} examples): " +
              ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
        figures(blip, mode, res, args.out, "n3", "n4")

    # N5: per set (task x modality) the heads that stand out (mean + k np.std), and those every set selects
    sets = {f"{mode.upper()} {task}": torch.stack(results[f"blip_{mode}"]["heads_cross_attn"])
            for mode in ("sip", "str") if results[f"blip_{mode}"]["items"]}
    if not sets:
        raise SystemExit("no usable BLIP example: nothing to select heads from")
    universal = universal_heads(sets, k_std=args.k_std)
    for name, heads in universal.selected.items():
        print(f"N5 {name}: cross-attention heads with mean |P| >= mean + {args.k_std:g} std: {heads}")
    for mode in ("sip", "str"):
        if results[f"blip_{mode}"]["items"]:
            heads = select_heads(torch.stack(results[f"blip_{mode}"]["heads_attn"]), k_std=args.k_std)
            print(f"   ({mode.upper()} self-attention heads: {heads})")
    print(f"N5 universal cross-attention heads (selected in all {len(sets)} sets): {universal.heads}; "
          f"counts {universal.counts}")
    first = next(iter(sets.values()))
    counts = torch.zeros(first.shape[-2:])
    for (layer, head), c in universal.counts.items():
        counts[layer, head] = c
    plot.heatmap(counts, args.out / "n5_universal_heads.png", xlabel="head", centered=False, cmap="Greens",
                 title=f"N5: in how many of the {len(sets)} sets each cross-attention head is selected")
    results["universal"] = {"heads": universal.heads, "selected": universal.selected,
                            "counts": [(layer, head, c) for (layer, head), c in universal.counts.items()]}

    # N6: the universal heads' cross-attention from the token of interest over the patch grid
    heads = universal.heads[:3]
    if not heads:
        heads = list(universal.counts)[:3] or [divmod(int(first.abs().mean(0).argmax()), first.shape[-1])]
        print(f"N6: no head is selected in every set; drawing {heads} (selected in the most sets, else the strongest)")
    item = next(i for i in blip_items if i.id == (results["blip_sip"]["items"] or results["blip_str"]["items"])[0])
    inputs = to(dict(blip.model.processor(images=item.image(), text=item.question, return_tensors="pt")), args.device)
    _, cache = blip.model.run_with_cache(**inputs, names_filter=overlays.overlay_names(blip.model))
    toi = cache.positions.find_each(blip.tokenizer, item.answer, sub_token="first")
    size = blip.model.cfg.vision.image_size
    for rank, head in enumerate(heads, 1):
        grid = overlays.head_overlay(blip.model, cache, head, toi)
        plot.patch_overlay(item.image().resize((size, size)), grid, args.out / f"n6_overlay_{rank}.png",
                           cmap="seismic", centered=False,
                           title=f"N6: L{head[0]}H{head[1]} from {item.answer!r}, minus the mean head (min-max)")
    # every cross-attention head at once, from any token: pick a layer and head, hover the question's tokens
    view.attention(blip.model, cache, args.out / "n6_attention.html", inputs=inputs,
                   title=f"N6: BLIP's question encoder reading the image ({item.question!r}; N6 heads {heads})")


if __name__ == "__main__":
    sys.exit(main())
