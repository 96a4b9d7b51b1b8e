"""The paper's analysis tables: component roles (against a planted rule, ablations computed two
ways), checkpoint curves, model diffs, corpus diffs and keyword masses against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jetgraph.applications.curves import checkpoint_curves
from jetgraph.applications.diffs import corpus_diff, model_diff, precision_at
from jetgraph.applications.groundtruth import TinyConfig, tiny_gpt2
from jetgraph.applications.groundtruth.planted import planted_rule_model
from jetgraph.applications.masses import keyword_masses, matched_controls
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import bigram_readout
from jetgraph.applications.roles import (
    control_positions,
    source_rows,
    target_positions,
    unit_means,
    unit_roles,
    verify_roles,
)
from jetgraph.applications.targets import target_tokens
from jetgraph.capture import capture
from jetgraph.cli import main


@pytest.fixture(scope="module")
def planted():
    """A 3-layer tiny GPT-2 whose rule "trigger → target" was trained into mlp1 alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    try:
        cfg = TinyConfig(vocab=48, n_layer=3, seq=24, steps=120, batch=32, n_embd=48)
        model, rule, text = planted_rule_model(cfg, layer=1, sequences=600)
    finally:
        torch.set_num_threads(threads)
    prog = capture(model, text[:1, :8])
    return model, prog, rule, text


def _by_hand_path(model, units, tokens):
    """Logits of the path E→units→U on single tokens, composed by hand from the HF modules."""
    h = model.transformer.wte.weight[tokens]
    for layer in units:
        block = model.transformer.h[layer]
        h = block.mlp(block.ln_2(h))
    return model.lm_head(model.transformer.ln_f(h)).double()


def _centred(logits, rows, positions, targets):
    picked = logits[rows, positions].double()
    return picked.gather(-1, targets[:, None])[:, 0] - picked.mean(-1)


def test_roles_recover_the_planted_rule(planted):
    _, prog, rule, text = planted
    report = verify_roles(prog, unit_roles(prog, [rule.target], progress=False), text, progress=False)
    assert report.best().units == (rule.unit,)
    zero = {s.units[0]: report.effect(s.units, "zero") for s in report.singles}
    carrier = zero[rule.unit]
    assert carrier.high < -1.0  # removing the rule's MLP costs the target more than a logit
    assert carrier.mean < carrier.others - 1.0  # and more than it costs the other tokens: a specific role
    assert all(carrier.mean < e.mean for u, e in zero.items() if u != rule.unit)
    for method in ("mean", "term"):
        assert report.effect((rule.unit,), method).high < 0
    assert report.rank_agreement() is not None
    assert report.positions == int(target_positions(text, None, [rule.target])[0].numel())


def test_path_scores_match_the_path_composed_by_hand(planted):
    model, prog, rule, _ = planted
    report = unit_roles(prog, [rule.target, 3], pairs=3, progress=False)
    tokens = torch.arange(48)
    with torch.no_grad():
        for score in report.singles + report.pairs:
            layers = [int(u[3:]) for u in score.units]
            logits = _by_hand_path(model, layers, tokens)
            centred = logits[:, [min(rule.target, 3), max(rule.target, 3)]] - logits.mean(-1, keepdim=True)
            per_source = centred.mean(-1)
            assert score.mean == pytest.approx(per_source.mean().item(), abs=1e-5)
            assert score.score == pytest.approx(per_source.topk(16).values.mean().item(), abs=1e-5)
        first, second = report.pairs[0].units
        by_unit = {s.units[0]: s.score for s in report.singles}
        joint = report.pairs[0].score + by_unit[first] + by_unit[second]
        assert report.pairs[0].joint == pytest.approx(joint)


def test_source_rows_are_the_tokens_the_model_predicts_most(planted):
    """A count below the vocabulary means the tokens of the model's mean next-token prediction
    (computed here by hand from the model run on every one-token context), never a random draw;
    without a convention or tokenizer it is refused with what to pass."""
    model, prog, _, _ = planted
    with pytest.raises(ValueError, match="tokenizer="):
        source_rows(prog, 10)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(48)[:, None]).logits[:, -1].double()
    by_hand = logits.softmax(-1).mean(0).topk(10).indices.sort().values
    rows = source_rows(prog, 10, convention=InputConvention())
    assert rows.tolist() == by_hand.tolist()
    assert source_rows(prog, 48).tolist() == list(range(48))
    assert source_rows(prog, [5, 3]).tolist() == [5, 3]


