"""Data formats, detection, record errors with file and line, the skip budget, file types and compression,
the `python -m entrypoints.data` inspector as a command; a property test."""

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import subprocess
import sys
from pathlib import Path

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
    held_out_word,
    load_conversations,
    normalize,
)
from entrypoints.errors import EXIT_CONFIG, EXIT_DATA, DataError

REPO = Path(__file__).resolve().parents[2]

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
    (d / "README.md").write_text("not data: ignored")
    assert len(list(load_conversations(d))) == 5


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        list(load_conversations(tmp_path / "empty.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no data files found under this prefix; readable: .jsonl, .ndjson"):
        list(load_conversations(tmp_path / "dir"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'; use .jsonl, .ndjson, .json, .parquet, .csv"):
        list(load_conversations(tmp_path / "data.txt"))


def test_explicit_format_mismatch_names_field(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["alpaca"])])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field `messages`"):
        list(load_conversations(f, fmt="messages"))


def _alpaca_lines(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}).encode() + b"\n"
                    for i in range(start, start + n))


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def test_every_common_file_form_in_a_directory_is_read(tmp_path):
    """Finding 7: .jsonl.gz, .ndjson and upper-case suffixes were skipped without a word."""
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_alpaca_lines(3)))
    (tmp_path / "b.NDJSON").write_bytes(_alpaca_lines(2))
    (tmp_path / "C.JSONL").write_bytes(_alpaca_lines(4))
    (tmp_path / "d.jsonl").write_bytes(_alpaca_lines(1))
    (tmp_path / "e.Json.BZ2").write_bytes(bz2.compress(json.dumps([CASES["alpaca"]] * 2).encode()))
    (tmp_path / "f.ndjson.xz").write_bytes(lzma.compress(_alpaca_lines(5)))
    (tmp_path / "g.jsonl.zst").write_bytes(_zstd(_alpaca_lines(6)))
    stats = LoadStats()
    assert len(list(load_conversations(tmp_path, stats=stats))) == 23
    assert (stats.records, stats.skipped, stats.fmt) == (23, 0, "alpaca")
    got = {Path(f.file).name: (f.type, f.records) for f in stats.files}
    assert got == {"a.jsonl.gz": ("jsonl+gzip", 3), "b.NDJSON": ("jsonl", 2), "C.JSONL": ("jsonl", 4),
                   "d.jsonl": ("jsonl", 1), "e.Json.BZ2": ("json+bzip2", 2), "f.ndjson.xz": ("jsonl+xz", 5),
                   "g.jsonl.zst": ("jsonl+zstd", 6)}


def test_single_upper_case_and_compressed_files(tmp_path):
    (tmp_path / "TRAIN.JSONL").write_bytes(_alpaca_lines(2))
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(_alpaca_lines(3)))
    assert len(list(load_conversations(tmp_path / "TRAIN.JSONL"))) == 2
    assert len(list(load_conversations(tmp_path / "train.jsonl.gz"))) == 3


