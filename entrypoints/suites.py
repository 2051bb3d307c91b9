"""Evaluation suites: fixed questions with reference answers, read and checked before any download or GPU work.

    QLORA_EVAL_SUITE=s3://bucket/suites/facts.jsonl,suites/format.jsonl python -m entrypoints.train

A suite is one JSON Lines file, one question a line:
    {"prompt": "What is the capital of Veloria?", "reference": "Quendar"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "..."}],
     "reference": "...", "metric": "token_f1"}
`metric` (optional) names the metric that scores the item in its suite's `score`; every item is scored with every
metric anyway. The suite's name is its file name without the extension (`facts`), used in `<suite>/<metric>`
(QLORA_PROMOTE_METRIC), W&B keys and the output's `evaluation/<suite>.jsonl`. Torch-free: the launcher checks the
names at submit time.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from entrypoints.errors import DataError

METRICS = ("exact_match", "contains", "token_f1", "rouge_l")
SUMMARY_METRICS = (*METRICS, "score")  # `score`: the mean of each item's own metric
DEFAULT_METRIC = "contains"
SUITE_SUFFIXES = (".jsonl", ".ndjson")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SuiteItem:
    source: str  # "<uri>:<line>", for messages and the answers file
    messages: list[dict[str, str]] | None  # the conversation to answer (ends with a user turn); None: a plain prompt
    prompt: str  # the question as shown (the last user turn of `messages`)
    reference: str
    metric: str


@dataclass(frozen=True)
class Suite:
    name: str
    uri: str
    sha256: str  # of the file's bytes: two runs compare on a suite only when these agree
    items: tuple[SuiteItem, ...]


def suite_uris(setting: str) -> list[str]:
    return [part.strip() for part in setting.split(",") if part.strip()]


def suite_name(uri: str) -> str:
    """`s3://b/suites/facts.jsonl` -> `facts`."""
    name = PurePosixPath(uri.rstrip("/")).name
    for suffix in SUITE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_suite_setting(setting: str) -> list[str]:
    """Problems with QLORA_EVAL_SUITE's value itself (not the files): names, suffixes, duplicates."""
    problems, seen = [], {}
    for uri in suite_uris(setting):
        name = suite_name(uri)
        if not PurePosixPath(uri).name.lower().endswith(SUITE_SUFFIXES):
            problems.append(f"QLORA_EVAL_SUITE: {uri!r} is not a JSON Lines file: a suite is one .jsonl file")
        elif not _NAME.match(name):
            problems.append(f"QLORA_EVAL_SUITE: {uri!r}: the suite's name {name!r} (its file name) must start with a"
                            " letter or digit and hold only letters, digits, `_`, `.` and `-`: rename the file")
        elif name in seen:
            problems.append(f"QLORA_EVAL_SUITE: {seen[name]!r} and {uri!r} are both named {name!r} (a suite is named"
                            " by its file name): rename one of the files")
        seen.setdefault(name, uri)
    return problems


def load_suite(path: Path, uri: str, chat: bool) -> Suite:
    """Read and check one suite file (`path`, fetched from `uri`). Every problem is a DataError naming `uri:line`.

    `chat=False` (the `text` data format: no chat template) accepts plain prompts only."""
    if path.is_dir():
        raise DataError(f"{uri}: QLORA_EVAL_SUITE names a directory or prefix; a suite is one .jsonl file")
    data = path.read_bytes()
    items = []
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        items.append(_item(raw, f"{uri}:{line_no}", chat))
    if not items:
        raise DataError(f"{uri}: the evaluation suite is empty: give one question a line as"
                        ' {"prompt": ..., "reference": ...}, or remove it from QLORA_EVAL_SUITE')
    return Suite(suite_name(uri), uri, hashlib.sha256(data).hexdigest(), tuple(items))


def _item(raw: bytes, where: str, chat: bool) -> SuiteItem:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: not a JSON object ({exc}): one JSON object a line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    reference = record.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise DataError(f"{where}: no `reference` answer (a non-empty string): every question of a suite needs the"
                        " answer it is scored against")
    metric = record.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise DataError(f"{where}: unknown metric {metric!r}: use one of {', '.join(METRICS)} (or leave `metric` out:"
                        f" {DEFAULT_METRIC})")
    unknown = sorted(set(record) - {"prompt", "messages", "reference", "metric"})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}: a suite item has `prompt` or `messages`,"
                        " `reference` and optionally `metric`")
    if ("prompt" in record) == ("messages" in record):
        raise DataError(f"{where}: give the question as `prompt` (a string) or `messages` (a conversation), one of"
                        " them")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: `prompt` must be a non-empty string")
        messages = [{"role": "user", "content": prompt}] if chat else None
        return SuiteItem(where, messages, prompt, reference, metric)
    if not chat:
        raise DataError(f"{where}: `messages` needs a chat template, and QLORA_DATA_FORMAT=text trains without one:"
                        " give the question as `prompt`")
    messages = _messages(record["messages"], where)
    return SuiteItem(where, messages, messages[-1]["content"], reference, metric)


def _messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(turns):
        if (not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant")
                or not isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}")
        out.append({"role": turn["role"], "content": turn["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{where}: the last turn of `messages` must be the user's question (the model answers it;"
                        " the answer goes in `reference`)")
    return out


def fetch_suites(setting: str, dest: Path, endpoint_url: str, chat: bool) -> list[Suite]:
    """Download (s3://) and check every suite of QLORA_EVAL_SUITE, in the order given."""
    from entrypoints import storage

    suites = []
    for i, uri in enumerate(suite_uris(setting)):
        path = storage.fetch(uri, dest / str(i), endpoint_url=endpoint_url)
        suites.append(load_suite(path, uri, chat))
    return suites
