"""Training data: read data files, detect the record format per file, normalise to chat messages.

    python -m entrypoints.data PATH_OR_S3_URI [--format F] [--max-bad-records N]   # check data without training
    python -m entrypoints.data PATH_OR_S3_URI --report --tokenizer MODEL_DIR        # ... and what the job trains on

File types, by suffix (any case): JSON Lines (`.jsonl`, `.ndjson`), a JSON array (`.json`), Parquet (`.parquet`),
CSV/TSV with a header row (`.csv`, `.tsv`); JSON, JSON Lines, CSV and TSV may be compressed (`.gz`, `.bz2`,
`.xz`, or `.zst` with the `zstandard` package). In a directory, files that are not data (hidden, `_SUCCESS`
and other `_` markers, `*.crc`, README*, LICENSE*) are ignored and logged; any other file fails the job.
Formats users actually have, all normalised to `[{"role": ..., "content": ...}, ...]`:
messages (OpenAI), sharegpt (conversations from/value), alpaca (instruction/input/output),
dolly (instruction/context/response), prompt_completion, and text (plain text, trained on every token).
Torch-free; streams records (compressed files too), so memory does not grow with the file size; only a
`.json` array is read whole.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import os
import re
import signal
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any

from entrypoints.errors import DataError

log = logging.getLogger("qlora.data")

# Suffix (lower case) -> how the file is laid out. JSON Lines goes by two names.
LAYOUTS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
# Compression suffix -> codec. Parquet is left out: it compresses inside the file, and a compressed Parquet
# file cannot be read without decompressing it whole.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
READABLE_TYPES = (".jsonl, .ndjson, .json, .parquet, .csv or .tsv (the text ones optionally compressed: .gz, .bz2,"
                  " .xz, .zst)")
# Words in a training file's name that suggest held-out data (`eval.jsonl`, `test-00000-of-00001.parquet`).
HELD_OUT_WORDS = frozenset({"eval", "evaluation", "test", "testing", "valid", "validation", "val", "dev",
                            "heldout", "holdout"})
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


class EmptyAnswer(RecordError):
    """An assistant turn with no text: counted apart in the data report (an export that lost its answers)."""


@dataclass(frozen=True)
class Record:
    source: str  # "file:line" (JSONL, CSV), "file:record N" (JSON), "file:row N" (Parquet)
    data: dict[str, Any]


@dataclass(frozen=True)
class DataFile:
    path: Path
    layout: str  # jsonl, json, parquet, csv, tsv
    compression: str = ""  # "", gzip, bzip2, xz, zstd

    @property
    def kind(self) -> str:
        return f"{self.layout}+{self.compression}" if self.compression else self.layout


def file_type(name: str) -> tuple[str, str] | None:
    """(layout, compression) of a file name, case-insensitive; None when it is not a type we read."""
    lower = name.lower()
    compression = ""
    for suffix, codec in COMPRESSIONS.items():
        if lower.endswith(suffix):
            lower, compression = lower[: -len(suffix)], codec
            break
    layout = LAYOUTS.get(os.path.splitext(lower)[1])
    if layout is None or (layout == "parquet" and compression):
        return None
    return layout, compression


def _not_data(relative: PurePath) -> bool:
    """Files that travel with data sets but hold no records: skipped (and logged), never read, never an error."""
    if any(part.startswith(".") for part in relative.parts):  # hidden files and directories (.DS_Store, .git/)
        return True
    # Hadoop and Spark treat every path component that starts with `_` as hidden: `_temporary/` holds the attempts
    # of a write in progress (their part files are copies of the committed ones), `_delta_log/` a table's log.
    if any(part.startswith("_") for part in relative.parts[:-1]):
        return True
    if file_type(relative.name) is not None:
        return False
    name = relative.name.upper()
    # `_SUCCESS`, `_committed_*`, `_metadata`: Spark/Hadoop/Databricks markers. `.crc`: Hadoop checksums.
    # `.partial` (and boto3's `.partial.XXXXXXXX`): an interrupted download of entrypoints.storage.
    return (name.startswith("_") or name.endswith((".CRC", ".PARTIAL")) or ".PARTIAL." in name
            or name.startswith(("README", "LICENSE", "LICENCE")))


def _listing(paths: list[str], limit: int = 10) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def scan_data_files(path: Path) -> tuple[list[DataFile], list[Path]]:
    """The data files under `path` (a file or a directory) and the files ignored as not data.

    Raises DataError for a missing path, a file of a type we do not read, or a directory without data.
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path (inside a container, mount it first)")
    if path.is_file():
        kind = file_type(path.name)
        if kind is None:
            suffix = "".join(path.suffixes[-2:]) or path.name
            raise DataError(f"{path}: unsupported file type {suffix!r}; use {READABLE_TYPES}")
        files, ignored = [DataFile(path, *kind)], []
    else:
        files, ignored, unreadable = [], [], []
        for p in _walk(path):
            relative = p.relative_to(path)
            kind = file_type(p.name)
            if _not_data(relative):
                ignored.append(p)
            elif kind is None:
                unreadable.append(relative.as_posix())
            else:
                files.append(DataFile(p, *kind))
        if unreadable:
            raise DataError(f"{path}: {len(unreadable)} file(s) under this prefix are not a data type the job reads:"
                            f" {_listing(unreadable)}. Remove them from the prefix, or point the data setting"
                            f" (QLORA_DATA / QLORA_EVAL_DATA) at the data files only; readable: {READABLE_TYPES}")
        if not files:
            seen = f" (ignored as not data: {_listing([p.relative_to(path).as_posix() for p in ignored])})" if ignored else ""
            raise DataError(f"{path}: no data files found under this prefix{seen}; readable: {READABLE_TYPES};"
                            " check the URI")
    zstd = [f for f in files if f.compression == "zstd"]
    if zstd and not _have_zstandard():
        raise DataError(f"{_listing([str(f.path) for f in zstd])}: zstd-compressed, but the `zstandard` package is"
                        " not installed: `pip install zstandard` in the image, or decompress the file(s) (zstd -d)"
                        " or recompress them with gzip")
    return files, ignored


