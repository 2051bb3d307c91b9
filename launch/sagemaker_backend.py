"""SageMaker backend: the CreateTrainingJob request, its submission through the SDK, the schedule, wait/logs.

    python launch/submit.py --instance g5.2xlarge --backend sagemaker --dry-run

`training_job_request()` builds the plain CreateTrainingJob request (the API's own field names), which
`--dry-run` prints and the EventBridge schedule embeds. Submission goes through the SageMaker Python SDK
v3 (sagemaker-core's `TrainingJob.create`) when it is installed (`pip install -e '.[sagemaker]'` in the checkout), with
that same request (a test compares them); without the SDK, or with --no-sdk, boto3 sends it.
The image keeps its own entrypoint: SageMaker starts `<image> train`, and the container's wrapper runs
torchrun over every GPU and host (SM_HOSTS / SM_CURRENT_HOST), so multi-node needs nothing more here.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from entrypoints import errors
from launch.plan import LaunchPlan, join_s3

# The job reads its data/eval/model from these channels when QLORA_DATA / QLORA_EVAL_DATA / QLORA_MODEL
# are not set (entrypoints/config.py), so a channel replaces the variable instead of repeating it.
CHANNELS = {"QLORA_DATA": "train", "QLORA_EVAL_DATA": "eval", "QLORA_MODEL": "model"}
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # the job's default checkpoint_dir (entrypoints/paths.py)
SCHEDULER_TARGET_ARN = "arn:aws:scheduler:::aws-sdk:sagemaker:createTrainingJob"
# EventBridge Scheduler replaces this in the target input with an id unique to each invocation
# (16 lower-case alphanumerics), which makes every scheduled job name and checkpoint prefix unique.
EXECUTION_ID = "<aws.scheduler.execution-id>"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
# What SageMaker puts before a custom image's failure file text in FailureReason (see exit_code_for).
FAILURE_REASON_PREFIXES = ("AlgorithmError:", "ClientError:")
_EXIT_CODE_AT_END = re.compile(r"exit code:\s*(\d+)\s*$", re.IGNORECASE)
_DOCUMENTED_CODES = {errors.EXIT_CONFIG, errors.EXIT_DATA, errors.EXIT_MODEL, errors.EXIT_STORAGE,
                     errors.EXIT_OUTPUT_EXISTS, errors.EXIT_NOT_PROMOTED, errors.EXIT_HUB_PUBLISH,
                     errors.EXIT_PEER_LOST, errors.EXIT_PREEMPTED}


@dataclass(frozen=True)
class SageMakerOptions:
    role_arn: str
    region: str = ""
    subnets: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    volume_kms_key: str = ""
    output_kms_key: str = ""
    scheduler_role_arn: str = ""  # the role EventBridge Scheduler assumes to create the jobs
    dead_letter_arn: str = ""  # SQS queue for the events of scheduled runs that could not be started
    tags: dict[str, str] = field(default_factory=dict)


def _s3_channel(name: str, uri: str) -> dict:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                # S3Prefix: a single object or everything under a prefix, like QLORA_DATA itself.
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                # Every host gets all of it; the job shards the data across ranks itself.
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        # File: copied to /opt/ml/input/data/<name> before the container starts (the job expects files).
        "InputMode": "File",
    }


def job_environment(plan: LaunchPlan, job_name: str) -> tuple[dict[str, str], list[dict]]:
    """The container environment and the input channels that replace the s3:// data/model prefixes."""
    # The run is named like its job: W&B, the model card, and the job's "to resume: --resume-from <name>" hint.
    env = {**plan.extra_env, **plan.settings, "QLORA_RUN_NAME": job_name}
    channels = []
    for variable, channel in CHANNELS.items():
        uri = env.get(variable, "")
        # Only a prefix (the launcher made every non-file URI one, ending in /) becomes a channel: an S3Prefix of one
        # file's key would also take every other key that starts with it (train.jsonl.bak); the job downloads a single
        # file itself, as it does on Kubernetes.
        # Nor does a data mix (several comma-separated sources): the job reads each source from S3 itself, so the
        # manifest and the data fingerprint name the sources, and the mix is drawn the same way on both backends.
        if uri.startswith("s3://") and uri.endswith("/") and "," not in uri:
            channels.append(_s3_channel(channel, uri))
            del env[variable]
            if variable == "QLORA_MODEL":
                # Inside the job the model is then /opt/ml/input/data/model: the outputs name it by its source instead.
                env.setdefault("QLORA_MODEL_NAME", uri)
    return dict(sorted(env.items())), channels


