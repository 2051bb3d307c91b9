"""Secrets: resolved from the environment, a mounted directory or Secrets Manager, and never written anywhere.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_secrets.py

Secrets Manager is moto's server over real HTTP (botocore signs and sends the real GetSecretValue request).
The job test runs the real entrypoint with the HF token in a mounted-secret directory and the W&B key only
in Secrets Manager, then searches every log line, W&B record, checkpoint, output object, manifest and the
failure file for the recognisable fake values; the launcher test does the same for its dry-run requests and
manifests with the values in the launcher's own environment.
"""

from __future__ import annotations

import json
import logging

import pytest

from entrypoints import storage
from entrypoints.config import parse_config
from entrypoints.demo.assets import tiny_llama2
from entrypoints.demo.local_s3 import SECRET_KEY
from entrypoints.errors import ConfigError, StorageError
from entrypoints.secrets import REDACTED, REDACTOR, install_redactor, resolve_secrets

from ..jobrun import job_env, run_job

HF = "hf_RELIABILITYfakeTOKEN0123456789abcd"
WANDB = "wandbRELIABILITYfake0123456789abcdef0123"
ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:qlora-job-test"


def make_secret(moto_url: str, name: str, value: dict | str) -> str:
    import boto3

    client = boto3.client("secretsmanager", endpoint_url=moto_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    text = value if isinstance(value, str) else json.dumps(value)
    return client.create_secret(Name=name, SecretString=text)["ARN"]


@pytest.fixture
def sm_env(moto_url, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return moto_url


def cfg(tmp_path, **settings):
    return parse_config({"QLORA_DATA": str(tmp_path), **settings}, check_paths=False)


def test_each_source_and_the_precedence(tmp_path, sm_env):
    secrets_dir = tmp_path / "mounted"
    secrets_dir.mkdir()
    (secrets_dir / "HF_TOKEN").write_text(HF + "-dir\n")
    (secrets_dir / "WANDB_API_KEY").write_text(WANDB + "-dir")
    arn = make_secret(sm_env, "precedence", {"HF_TOKEN": HF + "-sm", "WANDB_API_KEY": WANDB + "-sm", "OTHER": "x"})

    assert resolve_secrets(cfg(tmp_path), {"HF_TOKEN": HF}) == {"HF_TOKEN": HF}
    assert resolve_secrets(cfg(tmp_path, QLORA_SECRETS_DIR=str(secrets_dir)), {}) == {
        "HF_TOKEN": HF + "-dir", "WANDB_API_KEY": WANDB + "-dir"}  # the file's trailing newline is not part of it
    assert resolve_secrets(cfg(tmp_path, QLORA_SECRETS_ARN=arn), {}) == {
        "HF_TOKEN": HF + "-sm", "WANDB_API_KEY": WANDB + "-sm"}  # only the two known names are taken
    # First found wins, per secret: environment, then the mounted directory, then Secrets Manager.
    both = cfg(tmp_path, QLORA_SECRETS_DIR=str(secrets_dir), QLORA_SECRETS_ARN=arn)
    assert resolve_secrets(both, {"WANDB_API_KEY": WANDB}) == {"HF_TOKEN": HF + "-dir", "WANDB_API_KEY": WANDB}


def test_secrets_manager_failures_are_clear(tmp_path, sm_env):
    with pytest.raises(StorageError, match="QLORA_SECRETS_ARN=.*secretsmanager:GetSecretValue"):
        resolve_secrets(cfg(tmp_path, QLORA_SECRETS_ARN=ARN + "-missing"), {})
    not_json = make_secret(sm_env, "not-json", "just a string")
    with pytest.raises(ConfigError, match="must be a JSON object like"):
        resolve_secrets(cfg(tmp_path, QLORA_SECRETS_ARN=not_json), {})


def test_log_lines_are_redacted(tmp_path, capsys):
    logging.basicConfig(level=logging.INFO, force=True)
    install_redactor()
    resolve_secrets(cfg(tmp_path), {"HF_TOKEN": HF})
    logging.getLogger("qlora.test").error("the Hub said: 401 for https://x/?token=%s", HF)
    err = capsys.readouterr().err
    assert HF not in err and f"token={REDACTED}" in err
    REDACTOR.values.discard(HF)


def search(secrets: dict[str, str], texts: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for where, data in texts.items() for name, value in secrets.items()
            if value.encode() in data]


def test_job_with_mounted_and_secrets_manager_secrets_leaks_nothing(s3_env, moto_url, tmp_path, cache_dir):
    server, bucket = s3_env
    model = tiny_llama2(cache_dir)
    secrets_dir = tmp_path / "mounted"
    secrets_dir.mkdir()
    (secrets_dir / "HF_TOKEN").write_text(HF)
    arn = make_secret(moto_url, "job-secret", {"WANDB_API_KEY": WANDB})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code {i}?", "output": f"Code {i} is {i % 7}."}) + "\n"
                            for i in range(12)))
    storage.upload_file(data, f"s3://{bucket}/data/train.jsonl", endpoint_url=server.endpoint)
    # An earlier result at the output: QLORA_OUTPUT_EXISTS=version keeps it and writes runs/<time>/.
    storage.write_text(f"s3://{bucket}/out/manifest.json", "{}", endpoint_url=server.endpoint)
    env = job_env(tmp_path, **server.env(), **{
        "QLORA_MODEL": str(model), "QLORA_DATA": f"s3://{bucket}/data/train.jsonl", "QLORA_OUTPUT": f"s3://{bucket}/out",
        "QLORA_OUTPUT_EXISTS": "version", "QLORA_S3_ENDPOINT_URL": server.endpoint,
        "QLORA_CHECKPOINT_URI": f"s3://{bucket}/checkpoints", "QLORA_SECRETS_DIR": str(secrets_dir),
        "QLORA_SECRETS_ARN": arn, "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_url,
        "QLORA_MAX_STEPS": "2", "QLORA_SAVE_STEPS": "1", "QLORA_MICRO_BATCH_SIZE": "2",
        "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_EVAL_FRACTION": "0.2", "QLORA_NUM_SAMPLE_GENERATIONS": "1",
        "QLORA_MAX_NEW_TOKENS": "4", "QLORA_LOGGING_STEPS": "1", "QLORA_REPORT_TO": "wandb", "QLORA_LOG_LEVEL": "debug",
    })
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        env.pop(name)  # only the mounted file and Secrets Manager have them
    result = run_job(env)
    assert result.code == 0, result.output[-4000:]

    # Versioned output: the old result kept, the new one under runs/<time>/ with latest.json pointing at it.
    latest = json.loads(storage.read_text(f"s3://{bucket}/out/latest.json", endpoint_url=server.endpoint))
    assert latest["run"].startswith(f"s3://{bucket}/out/runs/") and result.summary["output"] == latest["run"]
    assert storage.read_text(f"s3://{bucket}/out/manifest.json", endpoint_url=server.endpoint) == "{}"

    secrets = {"HF_TOKEN": HF, "WANDB_API_KEY": WANDB, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    texts = {"job output (every log line)": result.output.encode()}
    wandb_records = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert wandb_records, "W&B ran offline and wrote its records"
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_relative_to(secrets_dir) and path.stat().st_size < 50_000_000:
            texts[str(path)] = path.read_bytes()
    objects = storage.list_objects(f"s3://{bucket}/", endpoint_url=server.endpoint)
    assert any(o.relative.endswith("manifest.json") and "runs/" in o.relative for o in objects)
    assert any(o.relative.startswith("checkpoints/checkpoint-2/") for o in objects)
    for obj in objects:
        target = tmp_path.parent / f"{tmp_path.name}-s3" / obj.relative
        storage.download_file(obj.uri, target, size=obj.size, endpoint_url=server.endpoint)
        texts[obj.uri] = target.read_bytes()
    assert len(texts) > 30
    assert search(secrets, texts) == []


def test_launcher_dry_runs_leak_nothing(monkeypatch, capsys, tmp_path):
    from launch import submit

    for key, value in {"HF_TOKEN": HF, "WANDB_API_KEY": WANDB, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       "AWS_ACCESS_KEY_ID": "test-access-key", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    env_file = tmp_path / "job.env"
    env_file.write_text("QLORA_MAX_STEPS=10\nWANDB_MODE=offline\n")
    bucket = "s3://qlora-job-123456789012-us-east-1"
    common = ["--image", "123456789012.dkr.ecr.us-east-1.amazonaws.com/qlora-job:abc", "--set", f"data={bucket}/d/",
              "--set", f"output={bucket}/out", "--env-file", str(env_file), "--dry-run"]
    runs = {
        "sagemaker": ["--instance", "g5.2xlarge", "--role", "arn:aws:iam::123456789012:role/qlora",
                      "--set", f"QLORA_SECRETS_ARN={ARN}"],
        "sagemaker schedule": ["--instance", "g5.2xlarge", "--role", "arn:aws:iam::123456789012:role/qlora",
                               "--schedule", "0 3 * * 1", "--scheduler-role", "arn:aws:iam::123456789012:role/s",
                               "--set", f"QLORA_SECRETS_ARN={ARN}"],
        "kubernetes": ["--instance", "g5.2xlarge", "--backend", "kubernetes", "--k8s-secret", "qlora-secrets"],
        "kubernetes cronjob": ["--instance", "g5.2xlarge", "--backend", "kubernetes", "--k8s-secret", "qlora-secrets",
                               "--schedule", "@weekly"],
    }
    texts = {}
    for name, extra in runs.items():
        assert submit.main([*extra, *common]) == 0, name
        captured = capsys.readouterr()
        texts[name] = (captured.out + captured.err).encode()
        assert len(captured.out) > 500, name  # a whole request/manifest was printed
    assert b"secretKeyRef" in texts["kubernetes"] and ARN.encode() in texts["sagemaker"]  # references only
    assert search({"HF_TOKEN": HF, "WANDB_API_KEY": WANDB, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}, texts) == []
