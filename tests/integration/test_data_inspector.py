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