def _walk(root: Path) -> list[Path]:
    """Every file below `root`, following symbolic links (a linked file or directory is data the user pointed at;
    a link back to a directory already seen is not followed twice). A dangling link is a data error: what it
    named is gone, and skipping it would train on less than the settings say."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        for name in names:
            file = Path(folder, name)
            if not file.exists():
                raise DataError(f"{file}: a symbolic link to {os.readlink(file)!r}, which does not exist: restore its"
                                " target or remove the link")
            if file.is_file():
                found.append(file)
    return sorted(found)


def list_data_files(path: Path) -> list[Path]:
    return [f.path for f in scan_data_files(path)[0]]


def _have_zstandard() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def held_out_word(relative: str) -> str | None:
    """The word of a file's path that suggests held-out data (`eval`, `test`, ...), if any."""
    return next((w for w in re.findall(r"[a-z]+", relative.lower()) if w in HELD_OUT_WORDS), None)


def _empty(data_file: DataFile) -> DataError:
    what = " (it decompresses to nothing)" if data_file.compression else ""
    return DataError(f"{data_file.path}: the file is empty{what}; remove it or point the data setting elsewhere")


def iter_file_records(data_file: DataFile) -> Iterator[Record]:
    """The records of one file. A file that cannot be read (damaged, truncated) is a DataError naming it."""
    file = data_file.path
    if file.stat().st_size == 0:
        raise _empty(data_file)
    if data_file.layout == "parquet":
        yield from _iter_parquet(file)
        return
    reader = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "tsv": _iter_csv}[data_file.layout]
    position = ""
    try:
        with _open(data_file) as stream:
            for record in reader(data_file, stream):
                position = record.source[len(str(file)) + 1:]
                yield record
    except _stream_errors() as exc:
        where = f"after {'line ' if position.isdigit() else ''}{position}" if position else "at the start"
        what = f" as {data_file.compression}-compressed {data_file.layout.upper()}" if data_file.compression else ""
        raise DataError(f"{file}: cannot be read{what} {where} ({type(exc).__name__}: {exc}): the file is damaged"
                        " or truncated (an interrupted copy or upload?) or not readable by the job; re-create or"
                        " re-upload it, or remove it") from None


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def _open(data_file: DataFile) -> IO[bytes]:
    """A binary stream of the file's (decompressed) bytes: read piece by piece, never whole."""
    if data_file.compression == "gzip":
        return gzip.open(data_file.path, "rb")
    if data_file.compression == "bzip2":
        return bz2.open(data_file.path, "rb")
    if data_file.compression == "xz":
        return lzma.open(data_file.path, "rb")
    if data_file.compression == "zstd":
        return io.BufferedReader(_ZstdReader(open(data_file.path, "rb")))  # noqa: SIM115 - closed with the reader
    return open(data_file.path, "rb")  # noqa: SIM115 - the caller closes it