def test_format_is_detected_per_file_and_each_file_is_logged(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_bytes(_alpaca_lines(2))
    _write(tmp_path / "b.jsonl", [json.dumps(CASES["sharegpt"]), "{broken", json.dumps(CASES["sharegpt"])])
    stats = LoadStats()
    with caplog.at_level(logging.INFO, logger="qlora.data"):
        assert len(list(load_conversations(tmp_path, max_bad_records=1, stats=stats))) == 4
    assert (stats.records, stats.skipped, stats.fmt) == (4, 1, "alpaca,sharegpt")
    assert [(f.fmt, f.records, f.skipped) for f in stats.files] == [("alpaca", 2, 0), ("sharegpt", 2, 1)]
    assert f"{tmp_path / 'a.jsonl'}: jsonl, format alpaca (detected): 2 record(s) read, 0 bad skipped" in caplog.text
    assert f"{tmp_path / 'b.jsonl'}: jsonl, format sharegpt (detected): 2 record(s) read, 1 bad skipped" in caplog.text


def test_files_that_are_not_data_are_ignored_with_one_log_line(tmp_path, caplog):
    (tmp_path / "part-0.jsonl").write_bytes(_alpaca_lines(2))
    for name in (".DS_Store", "_SUCCESS", "_committed_123", ".part-0.jsonl.crc", "part-0.crc", "README.md",
                 "LICENSE", "part-1.jsonl.partial", "part-1.jsonl.partial.a1B2c3D4"):
        (tmp_path / name).write_text("not data")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]")
    stats = LoadStats()
    with caplog.at_level(logging.INFO, logger="qlora.data"):
        assert len(list(load_conversations(tmp_path, stats=stats))) == 2
    lines = [r.getMessage() for r in caplog.records if "not data" in r.getMessage()]
    assert lines == [f"{tmp_path}: ignoring 10 file(s) that are not data: .DS_Store, .git/config, .part-0.jsonl.crc,"
                     " LICENSE, README.md, _SUCCESS, _committed_123, part-0.crc, part-1.jsonl.partial,"
                     " part-1.jsonl.partial.a1B2c3D4"]
    assert len(stats.ignored) == 10


@pytest.mark.parametrize("names", [("notes.txt",), ("data.arrow", "state.json.zip"), ("x.tar",), ("blob",),
                                   ("train.parquet.gz",), ("dataset_dict.pickle", "more.bin")])
def test_a_file_the_job_cannot_read_fails_the_prefix_naming_it(tmp_path, names):
    (tmp_path / "train.jsonl").write_bytes(_alpaca_lines(2))
    for name in names:
        (tmp_path / name).write_text("x")
    with pytest.raises(DataError) as err:
        list(load_conversations(tmp_path))
    message = str(err.value)
    assert f"{len(names)} file(s) under this prefix are not a data type the job reads" in message
    assert all(name in message for name in names)
    assert "Remove them from the prefix, or point the data setting" in message


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
                                             (".zst", _zstd)])
def test_a_truncated_compressed_file_is_a_data_error_naming_it(tmp_path, suffix, compress):
    data = b"".join(json.dumps({"text": f"record {i} " + hashlib.sha256(b"%d" % i).hexdigest()}).encode() + b"\n"
                    for i in range(60_000))
    packed = compress(data)
    path = tmp_path / f"train.jsonl{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    records = load_conversations(path)
    if suffix != ".zst":  # streamed: the records before the damage arrive first (zstd's first block is cut here)
        assert next(records).startswith("record 0 ")
    with pytest.raises(DataError, match=rf"train\.jsonl\{suffix}: cannot be read as .*-compressed JSONL (after line"
                                        r" \d+|at the start) .*re-create or re-upload it"):
        list(records)


