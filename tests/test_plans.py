"""Plans held against measured runs: every command that plans its cost runs in a child process
on a tiny model, and what it measures must stay under what it planned.

The child wraps ``jetgraph.cli.main``: at the first ``Plan.check`` (after loading, capture and
planning, before any work) it notes the resident memory and the time and resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``); at the end it reads the peak (``VmHWM``). So the
measured memory is the peak above the loaded model and the measured time the work after the
plan, both of the real command. Plans price this machine's own speed (best-of probes), so the
time the child's threads spent waiting for a CPU that other processes held (``schedstat``, the
largest over its threads) is not counted against them. They must satisfy

    measured memory ≤ 1.5 × planned peak + MEMORY_FLOOR
    measured time   ≤ 1.5 × planned time + TIME_FLOOR

where the floors cover what no plan counts: the interpreter's own allocations and imports after
the plan (matplotlib for the PNGs, graphviz, safetensors), writing the outputs, thread-pool
start-up. A plan that fails is fixed in its estimate, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jetgraph.cost import DEFAULT_MAX_SECONDS, Plan, check_plan, format_plan
from jetgraph.errors import CostError
from tests.conftest import require_tinystories

MEMORY_FLOOR = 150e6  # bytes: interpreter noise and imports after the plan (matplotlib ≈ 50 MB)
TIME_FLOOR = 4.0  # seconds: imports after the plan, plotting, writing outputs, thread start-up
SLACK = 1.5  # measured may exceed planned by this factor (plus the floors) before the plan is wrong
WIDE_VOCAB = 32768  # the wide model's vocabulary: vocabulary-sized buffers dominate its memory

CHILD = r"""
import json, os, re, sys, time
from jetgraph import cost

record = {"checks": []}
original = cost.Plan.check


def status(key):
    with open("/proc/self/status") as handle:
        return int(re.search(key + r":\s+(\d+) kB", handle.read()).group(1)) * 1024


def waits():
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as handle:
                found[task] = int(handle.read().split()[1]) / 1e9  # seconds spent waiting for a CPU
        except OSError:
            pass
    return found


def check(self, *args, **kwargs):
    now = time.perf_counter()
    if not record["checks"]:
        record["rss"], record["waits"] = status("VmRSS"), waits()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the peak-RSS mark restarts here
    record["checks"].append((now, self.what, self.seconds, self.peak_bytes))
    return original(self, *args, **kwargs)


cost.Plan.check = check
from jetgraph.cli import main

code = main(sys.argv[1:])
end, after = time.perf_counter(), waits()
waited = max((w - record.get("waits", {}).get(t, 0.0) for t, w in after.items()), default=0.0)
record.update(end=end, waited=waited, peak=status("VmHWM"), code=code)
print("@@measured " + json.dumps(record), file=sys.stderr)
"""


def measure(argv: list[str], cwd: Path) -> dict:
    """Run ``jetgraph ARGV`` in a child; its plan (the checks made together before the work: time
    summed, peak the largest) and what it measured above the model after the plan."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if os.environ.get("PYTEST_XDIST_WORKER"):  # beside another worker: one thread, planned and run alike
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.startswith("@@measured ")]
    assert lines and done.returncode == 0, done.stderr[-3000:]
    record = json.loads(lines[-1].removeprefix("@@measured "))
    assert record["code"] == 0, done.stdout[-2000:] + done.stderr[-2000:]
    checks = record["checks"]
    assert checks, f"jetgraph {' '.join(argv)} checked no plan"
    first = checks[0][0]
    plan = [c for c in checks if c[0] - first < 0.5]  # the plan's checks; later ones are the API's own
    return {"planned_seconds": sum(c[2] for c in plan), "planned_bytes": max(c[3] for c in plan),
            "seconds": record["end"] - first - record["waited"], "waited": record["waited"],
            "bytes": record["peak"] - record["rss"], "what": [c[1] for c in plan], "stdout": done.stdout}


def assert_within_plan(measured: dict) -> None:
    report = (f"{measured['what']}: planned {measured['planned_seconds']:.2f} s, "
              f"{measured['planned_bytes'] / 1e6:.0f} MB; measured {measured['seconds']:.2f} s "
              f"(+ {measured['waited']:.2f} s waiting for a CPU), {measured['bytes'] / 1e6:.0f} MB")
    print(report)
    assert measured["bytes"] <= SLACK * measured["planned_bytes"] + MEMORY_FLOOR, report
    assert measured["seconds"] <= SLACK * measured["planned_seconds"] + TIME_FLOOR, report


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 32,768-token vocabulary (d = 64) and TinyStories' tokenizer
    (its 2,048 ids fit): a model whose vocabulary-sized buffers are most of every run's memory."""
    return _random_llama(tmp_path_factory.mktemp("wide"), WIDE_VOCAB)


