"""The processes of one job: torchrun launches one per GPU (and several hosts); a plain process is rank 0 of 1.

Who does what: the host leader (local rank 0 of each host) downloads the inputs, builds the data caches and tidies
the local checkpoint directory while the host's other ranks wait, then they reuse its files; the world leader
(rank 0) alone claims the output, opens the W&B run, generates the sample answers and writes the outputs, while the
other ranks wait for it and end with its outcome (one exit code on every host).
Everything else (loading the model, eval, training) runs on every rank.

A process that stops answering (its host killed, crashed, its machine or network lost) fails the collective the
others are in: they stop with exit 10 and a message naming the lost rank and its host (`Ranks.lost_peer`) instead
of waiting. A killed process closes its connections and is noticed at once; one that vanishes silently is given up
after `distributed_timeout_seconds` in training's collectives and after RANK_WAIT_TIMEOUT in the waits below.
During training a heartbeat (`Ranks.watching_peers`) also watches the others over gloo: NCCL's own watchdog would
otherwise notice a lost peer only at its timeout and then abort the process (SIGABRT) with no exit code or message
of the job's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from entrypoints.errors import EXIT_INTERNAL, EXIT_PREEMPTED, HOST_NAME_ENV, JobError, PeerLost, record_rank_exit

log = logging.getLogger("qlora.ranks")
# How long a rank waits for its host's leader to download the inputs and build the data caches (or for the world
# leader to claim the output, or to merge and upload the outputs). Long on purpose: a 70B model or millions of records take a while, and a leader
# that dies is not waited for (torchrun stops the other ranks when one exits with an error).
RANK_WAIT_TIMEOUT = timedelta(hours=4)
# What the communication libraries say when a peer process is gone: gloo (a closed or reset connection, a timed-out
# receive), NCCL (a remote error, an aborted communicator, the watchdog's timeout) and c10d's store.
CONNECTION_LOSS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                   "Timed out waiting", "Socket Timeout", "remote process exited", "ncclRemoteError",
                   "NCCL communicator was aborted", "collective operation timeout", "Connection was likely closed")
# How often the ranks' heartbeat threads exchange a message while training (a lost peer is noticed within this).
HEARTBEAT_SECONDS = 5.0
T = TypeVar("T")


class RankFailed(JobError):
    """Another rank's failure, raised here too so that every rank stops with the same exit code and message."""

    def __init__(self, exit_code: int, kind: str, message: str):
        super().__init__(message)
        self.exit_code, self.kind = exit_code, kind


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (one process per GPU); a plain process is rank 0 of 1.

    Who does what: local rank 0 of each host downloads the inputs, builds the data caches and tidies the local
    checkpoint directory while the host's other ranks wait, then they reuse its files; world rank 0 alone
    checks the output location, opens the W&B run, generates the sample answers and writes the outputs.
    Everything else (loading the model, eval, training) runs on every rank.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    group: Any = None  # a gloo group for the waits above: its own long timeout, apart from training's collectives
    hosts: tuple[str, ...] = ()  # the host of every rank, in rank order (SageMaker's algo-N, the pod's name)
    timeout_seconds: int = 0  # training's collectives give a silent peer up after this long
    heartbeat_group: Any = None  # a gloo group of its own for `watching_peers` (timeout: timeout_seconds)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def host_leader(self) -> int:
        return self.rank - self.local_rank  # torchrun numbers the ranks of one host contiguously

    def on_host_leader(self, fn: Callable[[], T], what: str) -> T:
        """Local rank 0 runs `fn`; the host's other ranks wait and get its result (or fail with its error)."""
        return self._lead(fn, what, self.is_local_main, self.host_leader)

    def on_world_leader(self, fn: Callable[[], T], what: str) -> T:
        """World rank 0 runs `fn`; every other rank waits and gets its result (or fails with its error)."""
        return self._lead(fn, what, self.is_main, 0)

    def host_leader_first(self, fn: Callable[[], T], what: str) -> T:
        """Local rank 0 runs `fn` first; the host's other ranks run it once it has finished (reusing its files)."""
        if self.world_size == 1:
            return fn()
        result = self._lead(fn, what, self.is_local_main, self.host_leader)
        return result if self.is_local_main else fn()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def lost_peer(self, exc: BaseException) -> PeerLost | None:
        """The job's error for a collective that failed because another process of the job is gone, else None.

        It names the ranks on the other hosts (with two hosts: the lost one); a process on this host that dies is
        also reported by torchrun, which stops this host's other ranks."""
        if self.world_size <= 1 or isinstance(exc, JobError):
            return None
        detail = _connection_loss(exc)
        if detail is None:
            return None
        hosts = self.hosts or tuple("?" for _ in range(self.world_size))
        mine = hosts[self.rank]
        others: dict[str, list[int]] = {}
        for rank, host in enumerate(hosts):
            if host != mine:
                others.setdefault(host, []).append(rank)
        if not others:  # every rank on this host
            lost = "another rank on this host"
        else:
            named = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on host {host}"
                     for host, ranks in others.items()]
            lost = named[0] if len(named) == 1 else "a process on another host (" + "; ".join(named) + ")"
        return PeerLost(
            f"rank {self.rank} on host {mine} lost contact with {lost} ({detail}). That process was killed, crashed,"
            " or lost its machine or network (its own log says which); this one stops too instead of waiting. Rerun the"
            " job to resume from its last complete checkpoint. A process that vanishes without closing its"
            f" connections is given up after distributed_timeout_seconds ({self.timeout_seconds} s) in training")

    @contextlib.contextmanager
    def watching_peers(self, on_lost: Callable[[PeerLost], None], interval: float = HEARTBEAT_SECONDS
                       ) -> Iterator[None]:
        """While the block runs, a thread on every rank exchanges a heartbeat with the others every `interval`
        seconds on a gloo group of its own. When a peer is gone (its connection closed, or silent for
        timeout_seconds) the thread calls `on_lost` with the job's error naming it; `on_lost` must end the process
        (the main thread may be stuck in a collective that would otherwise wait for NCCL's watchdog to abort it).
        Leaving the block ends the heartbeat on every rank together: each heartbeat carries whether its rank has
        left, and the threads stop on the first heartbeat where one has, so none waits for a partner that is gone."""
        if self.world_size <= 1 or self.heartbeat_group is None:
            yield
            return
        import torch
        import torch.distributed as dist

        leaving = threading.Event()

        def beat() -> None:
            flag = torch.zeros(1)
            while True:
                flag[0] = 1.0 if leaving.is_set() else 0.0
                try:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.heartbeat_group)
                except Exception as exc:  # noqa: BLE001 - any failure of the heartbeat means a peer is gone
                    on_lost(self.lost_peer(exc) or PeerLost(
                        f"rank {self.rank} lost its heartbeat with the other processes of the job"
                        f" ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})."
                        " Rerun the job to resume from its last complete checkpoint"))
                    return
                if flag[0] > 0:
                    return
                leaving.wait(interval)

        thread = threading.Thread(target=beat, name="qlora-peer-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            leaving.set()
            thread.join()

    def _lead(self, fn: Callable[[], T], what: str, leading: bool, leader: int) -> T:
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] | None = None
        error: BaseException | None = None
        if leading:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the waiting ranks have been told
                error = exc
                outcome = ("error", _describe(exc))
        else:
            log.info("waiting for rank %d: %s", leader, what)
        status, value = self.gather(outcome)[leader]
        if error is not None:
            raise error
        if status == "error":
            exit_code, kind, message = value
            log.error("rank %d failed during %s; stopping with its error", leader, what)
            raise RankFailed(exit_code, kind, message)
        return value