def test_ablation_delta_logit_two_ways_agree(planted):
    """Zero- and mean-ablation through the IR equal forward hooks on the transformers modules;
    path-term removal equals the path composed by hand."""
    model, prog, rule, text = planted
    report = verify_roles(prog, unit_roles(prog, [rule.target], pairs=3, progress=False), text,
                          units=[("mlp1",), ("mlp0", "mlp2")], progress=False)
    rows, positions = target_positions(text, None, [rule.target])
    targets = text[rows, positions + 1]
    other_rows, other_positions = control_positions(text, None, [rule.target])
    assert report.controls == other_rows.numel() > 0
    assert not torch.isin(text[other_rows, other_positions + 1], torch.tensor([rule.target])).any()
    other_next = text[other_rows, other_positions + 1]
    with torch.no_grad():
        clean_logits = model(text).logits
        clean = _centred(clean_logits, rows, positions, targets)
        clean_others = _centred(clean_logits, other_rows, other_positions, other_next)
        recorded = []
        handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: recorded.append(o))
        model(text)
        handle.remove()
        hf_mean = recorded[0].double().mean((0, 1))
        ir_mean = unit_means(prog, ["mlp1"], text, None)["mlp1"].double()
        assert torch.allclose(hf_mean, ir_mean, atol=1e-5)
        for method, replace in (("zero", lambda o: torch.zeros_like(o)),
                                ("mean", lambda o: hf_mean.float().expand_as(o))):
            handles = [model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o, r=replace: r(o))]
            logits = model(text).logits
            for h in handles:
                h.remove()
            ablated = _centred(logits, rows, positions, targets)
            assert report.effect(("mlp1",), method).mean == pytest.approx((ablated - clean).mean().item(),
                                                                           abs=1e-4)
            others = _centred(logits, other_rows, other_positions, other_next) - clean_others
            assert report.effect(("mlp1",), method).others == pytest.approx(others.mean().item(), abs=1e-4)
        hooks = [model.transformer.h[i].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
                 for i in (0, 2)]
        both = _centred(model(text).logits, rows, positions, targets)
        for h in hooks:
            h.remove()
        assert report.effect(("mlp0", "mlp2"), "zero").mean == pytest.approx((both - clean).mean().item(),
                                                                              abs=1e-4)
        sources = text[rows, positions]
        term = _by_hand_path(model, [1], sources)
        removed = -(term.gather(-1, targets[:, None])[:, 0] - term.mean(-1))
        assert report.effect(("mlp1",), "term").mean == pytest.approx(removed.mean().item(), abs=1e-4)
        term = _by_hand_path(model, [1], text[other_rows, other_positions])
        removed = -(term.gather(-1, other_next[:, None])[:, 0] - term.mean(-1))
        assert report.effect(("mlp1",), "term").others == pytest.approx(removed.mean().item(), abs=1e-4)
        pair = sum(_by_hand_path(model, layers, sources) for layers in ([0], [2], [0, 2]))
        removed = -(pair.gather(-1, targets[:, None])[:, 0] - pair.mean(-1))
        assert report.effect(("mlp0", "mlp2"), "term").mean == pytest.approx(removed.mean().item(), abs=1e-4)


def _unstreamed(prog, report, text, rows, positions, next_ids, edits, with_terms):
    """The interventions as computed before they streamed (the reference): each batch's picked
    [positions, V] float64 logits whole, and every unit set's path-removed copy held at once."""
    from jetgraph.applications.roles import path_logits

    out = {"run": ([], []), **{s: ([], []) for s in with_terms}}
    visited = []
    for start in range(0, text.shape[0], 8):
        chosen = (rows >= start) & (rows < start + 8)
        if not chosen.any():
            continue
        visited.append(chosen.nonzero()[:, 0])
        part = text[start:start + 8]
        picked = prog.intervene(part, edits)[rows[chosen] - start, positions[chosen]].double()
        targets = next_ids[chosen][:, None]
        sources = part[rows[chosen] - start, positions[chosen]]
        variants = [("run", picked)] + [(s, picked - sum(path_logits(prog, path, sources)
                                                         for path in report.paths_inside(s)))
                                        for s in with_terms]
        for key, values in variants:
            out[key][0].append(values.gather(-1, targets)[:, 0] - values.mean(-1))
            out[key][1].append(values.log_softmax(-1).gather(-1, targets)[:, 0])
    order = torch.cat(visited).argsort()
    return {key: (torch.cat(c)[order], torch.cat(lp)[order]) for key, (c, lp) in out.items()}


