"""One n-gram table across the ranks of torch.distributed.

A :class:`Shard` is this process's place in a run started by ``torchrun`` (or any launcher that
sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``): its rank, the world size,
its device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU) and the run's key-value store.
The sweep gives each rank a contiguous range of the table's chunks; ranks never talk while they
compute, and the reductions are merged with collectives once every rank is done.

A run must not hang when one rank dies. Each rank bumps a heartbeat counter in the store as it
works; a rank that raises posts its error there first. A rank waiting for the others stops with
:class:`ShardError` when one has failed (naming it and its error) or when no unfinished rank's
heartbeat has moved for ``stall_seconds`` (a killed or hung process). Collectives run under the
process group's timeout, as a backstop.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from jetgraph.errors import JetgraphError

DEFAULT_STALL_SECONDS = 600.0
_BEAT_INTERVAL = 0.5  # seconds between heartbeats (one store round trip each)
_POLL = 0.05


class ShardError(JetgraphError):
    """Another rank of a distributed table failed or stopped answering."""


@dataclass
class Shard:
    """This process's rank in a distributed table run, and how it reaches the others."""

    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: dist.Store | None = None
    stall_seconds: float = DEFAULT_STALL_SECONDS
    _calls: itertools.count = field(default_factory=itertools.count, repr=False)
    _last_beat: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- liveness
    def session(self) -> str:
        """A store prefix for one table (every rank calls the sweeps in the same order)."""
        return f"table{next(self._calls)}/"

    def beat(self, prefix: str, force: bool = False) -> None:
        """Say this rank is alive (at most every half second), and stop if another has failed."""
        if self.store is None:
            return
        now = time.monotonic()
        if force or now - self._last_beat >= _BEAT_INTERVAL:
            self._last_beat = now
            self.store.add(f"{prefix}beat{self.rank}", 1)
            self._raise_if_failed()

    def fail(self, message: str) -> None:
        """Tell every rank that this one failed (best effort: the store may be gone too)."""
        if self.store is None:
            return
        try:
            self.store.set("failed", f"rank {self.rank} of {self.world} failed: {message}")
        except (RuntimeError, dist.DistStoreError):
            pass

    def _raise_if_failed(self) -> None:
        if self.store.check(["failed"]):
            raise ShardError(self.store.get("failed").decode())

    def wait_for_all(self, prefix: str, what: str) -> None:
        """Block until every rank has reached ``what``; raise :class:`ShardError` if one failed
        or none of the missing ranks has shown a heartbeat for ``stall_seconds``."""
        if self.world == 1:
            return
        if self.store is None:
            self.barrier(what)
            return
        self.store.set(f"{prefix}{what}{self.rank}", "1")
        beats: dict[int, int] = {}
        moved = time.monotonic()
        while True:
            self._raise_if_failed()
            missing = [r for r in range(self.world) if not self.store.check([f"{prefix}{what}{r}"])]
            if not missing:
                return
            now = time.monotonic()
            current = {r: self.store.add(f"{prefix}beat{r}", 0) for r in missing}
            if any(beats.get(r) != count for r, count in current.items()):
                beats, moved = current, now
            elif now - moved > self.stall_seconds:
                names = ", ".join(map(str, missing))
                raise ShardError(f"rank {self.rank}: rank(s) {names} of {self.world} showed no progress for "
                                 f"{self.stall_seconds:.0f} s before {what}; a process died or hangs (every "
                                 "checkpoint written is kept: rerun the same command to resume)")
            time.sleep(_POLL)

    def close(self) -> None:
        """Wait until every rank has finished, then tear the process group down. A rank that
        exits while a peer's gloo connection still expects it can abort that peer (SIGABRT at
        exit, seen as a failed rank after a correct table), so a finished run closes first."""
        if self.world > 1 and dist.is_initialized():
            self.wait_for_all("close/", "the end of the run")
            dist.destroy_process_group()

    # ---------------------------------------------------------------- collectives
    def barrier(self, what: str) -> None:
        self._collective(what, dist.barrier)

    def all_gather(self, obj, what: str) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(gathered, obj))
        return gathered

    def gather_to_main(self, obj, what: str) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world if self.is_main else None
        self._collective(what, lambda: dist.gather_object(obj, gathered, dst=0))
        return gathered

    def _collective(self, what: str, call) -> None:
        try:
            call()
        except (RuntimeError, dist.DistError) as exc:
            raise ShardError(f"rank {self.rank}: the collective for {what} failed ({exc}); another rank "
                             "died or stopped answering: rerun with the same checkpoints to resume") from exc


def current_shard(stall_seconds: float = DEFAULT_STALL_SECONDS,
                  timeout: float = 1800.0) -> Shard | None:
    """This process's :class:`Shard` when it runs under torch.distributed — the default process
    group if one exists, else initialised here from the launcher's environment — or None for a
    single process (``WORLD_SIZE`` unset or 1)."""
    if dist.is_available() and dist.is_initialized():
        store = _default_store()
        return Shard(dist.get_rank(), dist.get_world_size(), _local_device(), store, stall_seconds)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return init_shard(stall_seconds, timeout)


def init_shard(stall_seconds: float = DEFAULT_STALL_SECONDS, timeout: float = 1800.0) -> Shard:
    """Initialise the default process group from ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (NCCL when this process has a CUDA device, else gloo) with a store this
    module can also use for heartbeats."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ShardError(f"a distributed table needs {', '.join(missing)} in the environment: start it "
                         "with torchrun (or `jetgraph ngrams --nproc N`)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _local_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timedelta(seconds=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return Shard(rank, world, device, dist.PrefixStore("jetgraph-ngrams/", store), stall_seconds)


def _local_device() -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _default_store() -> dist.Store | None:
    """The default group's store for heartbeats, when torch exposes it (else collectives only)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return dist.PrefixStore("jetgraph-ngrams/", _get_default_store())
    except (ImportError, RuntimeError, ValueError):
        return None


def chunk_share(chunks: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``chunks`` (the first ranks take one more when the
    count does not divide)."""
    size, extra = divmod(len(chunks), world)
    start = rank * size + min(rank, extra)
    return chunks[start:start + size + (1 if rank < extra else 0)]
