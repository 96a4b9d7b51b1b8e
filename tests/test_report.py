"""The HTML explorer: one self-contained file per set of results, checked as data and, where a
browser is installed, in a real browser (headless Chromium through Playwright)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import jetgraph
from jetgraph.applications.report import report
from tests.conftest import captured, missing, random_ids


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


def _browser():
    """The browser driver, or a skip (a failure under CI=true, where setup installs both)."""
    from jetgraph.applications.report import browser

    try:
        browser.chromium()
    except browser.BrowserMissing as exc:
        missing(str(exc))
    return browser


def _table(prog):
    from jetgraph.applications import ngram_table

    return ngram_table(prog, "E→mlp0→U", top=300)


def test_the_explorer_works_in_a_browser(tmp_path) -> None:
    """Headless Chromium: the page loads with no script or console error and no request beyond
    the file; the slider changes the number of drawn edges; clicking a node lists only the paths
    through it; hovering a lens cell shows its top tokens; switching the order changes the cells;
    the table's search filters its rows. A screenshot of each view is written."""
    browser = _browser()
    prog, ids, why, lenses = _results()
    path = report(why, lenses, _table(prog), path=tmp_path / "r.html", input_ids=ids)
    with browser.opened(path) as (page, problems, _):
        edges = {}
        for share in (100, 5):
            page.fill("#attr-share", str(share))
            page.dispatch_event("#attr-share", "input")
            edges[share] = page.locator("#attr-graph path.edge").count()
        assert edges[5] < edges[100]
        page.fill("#attr-share", "100")
        page.dispatch_event("#attr-share", "input")
        unit = next(p.units[0] for p in why.paths if p.units)
        page.click(f'#attr-graph g[data-node="{unit}"]')
        listed = page.locator("#attr-side tr td:first-child").all_inner_texts()
        assert listed and all(unit in text for text in listed)
        page.screenshot(path=str(tmp_path / "attribution.png"))

        browser.show_view(page, "lens")
        before = page.locator("#lens-grid").inner_text()
        page.hover("#lens-grid tr:nth-child(3) td:nth-child(4)")
        assert page.inner_text("#tooltip").count("%") >= 10  # the top 10 and the rest
        page.screenshot(path=str(tmp_path / "lens.png"))
        page.select_option("#lens-order", "1")
        assert page.locator("#lens-grid").inner_text() != before

        browser.show_view(page, "n-grams")
        rows = page.locator("#table-rows tr").count()
        token = page.locator("#table-rows tr:nth-child(2) td:nth-child(2)").inner_text()  # a context
        page.fill("#table-search", token)
        page.dispatch_event("#table-search", "input")
        kept = page.locator("#table-rows tr").count()
        assert 1 < kept < rows
        page.click("#table-rows th:nth-child(4)")  # sort by a column
        page.screenshot(path=str(tmp_path / "table.png"))
        assert not problems, problems
    from jetgraph.applications.lens import lens_over_prompts

    average = lens_over_prompts(prog, [ids[0], ids[0, :5], ids[0, 2:]], orders=(0,), progress=False)[0]
    curves = average.to_html(tmp_path / "curves.html")
    with browser.opened(curves) as (page, problems, _):
        assert page.locator("#lens-curves path.mean").count() == 3  # and a band each
        assert page.locator("#lens-curves path.band").count() == 3
        page.screenshot(path=str(tmp_path / "curves.png"))
        assert not problems, problems
    views = ("attribution", "lens", "table", "curves")
    assert all((tmp_path / f"{v}.png").stat().st_size > 10_000 for v in views)


def test_notebook_output_renders_in_a_browser(tmp_path) -> None:
    """What a notebook shows: each result's ``_repr_html_`` and ``.show()``'s iframe, put in a page
    as Jupyter would, load in Chromium; the iframe's explorer draws its graph."""
    browser = _browser()
    _, _, why, lenses = _results()
    cells = [why._repr_html_(), lenses[0]._repr_html_(), why.show()._repr_html_()]
    notebook = tmp_path / "notebook.html"
    notebook.write_text("<!doctype html><html><body data-ready=true>" + "".join(
        f"<div class=cell>{cell}</div>" for cell in cells) + "</body></html>")
    with browser.opened(notebook) as (page, problems, _):
        assert "PathAttribution of" in page.inner_text("body")
        assert "LensResult" in page.inner_text("body")
        frame = page.frame_locator("iframe")
        frame.locator("body[data-ready=true]").wait_for()
        assert frame.locator("#attr-graph path.edge").count() > 0
        assert not problems, problems


