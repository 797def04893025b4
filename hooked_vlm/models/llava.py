"""LLaVA-1.5: a CLIP vision tower, a two-layer projector, and a Llama language model.

Towers (hook-name prefixes), in execution order: `vision`, `projector`, `lm`. The vision tower runs only up to the
selected feature layer(s) (HF computes the later ones and discards them; here they do not exist, so a hook name in
them is an error, not a hook that silently never fires). The projected image tokens are written into the LM input
at the `<image>` placeholders: `lm.hook_embed` still holds the placeholders' embeddings, `lm.hook_inputs_embeds`
the sequence block 0 reads.

Positions: rotary positions come from the attention mask (`cumsum(mask) - 1`, pads 0), as HF's generate computes
them, so a left-padded row equals the same prompt alone; `hf_positions=True` (a model option) numbers 0..T-1 as
HF's forward does (for LLaVA the two differ by about 1e-6, since the pads sit at the start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.mlp import ACTIVATIONS
from ..configs import LlavaConfig
from ..hooks import HookPoint
from ..positions import ImageSpan, Positions, image_spans
from ..tokens import TokenLayout
from ..towers.vit import VisionTower
from .base import HookedVLM
from .generation import Pick, greedy
from .inputs import check_pixels, strict_forward
from .language_model import LMPrompt, language_model


class Projector(nn.Module):
    """Vision features -> LM space: linear, activation, linear."""

    def __init__(self, d_in: int, d_out: int, act: str, bias: bool):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.in_weight = nn.Parameter(torch.empty(d_out, d_in))
        self.in_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(d_out, d_out))
        self.out_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.hook_in = HookPoint()  # [n_images, N, D_vision * n_feature_layers]: the selected vision features
        self.hook_mid = HookPoint()  # [n_images, N, D_lm]: after the first linear and the activation
        self.hook_out = HookPoint()  # [n_images, N, D_lm]: the image tokens in LM space

    def forward(self, x: Float[Tensor, "n N D_v"]) -> Float[Tensor, "n N D_lm"]:
        h = self.hook_mid(self.act(F.linear(self.hook_in(x), self.in_weight, self.in_bias)))
        return self.hook_out(F.linear(h, self.out_weight, self.out_bias))


class HookedLlava(HookedVLM):
    """`LlavaForConditionalGeneration`. Call it with the `LlavaProcessor` output; returns the LM logits."""

    tower_names = ("vision", "projector", "lm")
    image_embeddings_hook = "lm.hook_inputs_embeds"  # at the image tokens' positions
    prompt_tower = output_tower = "lm"
    prompt_template = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's chat format

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision.d_model * len(cfg.feature_layers), cfg.lm.d_model, cfg.projector_act,
                                   cfg.projector_bias)
        # the text side (image write-in, positions, logits, decoding); its tower is registered here as `lm`
        self.language = language_model(cfg.lm, image_token_id=cfg.image_token_id, bos_token_id=cfg.bos_token_id)
        self.lm = self.language.towers["lm"]
        self.setup()

    # ------------------------------------------------------------------ the image side
    def image_features(self, pixel_values: Float[Tensor, "n 3 H W"]) -> Float[Tensor, "n N D_lm"]:
        """The image tokens in LM space, one row of `tokens_per_image` per image."""
        features = self.vision(pixel_values, feature_layers=self.cfg.feature_layers)
        if self.cfg.select == "default":
            features = features[:, 1:]  # drop the class token
        return self.projector(features)

    def _patch_grid(self) -> tuple[Int[Tensor, "N"], Int[Tensor, "N"]]:
        """Each image token's patch row and column (-1: the class token, first with `select="full"`)."""
        grid = self.cfg.vision.grid
        patch = torch.arange(grid * grid)
        rows, cols = patch // grid, patch % grid
        if self.cfg.select == "full":
            rows, cols = torch.cat([torch.tensor([-1]), rows]), torch.cat([torch.tensor([-1]), cols])
        return rows, cols

    def token_layout(self) -> TokenLayout:
        """As `LlavaProcessor`: each `<image>` of the text becomes one placeholder per image token, labelled by its
        patch ("r,c"; "cls" for the class token)."""
        labels = tuple("cls" if r < 0 else f"{r},{c}" for r, c in zip(*(t.tolist() for t in self._patch_grid())))
        return TokenLayout(self.cfg.image_token_id, labels, expand_in_text=self.cfg.tokens_per_image)

    def _check_inputs(self, input_ids: Tensor | None, pixel_values: Tensor | None, attention_mask: Tensor | None,
                      position_ids: Tensor | None = None, generating: bool = False
                      ) -> tuple[LMPrompt, list[list[ImageSpan]]]:
        """The checked LM prompt and its image spans, after checking that placeholders and images match."""
        if input_ids is None:
            raise ValueError("input_ids is missing: pass the processor's output, e.g. model(**model.processor("
                             "images=image, text='USER: <image>\\nWhat is this? ASSISTANT:', return_tensors='pt'))")
        prompt = self.language.check(input_ids, attention_mask, position_ids=position_ids, generating=generating)
        if pixel_values is not None:
            check_pixels(pixel_values, self.vision)
        n_tokens, per_image = int(prompt.is_image.sum()), self.cfg.tokens_per_image
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is None and n_tokens:
            raise ValueError(f"the prompts hold {n_tokens} <image> tokens but no pixel_values were given; pass the "
                             "images the prompts refer to")
        if pixel_values is not None and n_tokens != n_images * per_image:
            raise ValueError(
                f"the prompts hold {n_tokens} <image> tokens, but {n_images} image(s) need {per_image} each "
                f"({n_images * per_image}); put one '<image>' per image in the text and build the inputs with "
                "model.processor(images=..., text=...), which expands each into the image's tokens")
        for b, n in enumerate(prompt.is_image.sum(dim=1).tolist()):
            if n % per_image:
                raise ValueError(f"example {b} holds {n} <image> tokens, not a multiple of the {per_image} tokens "
                                 "of one image: each image's tokens must sit in one prompt")
        spans = image_spans(prompt.is_image, per_image, *self._patch_grid())
        for b, row in enumerate(spans):
            if any(span.stop - span.start != per_image for span in row):
                raise ValueError(f"example {b}: the {per_image} <image> tokens of each image must be consecutive, "
                                 "as the processor writes them")
        return prompt, spans

    def image_embeddings_mask(self, positions: Positions) -> Tensor:
        return positions.image_mask

    def _inputs_embeds(self, prompt: LMPrompt, pixel_values: Tensor | None) -> Float[Tensor, "B T D"]:
        return self.language.inputs_embeds(prompt, None if pixel_values is None else self.image_features(pixel_values))

    # ------------------------------------------------------------------ forward
    @strict_forward
    def forward(self, input_ids: Int[Tensor, "B T"] | None = None, pixel_values: Float[Tensor, "n 3 H W"] | None = None,
                attention_mask: Int[Tensor, "B T"] | None = None, position_ids: Int[Tensor, "B T"] | None = None,
                mm_token_type_ids: Int[Tensor, "B T"] | None = None) -> Float[Tensor, "B T_out V"]:
        """LM logits for every prompt position (T_out = T; fewer when the LM resumes on a suffix, as patching's
        `model.resume` does). Text-only prompts (no `<image>`, no pixel_values) work too.

        `mm_token_type_ids` (the processor's `return_mm_token_type_ids=True`) is accepted and ignored: it marks the
        `<image>` positions, which the model reads from `input_ids` itself, so it cannot change the result.
        """
        prompt, _ = self._check_inputs(input_ids, pixel_values, attention_mask, position_ids)
        embeds = self._inputs_embeds(prompt, pixel_values)
        return self.language.logits(prompt, embeds, hf_positions=self.cfg.hf_positions)

    @strict_forward
    def positions(self, input_ids: Int[Tensor, "B T"] | None = None,
                  pixel_values: Float[Tensor, "n 3 H W"] | None = None,
                  attention_mask: Int[Tensor, "B T"] | None = None, position_ids: Int[Tensor, "B T"] | None = None,
                  mm_token_type_ids: Int[Tensor, "B T"] | None = None) -> Positions:
        """Where the prompt's tokens are in the LM's input, per example: each image's span (with each token's
        patch-grid row and column), the text, the last real token.

        A pure function of the inputs (forward's, checked as forward checks them): it runs no tower and leaves
        nothing on the model, so it holds for any call, thread or resumed run with these inputs. `run_with_cache`
        labels its cache with it (`cache.positions`).
        """
        return self.language.positions(*self._check_inputs(input_ids, pixel_values, attention_mask, position_ids))

    def _generate(self, *, max_new_tokens: int, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                  attention_mask: Tensor | None = None, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, mm_token_type_ids: Tensor | None = None,
                  pick: Pick = greedy) -> Tensor:
        """Decoding with a KV cache (greedy, or sampling by `pick`); returns the prompt and the new tokens, as HF.
        `eos_token_id` and `pad_token_id` override the model's (taken from the HF config), as in HF's generate. A
        right-padded batch is refused (see `inputs.refuse_right_padding`); `mm_token_type_ids` is ignored, as in
        `forward`."""
        prompt, _ = self._check_inputs(input_ids, pixel_values, attention_mask, generating=True)
        embeds = self._inputs_embeds(prompt, pixel_values)
        return self.language.generate(prompt, embeds, max_new_tokens,
                                      eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                                      pad_token_id=self.cfg.pad_token_id if pad_token_id is None else pad_token_id,
                                      pick=pick)
