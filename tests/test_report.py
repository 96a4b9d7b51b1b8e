"""The HTML explorer: one self-contained file per set of results, checked as data and, where a
browser is installed, in a real browser (headless Chromium through Playwright)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import jetgraph
from jetgraph.applications.report import report
from tests.conftest import captured, random_ids


def _results():
    _, prog = captured("llama")
    ids = random_ids(1, 8, seed=3)
    return prog, ids, jetgraph.explain(prog, ids, budget=200), jetgraph.lens(prog, ids, orders=(0, 1))


def _embedded(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="jetgraph-data">(.*?)</script>', html, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def test_report_is_one_file_with_its_data_and_nothing_fetched(tmp_path) -> None:
    _, ids, why, lenses = _results()
    path = report(why, lenses, path=tmp_path / "r.html", input_ids=ids)
    html = path.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html), "a resource fetched at view time"
    data = _embedded(html)
    kinds = [v["kind"] for v in data["views"]]
    assert kinds == ["attribution", "lens"]
    attribution, lens = data["views"]
    # every listed path of the attribution is in the picture's data, with its contribution
    listed = [p for p in why.paths if p.position is not None or p.units]
    assert [p["contribution"] for p in attribution["paths"]] == [p.contribution for p in listed]
    assert attribution["value"] == why.value
    assert {"target", "groups", "remainder"} <= set(attribution["nodes"])
    # the lens cells are the lens's own numbers: top token and its probability, the model's own token
    order0 = lenses[0]
    probabilities = torch.softmax(order0.logits[:, 0].float(), -1)
    assert len(lens["orders"]) == 2 and len(lens["orders"][0]["cells"]) == order0.logits.shape[0]
    cell = lens["orders"][0]["cells"][1][3]
    assert cell["top"][0][0] == str(int(probabilities[1, 3].argmax()))
    assert cell["top"][0][1] == pytest.approx(float(probabilities[1, 3].max()), rel=1e-6)
    own = int(order0.true_logits[0, 3].argmax())
    assert cell["own"] == pytest.approx(float(probabilities[1, 3, own]), rel=1e-6)
    assert lens["tokens"] == [str(t) for t in ids[0].tolist()]


def test_report_refuses_bad_input_before_writing(tmp_path) -> None:
    _, _, why, _ = _results()
    with pytest.raises(ValueError, match="at least one result"):
        report(path=tmp_path / "r.html")
    with pytest.raises(ValueError, match=r"\.html file"):
        report(why, path=tmp_path / "r.txt")
    with pytest.raises(ValueError, match="got int"):
        report(why, 3, path=tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


def test_to_html_writes_the_attribution(tmp_path) -> None:
    _, _, why, _ = _results()
    data = _embedded(why.to_html(tmp_path / "why.html").read_text())
    assert data["views"][0]["kind"] == "attribution"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_explorer_works_in_a_browser(tmp_path) -> None:
    """Headless Chromium: the page loads with no script error and no request beyond the file;
    the slider prunes the graph; clicking a node lists only the paths through it; the lens hover
    shows the top tokens."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    _, ids, why, lenses = _results()
    path = report(why, lenses, path=tmp_path / "r.html", input_ids=ids)
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: None if request.url.startswith("file:")
                else errors.append(f"fetched {request.url}"))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready=true]")
        edges_at = {}
        for share in (100, 10):
            page.fill("#attr-share", str(share))
            page.dispatch_event("#attr-share", "input")
            edges_at[share] = page.locator("#attr-graph path.edge").count()
        assert edges_at[10] < edges_at[100]
        page.fill("#attr-share", "100")
        page.dispatch_event("#attr-share", "input")
        unit = next(p.units[0] for p in why.paths if p.units)
        page.click(f'#attr-graph g[data-node="{unit}"]')
        listed = page.locator("#attr-side tr td:first-child").all_inner_texts()
        assert listed and all(unit in text for text in listed)
        page.click("nav button:nth-child(2)")
        page.hover("#lens-grid tr:nth-child(3) td:nth-child(4)")
        assert "%" in page.inner_text("#tooltip")
        browser.close()
    assert not errors, errors
