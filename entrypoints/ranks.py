"""The processes of one job: torchrun launches one per GPU (and several hosts); a plain process is rank 0 of 1.

Who does what: the host leader (local rank 0 of each host) downloads the inputs, builds the data caches and tidies
the local checkpoint directory while the host's other ranks wait, then they reuse its files; the world leader
(rank 0) alone claims the output, opens the W&B run, generates the sample answers and writes the outputs.
Everything else (loading the model, eval, training) runs on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from entrypoints.errors import EXIT_INTERNAL, EXIT_PREEMPTED, JobError

log = logging.getLogger("qlora.ranks")
# How long a rank waits for its host's leader to download the inputs and build the data caches (or for the world
# leader to claim the output). Long on purpose: a 70B model or millions of records take a while, and a leader
# that dies is not waited for (torchrun stops the other ranks when one exits with an error).
RANK_WAIT_TIMEOUT = timedelta(hours=4)
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


def join_ranks(env: Mapping[str, str]) -> Ranks:
    """Start the process group when torchrun launched several processes; a plain process gets rank 0 of 1."""
    if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
        return Ranks()
    import torch.distributed as dist
    from accelerate import PartialState
    from transformers import TrainingArguments

    from entrypoints.modeling import device_kind

    # The process group the Trainer would start later, started now so the steps before it can wait for each
    # other: the same accelerate state with the arguments TrainingArguments passes (use_cpu off CUDA, gloo; its
    # ddp_timeout on CUDA, NCCL). The Trainer finds the group initialized and uses it.
    cuda = device_kind() == "cuda"
    state = PartialState(cpu=not cuda, **({"timeout": timedelta(seconds=TrainingArguments.ddp_timeout)} if cuda else {}))
    group = dist.new_group(backend="gloo", timeout=RANK_WAIT_TIMEOUT)
    ranks = Ranks(state.num_processes, state.process_index, state.local_process_index, group)
    log.info("rank %d of %d (local rank %d, backend %s)", ranks.rank, ranks.world_size, ranks.local_rank, state.backend)
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