def test_graph_json_validates_against_circuit_tracers_models() -> None:
    """The graph file against circuit-tracer's pydantic models, written here from its
    ``circuit_tracer/frontend/graph_models.py`` (safety-research/circuit-tracer @ 196e2ce: the
    package itself needs nnsight and TransformerLens), and its links add up to the model's value."""
    pydantic = pytest.importorskip("pydantic", reason="pydantic is not installed")

    class Metadata(pydantic.BaseModel):
        slug: str
        scan: str
        transcoder_list: list[str]
        prompt_tokens: list[str]
        prompt: str
        node_threshold: float | None = None
        schema_version: int | None = 1

    class QParams(pydantic.BaseModel):
        pinnedIds: list[str]
        supernodes: list[list[str]]
        linkType: str
        clickedId: str
        sg_pos: str

    class Node(pydantic.BaseModel):
        node_id: str
        feature: int
        layer: str
        ctx_idx: int
        feature_type: str
        token_prob: float = 0.0
        is_target_logit: bool = False
        run_idx: int = 0
        reverse_ctx_idx: int = 0
        jsNodeId: str
        clerp: str = ""
        influence: float | None = None
        activation: float | None = None

    class Link(pydantic.BaseModel):
        source: str
        target: str
        weight: float

    class Graph(pydantic.BaseModel):
        metadata: Metadata
        qParams: QParams
        nodes: list[Node]
        links: list[Link]

    _, _, why, _ = _results()
    data = json.loads(json.dumps(why.to_graph_json(layers=2)))
    graph = Graph.model_validate(data)
    ids = [n.node_id for n in graph.nodes]
    assert len(ids) == len(set(ids))
    assert {link.source for link in graph.links} | {link.target for link in graph.links} <= set(ids)
    kinds = {n.feature_type for n in graph.nodes}
    assert kinds <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    logit = next(n for n in graph.nodes if n.feature_type == "logit")
    assert logit.layer == "3" and logit.is_target_logit and logit.node_id == f"3_{why.target}_{why.position}"
    into_logit = sum(link.weight for link in graph.links if link.target == logit.node_id)
    assert into_logit == pytest.approx(why.value, rel=1e-9, abs=1e-12)
    units = {n.clerp for n in graph.nodes if n.feature_type == "cross layer transcoder"}
    assert units == {u for p in why.paths for u in p.units}


def test_every_result_type_round_trips_through_save_and_load(tmp_path) -> None:
    """Lens result, lens average, path attribution, score attribution, n-gram table: saved as JSON +
    safetensors and loaded back, each reads out the same (tables, entries, checks, its explorer
    page byte for byte)."""
    from jetgraph.applications.lens import lens_over_prompts
    from jetgraph.applications.report import page, views_of

    prog, ids, why, lenses = _results()
    average = lens_over_prompts(prog, [ids[0], ids[0, :5]], orders=(0,), progress=False)[0]
    look = jetgraph.explain_attention(prog, ids, "attn1.h0", key=2)
    table = _table(prog)
    for index, result in enumerate([lenses[0], lenses[1], average, why, look, table]):
        folder = jetgraph.save_result(result, tmp_path / f"r{index}")
        assert {p.name for p in folder.iterdir()} == {"result.json", "tensors.safetensors"}
        loaded = jetgraph.load_result(folder)
        assert type(loaded) is type(result)
        if hasattr(result, "table") and not isinstance(result, type(look)):
            assert loaded.table() == result.table()
        if hasattr(result, "entries"):
            assert loaded.entries() == result.entries()
        if result is not look:
            assert page("t", views_of(loaded)) == page("t", views_of(result))
    assert jetgraph.load_result(tmp_path / "r3").check(1e-4, remainder_is_rounding=True) is None
    assert jetgraph.load_result(tmp_path / "r4").pairs == look.pairs
    # saving over a result needs overwrite=True and replaces it whole; anything else is refused
    with pytest.raises(ValueError, match="overwrite=True"):
        jetgraph.save_result(why, tmp_path / "r0")
    jetgraph.save_result(why, tmp_path / "r0", overwrite=True)
    assert type(jetgraph.load_result(tmp_path / "r0")) is type(why)
    with pytest.raises(ValueError, match="saves jetgraph's results, got str"):
        jetgraph.save_result("hello", tmp_path / "s")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds something other"):
        jetgraph.save_result(why, tmp_path / "other")
    with pytest.raises(ValueError, match="no saved result"):
        jetgraph.load_result(tmp_path / "other")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_cli_view_opens_saved_results_in_one_page(tmp_path, capsys) -> None:
    from jetgraph.cli import main

    prog, ids, why, lenses = _results()
    jetgraph.save_result(why, tmp_path / "saved" / "why")
    jetgraph.save_result(lenses[0], tmp_path / "saved" / "lens")
    look = jetgraph.explain_attention(prog, ids, "attn1.h0", key=2)
    jetgraph.save_result(look, tmp_path / "saved" / "look")
    out = tmp_path / "v.html"
    assert main(["view", str(tmp_path / "saved"), "--out", str(out), "--no-open"]) == 0
    assert "3 results" in capsys.readouterr().out
    assert [v["kind"] for v in _embedded(out.read_text())["views"]] == ["lens", "table", "attribution"]
    assert main(["view", str(tmp_path / "nothing"), "--out", str(tmp_path / "w.html"), "--no-open"]) == 2
    assert "holds no saved result" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "saved"), "--out", str(tmp_path / "w.txt"), "--no-open"]) == 2
    assert not (tmp_path / "w.html").exists()