class _ZstdReader(io.RawIOBase):
    """Decompresses every frame of a .zst file, a slice of input at a time.

    A file that ends inside a frame raises EOFError, as gzip, bz2 and lzma do (zstandard's own stream_reader
    returns a short read there and the rest of the data would vanish silently). zstandard's decompressobj
    returns all the output of its input at once, and repetitive text compresses 1000:1, so the input slice
    shrinks as the ratio grows: each step yields about OUT_STEP_BYTES, whatever the ratio.
    """

    OUT_STEP_BYTES = 1 << 20
    READ_BYTES = 1 << 16

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self._raw = raw
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new()
        self._in_frame = False
        self._input, self._in_pos = b"", 0
        self._slice = 64  # at most doubles per step: the first bytes (headers) understate the ratio
        self._out, self._out_pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._out_pos >= len(self._out):
            if self._in_pos >= len(self._input):
                self._input, self._in_pos = self._raw.read(self.READ_BYTES), 0
                if not self._input:
                    if self._in_frame:
                        raise EOFError("the zstd data ended inside a frame")
                    return 0
            piece = self._input[self._in_pos:self._in_pos + self._slice]
            self._in_pos += len(piece)
            self._in_frame = True
            self._out, self._out_pos = self._frame.decompress(piece), 0
            if self._frame.eof:  # a frame ended; the next one starts with the input it did not use
                rest = self._frame.unused_data
                self._input, self._in_pos = rest + self._input[self._in_pos:], 0
                self._frame, self._in_frame = self._new(), False
            ratio = max(len(self._out), 1) / max(len(piece), 1)
            self._slice = int(min(self.READ_BYTES, 2 * self._slice, max(64, self.OUT_STEP_BYTES / ratio)))
        n = min(len(buffer), len(self._out) - self._out_pos)
        buffer[:n] = self._out[self._out_pos:self._out_pos + n]
        self._out_pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _iter_jsonl(data_file: DataFile, stream: IO[bytes]) -> Iterator[Record]:
    file = data_file.path
    line_no = 0
    for line_no, raw in enumerate(_bounded_lines(stream), start=1):  # noqa: B007 - line_no is read after the loop
        if isinstance(raw, int):  # a line longer than any record may be: its length, never its bytes
            yield Record(f"{file}:{line_no}", {"__error__": f"the line is {raw / 2**20:.1f} MiB; records over"
                                               f" {MAX_RECORD_BYTES // 2**20} MiB are refused (far beyond any context"
                                               " window): split it into several records or drop it"})
            continue
        if not raw.strip():
            continue
        where = f"{file}:{line_no}"
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
    if line_no == 0:
        raise _empty(data_file)


def _bounded_lines(stream: IO[bytes]) -> Iterator[bytes | int]:
    """The lines of a stream, each read up to MAX_RECORD_BYTES: a longer line (a whole JSON array saved as .jsonl, a
    multi-GB line) is skipped in pieces and reported by its length, so memory stays bounded whatever the file holds."""
    while True:
        line = stream.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_RECORD_BYTES or line.endswith(b"\n"):
            yield line
            continue
        length = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(1 << 20)
            if not line:
                break
            length += len(line)
        yield length


