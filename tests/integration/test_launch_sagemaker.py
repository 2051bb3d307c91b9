"""SageMaker path end to end: the SDK (and boto3) against a moto server over HTTP, asserting on the request.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_launch_sagemaker.py

moto accepts anything and drops `Environment`, so the outgoing CreateTrainingJob / CreateSchedule
requests are captured with a botocore event hook and checked with botocore's own parameter validation.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.validate import ParamValidator

from launch import sagemaker_backend, submit

REPO = Path(__file__).resolve().parents[2]
ROLE = "arn:aws:iam::123456789012:role/qlora-job-sagemaker-execution"
SCHED_ROLE = "arn:aws:iam::123456789012:role/qlora-job-scheduler"
DEAD_LETTERS = "arn:aws:sqs:us-east-1:123456789012:qlora-job-schedule-dead-letters"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/qlora-job:abc123"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:qlora-job-AbCdEf"
BUCKET = "s3://qlora-job-123456789012-us-east-1"


@pytest.fixture(autouse=True)
def plain_logging(monkeypatch):
    """As in a fresh `python launch/submit.py`: no handler on the root logger. (A test elsewhere may have left one
    writing to a captured stream that is closed by now: every library log line would then print a logging error.)"""
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)


def validate(service: str, operation: str, params: dict) -> None:
    """botocore's own validation of a request against the service model (raises on any problem)."""
    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    report = ParamValidator().validate(params, model.input_shape)
    assert not report.has_errors(), report.generate_report()


