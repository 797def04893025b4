"""Unless HOOKED_VLM_TYPECHECK=0, the jaxtyping import hook of conftest.py is on: hooked_vlm's shape annotations are checked in every test."""

import ast
import os
from pathlib import Path

import pytest
import torch

from hooked_vlm.components.masks import padding_mask

jaxtyping = pytest.importorskip("jaxtyping")
pytestmark = pytest.mark.skipif(os.environ.get("HOOKED_VLM_TYPECHECK", "1") == "0",
                                reason="HOOKED_VLM_TYPECHECK=0 turned the runtime checks off (see conftest.py)")


def test_shape_annotations_are_checked_at_runtime():
    assert padding_mask(torch.ones(2, 5, dtype=torch.long), torch.float32).shape == (2, 1, 1, 5)
    with pytest.raises(jaxtyping.TypeCheckError, match="attention_mask"):
        padding_mask(torch.ones(2, 5, 3, dtype=torch.long), torch.float32)  # "B S" given a 3-D mask
    with pytest.raises(jaxtyping.TypeCheckError, match="attention_mask"):
        padding_mask(torch.ones(2, 5), torch.float32)  # Int given floats


def _nested_functions(tree: ast.AST, inside: bool = False):
    for node in ast.iter_child_nodes(tree):
        is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if is_def and inside:
            yield node
        yield from _nested_functions(node, inside or is_def)


def _is_shape(node: ast.AST) -> bool:
    """`Float[Tensor, "B T D"]` and the like: a subscript whose last argument is a string of dimensions."""
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple)
            and isinstance(node.slice.elts[-1], ast.Constant) and isinstance(node.slice.elts[-1].value, str))


def test_no_nested_function_has_a_shape_annotation():
    """conftest.py leaves nested functions unchecked (decorating a closure on every call was a third of some files'
    time): that loses no shape check only while no nested function has one. Move such a function to module level."""
    package = Path(__file__).resolve().parents[1] / "hooked_vlm"
    shaped = [f"{path.relative_to(package.parent)}:{fn.lineno} {fn.name}"
              for path in sorted(package.rglob("*.py"))
              for fn in _nested_functions(ast.parse(path.read_text()))
              if any(_is_shape(n) for a in [fn.args, fn.returns] if a is not None for n in ast.walk(a))]
    assert not shaped, shaped
