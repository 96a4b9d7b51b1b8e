"""The command line: help, exit codes, outputs, and every user error as one line before the work."""

from __future__ import annotations

import inspect
import time

import pytest
import torch

import jetgraph
from jetgraph.cli import main
from jetgraph.ir import DEFAULT_GRANULARITY
from tests.conftest import captured, require_gpt2_tokenizer, require_tinystories


def _no_model_loading(monkeypatch) -> None:
    """Make any model load fail loudly: a check that must come first did not."""
    import jetgraph

    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(jetgraph, "load_model", refuse)


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("Loading weights")]  # transformers' progress bar
    assert len(lines) == 1 and lines[0].startswith("jetgraph "), err
    err = lines[0]
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_help_exits_zero_and_shows_defaults(capsys) -> None:
    assert main(["--help"]) == 0
    assert "capture" in capsys.readouterr().out
    assert main(["ngrams", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: prob)" in text and "(default: 3600.0)" in text
    assert main(["emit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: sublayer)" in text and "(default: unit)" in text


def test_version(capsys) -> None:
    from jetgraph._version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jetgraph {__version__}"


def test_no_command_prints_help_and_returns_2(capsys) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_one_default_granularity() -> None:
    from jetgraph.cli import build_parser

    parser = build_parser()
    commands = (("capture", []), ("lens", ["t"]), ("paths", []), ("emit", ["-o", "x.py"]))
    defaults = {name: parser.parse_args([name, "m", *extra]).granularity for name, extra in commands}
    assert set(defaults.values()) == {jetgraph.ir.DEFAULT_GRANULARITY}, defaults  # the library's too
    from jetgraph.capture import capture

    assert inspect.signature(capture).parameters["granularity"].default == DEFAULT_GRANULARITY
    model, prog = captured("llama")  # jetgraph.lens(model) and `jetgraph lens MODEL` read the same states
    ids = torch.tensor([[1, 2, 3]])
    assert jetgraph.lens(model, ids, orders=(0,))[0].labels == \
        jetgraph.lens(prog.at(DEFAULT_GRANULARITY), ids, orders=(0,))[0].labels


def test_the_renamed_flags_still_parse_with_a_note(capsys) -> None:
    from jetgraph.cli import build_parser

    parser = build_parser()
    for command in ("ngrams", "sketch", "diff", "masses"):
        extra = {"diff": ["m2"], "masses": ["--keywords", "a,b"]}.get(command, [])
        if command in ("sketch",):
            args = parser.parse_args([command, "m", "--average", "3"])
            assert args.first_tokens == 3
            assert "--average is deprecated and goes in 0.9: use --first-tokens" in capsys.readouterr().err
            continue
        args = parser.parse_args([command, "m", *extra, "--first", "7", "--average", "2"])
        assert (args.sources, args.first_tokens) == (7, 2)
        err = capsys.readouterr().err
        assert "--first is deprecated and goes in 0.9: use --sources" in err
        assert "--average is deprecated and goes in 0.9: use --first-tokens" in err
        args = parser.parse_args([command, "m", *extra, "--sources", "7", "--first-tokens", "2"])
        assert (args.sources, args.first_tokens) == (7, 2) and capsys.readouterr().err == ""


def test_parse_errors_exit_2(capsys, monkeypatch) -> None:
    _no_model_loading(monkeypatch)
    assert main(["lens", "m", "text", "--order", "x"]) == 2
    assert "expected an integer, got 'x'" in capsys.readouterr().err
    assert main(["lens", "m", "text", "--order", "20"]) == 2
    assert "above the highest supported order 18" in capsys.readouterr().err
    assert main(["ngrams", "m", "--max-time", "nan"]) == 2
    assert "positive number of seconds" in capsys.readouterr().err
    assert main(["lens", "m", "text", "--order", "-1"]) == 2
    assert "non-negative" in capsys.readouterr().err
    assert main(["ngrams", "m", "--top", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["paths", "m", "--granularity", "layer"]) == 2
    assert "invalid choice: 'layer'" in capsys.readouterr().err
    assert main(["ngrams", "m", "--sources", "3", "--contexts", "c.txt"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_unknown_model_returns_1(capsys) -> None:
    start = time.perf_counter()
    assert main(["capture", "no-such-model"]) == 1
    _one_line_error(capsys, "unknown model 'no-such-model'")
    assert time.perf_counter() - start < 10  # no retrying on a hub that cannot be reached


def test_empty_text_is_refused_before_loading(capsys, monkeypatch) -> None:
    _no_model_loading(monkeypatch)
    assert main(["capture", "m", "--text", ""]) == 2
    _one_line_error(capsys, "--text is empty")
    assert main(["lens", "m", "  "]) == 2
    _one_line_error(capsys, "the text is empty")


def test_path_specs_are_checked_before_loading(tmp_path, capsys, monkeypatch) -> None:
    path = require_tinystories()  # its config says 2 layers
    _no_model_loading(monkeypatch)
    out = tmp_path / "t.csv"
    cases = {
        "E→mlp9→U": "has 2 layers (mlp0..mlp1)",
        "E→mlp0^-1→U": "takes the order as ^j",
        "E→mlp0^x→U": "takes the order as ^j",
        "E→mlp0^30→U": "above the highest supported order 18",
        "E→→U": "has an empty step",
        "E→mlp0": "must end at U",
        "E→conv0→U": "unknown unit 'conv0'",
        "E^1→U": "takes no Taylor order",
    }
    for spec, message in cases.items():
        assert main(["ngrams", str(path), "--paths", "E→U", spec, "--out", str(out)]) == 1, spec
        _one_line_error(capsys, message)
    assert main(["ngrams", str(path), "--keywords", str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    _one_line_error(capsys, "no keyword list")
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_checked_before_loading(tmp_path, capsys, monkeypatch) -> None:
    _no_model_loading(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["ngrams", "m", "--out", str(blocker / "t.csv")]) == 1
    _one_line_error(capsys, "is not a folder")
    assert main(["ngrams", "m", "--out", str(tmp_path / "t.txt")]) == 2
    _one_line_error(capsys, "--out must end in .csv or .json")
    assert main(["lens", "m", "text", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--out must end in .png")
    assert main(["lens", "m", "text", "--out", str(tmp_path / "lens.png"), "--csv", str(tmp_path)]) == 2
    _one_line_error(capsys, "--csv must end in .csv")
    assert main(["paths", "m", "--render", str(tmp_path / "p.gif")]) == 2
    _one_line_error(capsys, "--render must end in .svg or .png or .dot")
    folder = tmp_path / "out.py"
    folder.mkdir()
    assert main(["emit", "m", "-o", str(folder)]) == 1
    _one_line_error(capsys, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "out.py"]


def test_disk_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    import jetgraph.files

    path = require_tinystories()

    def full_disk(target, data):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(jetgraph.files, "atomic_write", full_disk)
    out = tmp_path / "summary.txt"
    assert main(["capture", str(path), "--text", "Once upon a time", "--out", str(out)]) == 1
    _one_line_error(capsys, "No space left on device")
    assert not out.exists()


def test_interrupt_exits_130_with_a_resume_hint(tmp_path, capsys, monkeypatch) -> None:
    import jetgraph.applications.ngrams.tables as tables  # where the command's tables are read

    path = require_tinystories()
    real = tables.ngram_table

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "ngram_table", interrupted)
    resume = tmp_path / "ckpt"
    assert main(["ngrams", str(path), "--resume", str(resume), "--out", str(tmp_path / "t.csv")]) == 130
    assert f"no checkpoint was written yet in {resume}" in capsys.readouterr().err  # none is promised
    resume.mkdir(exist_ok=True)
    (resume / "ngrams-0.pt").write_bytes(b"partial")
    assert main(["ngrams", str(path), "--resume", str(resume), "--out", str(tmp_path / "t.csv")]) == 130
    assert "rerun the same command to resume from the checkpoints in" in capsys.readouterr().err
    file_name = str(tmp_path / "state.pt")
    assert main(["ngrams", str(path), "--resume", file_name, "--out", str(tmp_path / "t.csv")]) == 2
    _one_line_error(capsys, "--resume takes a folder")
    assert not (tmp_path / "state.pt").exists()
    assert main(["ngrams", str(path), "--out", str(tmp_path / "t.csv")]) == 130
    assert "no output was written; add --resume DIR" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()
    calls = []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tables, "ngram_table", second_interrupted)
    out = tmp_path / "two.csv"
    assert main(["ngrams", str(path), "--paths", "E→U", "E→mlp0→U", "--top", "3",
                 "--out", str(out)]) == 130
    assert f"{tmp_path / 'two-0.csv'} is complete; no other output was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".csv") == ["two-0.csv"]


def test_capture_tinystories_writes_summary(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "summary.txt"
    assert main(["capture", str(path), "--text", "Once upon a time", "--out", str(out)]) == 0
    text = out.read_text()
    assert "LlamaForCausalLM" in text and "attn1" in text and "mlp1" in text
    error = float(text.split("eager attention)| = ")[1].split()[0])
    assert error <= 1e-5
    assert text.strip() in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o644


def test_emit_writes_an_importable_module(tmp_path, capsys) -> None:
    import importlib.util

    import torch

    path = require_tinystories()
    out = tmp_path / "expanded_tiny.py"
    assert main(["emit", str(path), "-o", str(out), "--text", "Once upon a time", "--order", "1",
                 "--exclude", "attn"]) == 0
    assert "(unit weights)" in capsys.readouterr().out
    spec = importlib.util.spec_from_file_location("expanded_tiny", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "Term weights: unit" in module.__doc__
    assert module.INPUT_SHAPE[0] is None  # any batch, any length up to the context
    ids = torch.zeros(3, 5, dtype=torch.long)
    result = module.load()(ids)
    assert set(module.TERMS) | {"target", "remainder"} == set(result)
    assert module.TERMS and all("attn" not in name for name in module.TERMS)
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.with_suffix(".safetensors").stat().st_mode & 0o777 == 0o644


def test_emit_include_by_sublayer_name(tmp_path) -> None:
    path = require_tinystories()
    out = tmp_path / "mlp0.py"
    assert main(["emit", str(path), "-o", str(out), "--include", "mlp0", "--no-remainder"]) == 0
    assert "'embed.token→mlp0→unembed'," in out.read_text()


def test_emit_and_paths_take_explicit_paths(tmp_path, capsys, monkeypatch) -> None:
    """``--paths`` in the path language: the emitted module's terms are exactly those paths."""
    path = require_tinystories()
    out = tmp_path / "chosen.py"
    assert main(["emit", str(path), "-o", str(out), "--order", "1", "--paths", "E→U", "E→MLP_last^1→U",
                 "--no-remainder"]) == 0
    text = out.read_text()
    assert "'embed.token→unembed'," in text and "'embed.token→mlp1^1→unembed'," in text
    assert "'embed.token→mlp0→unembed'," not in text
    picture = tmp_path / "chosen.dot"
    assert main(["paths", str(path), "--paths", "E→attn0→U", "--render", str(picture)]) == 0
    assert "1 selected (given as --paths" in capsys.readouterr().out
    _no_model_loading(monkeypatch)
    assert main(["paths", str(path), "--paths", "E→mlp5→U", "--render", str(picture)]) == 1
    _one_line_error(capsys, "has 2 layers (mlp0..mlp1)")
    assert main(["emit", str(path), "-o", str(out), "--expansion", "lens", "--paths", "E→U"]) == 2
    _one_line_error(capsys, "--paths selects paths of --expansion paths")


def test_dtype_loads_half_precision(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "lens.png"
    assert main(["lens", str(path), "Once upon a time", "--dtype", "bfloat16", "--order", "1",
                 "--out", str(out), "--csv", str(tmp_path / "lens.csv"),
                 "--html", str(tmp_path / "lens.html")]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "cos@1" in capsys.readouterr().out
    assert '"kind":"lens"' in (tmp_path / "lens.html").read_text()  # the grid, with the tokens' text
    assert main(["ngrams", str(path), "--dtype", "float64", "--out", str(tmp_path / "t.csv")]) == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_emit_lens(tmp_path) -> None:
    path = require_tinystories()
    out = tmp_path / "lens.py"
    assert main(["emit", str(path), "-o", str(out), "--expansion", "lens", "--order", "1"]) == 0
    assert "'h0→unembed^1'," in out.read_text()


def test_emit_errors(tmp_path, capsys) -> None:
    path = require_tinystories()
    assert main(["emit", str(path), "-o", str(tmp_path / "x.txt")]) == 2
    _one_line_error(capsys, "--out must end in .py")
    assert main(["emit", str(path), "-o", str(tmp_path / "my-module.py")]) == 2
    _one_line_error(capsys, "cannot be imported: the file name must be a Python identifier")
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--max-length", "2", "--limit", "3"]) == 1
    _one_line_error(capsys, "more than --limit 3")
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--exclude", "nonsense"]) == 1
    _one_line_error(capsys, "unknown units or kinds")
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--include", "mlp0",
                 "--granularity", "block"]) == 1
    _one_line_error(capsys, "at --granularity block")
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--dry-run"]) == 0
    assert "terms" in capsys.readouterr().out
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--max-time", "1e-9"]) == 1
    _one_line_error(capsys, "refusing emitted code for", "--max-time")
    assert list(tmp_path.iterdir()) == []


def test_lens_command_writes_every_order_and_the_joint_lens(tmp_path, capsys) -> None:
    import csv

    path = require_tinystories()
    png, table = tmp_path / "lens.png", tmp_path / "lens.csv"
    assert main(["lens", str(path), "Once upon a time", "--order", "2", "--joint", "--out", str(png),
                 "--csv", str(table)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "cos@2" in printed and "joint lens, order 2: cosine" in printed
    rows = list(csv.DictReader(table.open()))
    states = 2 * 2 + 1  # sublayer view of 2 blocks: h0..h4
    assert [(r["lens"], r["order"]) for r in rows] == (
        [("iterative", str(k)) for k in range(3) for _ in range(states)] + [("joint", "2")])
    assert rows[-1]["center"] == "Σ weighted centres"
    assert float(rows[states - 1]["cosine"]) == pytest.approx(1.0, abs=1e-5)  # order 0 at h_L


def test_ngrams_command_with_keywords(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "bigrams.csv"
    assert main(["ngrams", str(path), "--paths", "E→U", "E→MLP_last→U", "--top", "20",
                 "--keywords", "toxic", "--out", str(out), "--html", str(tmp_path / "t.html")]) == 0
    printed = capsys.readouterr().out
    assert "keyword mass (toxic" in printed
    assert (tmp_path / "bigrams-0.csv").read_text().count("\n") == 21
    assert (tmp_path / "bigrams-1.csv").is_file()
    assert '"kind":"table"' in (tmp_path / "t-1.html").read_text()  # one page per table, suffixed
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    capsys.readouterr()
    assert main(["ngrams", str(path), "--keywords", str(empty), "--out", str(out)]) == 1
    _one_line_error(capsys, "is empty")


def test_ngrams_nproc_gives_the_single_process_files(tmp_path, capsys) -> None:
    """``--nproc 2`` runs the table in two processes (torchrun's launcher, gloo): the CSVs,
    the per-last-token summary included, are the single process's, byte for byte."""
    path = require_tinystories()
    args = ["ngrams", str(path), "--paths", "E→attn0→U", "--sources", "6", "--top", "25", "--last-top", "2"]
    assert main([*args, "--out", str(tmp_path / "one.csv")]) == 0
    assert main([*args, "--out", str(tmp_path / "two.csv"), "--nproc", "2",
                 "--resume", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    assert (tmp_path / "one-by-last.csv").read_text() == (tmp_path / "two-by-last.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["ngrams-0.pt", "ngrams-0.rank1.pt"]
    capsys.readouterr()
    assert main([*args, "--nproc", "2", "--dry-run"]) == 0  # planned here, for 2 ranks; no launch
    assert "per rank of 2" in capsys.readouterr().out
    assert main([*args, "--nproc", "2", "--device", "cuda"] if not _has_cuda() else
                [*args, "--nproc", "2", "--out", str(tmp_path / "bad.txt")]) == 2
    _one_line_error(capsys, "--")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_lazy_loading_gives_the_same_table_and_capture(tmp_path, capsys) -> None:
    """``--lazy`` reads the safetensors only while needed: the same table as a full load, and
    capture says its check ran on the representative blocks."""
    path = require_tinystories()
    tables = []
    for flag in ([], ["--lazy"]):
        out = tmp_path / f"table{len(flag)}.csv"
        assert main(["ngrams", str(path), "--paths", "E→MLP_last→U", "--top", "15", "--out", str(out),
                     *flag]) == 0
        tables.append(out.read_text())
    assert tables[0] == tables[1]
    capsys.readouterr()
    assert main(["capture", str(path), "--lazy"]) == 0
    assert "read lazily" in capsys.readouterr().out


def test_ngrams_source_subsets_work_for_every_path(tmp_path, capsys) -> None:
    import csv

    path = require_tinystories()
    out = tmp_path / "first.csv"
    assert main(["ngrams", str(path), "--paths", "E→U", "--id-range", "0:10", "--top", "30",
                 "--out", str(out)]) == 0
    assert "of 10 contexts" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 30 and all(int(r["context_ids"]) < 10 for r in rows)
    assert main(["ngrams", str(path), "--paths", "E→U", "--sources", "10", "--top", "30",
                 "--out", str(out)]) == 0  # the 10 tokens the model predicts most, after its BOS
    assert "of 10 contexts" in capsys.readouterr().out
    import jetgraph
    from jetgraph.applications.ngrams import InputConvention, common_tokens

    model, tokenizer = jetgraph.load_model(path)
    convention = InputConvention.from_tokenizer(tokenizer)
    expected = common_tokens(jetgraph.capture(model), 10, convention, tokenizer)
    rows = list(csv.DictReader(out.open()))
    assert {int(r["context_ids"]) for r in rows} <= set(expected)
    assert not set(expected) & set(tokenizer.all_special_ids)
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("5\n17\n# a comment\n99\n")
    assert main(["ngrams", str(path), "--contexts", str(contexts), "--top", "5", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and {int(r["context_ids"]) for r in rows} <= {5, 17, 99}
    contexts.write_text("5 x\n")
    capsys.readouterr()
    assert main(["ngrams", str(path), "--contexts", str(contexts), "--out", str(out)]) == 2
    _one_line_error(capsys, "line 1: expected token ids")
    contexts.write_text("5\n7\n")
    assert main(["ngrams", str(path), "--paths", "E→attn0→U", "--contexts", str(contexts),
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "has 1 id(s) per line, but E→attn0→U reads 2 token(s)")
    contexts.write_text("5\n99999\n")
    assert main(["ngrams", str(path), "--contexts", str(contexts), "--out", str(out)]) == 2
    _one_line_error(capsys, "holds token id 99999, outside the model's vocabulary of 2048")


def test_ngrams_default_readout_follows_the_tokenizers_input_convention(tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """The default table reads each token the way the tokenizer builds text: TinyStories' tokenizer
    adds BOS, so a row is the model's distribution on (BOS, token); --first-tokens M mixes over
    (BOS, a, token) for the M tokens the model expects after BOS; --prefix none mixes over the
    first tokens of its mean one-token prediction over the whole vocabulary (fixed per model, not
    per row set). --sources N rows are the N tokens the model predicts most, special tokens left
    out. Each is checked against the transformers model run directly."""
    import json

    import jetgraph

    path = require_tinystories()
    model, tokenizer = jetgraph.load_model(path)
    bos = tokenizer("a")["input_ids"][0]
    assert bos == tokenizer.bos_token_id  # this tokenizer adds its BOS
    out = tmp_path / "default.json"
    head = ["ngrams", str(path), "--top", "4", "--sources", "300"]

    def model_probs(contexts: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=contexts).logits[:, -1].double().softmax(-1)

    vocab = model.config.vocab_size
    everything = torch.arange(vocab).view(-1, 1)
    mean = model_probs(torch.cat([torch.full_like(everything, bos), everything], 1)).mean(0)
    mean[torch.tensor(tokenizer.all_special_ids)] = -1
    common = sorted(mean.topk(300).indices.tolist())

    assert main([*head, "--out", str(out)]) == 0
    assert "each token read after '<|start_story|>'" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["averaged_over"] == [[[bos]], [1.0]]
    best = written["top"][0]
    context, token = int(best["context_ids"]), int(best["next_id"])
    assert context in common and not set(tokenizer.all_special_ids) & {context}
    expected = model_probs(torch.tensor([[bos, context]]))[0, token]
    assert best["prob"] == pytest.approx(float(expected), abs=1e-5)

    assert main([*head, "--first-tokens", "5", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    weights, first = model_probs(torch.tensor([[bos]]))[0].topk(5)
    weights = weights / weights.sum()
    assert written["averaged_over"][0] == [[bos, a] for a in first.tolist()]
    assert written["averaged_over"][1] == pytest.approx(weights.tolist(), abs=1e-6)
    best = written["top"][0]
    context, token = int(best["context_ids"]), int(best["next_id"])
    contexts = torch.stack([torch.full((5,), bos), first, torch.full((5,), context)], 1)
    mixture = (weights[:, None] * model_probs(contexts)).sum(0)
    assert best["prob"] == pytest.approx(float(mixture[token]), abs=1e-5)

    assert main([*head, "--prefix", "none", "--first-tokens", "5", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    alone = model_probs(everything).mean(0)  # every token: the vocabulary is below the sample size
    weights, first = alone.topk(5)
    assert written["averaged_over"][0] == [[a] for a in first.tolist()]
    assert written["averaged_over"][1] == pytest.approx((weights / weights.sum()).tolist(), abs=1e-6)
    capsys.readouterr()
    _no_model_loading(monkeypatch)
    assert main(["ngrams", str(path), "--paths", "E→U", "--first-tokens", "4", "--out", str(out)]) == 2
    _one_line_error(capsys, "--first-tokens applies to paths from the model's stream")
    assert main(["ngrams", str(path), "--paths", "E→U", "--prefix", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "--prefix applies to read-outs of the model's stream")
    assert main(["ngrams", str(path), "--prefix", "x1", "--out", str(out)]) == 2
    assert 'expected "none" or comma-separated token ids' in capsys.readouterr().err
    assert main(["ngrams", str(path), "--id-range", "0:99999", "--out", str(out)]) == 2
    _one_line_error(capsys, "reaches past the vocabulary of 2,048 tokens")


def test_ngrams_plan_and_refusal(tmp_path, capsys, monkeypatch) -> None:
    path = require_tinystories()
    out = tmp_path / "pairs.csv"
    assert main(["ngrams", str(path), "--paths", "E→attn0→U", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4,194,304 contexts" in printed and "FLOP" in printed and "total: ≈" in printed
    assert "--max-time 60 min (the default)" in printed  # the dry run says what a run would meet
    _no_model_loading(monkeypatch)  # 4.2e6 pairs · 2·V·d > 1 s here: refused from the config alone
    start = time.perf_counter()
    assert main(["ngrams", str(path), "--paths", "E→U", "E→attn0→U", "--max-time", "1",
                 "--out", str(out)]) == 1
    _one_line_error(capsys, "refusing the n-gram table E→attn0→U before loading the model",
                    "4,194,304 contexts", "--max-time")
    assert time.perf_counter() - start < 1.0
    assert list(tmp_path.iterdir()) == []


def test_paths_command(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "paths.dot"
    assert main(["paths", str(path), "--render", str(out)]) == 0
    assert "paths at sublayer granularity" in capsys.readouterr().out
    assert out.read_text().startswith("digraph")
    assert main(["paths", str(path), "--exclude", "", "--max-length", "3", "--limit", "4",
                 "--render", str(tmp_path / "all.svg")]) == 1
    _one_line_error(capsys, "15 paths pass the filters, more than --limit 4")
    assert main(["paths", str(path), "--exclude", "", "--dry-run",
                 "--render", str(tmp_path / "all.svg")]) == 0
    assert "a path picture of 11 paths" in capsys.readouterr().out
    assert not (tmp_path / "all.svg").exists()


def test_mismatched_tokenizer_and_long_text(capsys) -> None:
    path = require_tinystories()
    gpt2_tokenizer = require_gpt2_tokenizer()
    assert main(["lens", str(path), "Hello there", "--tokenizer", str(gpt2_tokenizer)]) == 1
    _one_line_error(capsys, "do not belong together")
    assert main(["lens", str(path), "Hello there", "--tokenizer", str(path / "config.json")]) == 1
    _one_line_error(capsys, "cannot load a tokenizer from")
    assert main(["lens", str(path), "Hello there", "--tokenizer", "/no/such/tokenizer.json"]) == 1
    _one_line_error(capsys, "no tokenizer at '/no/such/tokenizer.json'")
    assert main(["lens", str(path), "once upon a time " * 400]) == 1
    _one_line_error(capsys, "the model's context holds")


def test_demo_writes_every_output(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(path), "--text", "Once upon a time", "--out", str(out)]) == 0
    expected = {"program.txt", "program.svg", "lens.png", "lens.csv", "bigrams_readout.csv", "bigrams_0.csv",
                "bigrams_1.csv", "paths.svg", "bigram_paths.py", "bigram_paths.safetensors", "summary.txt",
                "report.html"}
    assert expected == {p.name for p in out.iterdir()}  # nothing else (no temporary files)
    printed = capsys.readouterr().out
    assert "toxic-word mass" in printed and "logits reproduced to" in printed
    assert "default read-out h_last→U:" in printed
    assert "- explain: " in printed and 'id="jetgraph-data"' in (out / "report.html").read_text()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())


def test_read_only_outputs_are_refused_before_loading(tmp_path, capsys, monkeypatch) -> None:
    """A read-only file system (a real one: root ignores permission bits, so a chmod proves
    nothing here) is detected by probing, before the model is loaded."""
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount rights)")
    try:
        _no_model_loading(monkeypatch)
        assert main(["ngrams", "m", "--out", str(folder / "t.csv")]) == 1
        _one_line_error(capsys, "is not writable (Read-only file system)")
        assert main(["demo", "--model", "m", "--out", str(folder / "demo")]) == 1
        _one_line_error(capsys, "is not writable (Read-only file system)")
    finally:
        subprocess.run(["umount", str(folder)], check=False)
