"""Training data: read JSONL / JSON / Parquet files, detect the record format, normalise to chat messages.

    python -m entrypoints.data PATH [--format auto]   # print format, counts and the first normalised record

Formats users actually have, all normalised to `[{"role": ..., "content": ...}, ...]`:
messages (OpenAI), sharegpt (conversations from/value), alpaca (instruction/input/output),
dolly (instruction/context/response), prompt_completion, and text (plain text, trained on every token).
Torch-free; streams records, so memory does not grow with the file size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.errors import DataError

log = logging.getLogger("qlora.data")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = ("messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "text")
# No context window holds a record this large (128k tokens are about 0.5 MB of text); tokenizing one would
# take minutes and gigabytes for a sample that is truncated anyway. Larger lines are bad records.
MAX_RECORD_BYTES = 8 * 2**20
ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
}


class RecordError(ValueError):
    """One record is malformed; the message says which field and how."""


@dataclass(frozen=True)
class Record:
    source: str  # "file:line" (JSONL), "file:record N" (JSON), "file:row N" (Parquet)
    data: dict[str, Any]


def list_data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path}: no .jsonl, .json or .parquet files found under this prefix; check the URI")
    return files


def iter_records(path: Path) -> Iterator[Record]:
    """Yield records from every data file under `path`, with their source position for error messages."""
    for file in list_data_files(path):
        if file.stat().st_size == 0:
            raise DataError(f"{file}: the file is empty; remove it or point the data setting elsewhere")
        if file.suffix == ".jsonl":
            yield from _iter_jsonl(file)
        elif file.suffix == ".json":
            yield from _iter_json(file)
        else:
            yield from _iter_parquet(file)


def _iter_jsonl(file: Path) -> Iterator[Record]:
    with open(file, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{file}:{line_no}"
            if len(raw) > MAX_RECORD_BYTES:
                yield Record(where, {"__error__": f"the line is {len(raw) / 2**20:.1f} MiB; records over"
                                     f" {MAX_RECORD_BYTES // 2**20} MiB are refused (far beyond any context window):"
                                     " split it into several records or drop it"})
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(where, {"__error__": f"not valid UTF-8 at byte {exc.start}; re-encode the file as UTF-8"})
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Record(where, {"__error__": f"invalid JSON ({exc.msg} at column {exc.colno})"})
                continue
            if not isinstance(data, dict):
                yield Record(where, {"__error__": f"expected a JSON object per line, got {type(data).__name__}"})
                continue
            yield Record(where, data)


def _iter_json(file: Path) -> Iterator[Record]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); a .json file must hold one array of"
                        " records (use .jsonl for one record per line)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON array of records, got {type(data).__name__}")
    for i, item in enumerate(data, start=1):
        where = f"{file}:record {i}"
        yield Record(where, item if isinstance(item, dict) else {"__error__": f"expected an object, got {type(item).__name__}"})


def _iter_parquet(file: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data error
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            row += 1
            yield Record(f"{file}:row {row}", item)


def detect_format(data: dict[str, Any]) -> str:
    keys = set(data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise RecordError(f"cannot detect the format from the fields {sorted(keys)}: expected `messages`, "
                      "`conversations`, instruction/output, instruction/response, prompt/completion or `text`"
                      " (or set QLORA_DATA_FORMAT)")


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    raise RecordError(f"field `{field}` must be a string, got {type(value).__name__}")


def _require(data: dict[str, Any], field: str) -> Any:
    if field not in data or data[field] is None:
        raise RecordError(f"missing field `{field}`")
    return data[field]


def _turns(items: Any, field: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RecordError(f"field `{field}` must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RecordError(f"{field}[{i}] must be an object with `{role_key}` and `{content_key}`")
        raw_role = turn.get(role_key)
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise RecordError(f"{field}[{i}].{role_key}={raw_role!r} is not a known role (system, user, assistant)")
        messages.append({"role": role, "content": _text(turn.get(content_key, ""), f"{field}[{i}].{content_key}")})
    return messages


def normalize(data: dict[str, Any], fmt: str) -> list[dict[str, str]] | str:
    """One record -> chat messages (or a plain string for the `text` format). Raises RecordError."""
    if "__error__" in data:
        raise RecordError(data["__error__"])
    if fmt == "text":
        text = _text(_require(data, "text"), "text")
        if not text.strip():
            raise RecordError("field `text` is empty")
        return text
    if fmt == "messages":
        messages = _turns(_require(data, "messages"), "messages", "role", "content")
    elif fmt == "sharegpt":
        messages = _turns(_require(data, "conversations"), "conversations", "from", "value")
    elif fmt == "alpaca":
        instruction = _text(_require(data, "instruction"), "instruction")
        extra = _text(data.get("input") or "", "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(_require(data, "output"), "output")}]
        if data.get("system"):
            messages.insert(0, {"role": "system", "content": _text(data["system"], "system")})
    elif fmt == "dolly":
        instruction = _text(_require(data, "instruction"), "instruction")
        context = _text(data.get("context") or "", "context")
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(_require(data, "response"), "response")}]
    elif fmt == "prompt_completion":
        prompt, completion = _require(data, "prompt"), _require(data, "completion")
        if isinstance(prompt, list):  # TRL's conversational prompt/completion
            messages = _turns(prompt, "prompt", "role", "content") + _turns(completion, "completion", "role", "content")
        else:
            messages = [{"role": "user", "content": _text(prompt, "prompt")},
                        {"role": "assistant", "content": _text(completion, "completion")}]
    else:
        raise RecordError(f"unknown format {fmt!r}")
    return check_conversation(messages)


def check_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Enforce the shape every chat template accepts: optional system, then user/assistant alternating."""
    if messages and messages[0]["role"] == "system":
        body = messages[1:]
    else:
        body = messages
    if any(m["role"] == "system" for m in body):
        raise RecordError("a system message may only come first")
    # A trailing user turn has no answer to learn from: drop it rather than fail the record.
    while body and body[-1]["role"] == "user":
        body = body[:-1]
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError("no assistant turn: every conversation needs at least one assistant answer to train on")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"turn {i + 1} is `{m['role']}` where `{expected}` was expected: turns must alternate"
                              " user/assistant (merge duplicate roles into one turn)")
    for i, m in enumerate(body):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"assistant turn {i + 1} is empty")
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    return head + body


