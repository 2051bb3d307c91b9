"""Data formats, detection, record errors with file and line, the skip budget; a property test."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrypoints.data import (
    FORMATS,
    LoadStats,
    RecordError,
    check_conversation,
    detect_format,
    load_conversations,
    normalize,
)
from entrypoints.errors import DataError

U, A = "user", "assistant"
CASES = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello"}]},
    "alpaca": {"instruction": "Hi", "input": "", "output": "Hello"},
    "dolly": {"instruction": "Hi", "context": "ctx", "response": "Hello", "category": "qa"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    "text": {"text": "Hello world"},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_and_normalize_every_format(fmt):
    record = CASES[fmt]
    assert detect_format(record) == fmt
    out = normalize(record, fmt)
    if fmt == "text":
        assert out == "Hello world"
        return
    assert out[-1] == {"role": A, "content": "Hello"}
    assert out[-2]["role"] == U and out[-2]["content"].startswith("Hi")
    if fmt == "dolly":
        assert out[-2]["content"] == "Hi\n\nctx"
    if fmt in ("messages", "sharegpt"):
        assert out[0] == {"role": "system", "content": "Be brief."}


def test_openai_content_parts_and_trl_conversational_prompt_completion():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert normalize(rec, "messages")[0]["content"] == "ab"
    rec = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    assert normalize(rec, "prompt_completion") == [{"role": U, "content": "q"}, {"role": A, "content": "a"}]


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, "turns must alternate"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "not a known role"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "is empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ({"instruction": "x"}, "cannot detect the format"),
])
def test_bad_records(record, message):
    with pytest.raises(RecordError, match=message):
        normalize(record, detect_format(record))


def test_trailing_user_turn_dropped():
    msgs = [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": U, "content": "again?"}]
    assert check_conversation(msgs) == msgs[:2]


def _write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def test_error_names_file_and_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["alpaca"]), "", "{broken", json.dumps(CASES["alpaca"])])
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON .*QLORA_MAX_BAD_RECORDS"):
        list(load_conversations(f))


def test_skip_budget_counts(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["alpaca"]), "{broken", b"\xff\xfe\n", json.dumps(CASES["alpaca"])])
    stats = LoadStats()
    assert len(list(load_conversations(f, max_bad_records=2, stats=stats))) == 2
    assert (stats.records, stats.skipped, stats.fmt) == (2, 2, "alpaca")
    with pytest.raises(DataError, match="more than QLORA_MAX_BAD_RECORDS=1"):
        list(load_conversations(f, max_bad_records=1))


def test_non_utf8_line_named(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["text"]), b"\xff\xfe{}\n"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        list(load_conversations(f))


def test_json_array_parquet_and_prefix(tmp_path):
    d = tmp_path / "prefix"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([CASES["dolly"], CASES["dolly"]]))
    pq.write_table(pa.Table.from_pylist([CASES["dolly"]] * 3), d / "b.parquet")
    (d / "notes.txt").write_text("ignored")
    assert len(list(load_conversations(d))) == 5


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        list(load_conversations(tmp_path / "empty.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no .jsonl, .json or .parquet files"):
        list(load_conversations(tmp_path / "dir"))
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        list(load_conversations(tmp_path / "data.csv"))


def test_explicit_format_mismatch_names_field(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["alpaca"])])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field `messages`"):
        list(load_conversations(f, fmt="messages"))


role = st.sampled_from(["system", "user", "assistant", "human", "gpt", "robot", None])
turn = st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=20), st.integers(), st.none())})


@settings(max_examples=300, deadline=None)
@given(st.lists(turn, max_size=6))
def test_normalizer_property(turns):
    """Any input either fails with a RecordError or yields a conversation every chat template accepts."""
    try:
        out = normalize({"messages": turns}, "messages")
    except RecordError:
        return
    body = out[1:] if out[0]["role"] == "system" else out
    assert body and all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body))
    assert body[-1]["role"] == "assistant" and all(isinstance(m["content"], str) for m in out)
    assert all(m["content"].strip() for m in body if m["role"] == "assistant")
