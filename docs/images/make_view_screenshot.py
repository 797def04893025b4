"""Regenerate docs/images/view_attention.png: the attention view of a tiny LLaVA (random weights, a 12x12 patch
grid) on a synthetic scene, taken by headless Chromium. Run: .venv/bin/python docs/images/make_view_screenshot.py"""

import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from hooked_vlm import HookedVLM, corruption, tiny, view

HERE = Path(__file__).parent

hf, processor = tiny.build_llava(seed=0, image_size=96, patch=8)
model = HookedVLM.from_hf(hf, processor=processor)
pair = corruption.synthetic_pairs(1, "color", seed=0)[0]
inputs = processor(images=pair.clean_image, text=model.prompt_template.format(question=pair.prompt),
                   return_tensors="pt")
_, cache = model.run_with_cache(**inputs, names_filter=view.attention_names(model))
with tempfile.TemporaryDirectory() as tmp:
    path = view.attention(model, cache, Path(tmp) / "attention.html", inputs=inputs,
                          title="Attention of a tiny LLaVA (random weights)").save(Path(tmp) / "attention.html")
    chromium = shutil.which("chromium") or sys.exit("needs chromium (scripts/install_browser.sh)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 980, "height": 600})
        page.goto(path.resolve().as_uri())
        page.select_option("#hv-layer", "1")
        page.select_option("#hv-head", "2")
        last = int(cache.positions.last[0])
        page.click(f'#hv-queries [data-q="{last}"]')
        page.screenshot(path=str(HERE / "view_attention.png"), full_page=True)
        browser.close()
print(f"wrote {HERE / 'view_attention.png'}")