def test_streamed_interventions_equal_the_unstreamed_computation(planted, monkeypatch):
    """verify_roles holds one block of positions' logits and one unit set's at a time; its
    effects are exactly those of the old computation that held them all (blocks of 7 positions
    here, so that every batch is cut in several)."""
    from jetgraph.applications import roles
    from jetgraph.applications.statistics import bootstrap_mean

    _, prog, rule, text = planted
    monkeypatch.setattr(roles.ranking, "LOGITS_PER_CALL", 48 * 7)  # where block_rows reads it
    assert roles.block_rows(48) == 7
    sets = [("mlp1",), ("mlp0", "mlp2")]
    report = verify_roles(prog, unit_roles(prog, [rule.target], pairs=3, progress=False), text, units=sets,
                          progress=False)
    rows, positions = target_positions(text, None, [rule.target])
    at = rows.numel()
    other_rows, other_positions = control_positions(text, None, [rule.target])
    rows, positions = torch.cat([rows, other_rows]), torch.cat([positions, other_positions])
    next_ids = text[rows, positions + 1]
    with torch.no_grad():
        clean = _unstreamed(prog, report, text, rows, positions, next_ids, {}, sets)
        means = unit_means(prog, ["mlp0", "mlp1", "mlp2"], text, None)
        edited = {(s, "term"): clean[s] for s in sets}
        for s in sets:
            edited[s, "zero"] = _unstreamed(prog, report, text, rows, positions, next_ids,
                                            {u: torch.zeros_like for u in s}, [])["run"]
            edited[s, "mean"] = _unstreamed(prog, report, text, rows, positions, next_ids,
                                            {u: (lambda x, m=means[u]: m.expand_as(x)) for u in s}, [])["run"]
    for (units, method), (centred, logprob) in edited.items():
        delta = centred - clean["run"][0]
        stats = bootstrap_mean(delta[:at], 1000)
        effect = report.effect(units, method)
        assert (effect.mean, effect.low, effect.high) == (stats["mean"], stats["low"], stats["high"])
        assert effect.others == float(delta[at:].mean())
        assert effect.logprob == float((logprob - clean["run"][1])[:at].mean())


