"""``--nproc N``: one command in N processes started by torchrun's launcher.
"""

from __future__ import annotations

import argparse
import os
import sys

from jetgraph.cli.exits import LaunchFailed


def launch_ranks(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command in N processes started by torchrun's launcher (one
    machine, a free port); each rank prints its own errors, so a failure here is one line."""
    import uuid

    os.environ.setdefault("LOGLEVEL", "ERROR")  # the launcher's own log: failures are reported below
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # as torchrun does: no oversubscribed cores
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if not item.startswith("--nproc="):
            argv.append(item)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "jetgraph", *argv)
    except SignalException:  # Ctrl-C reached the launcher too; rank 0 printed the resume hint
        return 130
    except ChildFailedError as exc:
        codes = {failure.local_rank: failure.exitcode for failure in exc.failures.values()}
        if 130 in codes.values() or -2 in codes.values():
            return 130
        failed = sorted(rank for rank, code in codes.items() if code != -15)  # -15: stopped by the launcher
        raise LaunchFailed(f"process(es) {', '.join(map(str, failed))} of {args.nproc} failed "
                            "(their errors are above); the others were stopped") from None
    return 0
