"""Write tests/slow.txt, the tests marked ``slow``, from a measured run.

    .venv/bin/python -m pytest -q -n 2 --durations=0 -p no:cacheprovider > /tmp/durations.log
    .venv/bin/python scripts/slow_tests.py /tmp/durations.log     # rewrites tests/slow.txt

A test is slow when its setup, call and teardown took 2 s or more in that run (two workers on
the project's 2-core machine). The conformance matrix's CI-sized cells stay in the fast tier
whatever they take (docs/conformance.md): the fast tier is the matrix plus every quick test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

THRESHOLD = 2.0
OUT = Path(__file__).resolve().parents[1] / "tests" / "slow.txt"


def main(log: str) -> int:
    seconds: dict[str, float] = {}
    for line in Path(log).read_text().splitlines():
        match = re.match(r"([\d.]+)s (?:call|setup|teardown)\s+(\S+)", line)
        if match:
            seconds[match.group(2)] = seconds.get(match.group(2), 0.0) + float(match.group(1))
    slow = sorted(t for t, s in seconds.items() if s >= THRESHOLD and "test_conformance.py" not in t)
    header = (f"# Tests marked slow (tests/conftest.py): {THRESHOLD:g} s or more measured with pytest -n 2 "
              f"on 2 cores.\n# Regenerate: see scripts/slow_tests.py. {len(slow)} tests.\n")
    OUT.write_text(header + "\n".join(slow) + "\n")
    print(f"wrote {OUT}: {len(slow)} slow tests of {len(seconds)} timed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