def _iter_json(data_file: DataFile, stream: IO[bytes]) -> Iterator[Record]:
    file = data_file.path
    raw = stream.read()  # a JSON array is one document: it is parsed whole
    if not raw:
        raise _empty(data_file)
    try:
        data = json.loads(raw.decode("utf-8"))
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


# Cells of these columns hold a list of turns, written as JSON (a CSV cell can only hold text).
CSV_JSON_COLUMNS = ("messages", "conversations")


def _iter_csv(data_file: DataFile, stream: IO[bytes]) -> Iterator[Record]:
    """CSV/TSV with a header row naming the fields; one record per row (a quoted cell may span lines)."""
    file = data_file.path
    line_no = 0

    def lines() -> Iterable[str]:
        nonlocal line_no
        for line_no, raw in enumerate(stream, start=1):  # noqa: B007 - line_no is read by the caller
            try:
                yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # -sig: spreadsheets write a BOM
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}:{line_no}: not valid UTF-8 at byte {exc.start}; re-encode the file as"
                                " UTF-8") from None

    # A cell as large as a record is allowed (the csv module's default limit is 128 KiB); process-wide setting.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES))
    reader = csv.reader(lines(), delimiter="\t" if data_file.layout == "tsv" else ",", strict=True)
    header: list[str] | None = None
    while True:
        start = line_no + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"{file}:{line_no}: not valid {data_file.layout.upper()} ({exc}); fix the quoting"
                            " (a cell holding the delimiter, a quote or a line break must be quoted, with quotes"
                            " doubled)") from None
        if row is None:
            break
        if not row or row == [""]:
            continue
        if header is None:
            header = [name.strip() for name in row]
            duplicates = sorted({n for n in header if header.count(n) > 1})
            if duplicates:
                raise DataError(f"{file}:{start}: the header names {duplicates} more than once; give every column"
                                " a distinct name")
            continue
        where = f"{file}:{start}"
        if len(row) != len(header):
            yield Record(where, {"__error__": f"the row has {len(row)} fields where the header has {len(header)}"
                                 " (an unquoted delimiter in a cell?)"})
            continue
        data: dict[str, Any] = dict(zip(header, row, strict=True))
        try:
            for column in CSV_JSON_COLUMNS:
                if data.get(column):
                    data[column] = json.loads(data[column])
        except json.JSONDecodeError as exc:
            yield Record(where, {"__error__": f"the `{column}` cell is not a JSON list of turns ({exc.msg})"})
            continue
        yield Record(where, data)
    if line_no == 0:
        raise _empty(data_file)


