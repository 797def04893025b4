"""Hook names, built and parsed in one place.

A hook name is the dotted module path of a `HookPoint` from the model's root (docs/hooks.md lists them all):

    {tower}.{leaf}                  a tower-level point     vision.hook_embed, lm.ln_final.hook_scale
    {tower}.blocks.{layer}.{leaf}   a point inside a block  lm.blocks.3.attn.hook_pattern, lm.blocks.3.hook_resid_pre

The leaf is one or more dotted parts, identifiers, the last and only the last starting with `hook_` (a hook point
has no children). `blocks` appears at most once, right after the tower, so every name parses one way. Names are a
public contract: the code builds them here and nowhere else, so their layout lives in one place.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, SupportsIndex

BLOCKS = "blocks"  # the tower's list of transformer blocks
HOOK = "hook_"  # the first letters of the last part of every hook name

Resid = Literal["pre", "mid", "mid_cross", "post"]


@dataclass(frozen=True)
class HookName:
    """A hook name taken apart: `tower`, the block index `layer` (None for a tower-level point) and the `leaf`
    after them (`"attn.hook_pattern"`). `str()` puts it back together."""

    tower: str
    layer: int | None
    leaf: str

    def __str__(self) -> str:
        return tower_hook(self.tower, self.leaf) if self.layer is None else block(self.tower, self.layer, self.leaf)


# ------------------------------------------------------------------------------------------------ building
def block(tower: str, layer: SupportsIndex, leaf: str) -> str:
    """The name of hook `leaf` in block `layer` of `tower`: `block("lm", 3, "attn.hook_z")` is
    `"lm.blocks.3.attn.hook_z"`."""
    return f"{block_prefix(tower, layer)}.{_checked_leaf(leaf)}"


def tower_hook(tower: str, leaf: str) -> str:
    """The name of a tower-level hook: `tower_hook("vision", "hook_embed") == "vision.hook_embed"`."""
    return f"{_checked_tower(tower)}.{_checked_leaf(leaf)}"


def check_tower(tower: str) -> str:
    """`tower` checked as a tower name (an identifier, not `blocks`, not starting with `hook_`) and returned."""
    return _checked_tower(_str(tower, "a tower"))


def block_prefix(tower: str, layer: SupportsIndex) -> str:
    """The module path of block `layer` of `tower` (`"lm.blocks.3"`), the prefix of every hook inside it."""
    return f"{_checked_tower(tower)}.{BLOCKS}.{_checked_layer(layer)}"


def resid(tower: str, layer: SupportsIndex, where: Resid = "pre") -> str:
    """The residual stream of block `layer`: entering it (`pre`), after its attention (`mid`), after its
    cross-attention (`mid_cross`) or leaving it (`post`)."""
    if where not in ("pre", "mid", "mid_cross", "post"):
        raise ValueError(f"where={where!r}: the residual stream is 'pre', 'mid', 'mid_cross' or 'post' a block")
    return block(tower, layer, f"{HOOK}resid_{where}")


def leaf(*parts: str) -> str:
    """A leaf from module parts and a hook, `hook_` added where it is left out: `leaf("cross_attn", "z") ==
    leaf("cross_attn.z") == "cross_attn.hook_z"`, `leaf("resid_pre") == "hook_resid_pre"`."""
    split = [p for part in parts for p in _str(part, "a leaf part").split(".")]
    if split and not split[-1].startswith(HOOK):
        split[-1] = HOOK + split[-1]
    return _checked_leaf(".".join(split))


# ------------------------------------------------------------------------------------------------ parsing
def parse(name: str) -> HookName:
    """`name` taken apart into (tower, layer, leaf); a ValueError naming the rule for a malformed name."""
    return _parse(_str(name, "a hook name"))


@functools.lru_cache(maxsize=8192)  # filters parse every name of a model on every call
def _parse(name: str) -> HookName:
    parts = name.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"hook name {name!r} is malformed: a hook name is '{{tower}}.{{leaf}}' or "
                         f"'{{tower}}.{BLOCKS}.{{layer}}.{{leaf}}' (dotted parts, none empty), e.g. "
                         f"'vision.hook_embed', 'lm.{BLOCKS}.3.attn.hook_pattern'")
    try:
        tower = _checked_tower(parts[0])
        if parts[1] != BLOCKS:
            return HookName(tower, None, _checked_leaf(".".join(parts[1:])))
        if len(parts) < 4:
            raise ValueError(f"'{BLOCKS}' must be followed by a layer number and a leaf")
        return HookName(tower, _layer_part(parts[2]), _checked_leaf(".".join(parts[3:])))
    except ValueError as e:
        raise ValueError(f"hook name {name!r} is malformed: {e}") from None


def layer_of(name: str) -> int:
    """The block index in `name`; a ValueError for a tower-level name (it is in no block)."""
    layer = parse(name).layer
    if layer is None:
        raise ValueError(f"hook name {name!r} is tower-level: it is in no block, so it has no layer")
    return layer


def in_blocks(tower: str | None, *leaves: str) -> Callable[[str], bool]:
    """A name filter: True for the hooks inside the blocks of `tower` (None: of every tower) whose leaf is one of
    `leaves` (none given: any leaf). `names_filter=in_blocks("lm", "hook_resid_pre")` caches every block input.
    A name that does not parse is simply not selected."""
    if tower is not None:
        _checked_tower(tower)
    wanted = frozenset(_checked_leaf(x) for x in leaves)

    def selects(name: str) -> bool:
        try:
            hook = parse(name)
        except (ValueError, TypeError):
            return False
        return hook.layer is not None and (tower is None or hook.tower == tower) and (
            not wanted or hook.leaf in wanted)

    return selects


# ------------------------------------------------------------------------------------------------ rules
def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r:.60}")
    return value


def _checked_tower(tower: str) -> str:
    if tower == BLOCKS:  # a TransformerLens name, "blocks.0.hook_z"
        raise ValueError(f"'{BLOCKS}' is not a tower: hooked_vlm names start with their tower, e.g. "
                         f"'lm.{BLOCKS}.0.hook_resid_pre' where TransformerLens writes '{BLOCKS}.0.hook_resid_pre'")
    if not _str(tower, "a tower").isidentifier() or tower.startswith(HOOK):
        raise ValueError(f"tower {tower!r} is not a tower name: an identifier such as 'vision' or 'lm', not "
                         f"starting with '{HOOK}'")
    return tower


def _checked_layer(layer: SupportsIndex) -> int:
    try:  # an int or a numpy integer; not a bool, a float or a string
        index = None if isinstance(layer, bool) else operator.index(layer)
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"layer {layer!r} is a {type(layer).__name__}, not a block index (an int)")
    if index < 0:
        raise ValueError(f"layer {index} is negative: hook names hold block indices 0, 1, ... (count from the end "
                         "with the tower's n_layers)")
    return index


def _layer_part(part: str) -> int:
    # the digits nn.ModuleList writes: no sign, no leading zero, so that each index has one spelling
    if not (part.isascii() and part.isdigit()) or (part != "0" and part.startswith("0")):
        raise ValueError(f"'{BLOCKS}' must be followed by a block index (0, 1, ...), got {part!r}")
    return int(part)


def _checked_leaf(leaf: str) -> str:
    parts = _str(leaf, "a leaf").split(".")
    if not all(p.isidentifier() for p in parts):
        raise ValueError(f"leaf {leaf!r} is not dotted identifiers such as 'attn.hook_pattern'")
    if not parts[-1].startswith(HOOK) or any(p.startswith(HOOK) for p in parts[:-1]):
        raise ValueError(f"leaf {leaf!r} must end in one '{HOOK}...' part, its last (e.g. 'hook_resid_pre', "
                         "'attn.hook_pattern')")
    if BLOCKS in parts:
        raise ValueError(f"leaf {leaf!r} contains '{BLOCKS}', which a name holds only right after its tower")
    return leaf