def training_job_request(plan: LaunchPlan, sm: SageMakerOptions, job_name: str, checkpoint_uri: str) -> dict:
    """The CreateTrainingJob request for one run, with the API's own field names."""
    env, channels = job_environment(plan, job_name)
    request: dict = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            # No ContainerEntrypoint/Arguments: the image's entrypoint runs, started as `<image> train`.
            "TrainingImage": plan.image,
            "TrainingInputMode": "File",
        },
        "RoleArn": sm.role_arn,
        "ResourceConfig": {
            "InstanceType": plan.instance.sagemaker_type,
            "InstanceCount": plan.instance_count,
            # Holds the input channels, /opt/ml/work (downloads, the merge) and checkpoints.
            "VolumeSizeInGB": plan.volume_size_gb,
        },
        "OutputDataConfig": {
            # The job uploads its results to QLORA_OUTPUT itself (manifest last); SageMaker only uploads
            # what is left in /opt/ml/model and /opt/ml/output/data, uncompressed (no multi-GB tarball).
            "S3OutputPath": join_s3(plan.output, "sagemaker"),
            "CompressionType": "NONE",
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": plan.max_run_seconds},
        "CheckpointConfig": {
            # SageMaker syncs this local folder to S3 while the job runs and restores it after a spot
            # interruption, so the restarted job resumes from its newest checkpoint.
            "S3Uri": checkpoint_uri,
            "LocalPath": str(plan.cfg.checkpoint_path) if plan.cfg.checkpoint_dir else CHECKPOINT_LOCAL_PATH,
        },
        # Settings and other non-secret variables only; secrets are read at run time from the Secrets
        # Manager ARN in QLORA_SECRETS_ARN (the execution role may read that one secret).
        "Environment": env,
        "EnableManagedSpotTraining": plan.spot,
    }
    if channels:
        request["InputDataConfig"] = channels
    if plan.spot:
        # Spot: the total time including waiting for capacity; must be at least the run time.
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = plan.max_wait_seconds
    if sm.volume_kms_key:
        request["ResourceConfig"]["VolumeKmsKeyId"] = sm.volume_kms_key
    if sm.output_kms_key:
        request["OutputDataConfig"]["KmsKeyId"] = sm.output_kms_key
    if sm.subnets or sm.security_group_ids:
        request["VpcConfig"] = {"SecurityGroupIds": list(sm.security_group_ids), "Subnets": list(sm.subnets)}
    tags = {**plan.tags, **sm.tags}
    if tags:
        request["Tags"] = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
    return request


def run_request(plan: LaunchPlan, sm: SageMakerOptions, job_name: str, resume_from: str = "") -> dict:
    return training_job_request(plan, sm, job_name, resume_from or plan.checkpoint_uri(job_name))


def checkpoint_uri_of(job_name: str, sm: SageMakerOptions) -> str:
    """The S3 prefix an earlier training job checkpointed to (DescribeTrainingJob), for --resume-from <job name>."""
    from botocore.exceptions import ClientError

    client = boto_session(sm).client("sagemaker")
    try:
        described = client.describe_training_job(TrainingJobName=job_name)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        # SageMaker answers a job that does not exist with ValidationException "Requested resource not found".
        message = error.get("Message", "").lower()
        if error.get("Code") not in ("ResourceNotFound", "ValidationException") or not (
                "not found" in message or "could not find" in message):
            raise
        raise LookupError(f"--resume-from {job_name}: there is no SageMaker training job of that name in"
                          f" {client.meta.region_name}; give its exact name, or the s3:// prefix of its checkpoints") from None
    uri = described.get("CheckpointConfig", {}).get("S3Uri", "")
    if not uri:
        raise LookupError(f"--resume-from {job_name}: that training job kept no checkpoints in S3 (no CheckpointConfig)")
    return uri


