"""`python -m entrypoints.data` on s3:// URIs (the real S3 server)."""

import gzip
import json

from entrypoints.errors import EXIT_DATA, EXIT_STORAGE

from ..unit.test_data import _alpaca_lines, _inspect


def test_inspector_reads_s3_uris(s3_env, tmp_path):
    server, bucket = s3_env
    client = server.client()
    client.put_object(Bucket=bucket, Key="ds/a.jsonl.gz", Body=gzip.compress(_alpaca_lines(3)))
    client.put_object(Bucket=bucket, Key="ds/B.NDJSON", Body=_alpaca_lines(2))
    client.put_object(Bucket=bucket, Key="ds/_SUCCESS", Body=b"")
    client.put_object(Bucket=bucket, Key="bad/train.jsonl", Body=_alpaca_lines(1) + b"{broken\n")
    env = server.env()
    proc = _inspect(f"s3://{bucket}/ds/", env={**env, "QLORA_S3_ENDPOINT_URL": server.endpoint})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 5 and report["format"] == "alpaca"
    assert [(f["file"], f["type"], f["records"]) for f in report["files"]] == [
        (f"s3://{bucket}/ds/B.NDJSON", "jsonl", 2), (f"s3://{bucket}/ds/a.jsonl.gz", "jsonl+gzip", 3)]
    assert report["ignored"] == [f"s3://{bucket}/ds/_SUCCESS"]
    # One object, the endpoint as a flag; a bad record is named by its URI and line.
    proc = _inspect(f"s3://{bucket}/bad/train.jsonl", "--s3-endpoint-url", server.endpoint, env=env)
    assert proc.returncode == EXIT_DATA
    assert f"data error: s3://{bucket}/bad/train.jsonl:2: invalid JSON" in proc.stderr
    proc = _inspect(f"s3://{bucket}/bad/train.jsonl", "--s3-endpoint-url", server.endpoint, "--max-bad-records", "1",
                    env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["skipped"] == 1
    proc = _inspect(f"s3://{bucket}/nothing/", "--s3-endpoint-url", server.endpoint, env=env)
    assert proc.returncode == EXIT_STORAGE and "the prefix is empty or the key does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_templating_tool_renders_s3_data_with_an_s3_models_tokenizer(s3_env, cache_dir, tmp_path, capsys, caplog):
    """`python -m entrypoints.templating s3://.../model/ s3://.../data.jsonl`: only the model's tokenizer and config
    files are downloaded (not its weights), the data is read as the job reads it, errors name the URI."""
    from entrypoints import storage
    from entrypoints.demo.assets import tiny_llama2
    from entrypoints.templating import main

    server, bucket = s3_env
    storage.upload_tree(tiny_llama2(cache_dir), f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    record = {"messages": [{"role": "user", "content": "Capital of Veloria?"},
                           {"role": "assistant", "content": "Quendar."}]}
    server.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=(json.dumps(record) + "\n").encode())
    server.client().put_object(Bucket=bucket, Key="data/bad.jsonl", Body=b'{"messages": []}\n')
    endpoint = ["--s3-endpoint-url", server.endpoint]
    assert main([f"s3://{bucket}/models/tiny/", f"s3://{bucket}/data/train.jsonl", *endpoint]) == 0
    out = capsys.readouterr().out
    assert "TRAIN  Quendar. </s>" in out.splitlines() and f"record 1 of s3://{bucket}/data/train.jsonl" in out

    assert main([f"s3://{bucket}/models/tiny/", f"s3://{bucket}/data/bad.jsonl", *endpoint]) == EXIT_DATA
    assert f"data error: s3://{bucket}/data/bad.jsonl:1:" in caplog.text and "qlora-templating-" not in caplog.text
    assert main([f"s3://{bucket}/nothing/", *endpoint]) == 4
    assert f"s3://{bucket}/nothing/: no tokenizer or config files under this prefix" in caplog.text

    from entrypoints.modeling import fetch_tokenizer

    fetched = fetch_tokenizer(f"s3://{bucket}/models/tiny", "main", tmp_path / "tok", server.endpoint)
    assert sorted(p.name for p in fetched.iterdir()) == ["config.json", "generation_config.json", "tokenizer.json",
                                                         "tokenizer_config.json"]  # no weights


def test_report_counts_what_the_job_trains_on_and_fails_where_the_job_would(s3_env, tmp_path, cache_dir):
    """--report with the tokenizer of a model prefix on S3 (its weights are not downloaded): per-file counts, length
    percentiles, truncation, duplicate prompts, empty answers; too many cut records is exit 3 after the report."""
    from entrypoints import storage
    from entrypoints.demo.assets import tiny_llama2

    server, bucket = s3_env
    model = tiny_llama2(cache_dir)
    storage.upload_tree(model, f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    rows = [{"instruction": f"What is code {i}?", "output": f"Code {i} is {i * 7 % 13}." + " more" * (10 * i)}
            for i in range(8)]
    rows += rows[:2] + [{"instruction": "Empty?", "output": " "}]  # two repeated prompts, one empty answer
    client = server.client()
    client.put_object(Bucket=bucket, Key="ds/a.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows[:6]).encode())
    client.put_object(Bucket=bucket, Key="ds/b.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows[6:]).encode())
    env = {**server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_MODEL": f"s3://{bucket}/models/tiny",
           "QLORA_MAX_BAD_RECORDS": "1", "HF_HUB_OFFLINE": "1"}

    proc = _inspect(f"s3://{bucket}/ds/", "--report", "--max-seq-length", "64", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["report"]
    assert report["sources"] == [{"file": "a.jsonl", "type": "jsonl", "format": "alpaca", "records": 6, "skipped": 0},
                                 {"file": "b.jsonl", "type": "jsonl", "format": "alpaca", "records": 4, "skipped": 1}]
    assert (report["train_records"], report["train_duplicate_prompts"], report["empty_answers_skipped"]) == (10, 2, 1)
    lengths = report["train_record_tokens_before_truncation"]
    assert lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"] and lengths["max"] > 64
    assert report["train_records_truncated"] >= 1 and report["train_loss_tokens_truncated"] > 0
    assert report["train_tokens"] <= 64 * 10 and report["longest_record_tokens"] == 64
    assert "model.safetensors" not in proc.stderr  # the tokenizer's files only

    proc = _inspect(f"s3://{bucket}/ds/", "--report", "--max-seq-length", "24", env=env)
    assert proc.returncode == EXIT_DATA
    assert json.loads(proc.stdout)["report"]["train_records_truncated"] > 5  # the report first, then the verdict
    assert "training records" in proc.stderr and "are longer than QLORA_MAX_SEQ_LENGTH=24" in proc.stderr
    assert "QLORA_MAX_TRUNCATED_FRACTION=0.5" in proc.stderr and "Traceback" not in proc.stderr
