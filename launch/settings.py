"""Job settings for a launch: `--set name=value`, `QLORA_NAME=value` and `--env-file FILE` into the job's environment.

    python launch/submit.py --instance g5.2xlarge --set data=s3://b/train.jsonl --env-file job.env --dry-run

The settings are the training job's own contract (entrypoints/config.py): the launcher converts them to
the job's `QLORA_*` environment and validates them with the job's parser before anything is sent. Other
variables (e.g. WANDB_MODE, NCCL_DEBUG) pass through as plain environment, except secrets: a secret
value in a request or manifest would be readable by anyone who can describe the job, so those are refused
and must be passed as references (QLORA_SECRETS_ARN, a Kubernetes Secret).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path

from entrypoints.config import ENV_PREFIX, FIELDS, SECRET_ENV_VARS, JobConfig, env_name, parse_config
from entrypoints.errors import ConfigError

# Variables that carry credentials under other names; refused like SECRET_ENV_VARS.
_SECRET_LIKE = ("AWS_ACCESS_KEY_ID", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def _is_secret_name(key: str) -> bool:
    return key in SECRET_ENV_VARS or key in _SECRET_LIKE or key.endswith(("_TOKEN", "_SECRET", "_PASSWORD",
                                                                          "_API_KEY"))


def _assignment(text: str, where: str, problems: list[str]) -> tuple[str, str] | None:
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        problems.append(f"{where}: {text!r} is not NAME=value")
        return None
    return key, value


def _strip_quotes(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def read_env_file(path: Path, problems: list[str]) -> list[tuple[str, str, str]]:
    """KEY=VALUE lines (blank lines and # comments skipped, `export ` allowed) -> (key, value, where)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"--env-file {path}: cannot be read ({exc})")
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        where = f"{path}:{number}"
        pair = _assignment(line, where, problems)
        if pair:
            out.append((pair[0], _strip_quotes(pair[1]), where))
    return out


def collect(sets: Iterable[str], env_files: Iterable[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The job's QLORA_* settings and its other (non-secret) environment, plus every problem found.

    `--set` and env files accept the setting's name (`max_steps=10`) or its variable (`QLORA_MAX_STEPS=10`); other
    keys in env files are plain environment. Env files are read first, so `--set` wins.
    """
    problems: list[str] = []
    items: list[tuple[str, str, str]] = []
    for f in env_files:
        for key, value, where in read_env_file(Path(f), problems):
            if not key.upper().startswith(ENV_PREFIX) and key.lower() in FIELDS and not _is_secret_name(key.upper()):
                key = env_name(key.lower())  # `lora_r=8` means the setting, as in --set (not a variable `lora_r`)
            items.append((key, value, where))
    for text in sets:
        pair = _assignment(text, f"--set {text!r}", problems)
        if pair is None:
            continue
        key, value = pair
        if _is_secret_name(key.upper()):
            items.append((key.upper(), value, f"--set {key}=..."))  # refused below, without echoing the value
            continue
        if not key.upper().startswith(ENV_PREFIX) and key.lower() in FIELDS:
            key = env_name(key.lower())
        elif not key.upper().startswith(ENV_PREFIX):
            close = difflib.get_close_matches(key.lower(), list(FIELDS), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                " (see `python -m entrypoints.config --markdown`); other environment goes in --env-file"
            problems.append(f"--set {key}: not a job setting{hint}")
            continue
        items.append((key.upper(), value, f"--set {text!r}"))
    settings: dict[str, str] = {}
    extra_env: dict[str, str] = {}
    for key, value, where in items:
        if key.startswith(ENV_PREFIX):
            settings[key] = value
        elif _is_secret_name(key):
            problems.append(f"{where}: {key} looks like a secret; secrets are never put in a request or manifest."
                            " Pass a reference instead: QLORA_SECRETS_ARN (SageMaker) or --k8s-secret (Kubernetes)")
        else:
            extra_env[key] = value
    return settings, extra_env, problems


def validate(settings: Mapping[str, str], problems: list[str]) -> JobConfig | None:
    """Parse with the job's own parser (paths are not checked: they exist where the job runs)."""
    try:
        return parse_config(dict(settings), check_paths=False)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