@dataclass
class LoadStats:
    records: int = 0
    skipped: int = 0
    fmt: str = ""


def load_conversations(path: Path, fmt: str = "auto", max_bad_records: int = 0, stats: LoadStats | None = None
                       ) -> Iterator[list[dict[str, str]] | str]:
    """Stream normalised records. Bad records fail the job, or are skipped within the budget."""
    stats = stats if stats is not None else LoadStats()
    detected = None if fmt == "auto" else fmt
    for record in iter_records(path):
        try:
            if detected is None:
                if "__error__" in record.data:
                    raise RecordError(record.data["__error__"])
                detected = detect_format(record.data)
                log.info("data format: %s (detected from %s)", detected, record.source)
            stats.fmt = detected
            item = normalize(record.data, detected)
        except RecordError as exc:
            stats.skipped += 1
            if stats.skipped > max_bad_records:
                budget = ("set QLORA_MAX_BAD_RECORDS to skip bad records" if max_bad_records == 0
                          else f"more than QLORA_MAX_BAD_RECORDS={max_bad_records} bad records")
                raise DataError(f"{record.source}: {exc} ({budget})") from None
            log.warning("skipping %s: %s", record.source, exc)
            continue
        stats.records += 1
        yield item
    if stats.records == 0:
        raise DataError(f"{path}: no usable records ({stats.skipped} skipped)")
    if stats.skipped:
        log.warning("skipped %d bad record(s) of %d in %s", stats.skipped, stats.records + stats.skipped, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Inspect a training data file or directory.")
    ap.add_argument("path")
    ap.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = LoadStats()
    first = None
    try:
        for item in load_conversations(Path(args.path), args.format, stats=stats):
            first = first or item
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"format": stats.fmt, "records": stats.records, "skipped": stats.skipped, "first": first}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
