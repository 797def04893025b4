"""Text corruptions: symmetric token replacement (NOTICE's STR) on whole words, and text minimal pairs (a prompt
and its corrupted version, as NOTICE's data files give them)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.example import Example, ImageFile
from ..data.notice import notice_pairs


def symmetric_token_replacement(tokenizer_or_processor: Any, text: str, replacements: Mapping[str, str], *,
                                images: Any = None, **processor_kwargs: Any) -> tuple[dict, dict]:
    """Clean and corrupted inputs for STR (NOTICE): `text`, and `text` with each word of `replacements` replaced,
    tokenized alike so that every position lines up.

    Whole words only: "cat" is replaced where it stands as a word, never inside "cats" or "concat" (a key may be
    a phrase, "red car", matched as a whole), case-sensitively. All replacements are made at once on the original
    text, so chains and swaps mean what they say: {"a": "b", "b": "c"} turns "a b" into "b c", and
    {"red": "blue", "blue": "red"} swaps the two words.

    Raises if a word does not occur as a whole word, or if a replacement changes the token count (naming the word
    and both tokenizations), since position-wise patching would then pair unrelated tokens. Works with a tokenizer
    or a processor; with a processor and `images`, both inputs carry the same images.
    """
    corrupted, spans = _replace_words(text, replacements)
    tokenizer = _tokenizer_of(tokenizer_or_processor, images)
    _check_replacements(tokenizer, text, corrupted, spans)
    return _encode_pair(tokenizer_or_processor, text, corrupted, images, processor_kwargs)


def text_pair_inputs(tokenizer_or_processor: Any, clean: str, corrupt: str, *, images: Any = None,
                     **processor_kwargs: Any) -> tuple[dict, dict]:
    """Inputs of a clean prompt and a corrupted prompt given whole (NOTICE's files hold both), checked to have the
    same number of tokens; the error names both tokenizations and the words whose token counts differ. With a
    processor and `images`, both inputs carry the same images."""
    if not isinstance(clean, str) or not isinstance(corrupt, str):
        raise TypeError(f"clean and corrupt must be strings, got {type(clean).__name__} and {type(corrupt).__name__}")
    tokenizer = _tokenizer_of(tokenizer_or_processor, images)
    a, b = _tokens(tokenizer, clean), _tokens(tokenizer, corrupt)
    if len(a) != len(b):
        raise ValueError(f"the prompts differ in token count{_word_hint(tokenizer, clean, corrupt)}, so position-wise "
                         f"patching would pair unrelated tokens: {clean!r} ({len(a)} tokens: {a}) and {corrupt!r} "
                         f"({len(b)} tokens: {b}); choose replacements of the same token length (or skip this pair)")
    return _encode_pair(tokenizer_or_processor, clean, corrupt, images, processor_kwargs)


@dataclass
class TextPair:
    """A prompt and its corrupted version (NOTICE's STR) about one image, with the answer the clean prompt should
    get; the image is a file, opened by `inputs()`."""

    clean: str
    corrupt: str
    answer: str
    wrong_answer: str | None = None
    image: ImageFile | None = None
    id: str = ""

    @classmethod
    def from_example(cls, example: Example) -> TextPair:
        if not example.corrupt_question:
            raise ValueError(f"example {example.id!r} has no corrupted question: it is no text pair")
        return cls(example.question, example.corrupt_question, example.answer or "", example.wrong_answer,
                   example.image, example.id)

    def inputs(self, processor: Any, **processor_kwargs: Any) -> tuple[dict, dict]:
        """Processor inputs of the clean and the corrupted prompt with the same image, checked to line up."""
        if self.image is None:
            raise ValueError(f"text pair {self.id!r} has no image file: give the loader its image_root")
        return text_pair_inputs(processor, self.clean, self.corrupt, images=self.image.load(), **processor_kwargs)


def load_text_pairs(path: str | Path, image_root: str | Path | None = None, *,
                    resolve: Callable[[str], str | Path] | None = None) -> list[TextPair]:
    """The text pairs (clean prompt, corrupted prompt, answers, image file) of a NOTICE data file; rows without a
    corrupted prompt are left out. `image_root` and `resolve` as in `hooked_vlm.data.notice_pairs`. The token
    counts are checked when a pair's inputs are made (NOTICE's own files do not guarantee them)."""
    return [TextPair.from_example(e) for e in notice_pairs(path, image_root, resolve=resolve) if e.corrupt_question]


# ------------------------------------------------------------------------------------------------ internals
@dataclass(frozen=True)
class _Span:
    old: str
    new: str
    start: int  # where `old` is in the clean text
    new_start: int  # where `new` is in the corrupted text


def _replace_words(text: str, replacements: Mapping[str, str]) -> tuple[str, list[_Span]]:
    """`text` with every whole-word occurrence of each key replaced, all at once, and where each replacement is."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(replacements, Mapping) or not replacements:
        raise ValueError(f"replacements must be a non-empty mapping word -> replacement, got {replacements!r}")
    for old, new in replacements.items():
        if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
            raise ValueError(f"each replacement maps a non-empty word to a non-empty word, got {old!r} -> {new!r}")
        if old != old.strip():
            raise ValueError(f"the word {old!r} has surrounding spaces: pass the word alone ({old.strip()!r})")

    def pattern(word: str) -> str:  # word boundaries only where the word starts or ends with a word character
        before = r"(?<!\w)" if re.match(r"\w", word[0]) else ""
        after = r"(?!\w)" if re.match(r"\w", word[-1]) else ""
        return before + re.escape(word) + after

    regex = re.compile("|".join(pattern(w) for w in sorted(replacements, key=len, reverse=True)))
    spans, pieces, last, shift = [], [], 0, 0
    for m in regex.finditer(text):
        new = replacements[m.group(0)]
        spans.append(_Span(m.group(0), new, m.start(), m.start() + shift))
        pieces += [text[last:m.start()], new]
        shift += len(new) - len(m.group(0))
        last = m.end()
    used = {s.old for s in spans}
    for old in replacements:
        if old not in used:
            inside = re.findall(r"\w*" + re.escape(old) + r"\w*", text)
            hint = f" (only inside other words: {sorted(set(inside))})" if inside else ""
            raise ValueError(f"{old!r} does not occur as a whole word in {text!r}{hint}")
    return "".join(pieces + [text[last:]]), spans


def _tokenizer_of(tokenizer_or_processor: Any, images: Any) -> Any:
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    if images is not None and tokenizer is tokenizer_or_processor:
        raise TypeError("images were given with a tokenizer: pass the processor (model.processor) to encode images")
    return tokenizer


def _tokens(tokenizer: Any, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_replacements(tokenizer: Any, clean: str, corrupt: str, spans: list[_Span]) -> None:
    """Raise unless each replacement keeps its word's token count in context and the whole text keeps its count."""
    a, b = _encoded(tokenizer, clean), _encoded(tokenizer, corrupt)
    for span in spans:
        old = _word_tokens(tokenizer, a, clean, span.start, len(span.old), span.old)
        new = _word_tokens(tokenizer, b, corrupt, span.new_start, len(span.new), span.new)
        if len(old) != len(new):
            raise ValueError(f"replacing {span.old!r} ({len(old)} tokens: {old}) by {span.new!r} ({len(new)} tokens: "
                             f"{new}) changes the token count; choose a replacement of the same length (the prompts "
                             f"tokenize to {_names(tokenizer, a)} and {_names(tokenizer, b)})")
    if len(a["input_ids"]) != len(b["input_ids"]):
        raise ValueError(f"{clean!r} ({len(a['input_ids'])} tokens: {_names(tokenizer, a)}) and {corrupt!r} "
                         f"({len(b['input_ids'])} tokens: {_names(tokenizer, b)}) differ in token count; choose "
                         "replacements of the same length")


def _encoded(tokenizer: Any, text: str) -> dict:
    offsets = bool(getattr(tokenizer, "is_fast", False))
    return dict(tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets))


def _names(tokenizer: Any, encoded: dict) -> list[str]:
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"])


def _word_tokens(tokenizer: Any, encoded: dict, text: str, start: int, length: int, word: str) -> list[str]:
    """The tokens of the word at text[start:start + length] as the whole text tokenizes it (the tokens whose
    characters overlap it, with the space before it, where word-boundary pieces such as sentencepiece's lone "▁"
    sit); without offsets (a slow tokenizer), the word's own tokens after a space."""
    if "offset_mapping" not in encoded:
        return _tokens(tokenizer, " " + word)
    lo = start - 1 if start > 0 and text[start - 1].isspace() else start
    hi = start + length
    ids = [i for i, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"]) if e > s and s < hi and e > lo]
    return tokenizer.convert_ids_to_tokens(ids)


def _word_hint(tokenizer: Any, clean: str, corrupt: str) -> str:
    """Which words differ in token count, when both texts have the same number of words."""
    a, b = re.findall(r"\w+|[^\w\s]", clean), re.findall(r"\w+|[^\w\s]", corrupt)
    if len(a) != len(b):
        return ""
    diffs = [f"{x!r} ({len(_tokens(tokenizer, ' ' + x))}) -> {y!r} ({len(_tokens(tokenizer, ' ' + y))} tokens)"
             for x, y in zip(a, b) if x != y and len(_tokens(tokenizer, " " + x)) != len(_tokens(tokenizer, " " + y))]
    return f" ({'; '.join(diffs)})" if diffs else ""


def _encode_pair(tokenizer_or_processor: Any, clean: str, corrupt: str, images: Any,
                 processor_kwargs: dict) -> tuple[dict, dict]:
    def encode(t: str) -> dict:
        if images is not None:
            return dict(tokenizer_or_processor(images=images, text=t, return_tensors="pt", **processor_kwargs))
        return dict(tokenizer_or_processor(t, return_tensors="pt", **processor_kwargs))

    a, b = encode(clean), encode(corrupt)
    if a["input_ids"].shape != b["input_ids"].shape:
        raise ValueError(f"{clean!r} and {corrupt!r} encode to {tuple(a['input_ids'].shape)} and "
                         f"{tuple(b['input_ids'].shape)} input_ids; choose replacements of the same token length")
    return a, b
