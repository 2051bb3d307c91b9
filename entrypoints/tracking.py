"""Experiment tracking: Weights & Biases when configured, otherwise a no-op stand-in with the same methods."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("qlora.tracking")


class NullTracker:
    """Used when W&B is not configured: every call does nothing, so callers never test `if wandb`."""

    enabled = False
    report_to = "none"

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    enabled = True
    report_to = "wandb"  # transformers' WandbCallback then logs into the run opened here

    def __init__(self, project: str, entity: str, name: str, config: Mapping[str, Any], directory: Path):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity or None, name=name, config=dict(config),
                              dir=str(directory), job_type="qlora-sft", reinit="finish_previous")
        log.info("W&B run %s (mode %s)", self.run.id, self.run.settings.mode)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.run.log(dict(metrics))

    def log_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({key: table})

    def summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def wandb_wanted(report_to: str, env: Mapping[str, str]) -> bool:
    """`auto` turns W&B on when a key or a mode (e.g. WANDB_MODE=offline) is there to use."""
    if report_to == "none":
        return False
    if report_to == "wandb":
        return True
    return bool(env.get("WANDB_API_KEY") or env.get("WANDB_MODE"))