def _describe(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, JobError):
        return exc.exit_code, exc.kind, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_PREEMPTED, "preempted", "interrupted before a checkpoint could be saved; rerun to resume"
    return EXIT_INTERNAL, "internal error", f"{type(exc).__name__}: {exc}"


def _connection_loss(exc: BaseException) -> str | None:
    """The first line of the library's message when `exc` (or what caused it) says a peer process is gone."""
    seen: set[int] = set()
    current: BaseException | None = exc
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistNetworkError", None)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if (dist_error is not None and isinstance(current, dist_error)) or (
                isinstance(current, RuntimeError) and any(marker in text for marker in CONNECTION_LOSS)):
            line = text.splitlines()[0] if text else type(current).__name__
            # gloo's "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:41234. This is typically caused by a
            # remote worker crashing. ...": the source location and the advice after the first sentence dropped.
            line = re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]
            return line[:300]
        current = current.__cause__ or current.__context__
    return None


def join_ranks(env: Mapping[str, str], timeout_seconds: int = 1800) -> Ranks:
    """Start the process group when torchrun launched several processes; a plain process gets rank 0 of 1.
    `timeout_seconds`: how long training's collectives wait for a silent peer (the process group's timeout)."""
    if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
        return Ranks()
    import torch.distributed as dist
    from accelerate import PartialState

    from entrypoints.modeling import device_kind

    # The process group the Trainer would start later, started now so the steps before it can wait for each
    # other: the same accelerate state with the arguments TrainingArguments passes (use_cpu off CUDA, gloo; NCCL on
    # CUDA), its timeout the job's setting (TrainingArguments' ddp_timeout, 1800 s, is its default). The Trainer
    # finds the group initialized and uses it.
    cuda = device_kind() == "cuda"
    state = PartialState(cpu=not cuda, timeout=timedelta(seconds=timeout_seconds))
    group = dist.new_group(backend="gloo", timeout=RANK_WAIT_TIMEOUT)
    heartbeat = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
    # Each rank's host, to name the one that is lost: the platform's name for it (the container's entrypoint passes
    # SageMaker's current host or the pod's name), else the machine's.
    host = env.get(HOST_NAME_ENV) or socket.gethostname()
    hosts: list[Any] = [None] * state.num_processes
    dist.all_gather_object(hosts, host, group=group)
    ranks = Ranks(state.num_processes, state.process_index, state.local_process_index, group, tuple(hosts),
                  timeout_seconds, heartbeat)
    log.info("rank %d of %d (local rank %d, backend %s) on host %s; hosts: %s", ranks.rank, ranks.world_size,
             ranks.local_rank, state.backend, host, ", ".join(dict.fromkeys(ranks.hosts)))
    return ranks


def leave_process_group() -> None:
    """Tear the process group down after a successful run (NCCL warns about leaked resources otherwise). Not
    after a failure: other ranks may still be inside a collective, and the teardown could then block this
    rank's exit, which is what tells torchrun to stop them."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - never turn a finished job into a crash here
        log.debug("destroy_process_group: %s", exc)


def exit_lost(error: PeerLost, failure_file: Path | None, cleanup: Callable[[], None] = lambda: None) -> None:
    """End this process at once with the job's exit code for a lost peer (from the heartbeat thread, while the main
    thread may be blocked in a collective): the message logged and in the failure file, the rank's exit code
    recorded for the container's entrypoint, `cleanup` (giving up the output claim) done as far as it goes."""
    from entrypoints.errors import write_failure_file

    message = f"{error.kind}: {error}"
    log.error("%s", message)
    try:
        cleanup()
    except Exception as exc:  # noqa: BLE001 - the exit below must happen whatever the cleanup does
        log.warning("while stopping: %s", exc)
    write_failure_file(failure_file, message)
    record_rank_exit(error.exit_code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(error.exit_code)
