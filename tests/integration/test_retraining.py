"""Retraining that never ships a worse model: eval suites, the best adapter with early stopping, the promotion gate.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_retraining.py

Real components: the SeaweedFS S3 server, the tiny Llama-2-shaped model, real training on CPU, the job's real entrypoint
(as a subprocess where the exit code, the failure file and W&B are checked; in-process where only the result is).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints import storage, train
from entrypoints.errors import EXIT_DATA, EXIT_NOT_PROMOTED, EXIT_OK

from ..jobrun import job_env, jsonl, run_job
from ..wandb_records import summarize

RECORDS = [{"instruction": f"What is code {i}?", "output": f"Code {i} is {i * 7 % 13}."} for i in range(12)]
EVAL = [{"instruction": f"What is code {i}?", "output": f"Code {i} is {i * 7 % 13}."} for i in range(12, 16)]
COLOURS = [{"instruction": f"Name colour {i}.", "output": f"Colour {i} is {'red' if i % 2 else 'blue'}."}
           for i in range(4)]
SUITE = [{"prompt": "What is code 3?", "reference": "Code 3 is 8."},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is code 4?"}],
          "reference": "Code 4 is 2.", "metric": "token_f1"}]
TINY = {"QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_MERGE": "false",
        "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_LORA_R": "4", "QLORA_LORA_ALPHA": "8", "QLORA_LOGGING_STEPS": "1",
        "QLORA_MAX_NEW_TOKENS": "3", "QLORA_WARMUP_RATIO": "0", "QLORA_EVAL_FRACTION": "0"}


@pytest.fixture
def series(s3_env, tmp_path):
    """Training data, a fixed eval set and a suite in a fresh bucket; the versioned output they are trained into."""
    server, bucket = s3_env
    for name, records in (("data/train.jsonl", RECORDS), ("eval/eval.jsonl", EVAL), ("suites/facts.jsonl", SUITE)):
        storage.upload_file(jsonl(tmp_path / Path(name).name, records), f"s3://{bucket}/{name}",
                            endpoint_url=server.endpoint)
    return server, bucket, f"s3://{bucket}/series"


def read_json(server, uri: str) -> dict | None:
    text = storage.read_text(uri, endpoint_url=server.endpoint)
    return json.loads(text) if text is not None else None


def test_a_better_retrain_is_promoted_and_a_worse_one_is_kept_but_not_promoted(series, tiny_model, tmp_path):
    server, bucket, out = series
    common = {**server.env(), **TINY, "QLORA_MODEL": str(tiny_model), "QLORA_S3_ENDPOINT_URL": server.endpoint,
              "QLORA_DATA": f"s3://{bucket}/data/train.jsonl", "QLORA_EVAL_DATA": f"s3://{bucket}/eval/eval.jsonl",
              "QLORA_EVAL_SUITE": f"s3://{bucket}/suites/facts.jsonl", "QLORA_PROMOTE_METRIC": "eval_loss",
              "QLORA_OUTPUT": out, "QLORA_OUTPUT_EXISTS": "version", "QLORA_LEARNING_RATE": "1e-3"}

    def run(name: str, **settings: str):
        (tmp_path / name).mkdir()  # each run on its own disk, as each scheduled job is
        return run_job(job_env(tmp_path / name, **{**common, "QLORA_REPORT_TO": "none", **settings}))

    first = run("first", QLORA_MAX_STEPS="1")
    assert first.code == EXIT_OK, first.output[-3000:]
    assert first.summary["promotion"]["promoted"] and "first run of the series" in first.summary["promotion"]["reason"]
    # The suite went through the whole job: the base model's answers and the trained one's, scored, in the outputs.
    run1 = first.summary["output"]
    suite = read_json(server, f"{run1}/manifest.json")["evaluation"]["suites"]["facts"]
    assert suite["count"] == 2 and set(suite["after"]) == {"exact_match", "contains", "token_f1", "rouge_l", "score",
                                                           "count"}
    assert suite["sha256"] == hashlib.sha256((tmp_path / "facts.jsonl").read_bytes()).hexdigest()
    assert set(suite["answer_seconds"]) == {"before", "after"} and all(s > 0 for s in suite["answer_seconds"].values())
    answers = [json.loads(line) for line in storage.read_text(f"{run1}/evaluation/facts.jsonl",
                                                              endpoint_url=server.endpoint).splitlines()]
    assert [a["source"] for a in answers] == [f"s3://{bucket}/suites/facts.jsonl:1", f"s3://{bucket}/suites/facts.jsonl:2"]
    assert {"before", "after", "scores_before", "scores_after"} <= set(answers[0])
    card = storage.read_text(f"{run1}/README.md", endpoint_url=server.endpoint)
    assert "## Evaluation suites" in card and "| facts | 2 | score |" in card and "## Promotion" in card
    assert "suite facts (2): score" in first.output

    better = run("better", QLORA_MAX_STEPS="4")
    assert better.code == EXIT_OK, better.output[-3000:]
    promotion = better.summary["promotion"]
    assert promotion["promoted"] and promotion["previous_run"] == run1
    assert promotion["value"] < promotion["previous_value"] == pytest.approx(first.summary["eval_loss_after"])
    run2 = better.summary["output"]
    assert read_json(server, f"{out}/latest.json")["run"] == run2

    # A run that learned next to nothing (a learning rate 1000 times lower): complete, not promoted, exit 7.
    worse = run("worse", QLORA_MAX_STEPS="1", QLORA_LEARNING_RATE="1e-6", QLORA_REPORT_TO="wandb")
    assert worse.code == EXIT_NOT_PROMOTED, worse.output[-3000:]
    run3 = worse.summary["output"]
    assert read_json(server, f"{out}/latest.json")["run"] == run2  # latest.json did not move
    manifest = read_json(server, f"{run3}/manifest.json")
    assert manifest["complete"] and "adapter/adapter_model.safetensors" in {f["path"] for f in manifest["files"]}
    decision = manifest["promotion"]
    assert not decision["promoted"] and decision["previous_run"] == run2
    assert decision["value"] == pytest.approx(worse.summary["eval_loss_after"])
    assert decision["previous_value"] == pytest.approx(better.summary["eval_loss_after"])
    assert f"{decision['value']:.6g} is worse than {decision['previous_value']:.6g}" in decision["reason"]
    failure = (tmp_path / "worse" / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith(f"not promoted: the run is complete at {run3}, but latest.json still names {run2}: ")
    assert "promotion: NOT PROMOTED (if-not-worse, eval_loss)" in worse.output and "Traceback" not in worse.output
    [wandb_file] = (tmp_path / "worse").rglob("offline-run-*/run-*.wandb")
    run = summarize(wandb_file)
    assert run["summary"]["promotion/promoted"] is False and run["summary"]["promotion/previous_run"] == run2
    assert "suite/facts/score_after" in run["summary"]
    assert any(h.get("suite/facts/_type") == "table-file" and h.get("suite/facts/nrows") == 2 for h in run["history"])


def test_a_bad_suite_fails_in_seconds_naming_its_line_before_any_download(series, tiny_model, tmp_path, monkeypatch,
                                                                          capsys, restore_signals):
    server, bucket, out = series
    storage.write_text(f"s3://{bucket}/suites/bad.jsonl", json.dumps(SUITE[0]) + "\n" + '{"prompt": "Q?"}\n',
                       endpoint_url=server.endpoint)
    _environment(monkeypatch, tmp_path, {**server.env(), "QLORA_MODEL": f"s3://{bucket}/models/none",
                                         "QLORA_DATA": f"s3://{bucket}/data/train.jsonl", "QLORA_OUTPUT": out,
                                         "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_OUTPUT_EXISTS": "version",
                                         "QLORA_EVAL_SUITE": f"s3://{bucket}/suites/bad.jsonl"})
    assert train.main([]) == EXIT_DATA
    log = capsys.readouterr().out
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith(f"data error: s3://{bucket}/suites/bad.jsonl:2: no `reference` answer"), failure
    assert f"downloading s3://{bucket}/suites/bad.jsonl" in log
    assert f"s3://{bucket}/data/train.jsonl to" not in log and "qlora.model" not in log  # neither was fetched


# ------------------------------------------------------------------------------------------- early stopping
def _environment(monkeypatch, base: Path, settings: dict[str, str]) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("QLORA_", "SM_CHANNEL_")):
            monkeypatch.delenv(key)
    for key, value in {"QLORA_BASE_DIR": str(base / "opt-ml"), "QLORA_REPORT_TO": "none", "HF_HUB_OFFLINE": "1",
                       **settings}.items():
        monkeypatch.setenv(key, value)
    storage._client.cache_clear()


def _run(capsys) -> tuple[int, dict, str]:
    code = train.main([])
    log = capsys.readouterr().out
    summary = [json.loads(line[len(train.SUMMARY_PREFIX):]) for line in log.splitlines()
               if line.startswith(train.SUMMARY_PREFIX)]
    return code, summary[-1] if summary else {}, log


def _eval_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h and h["step"] > 0}


def _same_adapter(published: Path, checkpoint: Path) -> bool:
    a, b = load_file(str(published / "adapter_model.safetensors")), load_file(str(checkpoint / "adapter_model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_evaluated_adapter_is_published_and_early_stopping_survives_a_resume(tiny_model, tmp_path,
                                                                                      monkeypatch, capsys,
                                                                                      restore_signals):
    """Eval after every step; patience 2 with a threshold no step can beat, so every evaluation after the first counts
    as one without improvement, whatever the losses: an uninterrupted run stops at step 3. A run limited to 2 steps is
    then extended: it must stop at step 3 too (transformers does not restore callback states by default: it trained
    to step 4). A rerun of the stopped run trains nothing and publishes the same adapter."""
    ckpt = tmp_path / "opt-ml" / "checkpoints"
    settings = {**TINY, "QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(jsonl(tmp_path / "train.jsonl", RECORDS)),
                "QLORA_EVAL_DATA": str(jsonl(tmp_path / "eval.jsonl", COLOURS)), "QLORA_OUTPUT": str(tmp_path / "out"),
                "QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_STEPS": "1", "QLORA_SAVE_STEPS": "1",
                "QLORA_EARLY_STOPPING_PATIENCE": "2", "QLORA_EARLY_STOPPING_THRESHOLD": "100",
                # A high constant learning rate: on these data the eval loss rises at step 2 (the best is step 1).
                "QLORA_LEARNING_RATE": "3e-2", "QLORA_LR_SCHEDULER": "constant"}
    _environment(monkeypatch, tmp_path, {**settings, "QLORA_MAX_STEPS": "2"})
    code, summary, log = _run(capsys)
    assert code == EXIT_OK, log[-3000:]
    losses = _eval_losses(ckpt / "checkpoint-2")
    best = min(losses, key=losses.get)
    assert best == 1, f"the eval loss no longer rises at step 2 ({losses}): the test needs data where it does"
    assert (summary["global_step"], summary["best_step"], summary["stopped_early"]) == (2, 1, False)
    assert summary["best_eval_loss"] == pytest.approx(losses[1]) == pytest.approx(summary["eval_loss_after"])
    assert _same_adapter(Path(summary["output"]) / "adapter", ckpt / "checkpoint-1")  # not step 2's
    state = json.loads((ckpt / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["EarlyStopping"]["attributes"]["early_stopping_patience_counter"] == 1

    _environment(monkeypatch, tmp_path, {**settings, "QLORA_MAX_STEPS": "6"})
    code, summary, log = _run(capsys)
    assert code == EXIT_OK, log[-3000:]
    assert "resuming from" in log and summary["resumed_from"] == "checkpoint-2"
    assert (summary["global_step"], summary["stopped_early"]) == (3, True), summary
    assert "early stopping at step 3" in log and "stopped early" in log
    losses = _eval_losses(ckpt / "checkpoint-3")
    assert summary["best_step"] == min(losses, key=losses.get)
    assert _same_adapter(Path(summary["output"]) / "adapter", ckpt / f"checkpoint-{summary['best_step']}")
    manifest = json.loads((Path(summary["output"]) / "manifest.json").read_text())
    assert manifest["metrics"]["best_step"] == summary["best_step"] and manifest["metrics"]["stopped_early"] is True
    published = Path(summary["output"]) / "adapter"

    code, again, log = _run(capsys)  # e.g. after the upload failed: the run is finished, nothing is trained
    assert code == EXIT_OK, log[-3000:]
    assert "nothing is left to train" in log and "where early stopping ended it" in log
    assert (again["global_step"], again["steps_this_run"], again["best_step"]) == (3, 0, summary["best_step"])
    assert _same_adapter(Path(again["output"]) / "adapter", published)
