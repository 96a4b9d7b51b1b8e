"""Padded batches: every entry point takes an attention mask, and a prompt's results in a padded
batch (left or right) equal its results alone, at its real positions.

The reference is independent of the padding code: each prompt run by itself, unpadded. The
tolerance is float32's (1e-5, relative to the values' scale for expansions); a NaN anywhere at a
real position fails (assert_close compares NaN as unequal).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import jetgraph
from jetgraph.applications import LensResult, iterative_lenses, lens_over_prompts, pad_batch
from jetgraph.capture.zoo import FAMILIES, VOCAB
from jetgraph.codegen import emit, emit_source
from tests.conftest import captured, reference_logits, require_smollm2, require_tinystories

ATOL = 1e-5
LENGTHS = (5, 3, 7, 2)


def _prompts(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in LENGTHS]


def _real(mask: torch.Tensor, row: int) -> torch.Tensor:
    return mask[row].bool()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "residual_mlp"])
def test_padded_batch_equals_each_prompt_alone(family: str, side: str) -> None:
    """Logits and every stream state of a padded batch, against each prompt run alone by the
    program and by the model itself."""
    model, prog = captured(family)
    prompts = _prompts()
    ids, mask = pad_batch(prompts, side)
    with torch.no_grad():
        logits = prog(ids, attention_mask=mask)
        states = prog.at("sublayer").stream(ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            real = _real(mask, row)
            alone = prog(prompt[None])[0]
            torch.testing.assert_close(logits[row, real], alone, rtol=0, atol=ATOL)
            torch.testing.assert_close(alone, reference_logits(model, prompt[None])[0], rtol=0, atol=ATOL)
            for state, single in zip(states, prog.at("sublayer").stream(prompt[None]), strict=True):
                torch.testing.assert_close(state[row, real], single[0], rtol=0, atol=ATOL)
    assert torch.isfinite(logits).all()  # pad rows too: a NaN there would reach real tokens


def test_model_without_a_mask_takes_right_padding_only() -> None:
    _, prog = captured("residual_mlp")
    assert not prog.reads_mask
    prompts = _prompts()
    ids, mask = pad_batch(prompts, "right")
    with torch.no_grad():
        logits = prog(ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = prog(prompt[None])[0]
            torch.testing.assert_close(logits[row, _real(mask, row)], alone, rtol=0, atol=ATOL)
    ids, mask = pad_batch(prompts, "left")
    with pytest.raises(ValueError, match="takes no attention_mask, so only right padding"):
        prog(ids, attention_mask=mask)


def test_bad_masks_are_refused() -> None:
    _, prog = captured("llama")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), the input ids \(2, 4\)"):
        prog(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1"):
        prog(ids, attention_mask=torch.full((2, 4), 2))
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        prog(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(TypeError, match="bool or integer"):
        prog(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(jetgraph.CaptureError, match="example attention mask"):
        jetgraph.capture(captured("llama")[0], ids, attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_capture_checks_a_padded_example() -> None:
    model, _ = captured("gpt2")
    ids, mask = pad_batch(_prompts(), "left")
    prog = jetgraph.capture(model, ids, attention_mask=mask)
    torch.testing.assert_close(prog(ids, mask)[0, _real(mask, 0)], prog(_prompts()[0][None])[0],
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_expansion_terms_on_a_padded_batch(family: str) -> None:
    """An order-2 jet of block 1 around each term of an order-1 jet of block 0 (every kind of
    term: source, jet, identity), evaluated on a left-padded batch, term by term."""
    _, prog = captured(family)
    first = jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=1)
    expansion = jetgraph.expand(prog, 1, first, order=2)
    prompts = _prompts(3)
    ids, mask = pad_batch(prompts, "left")
    padded = expansion.evaluate(ids, attention_mask=mask)
    scale = max(v.abs().max().item() for v in padded.terms.values())
    for row, prompt in enumerate(prompts):
        alone = expansion.evaluate(prompt[None])
        real = _real(mask, row)
        for name, value in alone.terms.items():
            torch.testing.assert_close(padded.terms[name][row, real], value[0], rtol=0, atol=ATOL * scale)
        torch.testing.assert_close(padded.remainder[row, real], alone.remainder[0], rtol=0, atol=ATOL * scale)
    faithful = expansion.faithfulness(ids, attention_mask=mask)
    assert all(math.isfinite(v) for v in faithful.values())


def _emitted_agrees(module, expansion, ids, mask=None) -> None:
    reference = expansion.evaluate(ids, attention_mask=mask)
    out = module(ids) if mask is None else module(ids, mask)
    scale = max(v.abs().max().item() for v in reference.terms.values())
    real = reference.real
    for name, value in reference.terms.items():
        torch.testing.assert_close(out[name][real], value[real], rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(out["remainder"][real], reference.remainder[real], rtol=0, atol=ATOL * scale)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_emitted_module_runs_on_any_shape_and_mask(family: str) -> None:
    """Emitted once (on the capture example's shape), run on three other shapes, a padded batch
    and batch 1 × seq 1; the guard refuses inputs past the model's context."""
    _, prog = captured(family)
    expansion = jetgraph.expand(prog, 1, jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=1),
                                order=2)
    module = emit(expansion)
    assert module.dynamic and module.input_shape == (None, prog.max_positions)
    generator = torch.Generator().manual_seed(5)
    for shape in [(2, 5), (1, 7), (3, 4), (1, 1)]:
        _emitted_agrees(module, expansion, torch.randint(0, VOCAB, shape, generator=generator))
    ids, mask = pad_batch(_prompts(4), "left")
    _emitted_agrees(module, expansion, ids, mask)
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        module(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        module(ids, mask[:, 1:])


def test_a_bigram_path_runs_on_a_batch_of_tokens(tmp_path) -> None:
    """The emitted file of a one-token path (E→U) takes a whole batch of contexts at once."""
    _, prog = captured("llama")
    expansion = jetgraph.expand_paths(prog, max_length=0).expansion()
    path = emit_source(expansion, tmp_path / "bigram.py", remainder=False)
    namespace: dict[str, object] = {"__file__": str(path)}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # the file as written
    module = namespace["load"]("cpu")
    tokens = torch.arange(VOCAB).unsqueeze(1)  # every token as a one-token context
    out = module(tokens)
    reference = expansion.evaluate(tokens).terms
    for name, value in reference.items():
        torch.testing.assert_close(out[name], value, rtol=0, atol=ATOL * value.abs().max().item())


def test_lens_on_a_padded_batch_equals_each_prompt() -> None:
    _, prog = captured("llama")
    prompts = _prompts(1)
    ids, mask = pad_batch(prompts, "left")
    padded = iterative_lenses(prog, ids, (0, 1, 2), attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = iterative_lenses(prog, prompt[None], (0, 1, 2))
        for order in (0, 1, 2):
            torch.testing.assert_close(padded[order].logits[:, row, _real(mask, row)],
                                       alone[order].logits[:, 0], rtol=0, atol=ATOL)
            for name, value in alone[order].prompt_metrics.items():
                torch.testing.assert_close(padded[order].prompt_metrics[name][:, row], value[:, 0],
                                           rtol=1e-4, atol=1e-5)
    assert padded[2].positions == sum(LENGTHS)


def test_lens_metrics_ignore_pad_positions() -> None:
    """Garbage (NaN) at pad positions changes no metric, count or warning."""
    generator = torch.Generator().manual_seed(0)
    true = torch.randn(2, 4, 11, generator=generator)
    logits = torch.randn(3, 2, 4, 11, generator=generator)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    clean = LensResult("iterative", 1, ["a", "b", "c"], logits.clone(), true, k=3, attention_mask=mask)
    logits[:, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy = LensResult("iterative", 1, ["a", "b", "c"], logits, true, k=3, attention_mask=mask)
        assert noisy.divergence() == [0, 0, 0] and not noisy.diverged.any()
    assert noisy.table() == clean.table()
    for name in noisy.metrics:
        assert torch.isfinite(noisy.metrics[name]).all()
        torch.testing.assert_close(noisy.metrics[name][:, 0], clean.token_metrics[name][:, 1, 0])
    row0 = clean.token_metrics["cosine"][:, 0, 1:].mean(-1)
    torch.testing.assert_close(noisy.prompt_metrics["cosine"][:, 0], row0)
    assert noisy.positions == 7


def test_lens_over_prompts_averages_each_prompts_own_lens() -> None:
    _, prog = captured("gpt2")
    prompts = _prompts(2) + _prompts(6)
    averages = lens_over_prompts(prog, prompts, (0, 1), batch_size=3, progress=False)
    for order, average in averages.items():
        assert average.prompts == len(prompts) and average.positions == 2 * sum(LENGTHS)
        singles = [iterative_lenses(prog, p[None], (order,))[order] for p in prompts]
        for name in average.prompt_metrics:
            expected = torch.stack([s.prompt_metrics[name][:, 0] for s in singles], 1)
            torch.testing.assert_close(average.prompt_metrics[name], expected, rtol=1e-4, atol=1e-5)
        table = average.table()
        assert table[-1]["cosine"] == pytest.approx(expected_mean(singles, -1), abs=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        lens_over_prompts(prog, prompts, batch_size=0)
    with pytest.raises(jetgraph.CostError, match="refusing the order-1 lens"):
        lens_over_prompts(prog, prompts, (1,), max_seconds=1e-9, progress=False)


def expected_mean(singles: list[LensResult], centre: int) -> float:
    return sum(s.prompt_metrics["cosine"][centre, 0].item() for s in singles) / len(singles)


def test_lens_of_a_list_of_texts_on_tinystories(tmp_path) -> None:
    """``jetgraph.lens(model, [texts], tokenizer=...)``: padded batches of real text; each prompt's
    numbers are the ones it gets alone, and the CSV has one row per order and state."""
    path = require_tinystories()
    from jetgraph.applications import write_lens_csv

    model, tokenizer = jetgraph.load_model(str(path))
    texts = ["Once upon a time there was a little girl", "The dog ran",
             "Tom and Sue went to the park to play"]
    prog = jetgraph.capture(model)
    averages = jetgraph.lens(prog, texts, (0, 1), tokenizer=tokenizer, batch_size=2, progress=False)
    for i, text in enumerate(texts):
        alone = jetgraph.lens(prog, text, (0, 1), tokenizer=tokenizer)
        for order in (0, 1):
            torch.testing.assert_close(averages[order].prompt_metrics["cosine"][:, i],
                                       alone[order].prompt_metrics["cosine"][:, 0], rtol=1e-4, atol=1e-5)
    rows = write_lens_csv(list(averages.values()), tmp_path / "lens.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (len(prog.units) + 1)
    with pytest.raises(TypeError, match="a list input must hold texts"):
        jetgraph.lens(prog, [1, 2], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"texts \[1\] are empty"):
        jetgraph.lens(prog, ["a", " "], tokenizer=tokenizer)


def test_emitted_llama_block_on_three_shapes() -> None:
    """A real Llama block (SmolLM2 block 3, order-2 jet at h_3 and at a moved centre) emitted once
    and run on three shapes and a padded batch: the interpreter's numbers each time."""
    require_smollm2()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids)
    first = jetgraph.expand(prog, 2, [jetgraph.stream_term(prog, 2)], order=1)
    expansion = jetgraph.expand(prog, 3, first, order=2)
    module = emit(expansion, ids)
    assert module.dynamic
    generator = torch.Generator().manual_seed(0)
    vocab = int(prog.decoder.unembedding.shape[0])
    for shape in [(1, 5), (2, 7), (3, 4)]:
        _emitted_agrees(module, expansion, torch.randint(0, vocab, shape, generator=generator))
    texts = ["Paris is the capital of", "Hello", "A cat sat on the mat and"]
    prompts = [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
    padded, mask = pad_batch(prompts, "left")
    _emitted_agrees(module, expansion, padded, mask)
