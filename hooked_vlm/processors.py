"""Processors built without the parts that need packages hooked_vlm does not install.

HF's `Qwen2VLProcessor` also builds a video processor, which imports torchvision. `qwen2_vl_processor` builds it from
the image processor and the tokenizer alone: HF's own `__call__` still expands each `<|image_pad|>` into the image's
merged-token count and writes `mm_token_type_ids`; only videos are unavailable (hooked_vlm refuses them anyway).

Saved, it writes the folder HF's `Qwen2VLProcessor` writes: `processor_class` "Qwen2VLProcessor" (in
processor_config.json and tokenizer_config.json) and a `video_processor` entry, so that HF's `AutoProcessor` loads
the folder where torchvision is installed (it needs a video processor config; see `video_processor_config`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["qwen2_vl_processor", "load_qwen2_vl_processor", "is_qwen2_vl_processor_folder", "video_processor_config",
           "QWEN2_VL_PROCESSORS"]

# processor_class values of a saved Qwen2-VL / Qwen2.5-VL processor: HF's, and the one hooked_vlm wrote before it
# wrote HF's (folders saved then still load)
QWEN2_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen2VLImageTextProcessor")
HF_PROCESSOR_CLASS = "Qwen2VLProcessor"  # what a saved folder names: HF's AutoProcessor resolves it
HF_VIDEO_PROCESSOR_TYPE = "Qwen2VLVideoProcessor"  # the video processor of both Qwen2-VL and Qwen2.5-VL
# the image processor's settings that Qwen2VLVideoProcessor takes too: VideosKwargs' (transformers.processing_utils)
# and Qwen2VLVideoProcessorInitKwargs' patch / merge sizes
_VIDEO_SHARED = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size")


def video_processor_config(image_processor: Any) -> dict[str, Any]:
    """The `video_processor` entry of a saved processor_config.json: Qwen2VLVideoProcessor with the image
    processor's resize, rescale, normalisation and patch settings, the rest left to the class's defaults. HF builds
    the same video processor for a checkpoint with only an image processor config (AutoVideoProcessor's fallback:
    the image config, its type renamed "...ImageProcessor" -> "...VideoProcessor"); HF's AutoVideoProcessor finds
    no video processor in a folder without this entry (or a video_preprocessor_config.json) and raises."""
    image = image_processor.to_dict()
    return {**{k: image[k] for k in _VIDEO_SHARED if k in image}, "video_processor_type": HF_VIDEO_PROCESSOR_TYPE}


@functools.cache
def _image_text_class() -> type:
    from transformers import Qwen2VLProcessor  # here: `import hooked_vlm` does not load transformers

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        """HF's Qwen2VLProcessor (its `__call__`, placeholder expansion and `mm_token_type_ids` unchanged) whose
        parts are the image processor and the tokenizer only: ProcessorMixin takes its parts from `__init__`'s
        signature, and checking a video processor's class needs torchvision. Saved, it is HF's Qwen2VLProcessor
        (`processor_class` and a `video_processor` entry), which this class loads back too."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "processor_class": HF_PROCESSOR_CLASS,
                    "video_processor": video_processor_config(self.image_processor)}

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            if push_to_hub:
                raise ValueError("this Qwen2-VL processor (built without torchvision) does not push to the Hub: "
                                 "save_pretrained(folder), then upload the folder with huggingface_hub")
            files = super().save_pretrained(save_directory, **kwargs)
            # ProcessorMixin wrote this class's name into tokenizer_config.json; AutoProcessor reads it where
            # processor_config.json names no class, so it too names HF's
            self.tokenizer._set_processor_class(HF_PROCESSOR_CLASS)
            self.tokenizer.save_pretrained(save_directory)
            return files

    return Qwen2VLImageTextProcessor


def qwen2_vl_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """A `Qwen2VLProcessor` (a subclass without the video processor) from a Qwen2-VL image processor and a
    tokenizer with the `<|image_pad|>`, `<|vision_start|>` and `<|vision_end|>` tokens."""
    return _image_text_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _processor_configs(folder: Path) -> list[dict[str, Any]]:
    out = []
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text())
            out.append(config)
            if isinstance(config.get("image_processor"), dict):
                out.append(config["image_processor"])
    return out


def is_qwen2_vl_processor_folder(folder: Path) -> bool:
    """Whether `folder` holds a Qwen2-VL processor: its processor class, or its image processor type."""
    for config in _processor_configs(Path(folder)):
        if config.get("processor_class") in QWEN2_VL_PROCESSORS:
            return True
        if str(config.get("image_processor_type", "")).startswith("Qwen2VLImageProcessor"):
            return True
    return False


def _chat_template(folder: Path, tokenizer: Any) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def load_qwen2_vl_processor(folder: Path) -> Any:
    """A saved Qwen2-VL processor: HF's `AutoProcessor` where torchvision is installed (it builds the video processor
    too), else `qwen2_vl_processor` from the folder's image processor (the PIL one) and tokenizer."""
    import importlib.util

    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    folder = Path(folder)
    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    return qwen2_vl_processor(image_processor, tokenizer, _chat_template(folder, tokenizer))