def test_a_corrupt_gzip_file_is_a_data_error_naming_it(tmp_path):
    packed = bytearray(gzip.compress(_alpaca_lines(500)))
    packed[40:60] = b"\xff" * 20
    (tmp_path / "train.jsonl.gz").write_bytes(bytes(packed))
    (tmp_path / "other.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"other\.jsonl\.gz: cannot be read as gzip-compressed JSONL at the start"):
        list(load_conversations(tmp_path / "other.jsonl.gz"))
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: cannot be read as gzip-compressed JSONL"):
        list(load_conversations(tmp_path / "train.jsonl.gz"))


@pytest.mark.parametrize("name,content", [("a.jsonl.gz", gzip.compress(b"")), ("a.json.bz2", bz2.compress(b"")),
                                          ("a.csv.xz", lzma.compress(b""))])
def test_a_compressed_file_that_decompresses_to_nothing_is_empty(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}: the file is empty \(it decompresses to nothing\); remove it"):
        list(load_conversations(tmp_path / name))


def test_zst_without_the_zstandard_package_is_a_clear_data_error(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # what `import zstandard` meets where it is not installed
    with pytest.raises(DataError, match=r"train\.jsonl\.zst: zstd-compressed, but the `zstandard` package is not"
                                        r" installed: `pip install zstandard` .* or decompress"):
        list(load_conversations(tmp_path))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_is_streamed_not_read_whole(tmp_path, suffix):
    """Reading a compressed file through holds a few blocks, not the file: peak memory far below its size."""
    import tracemalloc

    line = json.dumps({"text": "a line of text " * 40}).encode() + b"\n"
    data = line * 50_000  # 30 MB decompressed
    path = tmp_path / f"big.jsonl{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".gz" else _zstd(data))
    tracemalloc.start()
    try:
        count = sum(1 for _ in load_conversations(path, fmt="text"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 50_000
    assert peak < 3 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading {len(data) / 2**20:.0f} MiB"


def test_csv_and_tsv_records_with_positions(tmp_path):
    csv_file = tmp_path / "a.csv"
    csv_file.write_bytes("\ufeffinstruction, input ,output\n".encode() + b'"two\nlines",,"a, b"\nq2,,a2\n\nq3,x\n')
    stats = LoadStats()
    out = list(load_conversations(csv_file, max_bad_records=1, stats=stats))
    assert out[0] == [{"role": U, "content": "two\nlines"}, {"role": A, "content": "a, b"}]
    assert (stats.records, stats.skipped, stats.fmt) == (2, 1, "alpaca")
    with pytest.raises(DataError, match=r"a\.csv:6: the row has 2 fields where the header has 3"):
        list(load_conversations(csv_file))
    tsv = tmp_path / "b.tsv.gz"
    messages = json.dumps(CASES["messages"]["messages"]).replace('"', '""')  # CSV quoting doubles quotes
    tsv.write_bytes(gzip.compress(f'messages\tid\n"{messages}"\t1\n'.encode()))
    assert list(load_conversations(tsv)) == [normalize(CASES["messages"], "messages")]
    bad = tmp_path / "c.csv"
    bad.write_text('text\n"quoted"then text\n')
    with pytest.raises(DataError, match=r"c\.csv:2: not valid CSV .*fix the quoting"):
        list(load_conversations(bad))


def test_held_out_names_warn_when_read_as_training_data(tmp_path, caplog):
    for name in ("train.jsonl", "eval.jsonl", "test-00000-of-00001.jsonl", "contest.jsonl", "dev.jsonl"):
        (tmp_path / name).write_bytes(_alpaca_lines(1))
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "part-0.jsonl").write_bytes(_alpaca_lines(1))
    with caplog.at_level(logging.INFO, logger="qlora.data"):
        assert len(list(load_conversations(tmp_path))) == 6
    warned = sorted(Path(r.getMessage().split(":")[0]).name for r in caplog.records if r.levelno == logging.WARNING)
    assert warned == ["dev.jsonl", "eval.jsonl", "part-0.jsonl", "test-00000-of-00001.jsonl"]
    assert "suggests held-out data, but it is read as training data" in caplog.text
    assert "QLORA_EVAL_DATA" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora.data"):
        list(load_conversations(tmp_path, held_out=True))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert held_out_word("data/Valid_set.jsonl") == "valid" and held_out_word("interval.jsonl") is None


def test_missing_path_says_so(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or directory"):
        list(load_conversations(tmp_path / "nope"))


def test_load_stats_keeps_its_positional_fields():
    assert LoadStats(3, 1, "alpaca") == LoadStats(records=3, skipped=1, fmt="alpaca", files=[], ignored=[])


# --------------------------------------------------------------------- the inspector, as users run it
def _inspect(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    return subprocess.run([sys.executable, "-m", "entrypoints.data", *args], capture_output=True, text=True,
                          cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


def test_inspector_help_names_the_command_and_exit_codes():
    proc = _inspect("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m entrypoints.data ")
    for text in ("--max-bad-records N", "QLORA_MAX_BAD_RECORDS", "--s3-endpoint-url", "s3://", "exit codes:",
                 "3  data error", "5  storage error", ".ndjson", "README*"):
        assert text in proc.stdout, text


def test_inspector_per_file_breakdown_and_held_out_warning():
    proc = _inspect("entrypoints/demo/data")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"format", "records", "skipped", "files", "ignored", "first"}
    files = {Path(f["file"]).name: f for f in report["files"]}
    assert set(files) == {"eval.jsonl", "train.jsonl"} and report["format"] == "messages"
    assert report["records"] == sum(f["records"] for f in files.values()) and report["skipped"] == 0
    assert files["eval.jsonl"]["type"] == "jsonl" and files["eval.jsonl"]["format"] == "messages"
    assert "demo/data/eval.jsonl: the name ('eval') suggests held-out data, but it is read as training data" in proc.stderr


def test_inspector_missing_path(tmp_path):
    proc = _inspect(str(tmp_path / "nope.jsonl"))
    assert proc.returncode == EXIT_DATA
    assert proc.stderr.strip() == f"data error: {tmp_path / 'nope.jsonl'}: no such file or directory; check the path" \
                                  " (inside a container, mount it first)"


def test_inspector_honours_the_bad_record_budget(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps(CASES["alpaca"]), "{broken", json.dumps(CASES["alpaca"])])
    proc = _inspect(str(f))
    assert proc.returncode == EXIT_DATA and "d.jsonl:2: invalid JSON" in proc.stderr and "Traceback" not in proc.stderr
    for args, env in (((), {"QLORA_MAX_BAD_RECORDS": "1"}), (("--max-bad-records", "1"), {}),
                      (("--max-bad-records", "1"), {"QLORA_MAX_BAD_RECORDS": "0"})):
        proc = _inspect(str(f), *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert (json.loads(proc.stdout)["records"], json.loads(proc.stdout)["skipped"]) == (2, 1)
        assert "skipping " in proc.stderr and "d.jsonl:2" in proc.stderr
    proc = _inspect(str(f), env={"QLORA_MAX_BAD_RECORDS": "some"})
    assert proc.returncode == EXIT_CONFIG and "QLORA_MAX_BAD_RECORDS='some': expected an integer" in proc.stderr
    proc = _inspect(str(f), "--max-bad-records", "-1")
    assert proc.returncode == EXIT_CONFIG and "--max-bad-records=-1: must be 0 or more" in proc.stderr


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


def test_linked_files_and_directories_are_read_and_a_dangling_link_is_an_error(tmp_path):
    """A symlinked subdirectory was skipped without a word (rglob does not enter it) and a dangling link too: the
    job trained on 10 of 90 records."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "more.jsonl").write_bytes(_alpaca_lines(40))
    data = tmp_path / "data"
    data.mkdir()
    (data / "own.jsonl").write_bytes(_alpaca_lines(10))
    (data / "linkdir").symlink_to(outside, target_is_directory=True)
    (data / "linkfile.jsonl").symlink_to(outside / "more.jsonl")
    (data / "loop").symlink_to(data, target_is_directory=True)  # a link back up is followed once, not forever
    stats = LoadStats()
    assert len(list(load_conversations(data, stats=stats))) == 90
    (data / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="dangling.jsonl: a symbolic link to .*gone.jsonl'?, which does not exist"):
        list(load_conversations(data))


def test_files_below_underscore_folders_are_ignored(tmp_path):
    """Spark leaves the attempts of a write in `_temporary/`: their part files are copies of the committed ones."""
    (tmp_path / "part-00000.jsonl").write_bytes(_alpaca_lines(5))
    attempt = tmp_path / "_temporary" / "0" / "_temporary" / "attempt_1"
    attempt.mkdir(parents=True)
    (attempt / "part-00000.jsonl").write_bytes(_alpaca_lines(5))
    stats = LoadStats()
    assert len(list(load_conversations(tmp_path, stats=stats))) == 5
    assert any("_temporary" in p for p in stats.ignored)


def test_a_top_level_system_prompt_and_answer_weights_are_honoured():
    record = {"system": "Be brief.", "messages": [{"role": "user", "content": "q1"},
                                                  {"role": "assistant", "content": "old answer", "weight": 0},
                                                  {"role": "user", "content": "q2"},
                                                  {"role": "assistant", "content": "a2", "weight": 1}]}
    conv = normalize(record, "messages")
    assert conv[0] == {"role": "system", "content": "Be brief."}
    assert conv[2] == {"role": "assistant", "content": "old answer", "weight": 0} and "weight" not in conv[4]
    sharegpt = normalize({"system": "S", "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "a"}]}, "sharegpt")
    assert sharegpt[0] == {"role": "system", "content": "S"}
    with pytest.raises(RecordError, match="every assistant turn has weight 0"):
        normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
                  "messages")
    with pytest.raises(RecordError, match="weight=0.5"):
        normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
                  "messages")
    with pytest.raises(RecordError, match="both a top-level `system` field and a system turn"):
        normalize({"system": "A", "messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}, "messages")


def test_a_line_longer_than_any_record_is_never_read_whole(tmp_path):
    """A 410 MiB single-line file (a JSON array saved as .jsonl) peaked at 875 MB before its error; the line is now
    read in bounded pieces and refused by its length."""
    import tracemalloc

    f = tmp_path / "train.jsonl"
    with open(f, "wb") as fh:
        fh.write(_alpaca_lines(1))
        fh.write(b"[" + b'{"instruction": "x", "output": "y"},' * 1_500_000 + b"{}]\n")  # ~54 MiB on one line
        fh.write(_alpaca_lines(1))
    stats = LoadStats()
    tracemalloc.start()
    with pytest.raises(DataError, match=r"train.jsonl:2: the line is 5\d\.\d MiB"):
        list(load_conversations(f, stats=stats))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 25 * 2**20  # bounded by the 8 MiB read limit (and its buffers), not by the 54 MiB line


def test_the_data_limits_name_the_counts_and_the_settings():
    from entrypoints.dataset import check_data_limits

    stats = {"train_records": 10, "train_records_truncated": 6, "train_duplicate_prompts": 5,
             "train_record_tokens_before_truncation": {"p50": 900, "p90": 3000, "p99": 4000, "max": 4100}}
    with pytest.raises(DataError, match=r"6 of the 10 training records \(60%\) are longer than QLORA_MAX_SEQ_LENGTH=512"
                                        r" tokens .*median 900, 90th percentile 3000, longest 4100"):
        check_data_limits(stats, 512, 0.5, 1.0)
    with pytest.raises(DataError, match=r"5 of the 10 training records \(50%\) repeat the prompt of an earlier record"
                                        r" exactly, over QLORA_MAX_DUPLICATE_FRACTION=0.4"):
        check_data_limits(stats, 512, 1.0, 0.4)
    check_data_limits(stats, 512, 0.6, 0.5)  # at the limit is within it


def test_a_prompt_is_everything_before_the_last_answer():
    from entrypoints.dataset import prompt_key

    def conv(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    a = conv(("user", "Hi"), ("assistant", "Hello"))
    assert prompt_key(a) == prompt_key(conv(("user", "Hi"), ("assistant", "Other answer")))
    assert prompt_key(a) != prompt_key(conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")))
    multi = conv(("user", "Hi"), ("assistant", "Hello"), ("user", "More?"), ("assistant", "Yes"))
    assert prompt_key(multi) != prompt_key(a) and prompt_key("plain text") == prompt_key("plain text")


def test_a_stopped_report_removes_its_scratch_directory_and_exits_143(tmp_path, cache_dir):
    """SIGTERM (a scheduler's stop, `timeout`) while the report works: the downloads and the report's caches in its
    scratch directory are removed, and the exit code is the shell's for SIGTERM, with one line saying so."""
    import signal
    import time

    from entrypoints.demo.assets import llama2_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(20_000)))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.data", str(data), "--report", "--tokenizer",
                             str(llama2_tokenizer(cache_dir))], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**clean, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while not list(scratch.glob("qlora-data-*/job")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the report's scratch base dir exists: it is reading and tokenizing
    assert proc.poll() is None, "the report ended before it could be stopped: give it more records"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped (SIGTERM): nothing was kept" in err
    assert not list(scratch.glob("qlora-data-*"))