def schedule_request(plan: LaunchPlan, sm: SageMakerOptions, schedule_expression: str) -> dict:
    """The EventBridge Scheduler CreateSchedule request whose target creates one training job per run."""
    # 63 characters at most once the 16-character execution id is filled in.
    job_name = f"{plan.base_name[:46].rstrip('-')}-{EXECUTION_ID}"
    job = training_job_request(plan, sm, job_name, join_s3(plan.checkpoint_prefix, job_name))
    request = {
        "Name": plan.name,
        "Description": f"Scheduled QLoRA training of {plan.cfg.model} on {plan.instance_count} x"
                       f" {plan.instance.sagemaker_type}",
        "ScheduleExpression": schedule_expression,
        "ScheduleExpressionTimezone": plan.timezone or "UTC",
        # Start at the scheduled minute; a training run has no reason to be spread out.
        "FlexibleTimeWindow": {"Mode": "OFF"},
        "State": "ENABLED",
        "Target": {
            # Universal target: the scheduler calls sagemaker:CreateTrainingJob with Input as the request.
            "Arn": SCHEDULER_TARGET_ARN,
            "RoleArn": sm.scheduler_role_arn,
            "Input": json.dumps(job, sort_keys=True),
            # A failed CreateTrainingJob call (throttling, capacity) is retried for up to an hour; a run
            # that started and failed is not re-run by the scheduler: the next schedule tick is.
            "RetryPolicy": {"MaximumEventAgeInSeconds": 3600, "MaximumRetryAttempts": 3},
        },
    }
    if sm.dead_letter_arn:
        # A run that could not be started (quota, AccessDenied, an invalid request) lands here, where the template's
        # alarm sees it, instead of only in the scheduler's metrics.
        request["Target"]["DeadLetterConfig"] = {"Arn": sm.dead_letter_arn}
    return request


# What a smoke test's one run trains: one step, no merge, in a version series of its own.
SMOKE_SETTINGS = {"QLORA_MAX_STEPS": "1", "QLORA_MERGE": "false", "QLORA_NUM_SAMPLE_GENERATIONS": "0"}
SMOKE_RUNTIME_SECONDS = 3600


def smoke_schedule_request(schedule: dict, output: str, at_utc: float) -> dict:
    """A one-time schedule that fires once, a few minutes from now, with the recurring schedule's target (the same
    job name pattern `<base>-<aws.scheduler.execution-id>`): a training job of that name appearing proves the
    scheduler fills the execution id in, inside the name. It trains one step into <output>/smoke-test (its own
    latest.json), stops within the hour, and the schedule deletes itself afterwards."""
    job = json.loads(schedule["Target"]["Input"])
    job["Environment"] = {**job["Environment"], **SMOKE_SETTINGS, "QLORA_OUTPUT": join_s3(output, "smoke-test")}
    job["StoppingCondition"]["MaxRuntimeInSeconds"] = SMOKE_RUNTIME_SECONDS
    if "MaxWaitTimeInSeconds" in job["StoppingCondition"]:
        job["StoppingCondition"]["MaxWaitTimeInSeconds"] = 2 * SMOKE_RUNTIME_SECONDS
    return {
        **schedule,
        "Name": f"{schedule['Name'][:58]}-smoke",
        "Description": f"One-time smoke test of the schedule {schedule['Name']}",
        "ScheduleExpression": f"at({time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(at_utc))})",
        "ScheduleExpressionTimezone": "UTC",
        "ActionAfterCompletion": "DELETE",
        "Target": {**schedule["Target"], "Input": json.dumps(job, sort_keys=True)},
    }

def example_job_name(schedule_job_name: str, execution_id: str = "d32c5kddcf5bb8c3") -> str:
    return schedule_job_name.replace(EXECUTION_ID, execution_id)


# ------------------------------------------------------------------------------------------------ submission
def boto_session(sm: SageMakerOptions):
    import boto3

    return boto3.Session(region_name=sm.region or None)


def sdk_create(request: dict, session) -> str:
    """Create the job through the SageMaker Python SDK v3: sagemaker-core's TrainingJob.create, the call ModelTrainer
    itself ends in, with this very request (its fields in the SDK's names). Not ModelTrainer: it names the job
    `<base>-<local time>` itself (the checkpoint prefix and the printed name would disagree with the job's), and it
    validates the role with iam:SimulatePrincipalPolicy first, which rejects the template's role (no ec2:* on `*`, a
    namespace-conditioned cloudwatch:PutMetricData) for callers allowed to simulate, and fails without an IAM endpoint."""
    from sagemaker.core.resources import TrainingJob
    from sagemaker.core.utils.utils import transform

    job = TrainingJob.create(session=session, **transform(request, "CreateTrainingJobRequest"))
    return job.training_job_name


