"""Secrets (HF token, W&B key): resolved once at job start, never stored in the config or any output.

Sources, first found wins per secret: the environment (HF_TOKEN, WANDB_API_KEY), a mounted directory
(QLORA_SECRETS_DIR with files of those names), a Secrets Manager secret (QLORA_SECRETS_ARN, a JSON object
with those keys). The values are handed to the libraries through their standard environment variables
and registered with a logging filter that redacts them from every log line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from entrypoints.config import JobConfig
from entrypoints.errors import ConfigError, StorageError

SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY")
REDACTED = "[REDACTED]"


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in log records with [REDACTED]."""

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def add(self, value: str) -> None:
        if value and len(value) >= 6:  # very short values would redact ordinary words
            self.values.add(value)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values:
            return True
        message = record.getMessage()
        redacted = message
        for value in self.values:
            redacted = redacted.replace(value, REDACTED)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


REDACTOR = RedactingFilter()


def install_redactor() -> None:
    for handler in logging.getLogger().handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)


def _from_dir(directory: str) -> dict[str, str]:
    found = {}
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError([f"QLORA_SECRETS_DIR={directory!r}: not a directory; mount the secret there or unset it"])
    for name in SECRET_NAMES:
        path = root / name
        if path.is_file():
            found[name] = path.read_text(encoding="utf-8").strip()
    return found


def _from_secrets_manager(arn: str, endpoint_env: Mapping[str, str]) -> dict[str, str]:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    region = arn.split(":")[3] if arn.startswith("arn:") and arn.count(":") >= 6 else None
    try:
        client = boto3.session.Session().client("secretsmanager", region_name=region)
        text = client.get_secret_value(SecretId=arn)["SecretString"]
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"cannot read the secret QLORA_SECRETS_ARN={arn}: {exc}; grant the job's role"
                           " secretsmanager:GetSecretValue on it") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError([f"QLORA_SECRETS_ARN={arn}: the secret must be a JSON object like"
                           ' {"HF_TOKEN": "...", "WANDB_API_KEY": "..."}']) from None
    if not isinstance(data, dict):
        raise ConfigError([f"QLORA_SECRETS_ARN={arn}: the secret must be a JSON object"])
    return {k: str(v) for k, v in data.items() if k in SECRET_NAMES and v}


def resolve_secrets(cfg: JobConfig, env: Mapping[str, str]) -> dict[str, str]:
    """-> {name: value} for the secrets that were found; each value is registered for redaction."""
    found = {name: env[name] for name in SECRET_NAMES if env.get(name)}
    if cfg.secrets_dir:
        for name, value in _from_dir(cfg.secrets_dir).items():
            found.setdefault(name, value)
    if cfg.secrets_arn and any(name not in found for name in SECRET_NAMES):
        for name, value in _from_secrets_manager(cfg.secrets_arn, env).items():
            found.setdefault(name, value)
    for value in found.values():
        REDACTOR.add(value)
    return found
