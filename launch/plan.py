"""What one launch is, resolved and validated: the input of both backends' request builders.

    python launch/submit.py --instance g5.2xlarge --dry-run    # builds a LaunchPlan and prints its requests

Built by launch/submit.py from the command line; plain data, no I/O.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from entrypoints.config import JobConfig
from launch.instances import GpuInstance

# SageMaker job names: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}; Kubernetes Job names: DNS-1123 labels (lower case); the
# multi-node rendezvous Service of the same name: an RFC 1035 label, which starts with a letter. One rule that
# satisfies all three: a lower-case letter, then lower-case alphanumerics and dashes, at most 63 characters.
_NAME_OK = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"  # the same suffix the SageMaker SDK appends to a base job name


def base_name(model: str, prefix: str = "qlora") -> str:
    """`qlora-llama-2-7b-hf` from `meta-llama/Llama-2-7b-hf`: readable in consoles and kubectl."""
    last = model.rstrip("/").split("/")[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", last).strip("-")
    return f"{prefix}-{slug}"[:40].rstrip("-") if slug else prefix


def unique_name(base: str, now: float | None = None, max_length: int = 63) -> str:
    stamp = time.strftime(TIMESTAMP_FORMAT, time.gmtime(now))
    return f"{base[: max_length - len(stamp) - 1].rstrip('-')}-{stamp}"


def check_name(name: str, what: str) -> str | None:
    if len(name) > 63 or not _NAME_OK.match(name):
        return (f"{what} {name!r}: use lower-case letters, digits and dashes, start with a letter, end with a"
                " letter or digit, at most 63 characters")
    return None


@dataclass(frozen=True)
class LaunchPlan:
    name: str  # job name (one-off) or schedule/CronJob name (scheduled)
    base_name: str  # what per-run names are derived from
    image: str
    instance: GpuInstance
    instance_count: int
    spot: bool
    cfg: JobConfig  # the validated settings (for estimates and checks)
    settings: dict[str, str]  # the QLORA_* environment, exactly as validated
    extra_env: dict[str, str]  # other non-secret environment
    output: str  # s3:// base of the outputs (QLORA_OUTPUT)
    checkpoint_prefix: str  # s3:// prefix; each run checkpoints to <prefix>/<run name>/
    max_run_seconds: int
    max_wait_seconds: int | None  # spot only: run time + time waiting for capacity
    volume_size_gb: int
    tags: dict[str, str] = field(default_factory=dict)
    schedule: str = ""  # five-field cron, empty for a one-off run
    timezone: str = ""  # IANA zone of the schedule, empty: UTC
    resume_from: str = ""  # s3:// prefix of an earlier run's checkpoints to continue from, empty: a fresh prefix
    resume_job: str = ""  # the earlier run's job name, when --resume-from gave one

    def checkpoint_uri(self, job_name: str) -> str:
        """Where this run's checkpoints go: the earlier run's prefix when resuming, else its own, by job name."""
        return self.resume_from or join_s3(self.checkpoint_prefix, job_name)

    @property
    def gpus_per_node(self) -> int:
        return self.instance.gpu_count


def join_s3(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *[p.strip("/") for p in parts if p]])
