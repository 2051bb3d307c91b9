"""Experiment tracking: when W&B is on, what its (offline) run records; the no-op stand-in otherwise.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_tracking.py
"""

from __future__ import annotations

import pytest

from entrypoints.tracking import NullTracker, WandbTracker, wandb_wanted

from ..wandb_records import summarize


@pytest.mark.parametrize(("report_to", "env", "wanted"), [
    ("auto", {}, False), ("auto", {"WANDB_API_KEY": "k" * 40}, True), ("auto", {"WANDB_MODE": "offline"}, True),
    ("none", {"WANDB_API_KEY": "k" * 40}, False), ("wandb", {}, True),
])
def test_when_wandb_is_used(report_to, env, wanted):
    assert wandb_wanted(report_to, env) is wanted


def test_the_null_tracker_accepts_every_call_and_reports_to_nothing():
    tracker = NullTracker()
    tracker.log({"loss": 1.0})
    tracker.log_samples("samples", [{"prompt": "p"}])
    tracker.summary({"eval_loss": 0.5})
    tracker.finish(1)
    assert tracker.report_to == "none" and not tracker.enabled


def test_the_wandb_run_holds_config_history_samples_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = WandbTracker("qlora-test", "", "unit-run", {"lora_r": 8, "data": "s3://b/d"}, tmp_path / "wandb")
    tracker.log({"train/tokens_per_second": 123.0})
    tracker.log_samples("samples", [{"prompt": "q", "reference": "a", "before": "x", "after": "a"}])
    tracker.log_samples("empty", [])  # nothing to log: no table
    tracker.summary({"eval_loss_after": 0.25, "global_step": 3})
    tracker.finish(0)
    runs = list(tmp_path.rglob("run-*.wandb"))
    assert len(runs) == 1 and tracker.report_to == "wandb"
    run = summarize(runs[0])
    assert run["config"]["lora_r"] == 8 and run["config"]["data"] == "s3://b/d"
    assert any(h.get("train/tokens_per_second") == 123.0 for h in run["history"])
    tables = [h for h in run["history"] if h.get("samples/_type") == "table-file"]
    assert len(tables) == 1 and tables[0]["samples/nrows"] == 1 and tables[0]["samples/ncols"] == 4
    assert not any("empty/_type" in h for h in run["history"])
    assert run["summary"]["eval_loss_after"] == 0.25 and run["summary"]["global_step"] == 3
