"""Helpers to run the real training entrypoint as a subprocess, the way the container runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from entrypoints.train import SUMMARY_PREFIX

REPO = Path(__file__).resolve().parents[1]
FAKE_HF_TOKEN = "hf_FAKEsecretTOKEN0123456789abcdef"
FAKE_WANDB_KEY = "wandbFAKEkey0123456789abcdef0123456789ab"


@dataclass
class JobResult:
    code: int
    output: str
    summary: dict | None


def jsonl(path: Path, records: list[dict]) -> Path:
    """`records` written to `path` as JSON Lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def job_env(base_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(base_dir),
        "HF_TOKEN": FAKE_HF_TOKEN, "WANDB_API_KEY": FAKE_WANDB_KEY,
        "QLORA_BASE_DIR": str(base_dir / "opt-ml"),
    })
    env.update(settings)
    return env


def run_job(env: dict[str, str], timeout: int = 600) -> JobResult:
    proc = subprocess.run([sys.executable, "-m", "entrypoints.train"], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    out = proc.stdout + proc.stderr
    summary = None
    for line in proc.stdout.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            summary = json.loads(line[len(SUMMARY_PREFIX):])
    return JobResult(proc.returncode, out, summary)


def can_unshare() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in a user+mount namespace (`unshare -r -m`)."""
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-r", "-m", "true"], capture_output=True).returncode == 0


def with_tmpfs(mounts: dict[Path, str], script: str) -> list[str]:
    """A command that runs the shell `script` where each of `mounts` is a fresh tmpfs with those mount options
    (`size=1m`, `size=1m,ro`), visible only to the script: a real full disk or read-only file system, without root."""
    import shlex

    mount = " && ".join(f"mount -t tmpfs -o {opts} tmpfs {shlex.quote(str(path))}" for path, opts in mounts.items())
    return ["unshare", "-r", "-m", "sh", "-c", f"{mount} && {script}"]
