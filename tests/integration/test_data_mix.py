"""Data mixing on the real S3 server: a job trained on two weighted prefixes, the data report on a mix, and the
launcher's estimate from a sample of the data.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_data_mix.py
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

from entrypoints import storage
from entrypoints.errors import EXIT_OK
from launch import data_sample, submit

from ..jobrun import REPO, job_env, run_job
from ..wandb_records import summarize

NEW = [{"instruction": f"What is new fact {i}?", "output": f"New fact {i} is {i * 3 % 11}."} for i in range(40)]
OLD = [{"instruction": f"Recall old fact {i}.", "output": f"Old fact {i} was {i * 5 % 7}."} for i in range(400)]


def _put(server, bucket: str, key: str, records: list[dict], compress: bool = False) -> None:
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    server.client().put_object(Bucket=bucket, Key=key, Body=gzip.compress(body) if compress else body)


def _inspect(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.data", *args], capture_output=True, text=True, cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}, timeout=300)


def test_a_job_mixes_two_prefixes_by_weight_and_the_report_draws_the_same_mix(s3_env, tiny_model, tmp_path):
    server, bucket = s3_env
    _put(server, bucket, "data/new/part-0.jsonl", NEW[:20])
    _put(server, bucket, "data/new/part-1.jsonl", NEW[20:])
    _put(server, bucket, "data/replay/old.jsonl.gz", OLD, compress=True)
    _put(server, bucket, "data/eval/eval.jsonl", NEW[:4])
    sources = f"s3://{bucket}/data/new/,s3://{bucket}/data/replay/"
    settings = {**server.env(), "QLORA_MODEL": str(tiny_model), "QLORA_S3_ENDPOINT_URL": server.endpoint,
                "QLORA_DATA": sources, "QLORA_DATA_WEIGHTS": "0.6,0.4", "QLORA_SEED": "42",
                "QLORA_EVAL_DATA": f"s3://{bucket}/data/eval/eval.jsonl", "QLORA_EVAL_FRACTION": "0",
                "QLORA_OUTPUT": f"s3://{bucket}/out", "QLORA_MAX_STEPS": "1", "QLORA_MERGE": "false",
                "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_LORA_R": "4", "QLORA_LORA_ALPHA": "8",
                "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_MAX_SEQ_LENGTH": "64",
                "QLORA_REPORT_TO": "wandb"}
    result = run_job(job_env(tmp_path, **settings))
    assert result.code == EXIT_OK, result.output[-3000:]
    manifest = json.loads(storage.read_text(f"{result.summary['output']}/manifest.json", endpoint_url=server.endpoint))
    data = manifest["data"]
    assert data["source"] == sources and manifest["config"]["data_weights"] == "0.6,0.4"
    new, old = data["mix"]
    assert (new["source"], old["source"]) == (f"s3://{bucket}/data/new/", f"s3://{bucket}/data/replay/")
    assert (new["weight"], old["weight"]) == (0.6, 0.4) and (new["records_read"], old["records_read"]) == (40, 400)
    # first_exhausted: every record of the small source, and about 40 x 0.4/0.6 = 27 of the replay (binomial spread).
    assert new["train_records"] == 40 and 15 <= old["train_records"] <= 40
    assert data["train_records"] == new["train_records"] + old["train_records"]
    assert abs(new["train_share"] - 0.6) < 0.12
    assert new["fingerprint_sha256"] != old["fingerprint_sha256"] != data["fingerprint_sha256"]
    assert [s["source"] for s in data["sources"]] == [new["source"], new["source"], old["source"]]
    wandb = summarize(next((tmp_path / "opt-ml").rglob("run-*.wandb")))
    assert wandb["config"]["data_weights"] == "0.6,0.4"
    assert wandb["summary"]["data/mix/2/train_records"] == old["train_records"]
    assert "data mix (weights, until first_exhausted, seed 42)" in result.output

    # The report draws what the job drew with the same seed (its first step), and another mix with another seed.
    env = {**server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_MODEL": str(tiny_model),
           "HF_HUB_OFFLINE": "1", "QLORA_DATA_WEIGHTS": "0.6,0.4", "QLORA_MAX_SEQ_LENGTH": "64"}
    proc = _inspect(sources, "--report", "--seed", "42", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert [(s["source"], s["weight"], s["records"]) for s in shown["sources"]] == [
        (new["source"], 0.6, 40), (old["source"], 0.4, 400)]
    assert [m["train_records"] for m in shown["report"]["mix"]] == [new["train_records"], old["train_records"]]
    assert shown["report"]["train_tokens"] == data["train_tokens"]
    other = json.loads(_inspect(sources, "--report", "--seed", "7", env=env).stdout)["report"]["mix"]
    assert other[1]["train_records"] != old["train_records"]


def test_the_launcher_estimates_tokens_from_a_sample_of_the_s3_data(s3_env, tiny_model, tmp_path, capsys,
                                                                    monkeypatch):
    server, bucket = s3_env
    # Objects larger than the sample (64 KiB here, a few MiB in use), so that only their first part is read: one plain,
    # one gzip-compressed (its first 64 KiB decompress to more than that).
    monkeypatch.setattr(data_sample, "SAMPLE_BYTES", 64 * 2**10)
    big = [{"instruction": f"Recall old fact {i} about {'things ' * (i % 9)}", "output": f"Old fact {i} was {i % 7}."}
           for i in range(3_000)]
    _put(server, bucket, "data/replay/a.jsonl", big[:2_000])
    _put(server, bucket, "data/replay/b.jsonl.gz", big[2_000:], compress=True)
    _put(server, bucket, "data/new/new.jsonl", NEW)
    storage.upload_tree(tiny_model, f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    base = ["--instance", "g5.2xlarge", "--dry-run", "--set", f"model=s3://{bucket}/models/tiny",
            "--set", f"s3_endpoint_url={server.endpoint}", "--set", "max_seq_length=64",
            "--set", f"output=s3://{bucket}/out"]
    assert submit.main([*base, "--set", f"data=s3://{bucket}/data/replay/"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("data: "))
    assert "estimated from a sample" in line and f"s3://{bucket}/data/replay/: " in line
    assert "of 2 object(s)" in line and "tokenizer and chat template" in line, line
    estimated = int(line.split("~", 1)[1].split(" ", 1)[0].replace(",", ""))
    # The job's own count of every record (the report), less the 5% held out: the sample is within 15% of it.
    env = {**server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_MODEL": f"s3://{bucket}/models/tiny",
           "HF_HUB_OFFLINE": "1", "QLORA_MAX_SEQ_LENGTH": "64", "QLORA_MAX_DUPLICATE_FRACTION": "1"}
    actual = json.loads(_inspect(f"s3://{bucket}/data/replay/", "--report", env=env).stdout)["report"]["train_tokens"]
    assert abs(estimated - 0.95 * actual) < 0.15 * actual, (estimated, actual)
    assert "ESTIMATE: ~" in err and "estimated from a sample of the data" in err

    # A weighted mix: sized as the job draws it (all of the small source and as much again of the replay).
    assert submit.main([*base, "--set", f"data=s3://{bucket}/data/new/,s3://{bucket}/data/replay/",
                        "--set", "data_weights=1,1"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    mixed = int(line.split("~", 1)[1].split(" ", 1)[0].replace(",", ""))
    assert "mixed by data_weights until first_exhausted" in line, line
    new_tokens = int(line.split("/data/new/: 40 records, ", 1)[1].split(" ", 1)[0])  # all 40 sampled: exact
    # 95% of the new records (5% held out) and as many replay records, each about as long as a new one (+-50%).
    assert 0.95 * new_tokens * 1.5 < mixed < 0.95 * new_tokens * 2.5, line

    # A model whose tokenizer cannot be loaded here (a Hub id, with the Hub unreachable): characters per token, said so.
    assert submit.main([*base, "--set", "model=meta-llama/Llama-2-7b-hf", "--set", f"data=s3://{bucket}/data/new/"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert "tokens as characters / 3.5 + 4 per turn" in line and "meta-llama/Llama-2-7b-hf's tokenizer could not" in line

    # What cannot be sampled is a note, never a failed submission.
    assert submit.main([*base, "--set", f"data=s3://{bucket}-missing/data/"]) == 0
    err = capsys.readouterr().err
    assert "data: the data could not be sampled (NoSuchBucket" in err or "data: the data could not be sampled" in err
    assert "time/cost estimate needs QLORA_MAX_STEPS" in err and "Traceback" not in err

    # An empty object (the job fails on it, exit 3) is named at submit time, not a ranged GET's InvalidRange; a file
    # that holds no record is named by its URI, not by the launcher's scratch folder.
    server.client().put_object(Bucket=bucket, Key="data/odd/zz-empty.jsonl", Body=b"")
    assert submit.main([*base, "--set", f"data=s3://{bucket}/data/new/,s3://{bucket}/data/odd/"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert line == (f"data: 1 data object(s) at s3://{bucket}/data/odd/ are empty (s3://{bucket}/data/odd/zz-empty.jsonl):"
                    " the job fails on an empty data file (exit 3); remove them. No estimate from the data")
    server.client().put_object(Bucket=bucket, Key="data/binary/x.jsonl", Body=bytes(range(256)) * 64)
    assert submit.main([*base, "--set", f"data=s3://{bucket}/data/binary/"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert f"(DataError: s3://{bucket}/data/binary/x.jsonl: no usable records" in line and "qlora-sample" not in line