def sdk_available() -> bool:
    try:
        import sagemaker.train  # noqa: F401
    except ImportError:
        return False
    return True


def submit(request: dict, sm: SageMakerOptions, use_sdk: bool | None = None) -> str:
    """Create the training job; returns its name. The SDK path is used when the SDK is installed."""
    session = boto_session(sm)
    if use_sdk is None:
        use_sdk = sdk_available()
    if use_sdk:
        return sdk_create(request, session)
    session.client("sagemaker").create_training_job(**request)
    return request["TrainingJobName"]


def create_schedule(request: dict, sm: SageMakerOptions) -> str:
    response = boto_session(sm).client("scheduler").create_schedule(**request)
    return response["ScheduleArn"]


# ------------------------------------------------------------------------------------------------ wait/follow
def exit_code_for(description: dict) -> int:
    """The job's result as our exit code: 0 when Completed; a failure's code from its FailureReason.

    The job writes `<kind>: <message>` to /opt/ml/output/failure, which SageMaker reports as FailureReason,
    so the kind names the documented exit code (configuration error -> 2, ...).
    """
    status = description.get("TrainingJobStatus")
    if status == "Completed":
        return errors.EXIT_OK
    reason = description.get("FailureReason", "").strip()
    # SageMaker prefixes what a custom image wrote: "AlgorithmError: <failure file>" (the container exited
    # non-zero), "ClientError: ..." (the request or the input), and may end the reason with ", exit code: N".
    for prefix in FAILURE_REASON_PREFIXES:
        if reason.startswith(prefix):
            reason = reason[len(prefix):].lstrip()
            break
    for cls in (errors.ConfigError, errors.DataError, errors.ModelError, errors.StorageError,
                errors.OutputExistsError, errors.NotPromoted, errors.PeerLost, errors.Preempted):
        if reason.startswith(cls.kind + ":"):
            return cls.exit_code
    trailing = _EXIT_CODE_AT_END.search(reason)
    if trailing and int(trailing.group(1)) in _DOCUMENTED_CODES:
        return int(trailing.group(1))
    return errors.EXIT_INTERNAL


def stream_logs(logs_client, job_name: str, tokens: dict[str, str | None], write: Callable[[str], None]) -> None:
    """Print the new CloudWatch log events of every stream of the job (one stream per host)."""
    try:
        streams = logs_client.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=job_name + "/")
    except logs_client.exceptions.ResourceNotFoundException:
        return  # the log group appears with the first job's first line
    for stream in streams.get("logStreams", []):
        name = stream["logStreamName"]
        while True:
            kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
            if tokens.get(name):
                kwargs["nextToken"] = tokens[name]
            page = logs_client.get_log_events(**kwargs)
            for event in page.get("events", []):
                host = name.split("/")[-1]
                write(f"[{host}] {event['message']}")
            if page.get("nextForwardToken") == tokens.get(name):
                break
            tokens[name] = page.get("nextForwardToken")


def wait(job_name: str, sm: SageMakerOptions, follow: bool, poll_seconds: float = 30.0,
         write: Callable[[str], None] = print) -> int:
    session = boto_session(sm)
    client = session.client("sagemaker")
    logs = session.client("logs") if follow else None
    tokens: dict[str, str | None] = {}
    last_status = None
    while True:
        description = client.describe_training_job(TrainingJobName=job_name)
        status = f"{description['TrainingJobStatus']} / {description.get('SecondaryStatus', '')}"
        if status != last_status:
            print(f"[launcher] {job_name}: {status}", file=sys.stderr)
            last_status = status
        if logs is not None:
            stream_logs(logs, job_name, tokens, write)
        if description["TrainingJobStatus"] in ("Completed", "Failed", "Stopped"):
            if description.get("FailureReason"):
                print(f"[launcher] failure reason: {description['FailureReason']}", file=sys.stderr)
            code = exit_code_for(description)
            if code == errors.EXIT_NOT_PROMOTED:
                # SageMaker shows the job as Failed: say plainly that its result exists and what did not happen.
                print(f"[launcher] {job_name}: exit {code}: {errors.NOT_PROMOTED_MEANING} (the reason is above)",
                      file=sys.stderr)
            return code
        time.sleep(poll_seconds)