@pytest.fixture(scope="module")
def half_wide(tmp_path_factory) -> Path:
    """The wide model with half its vocabulary (16,384 tokens): read-outs call it on as many
    logits at a time (16M), so the same vocabulary-sized buffers, for a quarter of the V² work."""
    return _random_llama(tmp_path_factory.mktemp("half-wide"), WIDE_VOCAB // 2)


def _random_llama(folder: Path, vocab: int) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = require_tinystories()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text("Once upon a time there was a little girl. She was playing and singing and running "
                    "in the garden with her dog. " * 12)
    return path


@pytest.mark.serial
def test_roles_plan_bounds_the_run(wide, story, tmp_path) -> None:
    measured = measure(["roles", str(wide), "--targets", "re:ing.*", "--text", str(story), "--length", "32",
                        "--windows", "4", "--rows", "1024", "--pairs", "2", "--out", "r.png",
                        "--csv", "r.csv"], tmp_path)
    assert "interventions" in measured["stdout"] and "total:" in measured["stdout"]
    assert_within_plan(measured)


@pytest.mark.slow
@pytest.mark.serial
def test_roles_plan_with_sampled_text_bounds_the_run(tmp_path) -> None:
    """Without --text the plan has a sampling phase, timed from the model's own sampling rate."""
    folder = require_tinystories()
    measured = measure(["roles", str(folder), "--targets", "re:ing.*", "--samples", "16", "--length", "48",
                        "--rows", "256", "--pairs", "2", "--out", "r.png", "--csv", "r.csv"], tmp_path)
    assert "sampling the text" in measured["stdout"]
    assert_within_plan(measured)


@pytest.mark.serial
def test_paths_plan_bounds_the_run(wide, tmp_path) -> None:
    measured = measure(["paths", str(wide), "--text", "Once upon a time there was", "--order", "1",
                        "--render", "p.dot"], tmp_path)
    assert_within_plan(measured)


@pytest.mark.serial
def test_emit_plan_bounds_the_run(wide, tmp_path) -> None:
    measured = measure(["emit", str(wide), "-o", "emitted.py", "--text", "Once upon a time", "--order", "1",
                        "--exclude", "attn"], tmp_path)
    assert_within_plan(measured)


@pytest.mark.slow
@pytest.mark.serial
def test_ngrams_plan_bounds_the_run(wide, tmp_path) -> None:
    measured = measure(["ngrams", str(wide), "--sources", "300", "--out", "t.csv"], tmp_path)
    assert_within_plan(measured)


@pytest.mark.serial
def test_sketch_plan_bounds_the_run(half_wide, story, tmp_path) -> None:
    """The sketch's phases (the bigram table; fitting, scoring and writing) on a model whose
    vocabulary-sized buffers dominate: 16,384 rows of 16,384 read-out entries read after the
    tokenizer's BOS in chunks of 1,024 rows, each row's top 32 kept."""
    measured = measure(["sketch", str(half_wide), "--text", str(story), "--length", "16", "--bigram-top",
                        "32", "--trigram", "off", "--out", "s"], tmp_path)
    printed = measured["stdout"]
    assert "bigram table, 16,384 tokens × top 32" in printed and "skipped: --trigram off" in printed
    assert "--max-time 60 min (the default) lets it run" in printed and "perplexity" in printed
    assert_within_plan(measured)


# ------------------------------------------------------------------ the printer
def _plan(what: str, seconds: float, peak: float) -> Plan:
    return Plan(what, 10, "rows", 1e9, peak, seconds, 1e11)


def test_format_plan_labels_every_phase_and_says_whether_max_time_refuses() -> None:
    phases = [_plan("n-gram table h_last→U", 2.0, 5e8), _plan("n-gram table h_last→U", 30.0, 2e9),
              _plan("n-gram table h_last→U (2)", 1.0, 1e8)]
    text = format_plan(phases, DEFAULT_MAX_SECONDS, max_bytes=1e12)
    lines = text.splitlines()
    labels = [line.split(":")[0].strip() for line in lines[1:-2]]
    assert len(labels) == 3 and len(set(labels)) == 3  # no two phases with the same label
    assert lines[-2] == "  total: ≈ 33 s, peak ≈ 2 GB"  # time summed, peak the largest phase's
    assert "--max-time 60 min (the default) lets it run" in lines[-1]
    assert "1 TB of memory available" in lines[-1]
    refused = format_plan(phases, 10.0, max_bytes=1e12).splitlines()[-1]
    assert "--max-time 10 s refuses it (≈ 33 s > 10 s)" in refused and "(the default)" not in refused
    assert "--max-time none lets it run" in format_plan(phases, None, max_bytes=1e12)
    assert "refused for memory" in format_plan(phases, None, max_bytes=1e9)
    assert check_plan(phases, 40.0, max_bytes=1e12).seconds == 33.0
    with pytest.raises(CostError, match=r"refusing the whole run.*raise --max-time"):
        check_plan(phases, 10.0, max_bytes=1e12)
    with pytest.raises(CostError, match="needs more memory"):
        check_plan(phases, None, max_bytes=1e9)


@pytest.mark.serial
def test_explain_plan_bounds_the_run(wide, tmp_path) -> None:
    measured = measure(["explain", str(wide), "Once upon a time there was a little", "--budget", "300",
                        "--goal", "1", "--csv", "e.csv", "--json", "e.json", "--render", "e.dot"], tmp_path)
    assert "completeness" in measured["stdout"]
    assert_within_plan(measured)
