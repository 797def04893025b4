"""Processors built without the parts that need packages hooked_vlm does not install.

HF's `Qwen2VLProcessor` also builds a video processor, which imports torchvision. `qwen2_vl_processor` builds it from
the image processor and the tokenizer alone: HF's own `__call__` still expands each `<|image_pad|>` into the image's
merged-token count and writes `mm_token_type_ids`; only videos are unavailable (hooked_vlm refuses them anyway).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["qwen2_vl_processor", "load_qwen2_vl_processor", "is_qwen2_vl_processor_folder", "QWEN2_VL_PROCESSORS"]

# processor_class values of a saved Qwen2-VL / Qwen2.5-VL processor (HF's, and ours below)
QWEN2_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen2VLImageTextProcessor")


@functools.cache
def _image_text_class() -> type:
    from transformers import Qwen2VLProcessor  # here: `import hooked_vlm` does not load transformers

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        """HF's Qwen2VLProcessor (its `__call__`, placeholder expansion and `mm_token_type_ids` unchanged) whose
        parts are the image processor and the tokenizer only: ProcessorMixin takes its parts from `__init__`'s
        signature, and checking a video processor's class needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

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