@pytest.fixture
def aws_env(moto_url, monkeypatch, tmp_path):
    config = tmp_path / "sagemaker-config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    for key, value in {
        "AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config), "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config),
    }.items():
        monkeypatch.setenv(key, value)
    # The SDK's role validation is not switched off here: the launcher must not need that.
    for key in ("AWS_PROFILE", "SAGEMAKER_VALIDATE_ROLE", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    return moto_url


@pytest.fixture
def captured(monkeypatch):
    """Every request our code sends to SageMaker/Scheduler, as botocore is about to serialize it."""
    calls: list[tuple[str, dict]] = []
    real = sagemaker_backend.boto_session

    def session_with_hook(sm):
        session = real(sm)

        def hook(params, model, **_):
            calls.append((model.name, json.loads(json.dumps(params, default=str))))

        session.events.register("provide-client-params.sagemaker.CreateTrainingJob", hook)
        session.events.register("provide-client-params.scheduler.CreateSchedule", hook)
        return session

    monkeypatch.setattr(sagemaker_backend, "boto_session", session_with_hook)
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An env file (settings and plain environment) and a Llama-2-7B config.json for the memory check."""
    d = tmp_path_factory.mktemp("launch")
    (d / "launch.env").write_text("# job settings\nQLORA_LORA_R=16\nexport QLORA_MAX_SEQ_LENGTH=1024\n"
                                  'WANDB_MODE="offline"\n')
    (d / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}))
    return d


def common_args(files) -> list[str]:
    return ["--instance", "ml.g5.12xlarge", "--count", "2", "--image", IMAGE, "--role", ROLE,
            "--set", f"data={BUCKET}/data/chat/", "--set", f"eval_data={BUCKET}/data/eval.jsonl",
            "--set", f"model={BUCKET}/models/llama-2-7b-hf/", "--set", f"output={BUCKET}/output/run1",
            "--set", f"QLORA_SECRETS_ARN={SECRET}", "--set", "max_steps=50",
            "--env-file", str(files / "launch.env"),
            "--spot", "--max-run-hours", "4", "--subnet", "subnet-0abc", "--security-group", "sg-0abc",
            "--output-kms-key", "alias/qlora", "--tag", "team=ml",
            "--model-config", str(files / "config.json")]


def dry_run_request(args: list[str], capsys) -> dict:
    assert submit.main([*args, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def check_training_request(req: dict) -> None:
    validate("sagemaker", "CreateTrainingJob", req)
    env = req["Environment"]
    # Prefixes become channels and leave the environment (the job falls back to SM_CHANNEL_*): never both. A single
    # file stays a setting, which the job downloads itself: as an S3Prefix it would also take eval.jsonl.bak, ...
    assert {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]} == {
        "train": f"{BUCKET}/data/chat/", "model": f"{BUCKET}/models/llama-2-7b-hf/"}
    assert not {"QLORA_DATA", "QLORA_MODEL"} & set(env)
    # ... and the adapter's config and the model card name the model by its prefix, not by the channel's local path.
    assert env["QLORA_MODEL_NAME"] == f"{BUCKET}/models/llama-2-7b-hf/"
    assert env["QLORA_EVAL_DATA"] == f"{BUCKET}/data/eval.jsonl"
    assert env["QLORA_RUN_NAME"] == req["TrainingJobName"]  # W&B, the model card and the resume hint name the job
    assert env["QLORA_OUTPUT"] == f"{BUCKET}/output/run1"
    assert env["QLORA_SECRETS_ARN"] == SECRET and env["QLORA_MAX_STEPS"] == "50"
    assert env["WANDB_MODE"] == "offline"  # non-secret extra environment from the env file
    assert req["OutputDataConfig"]["CompressionType"] == "NONE"
    assert req["OutputDataConfig"]["KmsKeyId"] == "alias/qlora"
    assert req["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 200}
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 4 * 3600, "MaxWaitTimeInSeconds": 8 * 3600}
    assert req["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert req["CheckpointConfig"]["S3Uri"].startswith(f"{BUCKET}/checkpoints/qlora-")  # one folder per run
    assert req["VpcConfig"] == {"SecurityGroupIds": ["sg-0abc"], "Subnets": ["subnet-0abc"]}
    assert {"Key": "team", "Value": "ml"} in req["Tags"]
    assert "ContainerEntrypoint" not in req["AlgorithmSpecification"]  # the image's own entrypoint runs


def test_dry_run_request_is_complete_and_valid(capsys, files):
    req = dry_run_request(common_args(files), capsys)["CreateTrainingJob"]
    check_training_request(req)


def test_sdk_sends_the_same_request_through_moto(aws_env, captured, capsys, files):
    pytest.importorskip("sagemaker.train")
    expected = dry_run_request(common_args(files), capsys)["CreateTrainingJob"]
    assert submit.main([*common_args(files), "--name", "qlora-sdk-run"]) == 0
    out = capsys.readouterr().out
    [(operation, sent)] = captured
    assert operation == "CreateTrainingJob"
    check_training_request(sent)
    # Exactly the dry run's request: the job name, its checkpoint prefix and the printed name agree.
    expected = dry_run_request([*common_args(files), "--name", "qlora-sdk-run"], capsys)["CreateTrainingJob"]
    assert sent == expected
    assert sent["TrainingJobName"] == "qlora-sdk-run" and out.strip() == "submitted SageMaker training job qlora-sdk-run"
    assert sent["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/qlora-sdk-run"
    described = boto3.client("sagemaker").describe_training_job(TrainingJobName="qlora-sdk-run")
    assert described["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"


@pytest.mark.parametrize("path", ["sdk", "boto3"])
def test_default_names_agree_on_both_paths(aws_env, captured, capsys, files, path):
    pytest.importorskip("sagemaker.core") if path == "sdk" else None
    assert submit.main([*common_args(files), *(["--no-sdk"] if path == "boto3" else [])]) == 0
    printed = capsys.readouterr().out.split("training job ")[1].split()[0]
    [(_, sent)] = captured
    assert sent["TrainingJobName"] == printed and printed.startswith("qlora-llama-2-7b-hf-2")
    assert sent["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/{printed}"


def test_sdk_submits_without_role_validation_or_an_iam_endpoint(aws_env, capsys, files, monkeypatch, tmp_path):
    """The SDK's ModelTrainer ran iam:SimulatePrincipalPolicy on the role first: it rejected the template's role for
    callers allowed to simulate, and failed outright with no IAM endpoint reachable (a private CI subnet)."""
    pytest.importorskip("sagemaker.core")
    from .. import aws_calls

    monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", "http://127.0.0.1:9")  # nothing listens there
    record = tmp_path / "calls.jsonl"
    monkeypatch.setattr(botocore.session.Session, "__init__", botocore.session.Session.__init__)  # undone after
    aws_calls.install(str(record))
    assert submit.main([*common_args(files), "--name", "qlora-no-iam"]) == 0, capsys.readouterr().err
    services = {c["service"] for c in aws_calls.read(record)}
    assert "iam" not in services and "sagemaker" in services


def test_aws_region_alone_selects_the_region(aws_env, captured, capsys, files, monkeypatch):
    """The project's own scripts set AWS_REGION, which boto3 does not read (NoRegionError before)."""
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-region"]) == 0, capsys.readouterr().err
    assert boto3.client("sagemaker", region_name="eu-west-1").describe_training_job(
        TrainingJobName="qlora-region")["TrainingJobName"] == "qlora-region"


def test_boto3_path_without_sdk(aws_env, captured, capsys, files):
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-boto3-run"]) == 0
    [(_, sent)] = captured
    check_training_request(sent)
    assert sent["TrainingJobName"] == "qlora-boto3-run"
    assert sent["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/qlora-boto3-run"


def test_schedule_creates_the_same_job_each_run(aws_env, captured, capsys, files):
    args = [*common_args(files), "--schedule", "30 2 * * 1-5", "--timezone", "Europe/Berlin",
            "--scheduler-role", SCHED_ROLE, "--dead-letter-queue", DEAD_LETTERS]
    dry = dry_run_request(args, capsys)["CreateSchedule"]
    assert submit.main(args) == 0
    [(operation, sent)] = captured
    assert operation == "CreateSchedule"
    sent.pop("ClientToken", None)  # botocore fills an idempotency token in
    assert sent == dry
    validate("scheduler", "CreateSchedule", sent)
    assert sent["ScheduleExpression"] == "cron(30 2 ? * MON,TUE,WED,THU,FRI *)"
    assert sent["ScheduleExpressionTimezone"] == "Europe/Berlin"
    assert sent["Target"]["Arn"] == "arn:aws:scheduler:::aws-sdk:sagemaker:createTrainingJob"
    assert sent["Target"]["RoleArn"] == SCHED_ROLE
    # A run the scheduler could not start is reported there (the template's alarm watches the queue).
    assert sent["Target"]["DeadLetterConfig"] == {"Arn": DEAD_LETTERS}
    # What the scheduler sends on each tick, with its per-run execution id filled in, is a valid job.
    job = json.loads(sent["Target"]["Input"].replace(sagemaker_backend.EXECUTION_ID, "d32c5kddcf5bb8c3"))
    check_training_request(job)
    assert job["TrainingJobName"] == "qlora-llama-2-7b-hf-d32c5kddcf5bb8c3"
    assert job["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/qlora-llama-2-7b-hf-d32c5kddcf5bb8c3"
    # Each run gets its own output prefix and publishes latest.json only after success.
    assert job["Environment"]["QLORA_OUTPUT_EXISTS"] == "version"
    stored = boto3.client("scheduler").get_schedule(Name=sent["Name"])
    assert stored["Target"]["Input"] == sent["Target"]["Input"]


def test_follow_streams_logs_and_exits_with_the_result(aws_env, capsys, files):
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-follow"]) == 0
    logs = boto3.client("logs")
    group = sagemaker_backend.LOG_GROUP
    try:
        logs.create_log_group(logGroupName=group)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    stream = "qlora-follow/algo-1-1700000000"
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now_ms = int(time.time() * 1000)
    logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
        {"timestamp": now_ms, "message": "step 10 loss 1.23"}, {"timestamp": now_ms + 1, "message": "done"}])
    lines: list[str] = []
    sm = sagemaker_backend.SageMakerOptions(role_arn=ROLE)
    assert sagemaker_backend.wait("qlora-follow", sm, follow=True, poll_seconds=0.1, write=lines.append) == 0
    assert lines == ["[algo-1-1700000000] step 10 loss 1.23", "[algo-1-1700000000] done"]


@pytest.mark.parametrize(("status", "reason", "code"), [
    ("Completed", "", 0), ("Failed", "configuration error: 1 configuration problem(s)", 2),
    ("Failed", "data error: bad record", 3), ("Failed", "preempted: rerun to resume", 75),
    # What SageMaker really reports for a custom image: its own prefix before the failure file's text
    # (aws/amazon-sagemaker-examples#1224 "AlgorithmError: framework error: ..."), and ", exit code: N" after it
    # or alone when there is no failure file (aws-samples/amazon-sagemaker-ml-pipeline-deploy-with-terraform#12).
    ("Failed", "AlgorithmError: data error: train.jsonl:2: no assistant turn, exit code: 3", 3),
    ("Failed", "AlgorithmError: configuration error: 1 configuration problem(s):\n  - QLORA_LORA_R=0", 2),
    ("Failed", "AlgorithmError: storage error: access denied while trying to read s3://b/data/x", 5),
    ("Failed", "AlgorithmError: preempted: SIGTERM received: checkpoint saved at step 40, exit code: 75", 75),
    ("Failed", "AlgorithmError: output exists: s3://b/output/run1 already holds a complete result", 6),
    ("Failed", "AlgorithmError: , exit code: 4", 4),
    ("Failed", "AlgorithmError: not promoted: the run is complete at s3://b/out/runs/20260101T000000Z-abcdef, but"
               " latest.json still names s3://b/out/runs/x: eval_loss 2.5 is worse than 2.1, exit code: 7", 7),
    ("Failed", "AlgorithmError: , exit code: 7", 7),
    ("Failed", "AlgorithmError: , exit code: 1", 1),
    ("Failed", "AlgorithmError: Exit Code: 137", 1),
    ("Failed", "AlgorithmError: framework error: Traceback (most recent call last): ...", 1),
    ("Failed", "ClientError: Please ensure the specified S3 prefix exists", 1),
    ("Failed", "AlgorithmError: something else", 1), ("Stopped", "", 1)])
def test_exit_code_follows_the_failure_reason(status, reason, code):
    assert sagemaker_backend.exit_code_for({"TrainingJobStatus": status, "FailureReason": reason}) == code


def test_script_dry_run_from_a_fresh_checkout():
    """`python launch/submit.py --instance g5.2xlarge --dry-run` with nothing else set."""
    proc = subprocess.run([sys.executable, "launch/submit.py", "--instance", "g5.2xlarge", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    req = json.loads(proc.stdout)["CreateTrainingJob"]
    validate("sagemaker", "CreateTrainingJob", req)
    assert "placeholder" in proc.stderr and "GPU memory: fits" in proc.stderr


def test_a_schedule_needs_a_dead_letter_queue_and_no_overlap(capsys, files):
    base = ["--instance", "g5.2xlarge", "--image", IMAGE, "--role", ROLE, "--scheduler-role", SCHED_ROLE,
            "--set", f"data={BUCKET}/data/chat/", "--set", f"output={BUCKET}/output/run1"]
    assert submit.main([*base, "--schedule", "0 3 * * 1"]) == 2
    assert "--dead-letter-queue is not set" in capsys.readouterr().err
    # EventBridge starts every tick even while the last run trains: a run must end before the next one starts.
    assert submit.main([*base, "--schedule", "0 3 * * *", "--dead-letter-queue", DEAD_LETTERS, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "starts a run every 24 h at the shortest, but a run may last 24 h (--max-run-hours)" in err
    assert "Set --max-run-hours below 24" in err
    assert submit.main([*base, "--schedule", "0 3 * * *", "--max-run-hours", "20", "--dry-run"]) == 0
    capsys.readouterr()


def test_smoke_test_schedule_starts_one_short_run_with_the_same_job_name_pattern(aws_env, captured, capsys, files):
    args = [*common_args(files), "--schedule", "0 3 * * 1", "--scheduler-role", SCHED_ROLE,
            "--dead-letter-queue", DEAD_LETTERS, "--smoke-test", "--name", "qlora-weekly"]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    [(_, recurring), (_, smoke)] = captured
    validate("scheduler", "CreateSchedule", smoke)
    assert smoke["Name"] == recurring["Name"] + "-smoke" and smoke["ActionAfterCompletion"] == "DELETE"
    assert smoke["ScheduleExpression"].startswith("at(20") and smoke["ScheduleExpressionTimezone"] == "UTC"
    job = json.loads(smoke["Target"]["Input"])
    assert job["TrainingJobName"] == json.loads(recurring["Target"]["Input"])["TrainingJobName"]
    assert sagemaker_backend.EXECUTION_ID in job["TrainingJobName"]
    assert job["Environment"]["QLORA_MAX_STEPS"] == "1" and job["Environment"]["QLORA_OUTPUT"].endswith("/smoke-test")
    check = json.loads(smoke["Target"]["Input"].replace(sagemaker_backend.EXECUTION_ID, "d32c5kddcf5bb8c3"))
    validate("sagemaker", "CreateTrainingJob", check)
    assert "aws sagemaker list-training-jobs --name-contains qlora-llama-2-7b-hf-" in out


def test_resume_from_an_earlier_job_or_prefix(aws_env, captured, capsys, files):
    """A new job reuses an earlier run's checkpoint prefix (SageMaker restores CheckpointConfig.S3Uri at start)."""
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-first"]) == 0
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-second", "--resume-from", "qlora-first"]) == 0
    assert submit.main([*common_args(files), "--no-sdk", "--name", "qlora-third", "--resume-from", "qlora-second"]) == 0
    first, second, third = (sent for _, sent in captured)
    assert first["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/qlora-first"
    # A job name is looked up: the job's own prefix, also when that job itself resumed another.
    assert second["CheckpointConfig"]["S3Uri"] == third["CheckpointConfig"]["S3Uri"] == first["CheckpointConfig"]["S3Uri"]
    assert third["TrainingJobName"] == "qlora-third" and third["Environment"]["QLORA_RUN_NAME"] == "qlora-third"
    capsys.readouterr()
    dry = dry_run_request([*common_args(files), "--resume-from", f"{BUCKET}/checkpoints/qlora-first/"], capsys)
    assert dry["CreateTrainingJob"]["CheckpointConfig"]["S3Uri"] == f"{BUCKET}/checkpoints/qlora-first"
    capsys.readouterr()
    assert submit.main([*common_args(files), "--no-sdk", "--resume-from", "qlora-never-ran"]) == 2
    err = capsys.readouterr().err
    assert "--resume-from qlora-never-ran: there is no SageMaker training job of that name" in err
    assert "Traceback" not in err


def test_a_prefix_means_the_same_objects_on_both_backends(capsys, files):
    """SageMaker's S3Prefix takes every key that starts with the URI; the job lists `<uri>/`. A URI that names no data
    file is made the prefix `<uri>/`; a single data file is not a channel (the job downloads exactly that object)."""
    args = ["--instance", "g5.2xlarge", "--set", f"data={BUCKET}/data/chat", "--set", f"model={BUCKET}/models/llama",
            "--set", f"eval_data={BUCKET}/data/eval.jsonl", "--set", "max_steps=10"]
    assert submit.main([*args, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    req = json.loads(out)["CreateTrainingJob"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]}
    assert channels == {"train": f"{BUCKET}/data/chat/", "model": f"{BUCKET}/models/llama/"}
    assert req["Environment"]["QLORA_EVAL_DATA"] == f"{BUCKET}/data/eval.jsonl"
    assert f"QLORA_DATA={BUCKET}/data/chat is taken as the prefix {BUCKET}/data/chat/" in err
    assert submit.main([*args, "--backend", "kubernetes", "--format", "json", "--dry-run"]) == 0
    env = {e["name"]: e.get("value") for e in json.loads(capsys.readouterr().out)["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env["QLORA_DATA"] == f"{BUCKET}/data/chat/" and env["QLORA_MODEL"] == f"{BUCKET}/models/llama/"
    assert env["QLORA_EVAL_DATA"] == f"{BUCKET}/data/eval.jsonl"


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-run-hours", "0.0001"], "--max-run-hours 0.0001: must be at least one second"),
    (["--max-run-hours", "700"], "SageMaker stops training jobs after at most 28 days"),
    (["--volume-size-gb", "0"], "--volume-size-gb 0: must be 1 or more"),
    (["--subnet", "subnet-0abc"], "--subnet and --security-group go together"),
    (["--security-group", "sg-0abc"], "--subnet and --security-group go together"),
    (["--schedule", "0 3 * * 1", "--timezone", "Mars/Olympus"], "--timezone 'Mars/Olympus' is not an IANA time zone"),
    (["--volume-kms-key", "alias/qlora"], "SageMaker refuses a VolumeKmsKeyId for such types: leave the flag out"),
    (["--set", "QLORA_RUN_NAME=x"], "QLORA_RUN_NAME is set by the launcher"),
])
def test_what_aws_would_refuse_is_refused_locally(capsys, extra, message):
    """Each of these passed the dry run and was then refused by AWS (or failed the job after it started)."""
    args = ["--instance", "g5.2xlarge", "--set", f"data={BUCKET}/data/chat/", "--set", f"output={BUCKET}/output/x",
            "--set", "max_steps=10", *extra, "--dry-run"]
    assert submit.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was submitted" in err and "Traceback" not in err


def test_environment_limits_and_a_gated_model_without_a_token(capsys, tmp_path):
    env_file = tmp_path / "many.env"
    env_file.write_text("".join(f"VAR_{i}=x\n" for i in range(101)) + f"LONG={'y' * 513}\n")
    base = ["--instance", "g5.2xlarge", "--set", f"data={BUCKET}/data/chat/", "--set", f"output={BUCKET}/output/x",
            "--set", "max_steps=10"]
    assert submit.main([*base, "--env-file", str(env_file), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "SageMaker takes at most 100" in err and "LONG: its value has 513 characters" in err
    # The default model is gated: a real submission without a token source is refused, a dry run notes it.
    real = [*base, "--image", IMAGE, "--role", ROLE]
    assert submit.main(real) == 2
    err = capsys.readouterr().err
    assert "QLORA_MODEL=meta-llama/Llama-2-7b-hf: a gated Hub model" in err and "--set secrets_arn=" in err
    assert submit.main([*base, "--dry-run"]) == 0
    assert "a gated Hub model" in capsys.readouterr().err


def test_the_catalog_knows_the_instance_storage_and_the_disk_check_warns(capsys):
    from launch import instances

    assert instances.lookup("g5.xlarge").instance_store_gb == 250 and instances.lookup("p4d.24xlarge").has_instance_store
    args = ["--instance", "p4de.24xlarge", "--set", "model=meta-llama/Llama-2-70b-hf", "--set", "max_steps=10",
            "--backend", "kubernetes", "--volume-size-gb", "100", "--dry-run"]
    assert submit.main(args) == 0
    err = capsys.readouterr().err
    assert "disk: WARNING: Llama-2-70B needs about" in err and "--volume-size-gb 100" in err
    assert submit.main(["--instance", "g5.2xlarge", "--volume-size-gb", "300", "--dry-run"]) == 0
    assert "--volume-size-gb has no effect on SageMaker for ml.g5.2xlarge: its training disk is its 450 GB" in \
        capsys.readouterr().err


def test_a_submission_failure_has_its_own_exit_code(aws_env, capsys, files, monkeypatch):
    """Not 1, which under --wait means the job failed with an internal error."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert submit.main([*common_args(files), "--no-sdk"]) == submit.EXIT_SUBMISSION_FAILED == 8
    err = capsys.readouterr().err
    assert "submission failed; nothing was started: EndpointConnectionError" in err and "Traceback" not in err


def test_the_estimate_warns_past_max_run_hours_and_says_when_it_is_an_upper_bound(capsys):
    args = ["--instance", "g5.2xlarge", "--set", "max_steps=5000", "--dry-run"]
    assert submit.main(args) == 0
    err = capsys.readouterr().err
    assert "an UPPER BOUND" in err
    assert "is longer than --max-run-hours 24: SageMaker would stop the job" in err
    assert submit.main(["--instance", "g5.2xlarge", "--dataset-tokens", "2000000", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "the data's 2000000 tokens (--dataset-tokens) x 1 epoch(s)" in err and "UPPER BOUND" not in err


def test_names_start_with_the_stacks_job_name_prefix(capsys):
    """The template's roles act only on <JobNamePrefix>-* jobs and schedules: another name is AccessDenied at submit."""
    args = ["--instance", "g5.2xlarge", "--set", "max_steps=10", "--dry-run"]
    assert submit.main([*args, "--name", "support-bot-1"]) == 2
    assert "--name 'support-bot-1': must start with qlora-" in capsys.readouterr().err
    assert submit.main([*args, "--name", "ml-support-bot-1", "--name-prefix", "ml"]) == 0
    assert json.loads(capsys.readouterr().out)["CreateTrainingJob"]["TrainingJobName"] == "ml-support-bot-1"
    assert submit.main([*args, "--name-prefix", "ml"]) == 0
    assert json.loads(capsys.readouterr().out)["CreateTrainingJob"]["TrainingJobName"].startswith("ml-llama-2-7b-hf-")
