"""The views in a real headless browser (Debian's `chromium`, driven by Playwright through its executable: no
browser is downloaded). In the page itself: the selectors exist, choosing a head draws the cache's numbers,
hovering a token moves the overlay, clicking a sweep cell shows that head's pattern, the lens shows the lens's
tokens, and nothing is requested from outside the file. A screenshot of each view is kept in tests/artifacts/.

`scripts/install_browser.sh` (run by scripts/test.sh) installs chromium where it is absent and apt can reach a
mirror; elsewhere these tests skip, saying why. HOOKED_VLM_CHROMIUM names another Chromium executable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hooked_vlm import HookedVLM, analysis, tiny, view
from hooked_vlm.view.payload import decode

CHROMIUM = os.environ.get("HOOKED_VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the `test` extra installs it
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    sync_playwright is None or CHROMIUM is None,
    reason="the browser tests need playwright (pip install -e '.[test]') and a Chromium executable (Debian: "
           "apt-get install chromium, or bash scripts/install_browser.sh as root; or set HOOKED_VLM_CHROMIUM): "
           + ("playwright is not installed" if sync_playwright is None else "no chromium on PATH"))

ARTIFACTS = Path(__file__).parent / "artifacts"
F16 = dict(rtol=2**-10, atol=1e-7)  # what float16 keeps of a value (the view's precision for tiny models)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A view opened from its file, with every request the page makes recorded and any to the outside aborted."""

    def __init__(self, browser, path: Path):
        self.url = path.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1150, "height": 820})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", lambda route: route.continue_() if route.request.url == self.url else route.abort())
        self.page.goto(self.url)

    def state(self, key: str):
        return self.page.evaluate(f"window.hv.state[{key!r}]")

    def close(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"view_{name}.png"), full_page=True)
        outside = [u for u in self.requests if u != self.url and not u.startswith("data:")]
        assert not outside, f"the page requested {outside}: a view must not leave its file"
        assert not self.errors, f"script errors in the page: {self.errors}"
        self.page.close()


@pytest.fixture(scope="module")
def llava():
    hf, processor = tiny.build_llava(seed=2)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=tiny.random_image(seed=5), text=model.prompt_template.format(question="what is it?"),
                       return_tensors="pt")
    _, cache = model.run_with_cache(**inputs, names_filter=view.attention_names(model))
    return model, inputs, cache


def test_no_request_leaves_unnoticed(browser, tmp_path):
    """The request check itself: a page that fetches something is caught (and the fetch aborted)."""
    path = tmp_path / "leaky.html"
    path.write_text('<html><body><img src="http://example.invalid/x.png"><script>fetch("https://cdn.invalid/a.js")'
                    '.catch(() => {})</script></body></html>')
    page = Page(browser, path)
    page.page.wait_for_timeout(200)
    assert any("example.invalid" in u for u in page.requests) and any("cdn.invalid" in u for u in page.requests)
    page.page.close()


def test_attention_view(browser, tmp_path, llava):
    model, inputs, cache = llava
    page = Page(browser, view.attention(model, cache, tmp_path / "attention.html", inputs=inputs).save(
        tmp_path / "attention.html"))
    p = page.page
    for selector in ("#hv-set", "#hv-layer", "#hv-head", "#hv-queries", ".hv-grid .hv-cell"):
        assert p.locator(selector).count() > 0, selector
    sets = [o.inner_text() for o in p.locator("#hv-set option").all()]
    p.select_option("#hv-set", str(sets.index("lm self-attention")))
    p.select_option("#hv-layer", "1")
    p.select_option("#hv-head", "2")
    span = cache.positions.image[0][0]
    last = int(cache.positions.last[0])
    p.hover(f'#hv-queries [data-q="{last}"]')
    row = np.array(page.state("row"), dtype=np.float32)
    expected = cache["lm", 1, "pattern"][0, 2, last].numpy()
    print(f"attention head 2: max |page - cache| = {np.abs(row - expected).max():.2e}")
    np.testing.assert_allclose(row, expected, **F16)
    grid = page.state("grid")  # what the overlay draws, patch by patch
    for offset, (r, c) in enumerate(zip(span.rows.tolist(), span.cols.tolist())):
        assert grid[r * model.cfg.vision.grid + c] == pytest.approx(row[span.start + offset], rel=1e-6)
    cell = ".hv-grid .hv-cell[data-rc='1,2']"
    before = p.locator(cell).evaluate("e => e.style.background")
    other = span.start - 1  # a text token before the image: it attends to no patch (causal), so its map differs
    p.hover(f'#hv-queries [data-q="{last - 1}"]')
    assert page.state("query") == last - 1
    np.testing.assert_allclose(page.state("row"), cache["lm", 1, "pattern"][0, 2, last - 1].numpy(), **F16)
    assert p.locator(cell).evaluate("e => e.style.background") != before, "hovering a token did not move the overlay"
    p.hover(f'#hv-queries [data-q="{other}"]')
    assert page.state("query") == other
    p.select_option("#hv-head", "mean")
    p.hover(f'#hv-queries [data-q="{last}"]')
    np.testing.assert_allclose(page.state("row"), cache["lm", 1, "pattern"][0, :, last].mean(0).numpy(), **F16)
    # the vision tower: a click on a patch of the image picks that patch as the query
    p.select_option("#hv-set", str(sets.index("vision self-attention")))
    p.select_option("#hv-layer", "0")
    p.select_option("#hv-head", "1")
    p.click(".hv-grid .hv-cell[data-rc='2,3']")
    q = 1 + 2 * model.cfg.vision.grid + 3  # the class token first
    assert page.state("query") == q and page.state("pinned")
    np.testing.assert_allclose(page.state("row"), cache["vision", 0, "pattern"][0, 1, q].numpy(), **F16)
    page.close("attention")


