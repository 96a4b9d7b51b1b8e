"""``python -m jetgraph``: the command line (what ``torchrun -m jetgraph …`` starts)."""

import sys

from jetgraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
