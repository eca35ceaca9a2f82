"""report.html: every section from what a run wrote, self-contained and escaped; and in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.viz.report import find_recipe, run_images, write_report
from tests.viz.run_dirs import TRICKY, make_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def test_report_has_every_section_inline(run, capsys):
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'}"
    page = (run / "report.html").read_text(encoding="utf-8")
    for title in ("Recipe", "Training curves", "Evaluation", "Confusion and calibration", "Sample generations",
                  "Inside the model"):  # fmt: skip
        assert f"<h2>{title}</h2>" in page
    assert "学习率" in page  # the recipe, from the latest checkpoint
    assert "北京。" in page and "Four." in page  # answers before/after
    assert "[0.1628, 0.4372]" in page  # mmlu acc 0.3 ± 1.96 * 0.07, a 95% interval
    assert TRICKY not in page and "&lt;script&gt;" in page  # generated text is escaped
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(href|src)=\"(https?:)?//", page) and "<script" not in page
    # curves re-drawn from metrics.jsonl (curves.png not repeated), the checkpoint's PNG skipped
    assert len(srcs) == 1 + 1 + 2 + 1  # curves, error bars, confusion + reliability, one attention map
    assert [p.name for p in run_images(run)] == ["confusion-mmlu.png", "curves.png", "attention-layer00.png",
                                                 "reliability-mmlu.png"]  # fmt: skip
    assert find_recipe(run).parent.name == "step-000100"


def test_samples_argument_and_errors(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    out = write_report(tmp_path, samples={"prompts": ["ROMEO:"], "before": ["xq"], "after": ["ROMEO: thou"]})
    assert "ROMEO: thou" in out.read_text(encoding="utf-8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="nothing to report"):
        write_report(tmp_path / "empty")
    with pytest.raises(LmlabError, match="no such run folder"):
        write_report(tmp_path / "missing")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is missing: `make setup` installs it")
def test_report_renders_in_headless_chromium(run, tmp_path):
    from playwright.sync_api import sync_playwright

    page_path = write_report(run)
    url = page_path.resolve().as_uri()
    shot = Path(os.environ.get("LMLAB_SCREENSHOT_DIR", tmp_path)) / "run_report.png"
    errors, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:")) else None)
            page.goto(url, wait_until="load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 5 and all(w > 0 for w in widths), widths
            assert page.locator("h1").inner_text().startswith("Run report")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, f"the page fetched something outside the file: {outside}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_combined_report_holds_each_run_under_its_name(run, tmp_path):
    """The demo's one page: every stage's sections, prefixed by the stage, missing stages left out."""
    from lmlab.errors import LmlabError
    from lmlab.viz.report import build_sections, write_combined_report

    samples = {"prompts": ["a <b>"], "before": ["x"], "after": ["y"]}
    out = write_combined_report({"first": run, "second": run, "gone": tmp_path / "nope"}, tmp_path / "all.html",
                                {"first": samples})  # fmt: skip
    page = out.read_text()
    one, _ = build_sections(run)
    for sec in one:
        assert f'id="first-{sec["id"]}"' in page and f'id="second-{sec["id"]}"' in page
    assert 'id="gone-' not in page and "a &lt;b&gt;" in page
    with pytest.raises(LmlabError, match="nothing to report"):
        write_combined_report({"gone": tmp_path / "nope"}, tmp_path / "none.html")