def _iter_parquet(file: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data error
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                row += 1
                yield Record(f"{file}:row {row}", item)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file}: not a readable Parquet file: damaged after row {row} ({exc}); re-create or"
                        " re-upload it, or remove it") from None


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
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    if not isinstance(value, str):
        raise RecordError(f"field `{field}` must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud83d" alone: half of an emoji, no character at all
        raise RecordError(f"field `{field}` holds {value[exc.start]!r}, half of a UTF-16 surrogate pair (a broken"
                          " emoji or character): fix or drop the record") from None
    return value


def _require(data: dict[str, Any], field: str) -> Any:
    if field not in data or data[field] is None:
        raise RecordError(f"missing field `{field}`")
    return data[field]


def _turns(items: Any, field: str, role_key: str, content_key: str) -> list[dict[str, Any]]:
    """The turns of a conversation. An assistant turn's `weight` (OpenAI's fine-tuning format: 0 or 1) is kept as
    `"weight": 0` on the message when 0: that answer stays in the context but is not trained on."""
    if not isinstance(items, list) or not items:
        raise RecordError(f"field `{field}` must be a non-empty list of turns")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RecordError(f"{field}[{i}] must be an object with `{role_key}` and `{content_key}`")
        raw_role = turn.get(role_key)
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise RecordError(f"{field}[{i}].{role_key}={raw_role!r} is not a known role (system, user, assistant)")
        message: dict[str, Any] = {"role": role,
                                   "content": _text(turn.get(content_key, ""), f"{field}[{i}].{content_key}")}
        weight = turn.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                raise RecordError(f"{field}[{i}].weight={weight!r}: a weight is 0 (do not train on this answer) or 1,"
                                  " and only on assistant turns")
            if weight == 0:
                message["weight"] = 0
        messages.append(message)
    return messages


def _with_system(data: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A top-level `system` field (many ShareGPT and chat exports keep the system prompt beside the turns) becomes
    the first turn; with a system turn of its own as well, the record is ambiguous."""
    system = data.get("system")
    if system is None or system == "":
        return messages
    text = _text(system, "system")
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] == text:
            return messages
        raise RecordError("both a top-level `system` field and a system turn, with different texts: keep one")
    return [{"role": "system", "content": text}, *messages]


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
        messages = _with_system(data, _turns(_require(data, "messages"), "messages", "role", "content"))
    elif fmt == "sharegpt":
        messages = _with_system(data, _turns(_require(data, "conversations"), "conversations", "from", "value"))
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
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in body):
        raise RecordError("every assistant turn has weight 0: nothing in this conversation is trained on")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"turn {i + 1} is `{m['role']}` where `{expected}` was expected: turns must alternate"
                              " user/assistant (merge duplicate roles into one turn)")
    for i, m in enumerate(body):
        if m["role"] == "assistant" and not m["content"].strip():
            raise EmptyAnswer(f"assistant turn {i + 1} is empty")
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    return head + body


@dataclass
class FileStats:
    file: str
    type: str  # jsonl, json, parquet, csv, tsv; "+gzip" etc. when compressed
    fmt: str = ""  # the record format used for this file ("" while none of its records was usable)
    records: int = 0
    skipped: int = 0


@dataclass
class LoadStats:
    records: int = 0
    skipped: int = 0
    fmt: str = ""  # the distinct formats of the files, in reading order: "alpaca" or "alpaca,sharegpt"
    files: list[FileStats] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files under the prefix skipped as not data
    empty_answers: int = 0  # of `skipped`: records skipped because an answer was empty


def load_conversations(path: Path, fmt: str = "auto", max_bad_records: int = 0, stats: LoadStats | None = None,
                       *, held_out: bool = False, check: Callable[[Any], None] | None = None
                       ) -> Iterator[list[dict[str, str]] | str]:
    """Stream normalised records. Bad records fail the job, or are skipped within the budget (over all files).

    With `fmt="auto"` each file's format is detected from its first usable record. `held_out=False` (training
    data) warns about files whose names suggest eval/test data.
    """
    stats = stats if stats is not None else LoadStats()
    files, ignored = scan_data_files(path)
    if ignored:
        stats.ignored = [str(p) for p in ignored]
        log.info("%s: ignoring %d file(s) that are not data: %s", path, len(ignored),
                 _listing([p.relative_to(path).as_posix() for p in ignored], limit=20))
    for data_file in files:
        relative = data_file.path.name if data_file.path == path else data_file.path.relative_to(path).as_posix()
        word = None if held_out else held_out_word(relative)
        if word:
            log.warning("%s: the name (%r) suggests held-out data, but it is read as training data; if it is eval"
                        " data, move it out of the training data and give it as QLORA_EVAL_DATA", data_file.path, word)
        file_stats = FileStats(str(data_file.path), data_file.kind, "" if fmt == "auto" else fmt)
        stats.files.append(file_stats)
        for record in iter_file_records(data_file):
            try:
                if not file_stats.fmt:
                    if "__error__" in record.data:
                        raise RecordError(record.data["__error__"])
                    file_stats.fmt = detect_format(record.data)
                    stats.fmt = ",".join(dict.fromkeys(f.fmt for f in stats.files if f.fmt))
                item = normalize(record.data, file_stats.fmt)
                if check is not None:  # e.g. the chat template must accept it (raises RecordError if not)
                    check(item)
            except RecordError as exc:
                stats.skipped += 1
                file_stats.skipped += 1
                stats.empty_answers += isinstance(exc, EmptyAnswer)
                if stats.skipped > max_bad_records:
                    budget = ("set QLORA_MAX_BAD_RECORDS to skip bad records" if max_bad_records == 0
                              else f"more than QLORA_MAX_BAD_RECORDS={max_bad_records} bad records")
                    raise DataError(f"{record.source}: {exc} ({budget})") from None
                log.warning("skipping %s: %s", record.source, exc)
                continue
            stats.records += 1
            file_stats.records += 1
            yield item
        stats.fmt = ",".join(dict.fromkeys(f.fmt for f in stats.files if f.fmt))
        log.info("%s: %s, format %s (%s): %d record(s) read, %d bad skipped", data_file.path, data_file.kind,
                 file_stats.fmt or "none", "detected" if fmt == "auto" else "set", file_stats.records,
                 file_stats.skipped)
    if stats.records == 0:
        raise DataError(f"{path}: no usable records ({stats.skipped} skipped)")
    if stats.skipped:
        log.warning("skipped %d bad record(s) of %d in %s", stats.skipped, stats.records + stats.skipped, path)


INSPECT_HELP = """Check training data without training: read it the way the job reads QLORA_DATA (the same file
types, format detection per file and bad-record budget) and print JSON with the formats, the records read
and skipped per file and in total, the files ignored as not data, and the first normalised record. The log
(one line per file, warnings) goes to stderr. An s3:// URI is downloaded to a temporary directory that is
removed afterwards.

file types: .jsonl/.ndjson, .json (one array), .parquet, .csv/.tsv (a header row names the fields), in any
case; all but Parquet may be compressed (.gz, .bz2, .xz; .zst needs the zstandard package). In a directory,
hidden files, _SUCCESS and other _ markers, *.crc, README* and LICENSE* are ignored (and logged); a file of
any other type is a data error.

--report also tokenizes the records the way the job does (the model's tokenizer and chat template) and adds the
job's data report: per file, the records read and skipped; token lengths before truncation (percentiles); the
records and answer tokens max_seq_length cuts; records repeating an earlier prompt exactly; answers skipped as
empty; the tokens trained on. It fails (exit 3) where the job would, before any GPU time: when more records are cut
or duplicated than QLORA_MAX_TRUNCATED_FRACTION / QLORA_MAX_DUPLICATE_FRACTION allow.

A mix: several sources, comma-separated (s3://b/new/,s3://b/replay/), with --weights 0.7,0.3 (or
QLORA_DATA_WEIGHTS). The output adds `sources` (records read and skipped per source) and names each file's source;
--report adds `mix`: per source its weight, the records read, the records drawn into the training mix and their
share, drawn as the job draws them (QLORA_DATA_MIX_STOPPING, --seed or QLORA_SEED), from every record (the job first
holds out eval_fraction of each source, so its counts are that much lower)."""

EXIT_CODES_HELP = """exit codes:
  0  the data reads cleanly (bad records within the budget)
  2  bad arguments or settings
  3  data error: the message names the file (and line) and the fix; with --report, also too many records
     cut or duplicated (the report is printed first)
  4  with --report: the tokenizer cannot be loaded
  5  storage error: S3 unreachable, access denied, or nothing at the URI"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m entrypoints.data",
        description=INSPECT_HELP,
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a local file or directory, or an s3:// URI of one object or a prefix; several,"
                                 " comma-separated, for a mix (as QLORA_DATA takes them)")
    ap.add_argument("--format", choices=("auto",) + FORMATS,
                    help="record format of every file (default: QLORA_DATA_FORMAT, else auto: detected per file)")
    ap.add_argument("--max-bad-records", metavar="N",
                    help="skip and count up to N malformed records before failing (default: QLORA_MAX_BAD_RECORDS,"
                         " else 0: the first bad record fails)")
    ap.add_argument("--s3-endpoint-url", metavar="URL",
                    help="S3-compatible endpoint for s3:// URIs (default: QLORA_S3_ENDPOINT_URL, else AWS)")
    ap.add_argument("--weights", metavar="W1,W2",
                    help="the mix's weights, one per source (default: QLORA_DATA_WEIGHTS; none: every record of each)")
    ap.add_argument("--seed", metavar="N", help="with --report: the seed the mix is drawn with (default: QLORA_SEED,"
                                                " else the job's)")
    ap.add_argument("--report", action="store_true",
                    help="also tokenize the records and print the job's data report (see above)")
    ap.add_argument("--tokenizer", metavar="MODEL",
                    help="with --report: the model whose tokenizer and chat template are used: a local directory, an"
                         " s3:// prefix (only its tokenizer files are downloaded) or a Hub id (default: QLORA_MODEL)")
    ap.add_argument("--max-seq-length", metavar="N",
                    help="with --report: the job's max_seq_length (default: QLORA_MAX_SEQ_LENGTH, else the job's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The job's own parser reads these settings, so the inspector interprets them exactly as the job does.
    names = ("QLORA_DATA_FORMAT", "QLORA_MAX_BAD_RECORDS", "QLORA_S3_ENDPOINT_URL", "QLORA_DATA_WEIGHTS",
             "QLORA_DATA_MIX_STOPPING", "QLORA_SEED")
    if args.report:
        names += ("QLORA_MODEL", "QLORA_MODEL_REVISION", "QLORA_MAX_SEQ_LENGTH", "QLORA_CHAT_TEMPLATE",
                  "QLORA_ASSISTANT_ONLY_LOSS", "QLORA_TRUST_REMOTE_CODE", "QLORA_MAX_TRUNCATED_FRACTION",
                  "QLORA_MAX_DUPLICATE_FRACTION")
    env = {name: os.environ[name] for name in names if name in os.environ}
    flags = [(flag, value) for flag, value in (("--data-format", args.format), ("--max-bad-records", args.max_bad_records),
                                               ("--s3-endpoint-url", args.s3_endpoint_url), ("--model", args.tokenizer),
                                               ("--max-seq-length", args.max_seq_length),
                                               ("--data-weights", args.weights), ("--seed", args.seed))
             if value is not None]
    # SIGTERM (a scheduler's stop, `timeout`) ends the inspection like Ctrl-C: through the `with` below, so the
    # downloads and the report's caches in its scratch directory are removed, with the shell's exit code for it.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(args, env, flags)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was kept", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    print("stopped (SIGTERM): nothing was kept", file=sys.stderr)
    raise SystemExit(128 + signum)


def _main(args: argparse.Namespace, env: dict[str, str], flags: list[tuple[str, str]]) -> int:
    from entrypoints.config import parse_config
    from entrypoints.errors import ConfigError

    with tempfile.TemporaryDirectory(prefix="qlora-data-") as tmp:
        if args.report:  # the report's caches go to a scratch base dir; every record is reported (none held out)
            flags += [("--base-dir", str(Path(tmp, "job"))), ("--eval-fraction", "0")]
        try:
            cfg = parse_config({**env, "QLORA_DATA": args.path}, [part for pair in flags for part in pair],
                               check_paths=False)
        except ConfigError as exc:
            print(f"{exc.kind}: {exc}", file=sys.stderr)
            return exc.exit_code
        return _inspect(cfg, args.path, Path(tmp), args.report)


def _inspect(cfg: Any, given: str, tmp: Path, report: bool) -> int:
    from entrypoints import storage
    from entrypoints.errors import JobError

    sources = cfg.data_sources  # `given`, or the sources of a mix
    mixing = len(sources) > 1
    all_stats = [LoadStats() for _ in sources]
    first = None
    # Each s3:// source is downloaded to a folder of its own; a local one is read where it is.
    local = [tmp / "data" / str(i) if storage.is_s3(uri) else Path(uri) for i, uri in enumerate(sources)]

    def shown(text: str) -> str:
        for path, uri in zip(local, sources, strict=True):
            text = _shown(text, path, uri)
        return text

    try:
        for i, (uri, stats) in enumerate(zip(sources, all_stats, strict=True)):
            if storage.is_s3(uri):
                local[i] = storage.fetch(uri, local[i], endpoint_url=cfg.s3_endpoint_url)
            for item in load_conversations(local[i], cfg.data_format, cfg.max_bad_records, stats=stats):
                first = first or item
        tokenized = _tokenized_stats(cfg, local if mixing else local[0], tmp) if report else None
    except JobError as exc:
        # Downloaded files are named by their URI, not by the temporary directory they were read from.
        print(f"{exc.kind}: {shown(str(exc))}", file=sys.stderr)
        return exc.exit_code
    files = [{**({"source": uri} if mixing else {}), "file": shown(f.file), "type": f.type, "format": f.fmt,
              "records": f.records, "skipped": f.skipped} for uri, stats in zip(sources, all_stats, strict=True)
             for f in stats.files]
    result = {"format": ",".join(dict.fromkeys(f for st in all_stats for f in st.fmt.split(",") if f)),
              "records": sum(st.records for st in all_stats), "skipped": sum(st.skipped for st in all_stats),
              "files": files, "ignored": [shown(p) for st in all_stats for p in st.ignored], "first": first}
    if mixing:
        weights = cfg.data_mix_weights
        result["sources"] = [{"source": uri, "weight": round(weights[i], 6) if weights else None,
                              "records": st.records, "skipped": st.skipped}
                             for i, (uri, st) in enumerate(zip(sources, all_stats, strict=True))]
    print(json.dumps({**result, "report": tokenized} if report else result, indent=2, ensure_ascii=False))
    if tokenized is not None:
        from entrypoints.dataset import check_data_limits

        try:
            check_data_limits(tokenized, cfg.max_seq_length, cfg.max_truncated_fraction, cfg.max_duplicate_fraction,
                              cfg.data_weights, cfg.data_mix_stopping)
        except JobError as exc:
            print(f"{exc.kind}: {exc}", file=sys.stderr)
            return exc.exit_code
    return 0


def _tokenized_stats(cfg: Any, local: Path | list[Path], tmp: Path) -> dict[str, Any]:
    """The job's data report: the job's own reading, templating, tokenizing and counting (entrypoints.dataset)."""
    from entrypoints.dataset import prepare_data
    from entrypoints.train import load_tokenizer_and_template

    tokenizer, template = load_tokenizer_and_template(cfg, _tokenizer_dir(cfg, tmp / "tokenizer"))
    return prepare_data(cfg, local, None, tokenizer, template, enforce_limits=False).stats


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def _tokenizer_dir(cfg: Any, dest: Path) -> Path | str:
    """A local directory or Hub id as it is; of an s3:// model prefix, only the tokenizer's files (not the weights)."""
    from entrypoints import storage

    if not storage.is_s3(cfg.model):
        return cfg.model
    objects = [o for o in storage.list_objects(cfg.model.rstrip("/") + "/", endpoint_url=cfg.s3_endpoint_url)
               if o.relative in TOKENIZER_FILES]
    if not objects:
        raise DataError(f"{cfg.model}: no tokenizer files found under this prefix ({', '.join(TOKENIZER_FILES[:3])}"
                        "...): point --tokenizer at the model's directory or prefix")
    for obj in objects:
        storage.download_file(obj.uri, dest / obj.relative, size=obj.size, endpoint_url=cfg.s3_endpoint_url)
    return dest


def _shown(text: str, local: Path, given: str) -> str:
    """For an s3:// URI: `text` with the temporary directory it was downloaded to replaced by the URI."""
    from entrypoints.storage import is_s3

    return text.replace(str(local), given.rstrip("/")) if is_s3(given) else text


if __name__ == "__main__":
    sys.exit(main())
