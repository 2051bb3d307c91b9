"""The promotion gate's decision: which runs move latest.json, and why a run is refused.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_promotion.py

The S3 side (reading latest.json and the promoted run's manifest, exit 7, latest.json untouched) is exercised end to
end in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import pytest

from entrypoints.promotion import decide, measure

POINTER = {"run": "s3://b/out/runs/20260101T000000Z-aaaaaa", "manifest": "s3://b/out/runs/x/manifest.json"}


def manifest(eval_loss: float | None = 2.0, suite_score: float | None = 0.5, suite_sha: str = "a" * 64,
             eval_set: str = "e" * 64, model: str = "m" * 64, max_new_tokens: int = 64) -> dict:
    suites = {} if suite_score is None else {"facts": {
        "sha256": suite_sha, "max_new_tokens": max_new_tokens, "count": 4,
        "after": {"exact_match": 0.25, "contains": suite_score, "token_f1": 0.4, "rouge_l": 0.45, "score": suite_score}}}
    return {"metrics": {"eval_loss_after": eval_loss}, "data": {"eval_fingerprint_sha256": eval_set,
                                                                "fingerprint_sha256": "d" * 64},
            "base_model": {"fingerprint_sha256": model},
            "config": {"max_seq_length": 512, "chat_template": "auto", "assistant_only_loss": True,
                       "eval_fraction": 0.0, "seed": 42},
            "evaluation": {"suites": suites}}


def test_the_first_run_of_a_series_is_promoted_whatever_it_measures():
    d = decide("if-not-worse", "eval_loss", 0.0, manifest(eval_loss=None), None, None)
    assert d.promoted and "first run" in d.reason and not d.refused


@pytest.mark.parametrize(("metric", "ours", "theirs", "tolerance", "promoted"), [
    ("eval_loss", 1.9, 2.0, 0.0, True),  # lower loss: better
    ("eval_loss", 2.0, 2.0, 0.0, True),  # equal: not worse
    ("eval_loss", 2.05, 2.0, 0.0, False),
    ("eval_loss", 2.05, 2.0, 0.1, True),  # within the tolerance
    ("facts/score", 0.75, 0.5, 0.0, True),  # higher score: better
    ("facts/score", 0.25, 0.5, 0.0, False),
    ("facts/score", 0.45, 0.5, 0.05, True),
    ("facts/rouge_l", 0.45, 0.45, 0.0, True),
])
def test_not_worse_is_promoted_worse_is_refused_with_both_numbers(metric, ours, theirs, tolerance, promoted):
    key = "eval_loss" if metric == "eval_loss" else "suite_score"
    mine, previous = manifest(**{key: ours}), manifest(**{key: theirs})
    d = decide("if-not-worse", metric, tolerance, mine, POINTER, previous)
    assert d.promoted is promoted and d.refused is not promoted
    assert (d.value, d.previous_value, d.previous_run) == (measure(metric, mine).value, measure(metric, previous).value,
                                                         POINTER["run"])
    assert f"{d.value:.6g}" in d.reason and f"{d.previous_value:.6g}" in d.reason and POINTER["run"] in d.reason
    assert ("not worse than" in d.reason) is promoted


@pytest.mark.parametrize(("metric", "ours", "theirs", "named"), [
    ("facts/score", {"suite_sha": "b" * 64}, {}, "suite_sha256"),  # the suite file changed
    ("facts/score", {"max_new_tokens": 16}, {}, "max_new_tokens"),  # answers cut shorter
    ("eval_loss", {"eval_set": "f" * 64}, {}, "eval_set"),  # another eval set
    ("eval_loss", {"model": "n" * 64}, {}, "base_model"),  # another base model (another tokenizer, maybe)
])
def test_runs_measured_differently_cannot_be_compared_and_the_gate_refuses(metric, ours, theirs, named):
    d = decide("if-not-worse", metric, 0.0, manifest(**ours), POINTER, manifest(**theirs))
    assert not d.promoted and d.refused
    assert "cannot compare" in d.reason and named in d.reason and "QLORA_PROMOTE=always" in d.reason


def test_a_previous_run_without_the_metric_or_an_unreadable_one_refuses():
    d = decide("if-not-worse", "facts/score", 0.0, manifest(), POINTER, manifest(suite_score=None))
    assert not d.promoted and "did not run the suite 'facts'" in d.reason
    d = decide("if-not-worse", "eval_loss", 0.0, manifest(), POINTER, None, "its manifest s3://b/m does not exist")
    assert not d.promoted and "does not exist" in d.reason and d.previous_value is None
    d = decide("if-not-worse", "eval_loss", 0.0, manifest(eval_loss=None), POINTER, manifest())
    assert not d.promoted and "this run has no eval_loss" in d.reason


def test_always_and_never_decide_without_comparing_and_never_is_not_a_refusal():
    worse, better = manifest(eval_loss=9.0), manifest(eval_loss=1.0)
    d = decide("always", "eval_loss", 0.0, worse, POINTER, better)
    assert d.promoted and d.value == 9.0 and d.previous_value == 1.0  # the numbers are still reported
    d = decide("never", "eval_loss", 0.0, better, POINTER, worse)
    assert not d.promoted and not d.refused and "QLORA_PROMOTE=never" in d.reason
    assert not decide("never", "eval_loss", 0.0, better, None, None).promoted  # not even the first run


def test_an_eval_set_held_out_of_the_training_data_moves_with_the_data():
    """A split of the training data (eval_fraction) is the same eval set only for the same data and seed."""
    split = manifest()
    split["data"]["eval_fingerprint_sha256"] = None
    split["config"]["eval_fraction"] = 0.1
    grown = {**split, "data": {**split["data"], "fingerprint_sha256": "g" * 64}}
    assert decide("if-not-worse", "eval_loss", 0.0, split, POINTER, split).promoted
    d = decide("if-not-worse", "eval_loss", 0.0, grown, POINTER, split)
    assert not d.promoted and "eval_set" in d.reason


def test_eval_losses_over_other_records_are_not_compared_even_when_described_alike():
    """The same data, fraction and seed can still hold out other records (another version of the job choosing them, a
    changed chat template's tokens): the eval records' own sha256 (tokens and loss positions) must agree too. A
    manifest written before it was recorded is compared as before, on the description."""
    ours, theirs = manifest(eval_loss=1.9), manifest(eval_loss=2.0)
    ours["data"]["eval_records_sha256"], theirs["data"]["eval_records_sha256"] = "1" * 64, "2" * 64
    d = decide("if-not-worse", "eval_loss", 0.0, ours, POINTER, theirs)
    assert not d.promoted and d.refused and "eval_records_sha256" in d.reason and "cannot compare" in d.reason
    theirs["data"]["eval_records_sha256"] = "1" * 64
    assert decide("if-not-worse", "eval_loss", 0.0, ours, POINTER, theirs).promoted
    del theirs["data"]["eval_records_sha256"]  # an earlier version's manifest
    assert decide("if-not-worse", "eval_loss", 0.0, ours, POINTER, theirs).promoted
    assert not decide("if-not-worse", "eval_loss", 0.0, manifest(eval_loss=2.1), POINTER, theirs).promoted
