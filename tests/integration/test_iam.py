"""Every AWS call the job and the launcher make, recorded as it happens and evaluated against infra/cloudformation.yaml's
policies by a real IAM policy simulator.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_iam.py

The job runs for real (`python -m entrypoints.train`, as tests/jobrun.py starts it) against the SeaweedFS S3 server,
with Secrets Manager on moto, and a botocore hook (tests/iam/shim/sitecustomize.py, test code only) writes down each
call: the IAM action, the resource ARN and the request's condition keys (`s3:prefix`, ...) follow from it
(tests/iam_model.py). The launcher's own calls are recorded in-process against moto, and what SageMaker and
EventBridge Scheduler then do with the execution and scheduler roles is derived from the requests it sent. Each request
is evaluated with @cloud-copilot/iam-simulate against the policies of the principal that makes it, as the template
renders them (cloud-radar) and the bucket policy. Neither S3 server enforces IAM: the simulator is the judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entrypoints import storage
from entrypoints.demo.assets import tiny_llama2

from .. import aws_calls
from .. import iam_model as iam
from ..jobrun import job_env, run_job

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "tests" / "iam" / "shim"

pytestmark = pytest.mark.skipif(iam.simulator_available() is not None, reason=str(iam.simulator_available()))


def make_secret(moto_url: str, value: dict) -> str:
    import boto3

    client = boto3.client("secretsmanager", endpoint_url=moto_url, region_name=iam.REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    return client.create_secret(Name="qlora-job/job", SecretString=json.dumps(value))["ARN"]


def denied(decisions: list[iam.Decision]) -> list[str]:
    return [str(d) for d in decisions if d.result != "Allowed"]


def test_every_aws_call_of_the_job_is_allowed_by_its_roles(s3_env, moto_url, tmp_path, cache_dir):
    """The real job, start to published result (claim, inputs, checkpoints mirrored to S3, manifest, latest.json), under
    the SageMaker execution role and the EKS pod role. Today's first call, HeadBucket, needs s3:ListBucket without a
    prefix: a ListBucket granted only under an s3:prefix condition denied it, and every job exited 5 in seconds."""
    server, bucket = s3_env
    model = tiny_llama2(cache_dir)
    for path in model.iterdir():
        storage.upload_file(path, f"s3://{bucket}/models/tiny-llama2/{path.name}", endpoint_url=server.endpoint)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code {i}?", "output": f"Code {i} is {i % 7}."}) + "\n"
                            for i in range(12)))
    storage.upload_file(data, f"s3://{bucket}/data/chat/train.jsonl", endpoint_url=server.endpoint)
    secret = make_secret(moto_url, {"WANDB_API_KEY": "wandb-not-a-real-key-0123456789abcdef0123"})
    calls_file = tmp_path / "calls.jsonl"
    env = job_env(tmp_path, **server.env(), **{
        # What launch/submit.py sets for a Kubernetes Job (on SageMaker the channels and the checkpoint sync are
        # SageMaker's: see test_every_aws_call_of_the_launcher_is_allowed_by_the_launcher_policy).
        "QLORA_MODEL": f"s3://{bucket}/models/tiny-llama2/", "QLORA_DATA": f"s3://{bucket}/data/chat/",
        "QLORA_OUTPUT": f"s3://{bucket}/output/support-bot", "QLORA_OUTPUT_EXISTS": "version",
        "QLORA_CHECKPOINT_URI": f"s3://{bucket}/checkpoints/qlora-support-bot-20261130000000",
        "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_SECRETS_ARN": secret,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_url, "QLORA_MAX_STEPS": "2", "QLORA_SAVE_STEPS": "1",
        "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_EVAL_FRACTION": "0.2",
        "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_REPORT_TO": "none",
        "PYTHONPATH": f"{SHIM}:{REPO}", "TEST_RECORD_AWS_CALLS": str(calls_file),
    })
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        env.pop(name)  # read from Secrets Manager, as on SageMaker
    result = run_job(env)
    assert result.code == 0, result.output[-4000:]
    calls = aws_calls.read(calls_file)
    operations = {(c["service"], c["operation"]) for c in calls}
    # The job's calls, as the task describes them: the bucket check, conditional writes, reads, deletes, listings.
    assert {("s3", "HeadBucket"), ("s3", "PutObject"), ("s3", "GetObject"), ("s3", "ListObjectsV2"),
            ("s3", "DeleteObject"), ("secretsmanager", "GetSecretValue")} <= operations, operations
    assert any(c["params"].get("IfNoneMatch") == "*" for c in calls) and any("IfMatch" in c["params"] for c in calls)
    assert any(c["params"].get("Key", "").endswith("latest.json") for c in calls)
    assert any(c["operation"] == "GetObject" and c["status"] == 404 for c in calls)  # "absent" must stay a 404

    names = iam.Names(bucket=bucket, secret_arn=secret)
    requests = [r for c in calls for r in iam.requests_of(c)]
    cases = []
    for role in ("ExecutionRole", "PodRole"):
        arn, policies = names.attributes[f"{role}.Arn"], iam.role_policies(role, names)
        cases += [(r, arn, policies) for r in requests]
    decisions = iam.evaluate(cases, names)
    assert denied(decisions) == []
    # Least privilege the other way round: every statement of the job's policy is used by the job.
    used = {sid for d in decisions if d.principal == names.attributes["PodRole.Arn"] for sid in d.allowed_by}
    granted = {f"job:{s['Sid']}" for p in iam.role_policies("PodRole", names) for s in p["policy"]["Statement"]}
    assert granted <= used, f"statements no call of the job uses: {granted - used}"


def test_every_aws_call_of_the_launcher_is_allowed_by_the_launcher_policy(moto_url, monkeypatch, tmp_path):
    """submit.py's own calls (boto3 and SDK submission, --follow, a schedule with its smoke test) under LauncherPolicy;
    what SageMaker then does with the execution role for each job (image, channels, checkpoints, output, logs,
    metrics), and what EventBridge Scheduler does with the scheduler role on each tick (the CreateTrainingJob of its
    target, a failed start sent to the dead-letter queue)."""
    import botocore.session

    from launch import submit

    config = tmp_path / "sagemaker-config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    for key, value in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": iam.REGION, "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
                       "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config)}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_REGION", "SAGEMAKER_VALIDATE_ROLE"):
        monkeypatch.delenv(key, raising=False)
    names = iam.Names(bucket=f"qlora-job-{iam.ACCOUNT}-{iam.REGION}")
    bucket = f"s3://{names.bucket}"
    common = ["--instance", "g5.12xlarge", "--count", "2",
              "--image", f"{iam.ACCOUNT}.dkr.ecr.{iam.REGION}.amazonaws.com/qlora-job:abc123",
              "--role", names.attributes["ExecutionRole.Arn"], "--set", f"data={bucket}/data/chat/",
              "--set", f"model={bucket}/models/llama-2-7b-hf/", "--set", f"output={bucket}/output/support-bot",
              "--set", f"secrets_arn={names.secret_arn}", "--set", "max_steps=10", "--tag", "team=ml",
              "--max-run-hours", "4"]
    record = tmp_path / "calls.jsonl"
    monkeypatch.setattr(botocore.session.Session, "__init__", botocore.session.Session.__init__)  # undone after
    aws_calls.install(str(record))
    assert submit.main([*common, "--no-sdk", "--name", "qlora-iam-boto3", "--follow"]) == 0
    try:
        import sagemaker.core  # noqa: F401

        assert submit.main([*common, "--name", "qlora-iam-sdk"]) == 0
    except ImportError:
        pass
    assert submit.main([*common, "--schedule", "0 3 * * 1", "--name", "qlora-iam-weekly", "--smoke-test",
                        "--scheduler-role", names.attributes["SchedulerRole.Arn"],
                        "--dead-letter-queue", names.attributes["ScheduleDeadLetterQueue.Arn"]]) == 0
    calls = aws_calls.read(record)
    operations = {(c["service"], c["operation"]) for c in calls}
    assert {("sagemaker", "CreateTrainingJob"), ("sagemaker", "DescribeTrainingJob"), ("logs", "DescribeLogStreams"),
            ("scheduler", "CreateSchedule")} <= operations, operations

    launcher = f"arn:aws:iam::{iam.ACCOUNT}:role/ci-runner"
    launcher_policies = iam.role_policies("LauncherPolicy", names)
    execution, scheduler = names.attributes["ExecutionRole.Arn"], names.attributes["SchedulerRole.Arn"]
    execution_policies, scheduler_policies = iam.role_policies("ExecutionRole", names), iam.role_policies(
        "SchedulerRole", names)
    cases = [(r, launcher, launcher_policies) for c in calls for r in iam.requests_of(c)]
    for c in calls:
        if c["operation"] == "CreateTrainingJob":
            cases += [(r, execution, execution_policies) for r in iam.sagemaker_platform_requests(c["params"])]
        if c["operation"] == "CreateSchedule":
            tick, job = iam.scheduler_requests(c["params"])
            cases += [(r, scheduler, scheduler_policies) for r in tick]
            cases += [(r, execution, execution_policies) for r in iam.sagemaker_platform_requests(job)]
    decisions = iam.evaluate(cases, names)
    assert denied(decisions) == []
    used = {sid for d in decisions for sid in d.allowed_by}
    for role, policies in (("ExecutionRole", execution_policies), ("SchedulerRole", scheduler_policies)):
        granted = {f"{p['name']}:{s['Sid']}" for p in policies for s in p["policy"]["Statement"]
                   if p["name"] != "job"}  # the job policy's statements: the job's own calls (test above)
        assert granted <= used, f"{role}: statements nothing uses: {granted - used}"


def test_an_output_kms_key_is_usable_by_the_execution_role_when_the_stack_names_it():
    """--output-kms-key: SageMaker encrypts what it uploads with the execution role's kms:GenerateDataKey."""
    names = iam.Names(bucket=f"qlora-job-{iam.ACCOUNT}-{iam.REGION}")
    key = f"arn:aws:kms:{iam.REGION}:{iam.ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    role = names.attributes["ExecutionRole.Arn"]
    requests = [iam.IamRequest(a, key, {}, "SageMaker uploading with --output-kms-key")
                for a in ("kms:GenerateDataKey", "kms:Decrypt")]
    with_key = iam.role_policies("ExecutionRole", names, {"OutputKmsKeyArn": key})
    without = iam.role_policies("ExecutionRole", names)
    assert denied(iam.evaluate([(r, role, with_key) for r in requests], names)) == []
    assert len(denied(iam.evaluate([(r, role, without) for r in requests], names))) == 2
