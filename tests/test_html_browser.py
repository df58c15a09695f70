"""The interactive loss-picture page in a real headless browser: it renders, shows the tokens and
the hover box, and loads nothing from anywhere. Skips only when no Chromium binary is installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lens.report.html import write_html
from lens.core.translators import logit_lens_for
from lens.interventions import ActAdd
from lens.analysis.picture import build_picture
from conftest import N_LAYERS, make_model

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no headless browser found (looked for {BROWSERS})")

TEXT = "Love and hate <b>are</b> calm & anger."

# Appended to a copy of the page (after the page's own script): on load, hover the first cell,
# switch to the base view, and write what the page did into the DOM for --dump-dom to return.
PROBE = """<script>
window.addEventListener("load", () => {
  const cell = document.querySelector("td.cell");
  cell.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: 5, clientY: 5}));
  const tip = document.getElementById("tip");
  const report = {tipShown: tip.style.display, tipText: tip.textContent, diffFirstCell: cell.textContent};
  document.querySelector("input[value=base]").click();
  report.baseFirstCell = document.querySelector("td.cell").textContent;
  report.resources = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>"""


def dump_dom(page: Path, profile: Path) -> str:
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--dump-dom", page.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def texts_of(dom: str, tag: str, css_class: str) -> list[str]:
    pattern = rf'<{tag}[^>]*class="{css_class}"[^>]*>(.*?)</{tag}>'
    return [html.unescape(x) for x in re.findall(pattern, dom, flags=re.S)]


@pytest.fixture(scope="module")
def page_and_picture(tmp_path_factory, tokenizer):
    model = make_model("llama")
    act = ActAdd(model, tokenizer, pairs=[("Love", "Hate")], layer=1, coefficient=8.0)
    picture = build_picture(model, tokenizer, TEXT, logit_lens_for(model), lambda: act, top_k=3)
    page = write_html(picture, tmp_path_factory.mktemp("html") / "picture.html", title="test page")
    return page, picture


def test_page_renders_the_tokens_and_the_grid(page_and_picture, tmp_path):
    page, picture = page_and_picture
    dom = dump_dom(page, tmp_path / "profile")
    assert texts_of(dom, "th", "tok") == picture.tokens  # drawn by the page's script, in order
    assert len(texts_of(dom, "td", "cell")) == (N_LAYERS + 1) * len(picture.tokens)
    assert "<b>are</b>" not in dom  # token text is shown as text, never parsed as markup


def test_hover_shows_top_k_and_views_switch(page_and_picture, tmp_path):
    page, picture = page_and_picture
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    report = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dump_dom(probed, tmp_path / "p"), re.S)[1]))
    top_row = picture.n_rows - 1  # the grid's first row is the last layer
    assert report["tipShown"] == "block"
    for rank in range(3):  # the hover box lists the base and intervened top-k of that cell
        for stats in (picture.base, picture.intervened):
            assert picture.labels[int(stats.top_ids[top_row, 0, rank])] in report["tipText"]
    assert report["baseFirstCell"] == picture.top1_labels("base")[top_row][0]


def test_nothing_is_loaded_from_outside(page_and_picture, tmp_path):
    page, _ = page_and_picture
    source = page.read_text(encoding="utf-8")
    for pattern in (r"\b(src|href|action)\s*=", r"url\(", r"@import", r"https?://", r"//[a-z0-9.-]+\.[a-z]{2,}/"):
        assert not re.search(pattern, source, flags=re.I), f"page references something external: {pattern}"
    # Without the page's Content-Security-Policy, any fetch would show up as a resource entry.
    unguarded = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", source)
    assert unguarded != source
    probed = tmp_path / "unguarded.html"
    probed.write_text(unguarded.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    report = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dump_dom(probed, tmp_path / "p"), re.S)[1]))
    assert report["resources"] == []