def test_attention_view_uint8_and_cross_attention(browser, tmp_path):
    """BLIP's question encoder reading the image by cross-attention, quantised: the page draws the cache's values
    within the quantisation's bound (each row segment's maximum / 510)."""
    hf, processor = tiny.build_blip("vqa", seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=tiny.random_image(seed=6), text="what is it?", return_tensors="pt")
    _, cache = model.run_with_cache(**inputs, names_filter=view.attention_names(model))
    page = Page(browser, view.attention(model, cache, inputs=inputs, precision="uint8").save(tmp_path / "blip.html"))
    p = page.page
    assert p.locator("#hv-set option:checked").inner_text() == "text_encoder cross-attention"
    p.select_option("#hv-layer", "1")
    p.select_option("#hv-head", "3")
    p.click('#hv-queries [data-q="2"]')
    expected = cache["text_encoder", 1, "cross_attn.pattern"][0, 3, 2].numpy()
    row = np.array(page.state("row"))
    bound = max(expected[1:].max(), expected[:1].max()) / 510  # segments: the patches and the class token
    print(f"uint8 cross-attention: max |page - cache| = {np.abs(row - expected).max():.2e} (bound {bound:.2e})")
    np.testing.assert_allclose(row, expected, rtol=0, atol=bound * 1.001)
    page.close("attention_blip_cross")


def test_sweep_view(browser, tmp_path, llava):
    model, inputs, cache = llava
    info = model.tower_info("lm")
    scores = torch.randn(info.n_layers, info.n_heads, generator=torch.Generator().manual_seed(0))
    page = Page(browser, view.sweep(scores, tmp_path / "heads.html", kind="heads", model=model, cache=cache,
                                    inputs=inputs, tower="lm").save(tmp_path / "heads.html"))
    p = page.page
    assert p.locator("#hv-heat .hv-hc").count() == scores.numel()
    p.hover('[data-cell="0,3"]')
    assert page.state("hover")["value"] == pytest.approx(float(scores[0, 3]), rel=1e-6)
    p.click('[data-cell="1,2"]')
    assert page.state("selected") == {"layer": 1, "col": 2, "value": pytest.approx(float(scores[1, 2]), rel=1e-6)}
    query = int(cache.positions.last[0])
    np.testing.assert_allclose(page.state("row"), cache["lm", 1, "pattern"][0, 2, query].numpy(), **F16)
    p.click('[data-cell="0,1"]')
    np.testing.assert_allclose(page.state("row"), cache["lm", 0, "pattern"][0, 1, query].numpy(), **F16)
    page.close("sweep_heads")

    T = inputs["input_ids"].shape[1]
    resid = torch.randn(info.n_layers, T, generator=torch.Generator().manual_seed(1))
    page = Page(browser, view.sweep(resid, kind="positions", model=model, inputs=inputs, tower="lm").save(
        tmp_path / "positions.html"))
    page.page.click('[data-cell="1,7"]')
    np.testing.assert_allclose(page.state("row"), resid[1].numpy(), rtol=1e-6)
    span, g = cache.positions.image[0][0], model.cfg.vision.grid
    grid = page.state("grid")
    for offset, (r, c) in enumerate(zip(span.rows.tolist(), span.cols.tolist())):
        assert grid[r * g + c] == pytest.approx(float(resid[1, span.start + offset]), rel=1e-6)
    page.close("sweep_positions")


def test_lens_view(browser, tmp_path, llava):
    model, inputs, _ = llava
    result = analysis.logit_lens(model, inputs, tower="lm", k=3)
    page = Page(browser, view.lens(model, result, inputs=inputs).save(tmp_path / "lens.html"))
    p = page.page
    for selector in ("#hv-layer", "#hv-layer-range", "#hv-text", ".hv-grid .hv-cell"):
        assert p.locator(selector).count() > 0, selector
    positions = result.positions[0].tolist()
    for layer in (0, 1):
        p.select_option("#hv-layer", str(layer))
        top1 = page.state("top1")
        assert [top1[str(pos)] for pos in positions] == [result.tokens[layer][0][i][0] for i in range(len(positions))]
        span = model.positions(**inputs).image[0][0]
        r, c = span.rows[5].item(), span.cols[5].item()
        p.hover(f".hv-grid .hv-cell[data-rc='{r},{c}']")
        assert p.locator(f".hv-grid .hv-cell[data-rc='{r},{c}']").inner_text() == result.tokens[layer][0][
            positions.index(span.start + 5)][0].replace("\n", "\\n")
        hover = page.state("hover")
        i = positions.index(span.start + 5)
        assert hover["pos"] == span.start + 5
        assert [t for t, _, _ in hover["topk"]] == result.tokens[layer][0][i]
        np.testing.assert_allclose([pr for _, pr, _ in hover["topk"]], result.probs[layer, 0, i].numpy(), **F16)
    page.close("lens")


def test_notebook_form_runs(browser, llava):
    """`_repr_html_`, what Jupyter shows: the page in an iframe's srcdoc, scripts running, the same numbers."""
    model, inputs, cache = llava
    v = view.attention(model, cache, inputs=inputs)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_content(v._repr_html_())
    frame = page.frames[1]
    frame.wait_for_function("window.hv && window.hv.state.row !== null")
    s = view.load_payload(v.html)["sets"][v.payload["default_set"]]
    q = frame.evaluate("window.hv.state.query")
    np.testing.assert_allclose(frame.evaluate("window.hv.state.row"),
                               decode(s["values"])[0, :, s["queries"].index(q)].astype(np.float32).mean(0), **F16)
    assert [u for u in requests if not u.startswith(("about:", "data:"))] == []
    page.close()
