"""The job's exit contract: failure classes, their exit codes, and the one top-level handler.

`run_guarded(main_fn, failure_file)` is what every entrypoint's `main()` calls. It is torch-free so
the launcher can import the exit codes (the Kubernetes podFailurePolicy is built from them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("qlora")

# Documented exit codes (README "Exit codes"). Kubernetes' podFailurePolicy and the scheduler's retry
# policy key off these numbers, so they are part of the public contract: never renumber.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected library failure: retrying will not help
EXIT_CONFIG = 2  # a setting is missing, malformed or contradictory
EXIT_DATA = 3  # the training/eval data cannot be read or normalised
EXIT_MODEL = 4  # the base model or adapter is missing, unsafe or incompatible
EXIT_STORAGE = 5  # object storage or the Hugging Face Hub unreachable or failing after retries, access denied
EXIT_OUTPUT_EXISTS = 6  # the output location already holds a complete result
EXIT_NOT_PROMOTED = 7  # the run is complete but was not promoted; latest.json still points to the previous run
# Outputs complete (manifest written, S3/local untouched); only the Hugging Face Hub publish failed: retry only the
# publish (`python -m entrypoints.hub --output URI`), never the training.
EXIT_HUB_PUBLISH = 9
# Another host or process of a multi-process job stopped answering (killed, crashed, its machine or the network lost):
# every other process stops with this code instead of waiting forever; rerun to resume from the last checkpoint.
EXIT_PEER_LOST = 10
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was saved; rerun to resume (EX_TEMPFAIL)
# What exit 7 means, for the launcher's --wait (SageMaker shows such a job as Failed).
NOT_PROMOTED_MEANING = ("the run is complete but was not promoted: its result is under runs/<id>/ and latest.json still"
                        " points to the previous run")

# SageMaker shows the first 1024 characters of /opt/ml/output/failure as FailureReason.
FAILURE_REASON_LIMIT = 1024


class JobError(Exception):
    """A failure we understand: the message says what went wrong and how to fix it."""

    exit_code = EXIT_INTERNAL
    kind = "internal error"


class ConfigError(JobError):
    exit_code = EXIT_CONFIG
    kind = "configuration error"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


class DataError(JobError):
    exit_code = EXIT_DATA
    kind = "data error"


class ModelError(JobError):
    exit_code = EXIT_MODEL
    kind = "model error"


class StorageError(JobError):
    exit_code = EXIT_STORAGE
    kind = "storage error"


class OutputExistsError(JobError):
    exit_code = EXIT_OUTPUT_EXISTS
    kind = "output exists"


class NotPromoted(JobError):
    """The run published a complete result under runs/<id>/, but the promotion gate kept latest.json where it was."""

    exit_code = EXIT_NOT_PROMOTED
    kind = "not promoted"


class HubPublishError(JobError):
    exit_code = EXIT_HUB_PUBLISH
    kind = "Hub publish failed (outputs complete)"


class PeerLost(JobError):
    exit_code = EXIT_PEER_LOST
    kind = "lost a process of the job"


class Preempted(JobError):
    exit_code = EXIT_PREEMPTED
    kind = "preempted"


def write_failure_file(failure_file: Path | None, message: str) -> None:
    """Best effort: the failure file must never mask the original error."""
    if failure_file is None:
        return
    try:
        failure_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = failure_file.with_name(failure_file.name + ".tmp")
        tmp.write_text(message[:FAILURE_REASON_LIMIT] + ("\n" if len(message) <= FAILURE_REASON_LIMIT else ""))
        os.replace(tmp, failure_file)
    except OSError as exc:  # read-only or missing /opt/ml outside SageMaker
        log.debug("could not write failure file %s: %s", failure_file, exc)


def run_guarded(main_fn: Callable[[], object], failure_file: Callable[[], Path | None],
                first_failure_wins: bool = False) -> int:
    """Run `main_fn`, turning every failure into one message, the failure file and an exit code.

    `failure_file` is a callable because the path is only known once configuration has been parsed
    (and a configuration error may happen before that: then the default base dir is used).
    `first_failure_wins`: several processes of one job (torchrun ranks) share the failure file. The first
    failure is the cause; the others follow from it (torchrun stops the other ranks with SIGTERM when one
    fails), so a failure file written by another process after this one started is kept.
    """
    started = time.time()
    try:
        main_fn()
        record_rank_exit(EXIT_OK)
        return EXIT_OK
    except JobError as exc:
        message = f"{exc.kind}: {exc}"
        code = exc.exit_code
        log.error("%s", message)
    except KeyboardInterrupt:
        message = "preempted: interrupted before a checkpoint could be saved; rerun to resume"
        code = EXIT_PREEMPTED
        log.error("%s", message)
    except Exception as exc:  # noqa: BLE001 - the top-level handler is the one place that catches all
        full = disk_full(exc)
        if full is not None:
            # A full disk can surface from any library that writes (datasets' caches, torch.save, safetensors):
            # it is a storage problem with a known fix, never an internal error.
            message, code = f"{StorageError.kind}: {full}", EXIT_STORAGE
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
            code = EXIT_INTERNAL
            # A traceback helps here, but never as the only message: the summary line comes last.
            log.error("%s", traceback.format_exc().rstrip())
        log.error("%s", message)
    path = failure_file()
    if first_failure_wins and path is not None and _written_since(path, started):
        log.info("%s already holds the failure of another process of this job; kept", path)
    else:
        write_failure_file(path, message)
    record_rank_exit(code)
    sys.stdout.flush()
    return code


@contextlib.contextmanager
def disk_space_for(path: Path, what: str) -> Iterator[None]:
    """Name the place and the free space when a full disk stops `what` (a step that writes below `path`)."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        if disk_full(exc) is None:
            raise
        raise StorageError(f"the disk is full while {what} in {path} ({_free_bytes(path)}): {DISK_FULL_ADVICE}") from None


