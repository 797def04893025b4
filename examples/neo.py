"""Neo et al. (ICLR 2025), "Towards interpreting visual information processing in VLMs", on LLaVA, as the authors'
code (clemneo/llava-interp) runs it.

E1 the mean visual token (the projector's output averaged over images x tokens); E2 mean ablation of the object's
image tokens (buffers of 0/1/2 patches, prompt only), evaluated by a greedy description (class named?), polling ("yes"
to "Is there a {class} in this image?") and VQA (first token after "It is a"); E3 the same ablation of comparison
token sets (high-norm "register" tokens, the top-k tokens by integrated gradients, k random tokens); E4 the logit
lens over the image tokens on the patch grid, and where the class name appears in it; E5 attention knockout of
Neo et al.'s token sets in their layer windows; E6 the pixel-space control that curates their data (the model names
the object, and no longer when the object's patches of the image are noised).

    python examples/neo.py [--model llava-hf/llava-1.5-7b-hf] [--data instances_val2017.json val2017/]
                           [--questions clean_questions.json] [--mean mean_vector.pt] [--pairs 1000]

Without --data, synthetic COCO-style scenes (a small object on a non-square image) are written next to the figures
and read back through the same COCO loader. Without --model, a tiny random LLaVA: the numbers show the pipeline,
not a finding; generations are then 8 tokens unless --max-new-tokens says otherwise (the protocol's is 200).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from _common import image_geometry, load, parser
from hooked_vlm import analysis, evaluation, interventions, metrics, plot, spatial, view
from hooked_vlm.data import coco_instances, collate, neo_filter
from hooked_vlm.integrated_gradients import integrated_gradients

KS = (5, 10, 20, 40, 60, 100, 250)  # the authors' k for IG and random token sets
TINY_MAX_NEW_TOKENS = 8


def arguments(argv: list[str] | None):
    p = parser(__doc__.split("\n\n")[0], "neo", batch_size=8)
    p.add_argument("--data", nargs=2, metavar=("INSTANCES_JSON", "IMAGE_DIR"), default=None,
                   help="a COCO instances file and its image folder; default: synthetic scenes")
    p.add_argument("--questions", type=Path, default=None,
                   help="the authors' clean_questions.json ({image id: [question, ...]}) for VQA; default: one "
                        "generic question")
    p.add_argument("--mean", type=Path, default=None, help="a saved mean visual token (.pt); default: E1 computes it "
                   "over the data's images")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"description length (protocol 200; the tiny model's default {TINY_MAX_NEW_TOKENS})")
    p.add_argument("--poll-tokens", type=int, default=10)
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--ig-target", choices=["yes", "authors"], default="yes",
                   help="yes: the logit of 'Yes' as the paper describes; authors: tokenizer.encode('Yes')[0], what "
                        "their code reads (the BOS token for LLaVA-1.5's tokenizer)")
    p.add_argument("--no-curate", action="store_true", help="skip E6's curation (analyse every selected image)")
    p.add_argument("--ig-batch-size", type=int, default=16, help="rows (alphas x examples) per IG forward/backward")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ data
def synthetic_coco(folder: Path, n: int, seed: int) -> Path:
    """`n` scenes (320 x 213 and, every other one, 213 x 320: halved 640 x 427 COCO images, landscape and portrait,
    so that a model that sizes each image's token grid from the image, as Qwen2-VL, gets two grids) with one object
    of 1000-2000 px² and one larger object of another category, written as a COCO instances file; returns its
    path."""
    rng = random.Random(seed)
    names = ["car", "table", "couch", "man", "woman", "street"]
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        W, H = (320, 213) if i % 2 == 0 else (213, 320)
        image = Image.new("RGB", (W, H), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        # the larger object first, so that the small one (the one the filter selects) is drawn whole on top
        objects = [(rng.uniform(45, 60), rng.uniform(30, 40)), (rng.uniform(21, 26), rng.uniform(17, 22))]
        cats = rng.sample(range(len(names)), 2)
        for k, ((a, b), cat) in enumerate(zip(objects, cats)):
            cx, cy = rng.uniform(a + 2, W - a - 2), rng.uniform(b + 2, H - b - 2)
            poly = [v for t in range(16) for v in (cx + a * math.cos(2 * math.pi * t / 16),
                                                     cy + b * math.sin(2 * math.pi * t / 16))]
            draw.polygon(list(zip(poly[::2], poly[1::2])), fill=tuple(rng.randrange(30, 200) for _ in range(3)))
            area = 0.5 * abs(sum(poly[2 * j] * poly[(2 * j + 3) % 32] - poly[(2 * j + 2) % 32] * poly[2 * j + 1]
                                 for j in range(16)))
            annotations.append({"id": 2 * i + k + 1, "image_id": i + 1, "category_id": cat + 1, "segmentation": [poly],
                                "area": area, "bbox": [cx - a, cy - b, 2 * a, 2 * b], "iscrowd": 0})
        image.save(folder / f"{i + 1:012d}.jpg", quality=95)
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": W, "height": H})
    path = folder / "instances_synthetic.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": j + 1, "name": n} for j, n in enumerate(names)]}))
    return path


def select(args) -> list[tuple]:
    """(CocoImage, annotation) of the images that pass Neo et al.'s filter, at most --pairs of them."""
    if args.data:
        json_path, image_dir = args.data
    else:
        image_dir = args.out / "synthetic_coco"
        json_path = synthetic_coco(image_dir, args.pairs, args.seed)
    chosen = []
    for image in coco_instances(json_path, image_dir):
        ann = neo_filter(image)
        if ann is not None:
            chosen.append((image, ann))
        if len(chosen) == args.pairs:
            break
    if not chosen:
        raise SystemExit(f"no image of {json_path} passes Neo et al.'s filter (<= 3 annotations, one single-instance "
                         "category of 1000-2000 px²)")
    return chosen


# ------------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str = "accuracy") -> None:
    plt = _pyplot()
    metrics_, conditions = list(groups), list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(conditions) * len(metrics_) / 2, 3.5))
    width = 0.8 / len(metrics_)
    for m, name in enumerate(metrics_):
        ax.bar([c + m * width for c in range(len(conditions))], [groups[name][c] for c in conditions], width,
               label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(conditions))], conditions, rotation=30, ha="right")
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the protocol
def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load(args.model, "llava", args.device, args.dtype)
    tiny = args.model is None
    max_new = args.max_new_tokens or (TINY_MAX_NEW_TOKENS if tiny else 200)
    tok = model.processor.tokenizer
    hook = model.image_embeddings_hook
    torch.manual_seed(args.seed)
    chosen = select(args)
    images = [image.image.load() for image, _ in chosen]
    names = [ann.category.lower() for _, ann in chosen]
    bs = args.batch_size
    print(f"{len(chosen)} images; classes {names}")

    # object patches through the processor's own resize and crop, buffers 0/1/2, on each image's token grid (one
    # grid for every image on LLaVA-1.5; Qwen2-VL sizes each image's grid from the image's size)
    geometries = [image_geometry(model, pil.size) for pil in images]
    objects = []
    for (image, ann), geometry in zip(chosen, geometries):
        mask = spatial.annotation_mask(ann.raw, image.height, image.width)
        objects.append({b: spatial.object_patches(mask, geometry, buffer=b) for b in (0, 1, 2)})

    # E1: the mean visual token, over the images x their tokens (the authors: 50k ImageNet images)
    if args.mean is not None:
        mean = torch.load(args.mean, map_location="cpu").to(model.device, model.dtype)
    else:
        empty = [evaluation.prompt(model, "")] * len(images)
        mean = analysis.mean_activation(model, collate(model, zip(images, empty), batch_size=bs),
                                        ["projector.hook_out"], over="tokens", batch_size=bs,
                                        progress=False)["projector.hook_out"]
        torch.save(mean.cpu(), args.out / "E1_mean_visual_token.pt")
    print(f"E1 mean visual token: {mean.numel()}-d, L2 norm {mean.float().norm():.3f} (LLaVA-1.5-7B in the authors' "
          "file: 25.566)")
    norms = []
    for _, inputs in evaluation.batches(model, images, [evaluation.prompt(model, "Describe this image.")] * len(images),
                                        bs):
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=hook)
        norms.append(cache[hook][model.image_embeddings_mask(cache.positions).to(cache[hook].device)].float()
                     .norm(dim=-1).cpu())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(torch.cat(norms).numpy(), bins=40, color="grey")
    ax.axvline(float(mean.float().norm()), color="red", label="mean visual token")
    ax.set(title="E1 image-token norms at the LM input", xlabel="L2 norm", ylabel="tokens")
    ax.legend(fontsize=8)
    fig.savefig(args.out / "E1_mean_visual_token.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    # E6: the pixel-space control that curates the data: named in a clean description, not when the object's
    # patches of the image are noised
    clean = evaluation.identification(model, images, names, max_new_tokens=max_new, poll_tokens=args.poll_tokens,
                                      batch_size=bs)
    noised_images = [spatial.noise_patches(pil, obj[0], geometry, seed=args.seed + i)
                     for i, (pil, obj, geometry) in enumerate(zip(images, objects, geometries))]
    noised = evaluation.identification(model, noised_images, names, max_new_tokens=max_new,
                                       poll_tokens=args.poll_tokens, batch_size=bs)
    keep = clean.generative & ~noised.generative
    print(f"E6 pixel control: named clean {clean.generative.float().mean():.2f}, with the object noised "
          f"{noised.generative.float().mean():.2f}; {int(keep.sum())} of {len(keep)} images pass the curation")
    bars({"generative": {"clean": clean.generative.float().mean().item(),
                         "object noised": noised.generative.float().mean().item()},
          "polling": {"clean": clean.polling.float().mean().item(),
                      "object noised": noised.polling.float().mean().item()}},
         args.out / "E6_pixel_control.png", "E6 pixel-space control (object patches noised)")
    if not args.no_curate:
        if keep.any():
            idx = torch.nonzero(keep).flatten().tolist()
            images, names, objects, chosen, geometries = ([x[i] for i in idx]
                                                          for x in (images, names, objects, chosen, geometries))
            clean = evaluation.Identification(clean.generative[idx], clean.polling[idx],
                                              [clean.descriptions[i] for i in idx], [clean.answers[i] for i in idx])
        else:
            print("(no image passes the curation: analysing all of them)")

    # VQA questions: the authors' curated ones where given, else one generic question
    curated = json.loads(args.questions.read_text()) if args.questions else {}
    questions = [(curated.get(str(image.id)) or ["What is in this image?"])[0] for image, _ in chosen]
    clean_vqa = evaluation.first_token(model, images, questions, names, batch_size=bs, keep_probs=True)

    def evaluate(edit) -> dict[str, float]:
        if edit is None:
            ident, vqa = clean, clean_vqa
        else:
            ident = evaluation.identification(model, images, names, edit=edit, max_new_tokens=max_new,
                                              poll_tokens=args.poll_tokens, batch_size=bs)
            vqa = evaluation.first_token(model, images, questions, names, edit=edit, batch_size=bs)

        def rate(after, before):  # accuracy on the examples the unedited model gets right (all if none)
            base = before if before.any() else torch.ones_like(before)
            return after[base].float().mean().item()
        return {"generative": rate(ident.generative, clean.generative), "polling": rate(ident.polling, clean.polling),
                "vqa": rate(vqa.correct, clean_vqa.correct)}

    # E2: mean ablation of the object's tokens, prompt only
    results = {"clean": evaluate(None)}
    for b in (0, 1, 2):
        edit = evaluation.replace_image_tokens(model, [obj[b] for obj in objects], mean)
        results[f"object+{b}"] = evaluate(edit)
    for name, r in results.items():
        print(f"E2 {name:9s}: generative {r['generative']:.2f}  polling {r['polling']:.2f}  vqa {r['vqa']:.2f}")
    bars({m: {c: r[m] for c, r in results.items()} for m in ("generative", "polling", "vqa")},
         args.out / "E2_object_ablation.png", "E2 mean ablation of the object's tokens")

    # E3: comparison sets, as image-token indices: register tokens, top-k by integrated gradients, k random
    registers, ranked = [], []
    yes = metrics.answer_token(tok, "Yes") if args.ig_target == "yes" else tok.encode("Yes")[0]
    polls = [evaluation.prompt(model, f"Is there a {n} in this image?") for n in names]
    for rows, inputs in evaluation.batches(model, images, polls, bs):
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=hook)
        positions = cache.positions
        spans = [positions.image[b][0] for b in range(len(rows))]
        registers += [spatial.image_token_indices(s, p) for s, p in
                      zip(spans, spatial.register_tokens(cache[hook], positions, k=2.0))]
        ig = integrated_gradients(model, inputs, yes, hook, baseline=mean, positions="image", steps=args.ig_steps,
                                  rule="linspace", batch_size=max(args.ig_batch_size, len(rows)))
        every = max(len(s.indices) for s in spans)  # ranks all of each image's tokens
        ranked += [spatial.image_token_indices(s, p) for s, p in zip(spans, ig.top(hook, every))]
    n_tokens = [len(r) for r in ranked]  # each image's token count (per image where the grid follows its size)
    ks = [k for k in KS if k <= min(n_tokens)] or [min(n_tokens)]
    generator = torch.Generator().manual_seed(args.seed)
    sets = {"register": registers}
    for k in ks:
        sets[f"ig{k}"] = [r[:k] for r in ranked]
        sets[f"random{k}"] = [torch.randperm(n, generator=generator)[:k] for n in n_tokens]
    for name, token_sets in sets.items():
        results[name] = evaluate(evaluation.replace_image_tokens(model, token_sets, mean))
        print(f"E3 {name:9s}: generative {results[name]['generative']:.2f}  polling {results[name]['polling']:.2f}  "
              f"vqa {results[name]['vqa']:.2f}  ({sum(len(s) for s in token_sets) / len(token_sets):.1f} tokens)")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, m in zip(axes, ("generative", "polling", "vqa")):
        ax.plot(ks, [results[f"ig{k}"][m] for k in ks], "o-", label="integrated gradients top-k")
        ax.plot(ks, [results[f"random{k}"][m] for k in ks], "s-", label="random k")
        for name, style in (("register", ":"), ("object+0", "--"), ("object+1", "-."), ("clean", "-")):
            ax.axhline(results[name][m], ls=style, color="grey", lw=1, label=name)
        ax.set(title=m, xlabel="k tokens ablated", ylim=(-0.05, 1.05), xscale="log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("E3 ablating comparison token sets")
    fig.savefig(args.out / "E3_token_sets.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    # E4: logit lens at the image tokens ("Describe the image."), and where the class's first token shows up
    describe = [evaluation.prompt(model, "Describe the image.")] * len(images)
    inside, outside, first_lens = [], [], None
    # the lens reads [B, patches] positions: images whose grids differ (Qwen2-VL) are read one at a time
    same_grid = len({g.grid for g in geometries}) == 1
    for rows, inputs in evaluation.batches(model, images, describe, bs if same_grid else 1):
        positions = model.positions(**inputs)
        spans = [positions.image[b][0] for b in range(len(rows))]
        patch_pos = torch.stack([s.indices[s.rows >= 0] for s in spans])  # [B, grid*grid], row-major patches
        lens = analysis.logit_lens(model, inputs, tower="lm", positions=patch_pos, k=5)
        if first_lens is None:
            first_lens, first_inputs = lens, inputs
        for b, i in enumerate(rows):
            hit = (lens.ids[:, b] == evaluation.class_token(tok, names[i])).any(-1).float().cpu()  # [L, patches]
            obj = objects[i][0].flatten()
            inside.append(hit[:, obj].mean(-1) if obj.any() else torch.full((hit.shape[0],), float("nan")))
            outside.append(hit[:, ~obj].mean(-1))
    top1 = first_lens.probs[:, 0, :, 0]  # [layers, patches] of the first image
    plot.heatmap(top1, args.out / "E4_logit_lens_image_tokens.png", xlabel="image token (row-major patch)",
                 title="E4 logit lens: top-1 probability at each image token", centered=False, cmap="viridis")
    geometry = geometries[0]
    left, top, w, h = geometry.crop
    seen = images[0].resize(geometry.resized, Image.BICUBIC).crop((left, top, left + w, top + h))
    plot.patch_overlay(seen, top1[-1].view(geometry.grid), args.out / "E4_logit_lens_last_layer.png",
                       title="E4 last layer, top-1 probability per patch", centered=False, cmap="viridis")
    # as Neo et al.'s interactive viewer: each patch's top-1 token per layer, the top-5 on hover
    view.lens(model, first_lens, args.out / "E4_logit_lens.html", inputs=first_inputs, image=seen,
              title="E4 logit lens at the image tokens (first image)")
    inside_m, outside_m = torch.stack(inside).nanmean(0), torch.stack(outside).mean(0)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(inside_m.numpy(), "o-", label="object patches")
    ax.plot(outside_m.numpy(), "s-", label="other patches")
    ax.set(title="E4 class's first token in the top-5 of the logit lens", xlabel="layer", ylabel="fraction of patches")
    ax.legend(fontsize=8)
    fig.savefig(args.out / "E4_class_localisation.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"E4 class token in the top-5: object patches {inside_m.nanmean():.3f}, others {outside_m.mean():.3f} "
          "(mean over layers)")

    # E5: attention knockout of the token sets in the layer windows, VQA first token
    correct = clean_vqa.correct if clean_vqa.correct.any() else torch.ones_like(clean_vqa.correct)
    if not clean_vqa.correct.any():
        print("(E5: no image answered correctly without knockout: measuring on all of them)")
    windows = interventions.layer_windows(model.tower_info("lm").n_layers)
    accuracy = torch.zeros(len(interventions.NEO_TOKEN_SETS), len(windows))
    drop_own, drop_clean = torch.zeros_like(accuracy), torch.zeros_like(accuracy)
    for s, token_set in enumerate(interventions.NEO_TOKEN_SETS):
        for w, layers in enumerate(windows.values()):
            knocked = evaluation.first_token(model, images, questions, names, batch_size=bs, keep_probs=True,
                                             edit=evaluation.knockout(model, objects, token_set, layers))
            accuracy[s, w] = knocked.correct[correct].float().mean()
            # the authors' drop: p of each run's own top token; beside it, p of the unedited run's top token
            drop_own[s, w] = (clean_vqa.p_token - knocked.p_token)[correct].mean()
            drop_clean[s, w] = (clean_vqa.p_token - knocked.p_of(clean_vqa.token))[correct].mean()
    print("E5 knockout, VQA accuracy / drop of p(top token) / drop of p(unedited top token), per window "
          + ", ".join(f"{n} {r.start}-{r.stop - 1}" for n, r in windows.items()))
    for s, token_set in enumerate(interventions.NEO_TOKEN_SETS):
        cells = "  ".join(f"{accuracy[s, w]:.2f}/{drop_own[s, w]:+.3f}/{drop_clean[s, w]:+.3f}"
                          for w in range(len(windows)))
        print(f"   {token_set:25s} {cells}")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    im = ax.imshow(accuracy.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(windows)), [f"{n}\n{r.start}-{r.stop - 1}" for n, r in windows.items()], fontsize=7)
    ax.set_yticks(range(len(interventions.NEO_TOKEN_SETS)), interventions.NEO_TOKEN_SETS, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="VQA accuracy")
    ax.set(title="E5 attention knockout (queries may not read keys)")
    fig.savefig(args.out / "E5_knockout.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
