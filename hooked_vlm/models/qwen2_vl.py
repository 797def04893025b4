"""Qwen2-VL and Qwen2.5-VL: a vision tower over images of any size, the patch merger (`projector`) that fuses each
2 x 2 block of patches into one LM token, and the Qwen2 language model with multimodal rotary positions.

Towers (hook-name prefixes), in execution order: `vision` (one row per image, padded to the largest; see
`towers/qwen_vision.py`), `projector` (the merger: `[n_images, M, D_lm]`, M the largest image's merged-token count),
`lm`. The merged tokens are written into the LM input at the `<|image_pad|>` placeholders, image after image in
batch order, as HF's `masked_scatter`.

Positions: the LM's rotary positions are three-dimensional (time, row, column), derived from the prompt as HF's
`get_rope_index` derives them: text tokens count up from 0 (pads skipped, at 0), an image's tokens sit at
(p, p + row, p + col) where p is the position after the text before it, and the text after an image resumes at
p + max(rows, cols). While generating, each new token is one after the previous (HF's `rope_deltas`). A text-only
prompt is numbered from its attention mask (as HF's generate; HF's forward numbers a left-padded text-only batch
0..T-1 across the pads instead).

Videos (`pixel_values_videos`) are not supported and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.norms import NormConfig, make_norm
from ..configs import QwenVLConfig
from ..hooks import HookPoint
from ..positions import ImageSpan, Positions
from ..towers.qwen_vision import QwenVisionTower, patch_coordinates
from .base import HookedVLM
from .generation import Pick, decode, decoding_step, greedy
from .inputs import strict_forward
from .language_model import DecoderOnlyLM, LMPrompt

VIDEO_REFUSAL = ("hooked_vlm's Qwen2-VL takes images only; videos (pixel_values_videos, video_grid_thw) are not "
                 "supported: pass the frames as images")


class PatchMerger(nn.Module):
    """Vision stream -> LM tokens: a norm, each merge x merge block of patches (consecutive in the stream)
    concatenated, then linear, GELU, linear (HF's `PatchMerger`)."""

    def __init__(self, d_vision: int, d_out: int, merge: int, norm: NormConfig):
        super().__init__()
        self.group = merge**2
        d_in = d_vision * self.group
        self.hook_in = HookPoint()  # [n_images, N, D_vision]: the vision tower's output (padded rows)
        self.ln = make_norm(d_vision, norm)
        self.in_weight = nn.Parameter(torch.empty(d_in, d_in))
        self.in_bias = nn.Parameter(torch.zeros(d_in))
        self.out_weight = nn.Parameter(torch.empty(d_out, d_in))
        self.out_bias = nn.Parameter(torch.zeros(d_out))
        self.hook_mid = HookPoint()  # [n_images, M, D_vision * merge^2]: after the first linear and the GELU
        self.hook_out = HookPoint()  # [n_images, M, D_lm]: the image tokens in LM space

    def forward(self, x: Float[Tensor, "n N D_v"]) -> Float[Tensor, "n M D_lm"]:
        n, N, D = x.shape
        h = self.ln(self.hook_in(x)).reshape(n, N // self.group, D * self.group)  # fuse each block's patches
        h = self.hook_mid(F.gelu(F.linear(h, self.in_weight, self.in_bias)))
        return self.hook_out(F.linear(h, self.out_weight, self.out_bias))


def _image_rows(coordinates: list[tuple[Tensor, Tensor]]) -> Positions:
    """The `Positions` of a tower with one row per image, padded to the longest: each row one image span (its
    tokens' grid rows and columns), -1 for ids (no token), the mask marking the real tokens."""
    N = max(len(r) for r, _ in coordinates)
    mask = torch.zeros(len(coordinates), N, dtype=torch.long)
    for i, (r, _) in enumerate(coordinates):
        mask[i, :len(r)] = 1
    spans = [[ImageSpan(0, len(r), r, c)] for r, c in coordinates]
    return Positions(torch.full((len(coordinates), N), -1, dtype=torch.long), mask, spans)


class HookedQwen2VL(HookedVLM):
    """`Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`. Call it with the
    `Qwen2VLProcessor` output; returns the LM logits."""

    tower_names = ("vision", "projector", "lm")
    image_embeddings_hook = "lm.hook_inputs_embeds"  # at the image tokens' positions
    prompt_tower = output_tower = "lm"
    # Qwen2-VL's chat format for one image and a question
    prompt_template = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                       "<|im_start|>assistant\n")

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = QwenVisionTower(cfg.vision)
        self.projector = PatchMerger(cfg.vision.d_model, cfg.lm.d_model, cfg.vision.merge_size, cfg.merger_norm)
        # the text side (image write-in, logits); its tower is registered here as `lm`
        self.language = DecoderOnlyLM.build(cfg.lm, image_token_id=cfg.image_token_id, bos_token_id=cfg.bos_token_id)
        self.lm = self.language.towers["lm"]
        self.setup()

    # ------------------------------------------------------------------ the image side
    def merged_grids(self, image_grid_thw: Int[Tensor, "n 3"]) -> list[tuple[int, int]]:
        """Per image, its grid of LM tokens (rows, cols): the patch grid divided by the merge size."""
        m = self.cfg.vision.merge_size
        return [(h // m, w // m) for _, h, w in image_grid_thw.tolist()]

    def image_features(self, pixel_values: Float[Tensor, "P K"], image_grid_thw: Int[Tensor, "n 3"]
                       ) -> Float[Tensor, "n M D_lm"]:
        """The image tokens in LM space, one row per image, padded to the largest image's M tokens."""
        return self.projector(self.vision(pixel_values, image_grid_thw))

    def _check_images(self, pixel_values: Any, image_grid_thw: Any) -> None:
        if pixel_values is None:
            if image_grid_thw is not None:
                raise ValueError("image_grid_thw was given without pixel_values; pass both (the processor's output)")
            return
        if not isinstance(pixel_values, Tensor) or not isinstance(image_grid_thw, Tensor):
            raise TypeError("pixel_values and image_grid_thw must both be torch tensors (the processor's output with "
                            "return_tensors='pt')")
        if image_grid_thw.dtype.is_floating_point or image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be integers of shape [n_images, 3] (t, rows, cols), got "
                             f"{image_grid_thw.dtype} {tuple(image_grid_thw.shape)}")
        m, K = self.cfg.vision.merge_size, self.cfg.vision.patch_dim
        for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
            if t != 1:
                raise ValueError(f"image {i} has {t} temporal patches; an image has 1 (the processor repeats it over "
                                 "the temporal patch). " + VIDEO_REFUSAL)
            if h <= 0 or w <= 0 or h % m or w % m:
                raise ValueError(f"image {i}'s patch grid {h} x {w} is not a positive multiple of the merge size {m} "
                                 "in both directions; build the inputs with model.processor")
        if not pixel_values.dtype.is_floating_point:
            raise TypeError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}; preprocess images "
                            "with model.processor")
        n_patches = int(image_grid_thw.prod(-1).sum())
        if pixel_values.shape != (n_patches, K):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but image_grid_thw describes "
                             f"{n_patches} patches of {K} values (channels x temporal patch x patch^2): "
                             f"expected {(n_patches, K)}; pass the processor's output for these images")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values holds NaN or infinite values, which would make every logit NaN; check the "
                             "image preprocessing")

    def _check_inputs(self, input_ids: Tensor | None, pixel_values: Tensor | None, image_grid_thw: Tensor | None,
                      attention_mask: Tensor | None, pixel_values_videos: Any = None, video_grid_thw: Any = None,
                      generating: bool = False) -> tuple[LMPrompt, list[list[ImageSpan]]]:
        """The checked LM prompt and its image spans (each with its merged grid), after checking that the
        placeholders and the images match."""
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError(VIDEO_REFUSAL)
        if input_ids is None:
            raise ValueError("input_ids is missing: pass the processor's output, e.g. model(**model.processor("
                             "images=image, text=model.prompt_template.format(question='What is this?'), "
                             "return_tensors='pt'))")
        prompt = self.language.check(input_ids, attention_mask, generating=generating)
        self._check_images(pixel_values, image_grid_thw)
        grids = [] if pixel_values is None else self.merged_grids(image_grid_thw)
        counts = [r * c for r, c in grids]
        n_tokens = int(prompt.is_image.sum())
        if n_tokens != sum(counts):
            raise ValueError(f"the prompts hold {n_tokens} <|image_pad|> tokens, but the {len(grids)} image(s) give "
                             f"{sum(counts)} tokens ({counts}); put one '<|image_pad|>' per image in the text and "
                             "build the inputs with model.processor(images=..., text=...), which expands each into the "
                             "image's tokens")
        spans: list[list[ImageSpan]] = []
        image = 0
        for b, row in enumerate(prompt.is_image.cpu()):
            idx = torch.nonzero(row).flatten().tolist()
            spans.append([])
            k = 0
            while k < len(idx):
                if image == len(grids):  # unreachable when the counts match; kept as a guard
                    raise ValueError("more <|image_pad|> tokens than images")
                rows, cols = grids[image]
                run = idx[k:k + rows * cols]
                if len(run) < rows * cols or run[-1] - run[0] + 1 != len(run):
                    raise ValueError(f"example {b}: image {image}'s {rows * cols} <|image_pad|> tokens must be "
                                     "consecutive and in one prompt, as the processor writes them")
                spans[b].append(ImageSpan(run[0], run[-1] + 1, torch.arange(rows).repeat_interleave(cols),
                                          torch.arange(cols).repeat(rows)))
                image, k = image + 1, k + rows * cols
        return prompt, spans

    def rope_positions(self, prompt: LMPrompt, spans: list[list[ImageSpan]]) -> Int[Tensor, "3 B T"]:
        """The LM's (time, row, column) rotary positions of the prompt, as HF's `get_rope_index`: pads at 0, text
        counting up over the real tokens, each image at its start position plus its token's row and column, the
        text after it resuming at the start plus max(rows, cols)."""
        mask = prompt.attention_mask.cpu()
        B, T = mask.shape
        out = torch.zeros(3, B, T, dtype=torch.long)
        for b in range(B):
            real = torch.nonzero(mask[b]).flatten()
            rank = torch.full((T,), -1, dtype=torch.long)
            rank[real] = torch.arange(len(real))
            pos = torch.zeros(3, len(real), dtype=torch.long)
            cur = k = 0  # the next position; the next real token (index among the real ones)
            for span in spans[b]:
                s, e = int(rank[span.start]), int(rank[span.stop - 1]) + 1
                if s < 0 or e - s != span.stop - span.start:
                    raise ValueError(f"example {b}: an image's tokens are masked out in attention_mask; image tokens "
                                     "must be real tokens")
                pos[:, k:s] = torch.arange(s - k) + cur
                cur += s - k
                pos[0, s:e] = cur
                pos[1, s:e], pos[2, s:e] = cur + span.rows, cur + span.cols
                cur += max(int(span.rows.max()), int(span.cols.max())) + 1
                k = e
            pos[:, k:] = torch.arange(len(real) - k) + cur
            out[:, b, real] = pos
        return out.to(prompt.input_ids.device)

    def image_embeddings_mask(self, positions: Positions) -> Tensor:
        return positions.image_mask

    def _inputs_embeds(self, prompt: LMPrompt, pixel_values: Tensor | None, image_grid_thw: Tensor | None
                       ) -> Float[Tensor, "B T D"]:
        if pixel_values is None:
            return self.language.inputs_embeds(prompt, None)
        tokens = self.image_features(pixel_values, image_grid_thw)  # [n, M, D], padded rows
        counts = torch.tensor([r * c for r, c in self.merged_grids(image_grid_thw)], device=tokens.device)
        real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < counts[:, None]
        # image after image, as HF concatenates them (one row: the adapter writes them in order)
        return self.language.inputs_embeds(prompt, tokens[real][None])

    def _positions_for(self, prompt: LMPrompt, spans: list[list[ImageSpan]], position_ids: Any) -> Tensor:
        if position_ids is None:
            return self.rope_positions(prompt, spans)
        B, T = prompt.input_ids.shape
        if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point or (
                position_ids.shape != (3, B, T)):
            raise ValueError(f"position_ids must be integers of shape (3, {B}, {T}) (time, row, column per token), "
                             f"got {getattr(position_ids, 'shape', type(position_ids).__name__)}; or leave them out "
                             "to derive them as HF does")
        return position_ids

    # ------------------------------------------------------------------ forward
    @strict_forward
    def forward(self, input_ids: Int[Tensor, "B T"] | None = None, pixel_values: Float[Tensor, "P K"] | None = None,
                image_grid_thw: Int[Tensor, "n 3"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                position_ids: Int[Tensor, "3 B T"] | None = None, mm_token_type_ids: Int[Tensor, "B T"] | None = None,
                pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None
                ) -> Float[Tensor, "B T_out V"]:
        """LM logits for every prompt position (T_out = T; fewer when the LM resumes on a suffix). Text-only
        prompts work too. `mm_token_type_ids` (the processor's) is accepted and ignored: the image positions are
        read from `input_ids`. `position_ids` [3, B, T] override the derived rotary positions."""
        prompt, spans = self._check_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                           pixel_values_videos, video_grid_thw)
        prompt.position_ids = self._positions_for(prompt, spans, position_ids)
        embeds = self._inputs_embeds(prompt, pixel_values, image_grid_thw)
        return self.language.logits(prompt, embeds)

    @strict_forward
    def positions(self, input_ids: Int[Tensor, "B T"] | None = None,
                  pixel_values: Float[Tensor, "P K"] | None = None, image_grid_thw: Int[Tensor, "n 3"] | None = None,
                  attention_mask: Int[Tensor, "B T"] | None = None, position_ids: Tensor | None = None,
                  mm_token_type_ids: Int[Tensor, "B T"] | None = None, pixel_values_videos: Tensor | None = None,
                  video_grid_thw: Tensor | None = None) -> Positions:
        """Where the prompt's tokens are in the LM's input, per example: each image's span with each token's row and
        column in the image's merged grid, the text, the last real token. A pure function of the inputs.

        With images, `towers["vision"]` and `towers["projector"]` describe those towers' rows, one per image padded
        to the largest: `attention_mask` marks each image's real patches (merged tokens), `image[i]` is image i's
        one span with each patch's row and column in its patch grid (merged grid), and `input_ids` are -1 (no
        token). So means over tokens and patch groups leave the padding out."""
        prompt, spans = self._check_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                           pixel_values_videos, video_grid_thw)
        positions = self.language.positions(prompt, spans)
        if image_grid_thw is not None:
            m = self.cfg.vision.merge_size
            grids = [(h, w) for _, h, w in image_grid_thw.tolist()]
            positions.towers["vision"] = _image_rows([patch_coordinates(h, w, m) for h, w in grids])
            positions.towers["projector"] = _image_rows(
                [(torch.arange(h // m).repeat_interleave(w // m), torch.arange(w // m).repeat(h // m))
                 for h, w in grids])
        return positions

    def _generate(self, *, max_new_tokens: int, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                  image_grid_thw: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  mm_token_type_ids: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                  video_grid_thw: Tensor | None = None, pick: Pick = greedy) -> Tensor:
        """Decoding with a KV cache (greedy, or sampling by `pick`); returns the prompt and the new tokens, as HF.
        The prompt has its 3-D rotary positions; each new token is one after the last (HF's `rope_deltas`)."""
        prompt, spans = self._check_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                           pixel_values_videos, video_grid_thw, generating=True)
        embeds = self._inputs_embeds(prompt, pixel_values, image_grid_thw)
        positions = self.rope_positions(prompt, spans)
        # per row, how far the 3-D numbering runs ahead of the count of real tokens
        delta = positions.amax(dim=(0, 2)) + 1 - prompt.attention_mask.sum(-1)
        inner = decoding_step(self.lm, prompt_embeds=embeds, position_key="position_ids")
        started = []

        def step(new_ids: Tensor, mask: Tensor, text_positions: Tensor) -> Tensor:
            if not started:  # the prompt
                started.append(True)
                return inner(new_ids, mask, positions)
            shifted = text_positions + delta[:, None].to(text_positions.device)
            return inner(new_ids, mask, shifted[None].expand(3, -1, -1))

        return decode(step, prompt.input_ids, prompt.attention_mask, max_new_tokens,
                      eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                      pad_token_id=self.cfg.pad_token_id if pad_token_id is None else pad_token_id, pick=pick)