def _free_bytes(path: Path | str) -> str:
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free:,} bytes free on its file system"
    except OSError:
        return "free space unknown"


DISK_FULL_ADVICE = ("free space where the job writes, or give the job a larger volume (SageMaker: volume_size;"
                    " Kubernetes: the node's or the scratch volume's size), or point QLORA_BASE_DIR /"
                    " QLORA_CHECKPOINT_DIR at a larger one; then rerun to resume")


def disk_full(exc: BaseException) -> str | None:
    """The message for an exception caused (anywhere down its chain) by a full disk or an exhausted quota."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            path = current.filename or ""
            where = f" while writing {path} ({_free_bytes(path)})" if path else ""
            return f"the disk is full{where} ({current.strerror}): {DISK_FULL_ADVICE}"
        # Libraries with their own I/O report it in their own words: torch.save ("file write failed"),
        # safetensors ("StorageFull" / "No space left on device").
        text = str(current)
        if "No space left on device" in text or "StorageFull" in text or "file write failed" in text:
            return f"the disk is full ({text.strip().splitlines()[0][:200]}): {DISK_FULL_ADVICE}"
        current = current.__cause__ or current.__context__
    return None


# Set by container/entrypoint.py when it launches torchrun: torchrun exits 1 whenever a worker fails, so each
# rank leaves its own exit code (and when it ended) here, and the entrypoint exits with the cause's code.
RANK_EXIT_DIR_ENV = "JOB_RANK_EXIT_DIR"
# Also set by container/entrypoint.py: the name of this host as the platform knows it (SageMaker's `algo-2`, the
# Indexed Job's pod), so that a rank that loses another host can say which one it was.
HOST_NAME_ENV = "JOB_HOST_NAME"


def record_rank_exit(code: int) -> None:
    folder = os.environ.get(RANK_EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        Path(folder, f"rank-{int(rank)}").write_text(f"{code} {time.time():.6f}\n")
    except (OSError, ValueError) as exc:
        log.warning("could not record the exit code of rank %s in %s: %s", rank, folder, exc)


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False
