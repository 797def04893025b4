import os

import pytest
import torch

# jaxtyping runtime checks for the test session only (style.md point 7: not on the hot path). The import hook must be
# installed before anything imports `hooked_vlm`, so it sits here, at the top of the first conftest pytest loads: every
# function of the package with jaxtyping annotations is then checked by beartype, shapes included (letters bound
# consistently within one call). On by default (a whole run takes about 3x as long: 4.5 min instead of 1.5 on 2
# idle cores); HOOKED_VLM_TYPECHECK=0 turns it off. Tests of user-facing errors run with the checks off (see below).
TYPECHECK = os.environ.get("HOOKED_VLM_TYPECHECK", "1") != "0"
if TYPECHECK:
    import jaxtyping

    # PEP 484's numeric tower (an int where a float is annotated), which beartype checks only when asked
    jaxtyping.install_import_hook("hooked_vlm", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

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
