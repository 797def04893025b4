import ast
import importlib
import inspect
import os

import pytest
import torch

# jaxtyping runtime checks for the test session only (style.md point 7: not on the hot path). The import hook must be
# installed before anything imports `hooked_vlm`, so it sits here, at the top of the first conftest pytest loads: every
# module-level function and method of the package is then checked by beartype, shapes included (letters bound
# consistently within one call). On by default, at about 2.5x the time (tests/test_patching.py and
# tests/test_example_chunking.py: 91-100 s against 38 s on 2 cores); HOOKED_VLM_TYPECHECK=0 turns it off. Tests of
# user-facing errors run with the checks off (see below).
TYPECHECK = os.environ.get("HOOKED_VLM_TYPECHECK", "1") != "0"


def _leave_nested_functions_unchecked() -> None:
    """The hook decorates every `def`, nested ones too, and decorating costs ~1.5 ms: a closure built on each call (a
    name filter, a hook function, a patch) was decorated again every time, a third of test_example_chunking.py's time
    (17k decorations in `names.in_blocks` alone). No nested function of the package has a shape annotation
    (tests/test_typecheck.py checks), so they stay undecorated."""
    from jaxtyping._import_hook import JaxtypingTransformer  # private: checked below, so an upgrade fails here

    visit_function, visit_class = JaxtypingTransformer.visit_FunctionDef, JaxtypingTransformer.visit_ClassDef

    def unchecked_if_nested(visit):
        def visit_node(self, node):
            nested = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in self._parents)
            self._no_type_check_level += nested
            try:
                return visit(self, node)
            finally:
                self._no_type_check_level -= nested

        return visit_node

    probe = JaxtypingTransformer(typechecker=None)
    if not (isinstance(getattr(probe, "_parents", None), list) and probe._no_type_check_level == 0):
        raise AssertionError("jaxtyping's import hook changed: update _leave_nested_functions_unchecked")
    JaxtypingTransformer.visit_FunctionDef = unchecked_if_nested(visit_function)
    JaxtypingTransformer.visit_ClassDef = unchecked_if_nested(visit_class)


# The hook wraps every module-level function and method, and a wrapped call costs ~50 us however plain its
# annotations. The bookkeeping that runs once per hook point per forward, annotated with no tensor shape, made up 2/3
# of the checked calls (700k of 1.1M in tests/test_patching.py): it runs unchecked (`__no_type_check__`, which the
# wrapper reads on the wrapped function).
UNCHECKED_HOT_PATH = {
    "hooked_vlm.hooks": ["HookPoint.has_hooks", "HookPoint.forward", "HookPoint._visible", "PerCall._var",
                         "PerCall.__get__", "PerCall.__set__", "HookedRootModule._select"],
    "hooked_vlm.names": ["_str", "parse"],
    "hooked_vlm.weights": ["TowerWeights.__getattr__"],
    "hooked_vlm.towers.base": ["Tower.n_layers"],
}


def _skip_checks(module_name: str, qualname: str) -> None:
    owner = importlib.import_module(module_name)
    *outer, name = qualname.split(".")
    for part in outer:
        owner = getattr(owner, part)
    fn = inspect.getattr_static(owner, name)
    fn = getattr(fn, "fget", None) or getattr(fn, "__func__", None) or fn  # property, staticmethod
    if not hasattr(fn, "__wrapped__"):
        raise AssertionError(f"{module_name}.{qualname} is not wrapped by the jaxtyping import hook: update the list")
    fn.__wrapped__.__no_type_check__ = True


if TYPECHECK:
    import jaxtyping

    _leave_nested_functions_unchecked()
    # PEP 484's numeric tower (an int where a float is annotated), which beartype checks only when asked
    jaxtyping.install_import_hook("hooked_vlm", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")
    for module_name, qualnames in UNCHECKED_HOT_PATH.items():
        for qualname in qualnames:
            _skip_checks(module_name, qualname)

# Tiny models: more threads only add scheduling overhead, and CI machines are shared.
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "no_typecheck: run without the jaxtyping checks (tests of the errors users "
                                       "see, which the checks would pre-empt with a TypeCheckError)")
    config.addinivalue_line("markers", "slow: minutes or GBs (real-shaped models, several processes); CI runs them, "
                                       "`pytest -m 'not slow'` is the quick loop")


@pytest.fixture(autouse=True)
def _typecheck_off_for_error_tests(request):
    """The tests of hooked_vlm's own input errors (tests/bad_inputs/, `@pytest.mark.no_typecheck`) check what a user
    sees, who runs without the import hook: a wrong-shaped input must meet the library's message, not jaxtyping's."""
    off = TYPECHECK and ("bad_inputs" in request.path.parts or request.node.get_closest_marker("no_typecheck"))
    if not off:
        yield
        return
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="module")
def llava_minimal_pair():
    """A tiny LLaVA, a padded batch of two prompts with clean and corrupted images, and a logit-difference metric
    of the clean run's own next token: the inputs of the LLaVA sweep tests."""
    from hooked_vlm import HookedVLM, metrics
    from hooked_vlm.tiny import build_llava, random_image

    hf, processor = build_llava(seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=prompts, padding=True,
                      return_tensors="pt")
    corrupt = processor(images=[random_image(seed=2), random_image(seed=3)], text=prompts, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    return model, clean, corrupt, metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