def test_roles_refuses_text_without_targets_before_any_work(tmp_path, capsys, monkeypatch):
    """The text is checked right after tokenizing: no capture, no ranking, one line."""
    import jetgraph
    from jetgraph.applications import roles
    from jetgraph.applications.roles import check_text
    from tests.conftest import require_tinystories

    folder = require_tinystories()
    text = tmp_path / "plain.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. " * 20)

    def refuse(*_, **__):
        raise AssertionError("work started before the text was checked")

    monkeypatch.setattr(jetgraph, "capture", refuse)
    monkeypatch.setattr(roles, "unit_roles", refuse)
    assert main(["roles", str(folder), "--targets", "ing", "--text", str(text), "--length", "16",
                 "--out", str(tmp_path / "r.png"), "--csv", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err.strip()  # (after transformers' own progress bar)
    assert "the text has no position followed by a target (ing)" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert check_text(torch.tensor([[5, 7, 5, 7]]), None, [7]) == 2
    for ids, message in (([[5, 5, 5]], "no position followed by a target"), ([[7]], "1 token long")):
        with pytest.raises(ValueError, match=message):
            check_text(torch.tensor(ids), None, [7])


def test_attention_units_are_ablated_but_not_ranked(planted, tmp_path):
    """attention=True ablates every attention unit (zero, mean; no path term), and its ΔLogit
    equals a forward hook on the attention's output projection in the transformers model."""
    model, prog, rule, text = planted
    report = verify_roles(prog, unit_roles(prog, [rule.target], pairs=2, progress=False), text,
                          attention=True, progress=False)
    assert report.unranked() == [("attn0",), ("attn1",), ("attn2",)]
    assert all(report.effect(u, "term") is None for u in report.unranked())
    assert report.effect((rule.unit,), "term") is not None
    rows, positions = target_positions(text, None, [rule.target])
    targets = text[rows, positions + 1]
    with torch.no_grad():
        clean = _centred(model(text).logits, rows, positions, targets)
        projection = model.transformer.h[1].attn.c_proj
        recorded = []
        handle = projection.register_forward_hook(lambda m, i, o: recorded.append(o))
        model(text)
        handle.remove()
        mean = recorded[0].double().mean((0, 1)).float()
        for method, replace in (("zero", torch.zeros_like), ("mean", lambda o: mean.expand_as(o))):
            handle = projection.register_forward_hook(lambda m, i, o, r=replace: r(o))
            ablated = _centred(model(text).logits, rows, positions, targets)
            handle.remove()
            assert report.effect(("attn1",), method).mean == pytest.approx((ablated - clean).mean().item(),
                                                                            abs=1e-4)
    rows_out = report.rows_out()
    assert [r["units"] for r in rows_out if r["kind"] == "unranked"] == ["attn0", "attn1", "attn2"]
    assert rows_out[-1]["score"] is None and rows_out[-1]["dlogit_term"] is None
    assert "not ranked (no bigram path through attention)" in report.table()
    assert "unranked,,attn1" in report.write_csv(tmp_path / "r.csv").read_text()
    with pytest.raises(ValueError, match="give one or two of the ranked or attention units"):
        verify_roles(prog, report, text, units=[("block1",)], progress=False)


def test_intervene_checks_names_and_identity_edits_change_nothing(planted):
    _, prog, _, text = planted
    with torch.no_grad():
        same = prog.intervene(text[:2], {"mlp0": lambda u: u, "attn1": lambda u: u})
        assert torch.equal(same, prog(text[:2]))
        whole = prog.intervene(text[:2], {"block1": torch.zeros_like})
        parts = prog.intervene(text[:2], {"attn1": torch.zeros_like, "mlp1": torch.zeros_like})
        assert torch.allclose(whole, parts, atol=1e-5)
    with pytest.raises(ValueError, match="no unit named 'mlp9'"):
        prog.intervene(text[:1], {"mlp9": torch.zeros_like})


def test_target_specs():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"ing": 0, "Ġing": 1, "Ġsing": 2, "thing": 3, "ed": 4, "Ġthe": 5, "x": 6}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="x"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert target_tokens("ing", 7, tokenizer).ids == (0, 1)
    assert target_tokens("suffix:ing", 7, tokenizer).ids == (0, 1, 2, 3)
    assert target_tokens(["re: ?the", "id:4", 6], 7, tokenizer).ids == (4, 5, 6)
    for spec, message in (("zzz", "matches no token"), ("re:(", "not a regular expression"),
                          ("id:99", "outside the vocabulary"), ("id:x", "not id:N"),
                          ("suffix:", "needs text")):
        with pytest.raises(ValueError, match=message):
            target_tokens(spec, 7, tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        target_tokens("ing", 7, None)


# ------------------------------------------------------------------ curves, diffs, masses
@pytest.fixture(scope="module")
def series():
    """Three checkpoints of one tiny untied GPT-2: initial, trained a little, trained more."""
    from jetgraph.applications.groundtruth import markov_chain, train
    from jetgraph.applications.groundtruth.training import row_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TinyConfig(vocab=40, n_layer=1, seq=16, steps=60, batch=16, n_embd=32, tie=False)
        chain = markov_chain(40, successors=4, seed=1)
        batches = row_batches(chain.sample(200, 16, 2), 16, 0)
        snapshots, _ = train(tiny_gpt2(cfg), batches, 60, 3e-3, (0, 10, 60))
    finally:
        torch.set_num_threads(threads)
    models = [snapshots[s] for s in (0, 10, 60)]
    return models, [capture(m) for m in models]


def _e_to_u(model):
    with torch.no_grad():
        return model.lm_head(model.transformer.ln_f(model.transformer.wte.weight)).double().softmax(-1)


def test_checkpoint_curves_match_hand_computation(series, tmp_path):
    series, programs = series
    curves = checkpoint_curves(programs, "E→U", k=25, labels=["step0", "step10", "step60"], progress=False)
    tables = [_e_to_u(m).flatten() for m in series]
    final = set(tables[-1].topk(25).indices.tolist())
    for row, table in zip(curves.rows, tables, strict=True):
        top = table.topk(25)
        assert row["hit_ratio"] == pytest.approx(len(set(top.indices.tolist()) & final) / 25)
        assert row["top_k_mass"] == pytest.approx(top.values.sum().item(), rel=1e-5)
        assert row["final_top_k_mass"] == pytest.approx(table[sorted(final)].sum().item(), rel=1e-5)
    assert [r["step"] for r in curves.rows] == [0, 10, 60] and curves.rows[-1]["hit_ratio"] == 1.0
    none = InputConvention()  # a chain model: trained on windows of a stream, no start token
    default = checkpoint_curves(programs[1:], k=10, first_tokens=2, progress=False, convention=none)
    dense = [bigram_readout(p, 2, convention=none).exp().flatten() for p in programs[1:]]
    assert default.rows[0]["top_k_mass"] == pytest.approx(dense[0].topk(10).values.sum().item(), rel=1e-5)
    assert curves.plot(tmp_path / "c.png").stat().st_size > 0
    assert "hit_ratio" in curves.write_csv(tmp_path / "c.csv").read_text()
    with pytest.raises(ValueError, match="at least two checkpoints"):
        checkpoint_curves(series[:1])


def test_model_diff_matches_hand_computation(series):
    series, programs = series
    a, b = programs[1:]
    pa, pb = (_e_to_u(m) for m in series[1:])
    diff = model_diff(a, b, "E→U", top=7, progress=False)
    delta = (pb - pa).flatten()
    for direction, sign in (("increase", 1), ("decrease", -1)):
        expected = [divmod(i, 40) for i in (sign * delta).topk(7).indices.tolist()]
        assert diff.pairs(direction) == expected
    c, t, p_a, p_b = diff.increase[0]
    assert (p_a, p_b) == pytest.approx((pa[c, t].item(), pb[c, t].item()), rel=1e-5)
    ratio = model_diff(a, b, "E→U", top=5, rank="log_ratio", min_prob=0.02, progress=False)
    log_ratio = (pb.log() - pa.log()).masked_fill(torch.maximum(pa, pb) < 0.02, 0).flatten()
    assert ratio.pairs("increase") == [divmod(i, 40) for i in log_ratio.topk(5).indices.tolist()]
    subset = model_diff(a, b, "E→U", top=3, rows=[5, 9], progress=False)
    assert {c for c, *_ in subset.increase} <= {5, 9}
    with pytest.raises(ValueError, match="vocabularies differ"):
        model_diff(a, capture(tiny_gpt2(TinyConfig(vocab=41, n_layer=1))), "E→U")


def test_corpus_diff_and_precision():
    base = torch.tensor([0, 1, 0, 1, 2, 3, 0, 1])
    tuned = torch.tensor([2, 3, 2, 3, 2, 3, 0, 1, 3, 3])
    found = corpus_diff(base, tuned, 4, top=3, min_count=1, alpha=0.5)

    def count(stream, pair):
        pairs = zip(stream[:-1].tolist(), stream[1:].tolist(), strict=True)
        return sum(1 for x, y in pairs if (x, y) == pair)

    scores = {(a, b): math.log((count(tuned, (a, b)) + 0.5) / 9) - math.log((count(base, (a, b)) + 0.5) / 7)
              for a in range(4) for b in range(4) if count(tuned, (a, b)) >= 1}
    assert [scores[p] for p in found] == pytest.approx(sorted(scores.values(), reverse=True)[:3])
    assert found[0] == (3, 2)  # twice in the tuned corpus, never in the base
    candidates = [(3, 2), (0, 0), (1, 1), (2, 3)]
    assert precision_at(candidates, found, k=4) == pytest.approx(sum(p in found for p in candidates) / 4)
    assert precision_at(candidates, found, k=1) == 1.0


def test_keyword_masses_match_hand_computation(series):
    series, captured = series
    programs = {"a": captured[1], "b": captured[2]}
    keywords = [3, 7, 11]
    rows = keyword_masses(programs, keywords, "E→U", controls=4, samples=200)
    tables = {name: _e_to_u(m) for name, m in zip("ab", series[1:], strict=True)}
    controls = matched_controls(tables["a"].mean(0), keywords, 4)
    assert not set(controls.flatten().tolist()) & set(keywords)
    for row in rows:
        table = tables[row["model"]]
        mass = table[:, keywords].sum(-1).mean().item()
        lift = (table[:, keywords].sum(-1).mean() / table[:, controls].sum(-1).mean(0)).mean().item()
        assert row["mass"] == pytest.approx(mass, rel=1e-5)
        assert row["lift"] == pytest.approx(lift, rel=1e-5)
        assert row["mass_low"] <= row["mass"] <= row["mass_high"]
        assert row["lift_low"] <= row["lift"] <= row["lift_high"]


# ------------------------------------------------------------------ CLI
def test_analysis_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    for argv, code, message in (
            (["roles", "m", "--targets", "ing", "--out", str(tmp_path / "r.svg")], 2,
             "--out must end in .png"),
            (["curves", str(tmp_path)], 2, "at least two checkpoint folders"),
            (["roles", "m", "--targets", "re:("], 2, "--targets: the target pattern"),
            (["masses", "m", "--keywords", " , "], 2, "--keywords is empty"),
            (["curves", str(tmp_path), str(tmp_path), "--path", "E→attn0→U"], 2, "reads token pairs"),
            (["diff", "a", "b", "--min-prob", "2"], 2, "--min-prob must lie in (0, 1)"),
            (["diff", "a", "b", "--html", str(tmp_path / "d.png")], 2, "--html must end in .html"),
            (["roles", "m", "--targets", "ing", "--html", str(tmp_path / "r.txt")], 2, "--html must end"),
            (["masses", "a", "--keywords", "x", "--path", "E→nothing"], 2, "--path")):
        assert main(argv) == code
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["roles", "--help"]) == 0 and "--targets" in capsys.readouterr().out


def test_analysis_commands_on_tinystories(tmp_path, capsys):
    from tests.conftest import require_tinystories

    folder = require_tinystories()
    out = tmp_path / "roles.png"
    assert main(["roles", str(folder), "--targets", "ing", "--samples", "64", "--length", "64",
                 "--pairs", "2", "--attention", "--out", str(out), "--csv", str(tmp_path / "roles.csv"),
                 "--html", str(tmp_path / "roles.html")]) == 0
    text = capsys.readouterr().out
    assert 'id="jetgraph-data"' in (tmp_path / "roles.html").read_text()
    assert "zero-ablation" in text and out.stat().st_size > 0
    assert "not ranked (no bigram path through attention)" in text and "attn1" in text
    assert main(["roles", str(folder), "--targets", "suffix:qqqzz"]) == 1
    assert "matches no token" in capsys.readouterr().err
    assert main(["diff", str(folder), str(folder), "--sources", "64", "--first-tokens", "2", "--top", "5",
                 "--out", str(tmp_path / "d.png"), "--csv", str(tmp_path / "d.csv"),
                 "--html", str(tmp_path / "d.html")]) == 0
    assert "largest increases" in capsys.readouterr().out
    assert '"kind":"table"' in (tmp_path / "d.html").read_text()
    assert main(["masses", str(folder), "--keywords", "dog,cat,ball", "--sources", "64",
                 "--first-tokens", "2", "--out", str(tmp_path / "m.png"),
                 "--csv", str(tmp_path / "m.csv")]) == 0
    assert "lift" in capsys.readouterr().out


def test_curves_command_over_saved_folders(series, tmp_path, capsys):
    series, _ = series
    folders = []
    for step, model in zip((0, 10, 60), series, strict=True):
        folder = tmp_path / f"step{step}"
        copy.deepcopy(model).save_pretrained(folder)
        folders.append(str(folder))
    assert main(["curves", *folders, "--path", "E→U", "--top", "20", "--out", str(tmp_path / "c.png"),
                 "--csv", str(tmp_path / "c.csv")]) == 0
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0].startswith("label,step,hit_ratio") and len(lines) == 4
    assert lines[-1].split(",")[2] == "1.0"
