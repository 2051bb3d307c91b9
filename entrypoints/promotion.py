"""The promotion gate of a versioned output: a run moves `latest.json` only when it is not worse than the run there.

    QLORA_OUTPUT_EXISTS=version QLORA_EVAL_SUITE=s3://b/suites/facts.jsonl python -m entrypoints.train

Every run of a series writes its complete result to `runs/<id>/`. Before its manifest is written, the run reads the
manifest of the run `latest.json` names and compares one metric (QLORA_PROMOTE_METRIC) measured the same way:
`<suite>/<metric>` on a suite with the same sha256 and generation budget, `eval_loss` on the same eval records (the
sha256 of their tokens and loss positions), base model and sequence length. Within QLORA_PROMOTE_TOLERANCE of the previous value counts as not worse. When the two runs
cannot be compared (another suite or eval set, a metric the previous run lacks, an unreadable previous manifest) the
gate refuses: a model that cannot be shown not to be worse is not shipped. The decision, with both numbers and the
reason, goes into the manifest; a refused run ends with exit 7 (errors.EXIT_NOT_PROMOTED). Torch-free.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from entrypoints import storage
from entrypoints.outputs import LATEST

log = logging.getLogger("qlora.promotion")


@dataclass(frozen=True)
class Measure:
    value: float | None
    basis: dict[str, Any] = field(default_factory=dict)  # what must agree for two values to be comparable
    missing: str = ""  # why there is no value


@dataclass(frozen=True)
class Decision:
    promoted: bool
    policy: str  # always, if-not-worse, never
    metric: str
    reason: str
    value: float | None = None
    previous_value: float | None = None
    previous_run: str | None = None
    tolerance: float = 0.0

    @property
    def refused(self) -> bool:
        """Not promoted by the gate's comparison (exit 7); `never` is what was asked for (exit 0)."""
        return not self.promoted and self.policy == "if-not-worse"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Parts of a measure's basis that manifests of earlier versions of the job lack: compared when both runs have them.
RECORDED_SINCE = {"eval_records_sha256": "2026-11-30"}


def lower_is_better(metric: str) -> bool:
    return metric == "eval_loss"


def measure(metric: str, manifest: dict[str, Any]) -> Measure:
    """`metric` of a run, read from its manifest (this run's, before it is written, or an earlier run's)."""
    if metric == "eval_loss":
        value = (manifest.get("metrics") or {}).get("eval_loss_after")
        data, model = manifest.get("data") or {}, manifest.get("base_model") or {}
        config = manifest.get("config") or {}
        eval_set = data.get("eval_fingerprint_sha256") or (
            f"{config.get('eval_fraction')} of {data.get('fingerprint_sha256')} (seed {config.get('seed')})"
            if config.get("eval_fraction") else None)
        basis = {"eval_set": eval_set, "eval_records_sha256": data.get("eval_records_sha256"),
                 "base_model": model.get("fingerprint_sha256"),
                 "max_seq_length": config.get("max_seq_length"), "chat_template": config.get("chat_template"),
                 "assistant_only_loss": config.get("assistant_only_loss")}
        if not isinstance(value, (int, float)):
            return Measure(None, basis, "it has no eval loss after training (no eval data, or no answer token within"
                                        " max_seq_length)")
        return Measure(float(value), basis)
    suite, _, name = metric.partition("/")
    found = ((manifest.get("evaluation") or {}).get("suites") or {}).get(suite)
    if not found:
        return Measure(None, {}, f"it did not run the suite {suite!r}")
    value = (found.get("after") or {}).get(name)
    basis = {"suite_sha256": found.get("sha256"), "max_new_tokens": found.get("max_new_tokens")}
    if not isinstance(value, (int, float)):
        return Measure(None, basis, f"its results of the suite {suite!r} have no {name!r}")
    return Measure(float(value), basis)


def read_previous(base_uri: str, endpoint_url: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """(the latest.json pointer, the manifest it names, a problem reading it); (None, None, "") when there is none."""
    text = storage.read_text(storage.join(base_uri, LATEST), endpoint_url=endpoint_url)
    if text is None:
        return None, None, ""
    try:
        pointer = json.loads(text)
        manifest_uri = pointer["manifest"]
    except (ValueError, KeyError, TypeError):
        return {"run": "?"}, None, f"{storage.join(base_uri, LATEST)} is not a pointer this job wrote"
    manifest_text = storage.read_text(manifest_uri, endpoint_url=endpoint_url)
    if manifest_text is None:
        return pointer, None, f"its manifest {manifest_uri} does not exist"
    try:
        return pointer, json.loads(manifest_text), ""
    except ValueError:
        return pointer, None, f"its manifest {manifest_uri} is not JSON"


def decide(policy: str, metric: str, tolerance: float, ours: dict[str, Any], pointer: dict[str, Any] | None,
           previous: dict[str, Any] | None, problem: str = "") -> Decision:
    """Whether this run (its manifest so far: `ours`) becomes latest.json, given the run latest.json names now."""
    mine = measure(metric, ours)
    common = {"policy": policy, "metric": metric, "value": mine.value, "tolerance": tolerance}
    if pointer is None:
        if policy == "never":
            return Decision(False, reason="QLORA_PROMOTE=never: a candidate run; latest.json is not written", **common)
        return Decision(True, reason="the first run of the series (no latest.json yet)", **common)
    run = str(pointer.get("run", "?"))
    theirs = measure(metric, previous) if previous is not None else Measure(None, {}, problem)
    common.update(previous_run=run, previous_value=theirs.value)
    if policy == "always":
        return Decision(True, reason="QLORA_PROMOTE=always", **common)
    if policy == "never":
        return Decision(False, reason="QLORA_PROMOTE=never: a candidate run; latest.json still names " + run, **common)
    advice = (" Set QLORA_PROMOTE=always for this run to start a new series from it, if it is the one to"
              " ship")
    if mine.value is None:
        return Decision(False, reason=f"this run has no {metric}: {mine.missing}", **common)
    if theirs.value is None:
        return Decision(False, reason=f"cannot compare with the promoted run {run}: {theirs.missing}.{advice}",
                        **common)
    differ = sorted(k for k in set(mine.basis) | set(theirs.basis) if mine.basis.get(k) != theirs.basis.get(k)
                    and not (k in RECORDED_SINCE and None in (mine.basis.get(k), theirs.basis.get(k))))
    if differ:
        shown = "; ".join(f"{k}: {theirs.basis.get(k)!r} there, {mine.basis.get(k)!r} here" for k in differ)
        return Decision(False, reason=f"cannot compare {metric} with the promoted run {run}: it was measured"
                                      f" differently ({shown}).{advice}", **common)
    lower = lower_is_better(metric)
    ok = mine.value <= theirs.value + tolerance if lower else mine.value >= theirs.value - tolerance
    direction = "lower" if lower else "higher"
    verdict = "not worse than" if ok else "worse than"
    return Decision(ok, reason=f"{metric} {mine.value:.6g} is {verdict} {theirs.value:.6g} of the promoted run {run}"
                               f" ({direction} is better; tolerance {tolerance:g})", **common)


def gate(policy: str, metric: str, tolerance: float, ours: dict[str, Any], base_uri: str,
         endpoint_url: str) -> Decision:
    """Read the run latest.json names and decide; logged either way."""
    pointer, previous, problem = read_previous(base_uri, endpoint_url)
    decision = decide(policy, metric, tolerance, ours, pointer, previous, problem)
    log.log(logging.INFO if decision.promoted or not decision.refused else logging.WARNING, "%s: %s",
            "promoted" if decision.promoted else "not promoted", decision.reason)
    return decision
