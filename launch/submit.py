"""Submit the QLoRA training job to SageMaker or Kubernetes, once or on a schedule.

    python launch/submit.py --instance g5.2xlarge --dry-run
    python launch/submit.py --instance g5.2xlarge --set data=s3://b/data/train.jsonl --set output=s3://b/output/run1 \
        --image <ecr-uri> --role <execution-role-arn> --follow
    python launch/submit.py --instance g6e.xlarge --backend kubernetes --k8s-secret qlora-secrets ... --dry-run
    python launch/submit.py --instance g5.2xlarge --schedule "0 3 * * 1" --scheduler-role <arn> ...

Steps: collect the job settings -> validate them with the job's own parser -> check the model fits the
GPU -> print the time/cost estimate -> build the request/manifests -> print them (--dry-run) or send
them -> optionally wait and stream logs, exiting with the job's result. Never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python launch/submit.py`: sys.path[0] is launch/, which would let launch/*.py shadow real
    # packages and hides the repository's packages. Put the repository root there instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from entrypoints.config import env_name  # noqa: E402
from entrypoints.data import file_type  # noqa: E402
from entrypoints.errors import EXIT_CONFIG  # noqa: E402
from entrypoints.sizing import shape_of_model  # noqa: E402
from entrypoints.suites import suite_uris  # noqa: E402
from launch import cron, estimate, instances, settings  # noqa: E402
from launch.kubernetes_backend import KubernetesOptions  # noqa: E402
from launch.plan import LaunchPlan, base_name, check_name, join_s3, unique_name  # noqa: E402
from launch.sagemaker_backend import SageMakerOptions  # noqa: E402

# The launcher's own exit codes (launch/README.md). With --wait/--follow the job's result is the exit code instead
# (0, or its documented code: entrypoints/errors.py), so a submission that failed has a code the job never uses.
EXIT_SUBMITTED = 0
EXIT_INVALID = EXIT_CONFIG  # 2: a problem found before sending anything; nothing was sent
EXIT_SUBMISSION_FAILED = 8  # the cloud or cluster refused or could not be reached; nothing is running

# Shown only by --dry-run when a value needed for submission is missing; AWS's documentation account id,
# and the names infra/cloudformation.yaml creates, so the printout reads like the real thing.
EXAMPLE_ACCOUNT = "111122223333"
EXAMPLE_REGION = "us-east-1"
EXAMPLE_BUCKET = f"s3://qlora-job-{EXAMPLE_ACCOUNT}-{EXAMPLE_REGION}"
PLACEHOLDERS = {
    "image": f"{EXAMPLE_ACCOUNT}.dkr.ecr.{EXAMPLE_REGION}.amazonaws.com/qlora-job:0.1.0",
    "role": f"arn:aws:iam::{EXAMPLE_ACCOUNT}:role/qlora-job-sagemaker-execution",
    "scheduler_role": f"arn:aws:iam::{EXAMPLE_ACCOUNT}:role/qlora-job-scheduler",
    "dead_letter": f"arn:aws:sqs:{EXAMPLE_REGION}:{EXAMPLE_ACCOUNT}:qlora-job-schedule-dead-letters",
    "data": f"{EXAMPLE_BUCKET}/data/train.jsonl",
    "output": f"{EXAMPLE_BUCKET}/output/qlora-llama-2-7b-hf",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python launch/submit.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instance", required=True, help="GPU instance type, e.g. g5.2xlarge (see python -m launch.instances)")
    ap.add_argument("--backend", choices=("sagemaker", "kubernetes"), default="sagemaker")
    ap.add_argument("--count", type=int, default=1, help="number of instances (multi-node through torchrun)")
    ap.add_argument("--spot", action="store_true", help="SageMaker managed spot training (checkpoints resume it)")
    ap.add_argument("--dry-run", action="store_true", help="print the exact request/manifests and send nothing")
    ap.add_argument("--wait", action="store_true", help="wait for the job and exit with its result")
    ap.add_argument("--follow", action="store_true", help="like --wait, streaming the job's logs")
    ap.add_argument("--schedule", default="", metavar="CRON",
                    help="five-field cron (e.g. '0 3 * * 1'): create a schedule that starts a run each time")
    ap.add_argument("--timezone", default="", help="IANA time zone of --schedule (default UTC)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                    help="a job setting: max_steps=100 or QLORA_MAX_STEPS=100 (repeatable)")
    ap.add_argument("--env-file", action="append", default=[], metavar="FILE",
                    help="KEY=VALUE lines: QLORA_* settings and other non-secret environment (repeatable)")
    ap.add_argument("--image", default="", help="the job image URI (see infra/build_and_push.sh)")
    ap.add_argument("--name", default="", help="job name (default <prefix>-<model>-<UTC time>), or schedule name")
    ap.add_argument("--name-prefix", default="qlora", metavar="PREFIX",
                    help="every job and schedule name starts with PREFIX- (infra/cloudformation.yaml's JobNamePrefix:"
                         " its roles may act only on those names)")
    ap.add_argument("--max-run-hours", type=float, default=24.0, help="stop the job after this long")
    ap.add_argument("--max-wait-hours", type=float, default=0.0,
                    help="spot: run time plus time waiting for capacity (default twice --max-run-hours)")
    ap.add_argument("--volume-size-gb", type=int, default=200,
                    help="disk for data, model, checkpoints and merge (SageMaker volume / Kubernetes scratch)")
    ap.add_argument("--resume-from", default="", metavar="JOB_NAME|S3_PREFIX",
                    help="continue an earlier run from its checkpoints: its job name, or the s3:// prefix its"
                         " checkpoints are in (the job prints it when it stops early); use the same settings")
    ap.add_argument("--checkpoint-prefix", default="",
                    help="s3:// prefix for checkpoints, one folder per run below it (default s3://<output bucket>/checkpoints)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="SageMaker tag / Kubernetes label (repeatable)")
    ap.add_argument("--dataset-tokens", type=int, default=0, help="tokens in the training data, for the estimate")
    ap.add_argument("--model-config", default="", metavar="FILE",
                    help="the model's config.json (any file name), for the memory check of a model the launcher cannot"
                         " read (an s3:// or Hub model other than Llama 2)")
    ap.add_argument("--force", action="store_true", help="submit even if the model does not seem to fit the GPU")
    ap.add_argument("--format", choices=("yaml", "json"), default="", help="--dry-run output (default: json for"
                    " SageMaker, yaml for Kubernetes)")
    sm = ap.add_argument_group("SageMaker")
    sm.add_argument("--role", default="", help="SageMaker execution role ARN")
    sm.add_argument("--region", default="", help="AWS region (default: AWS_REGION, then AWS_DEFAULT_REGION or the AWS"
                    " configuration's)")
    sm.add_argument("--subnet", action="append", default=[], help="VPC subnet id (repeatable)")
    sm.add_argument("--security-group", action="append", default=[], help="VPC security group id (repeatable)")
    sm.add_argument("--volume-kms-key", default="", help="KMS key for the training volume")
    sm.add_argument("--output-kms-key", default="", help="KMS key for what SageMaker uploads")
    sm.add_argument("--scheduler-role", default="", help="role EventBridge Scheduler assumes (--schedule)")
    sm.add_argument("--dead-letter-queue", default="", metavar="SQS_ARN",
                    help="--schedule: where the scheduler reports a run it could not start (the template's queue)")
    sm.add_argument("--smoke-test", action="store_true",
                    help="--schedule: also create a one-time schedule 3 minutes from now that starts one short run"
                         " (1 step, no merge, <output>/smoke-test), proving the scheduler names the jobs")
    sm.add_argument("--no-sdk", action="store_true", help="send with boto3 even when the SageMaker SDK is installed")
    k8 = ap.add_argument_group("Kubernetes")
    k8.add_argument("--namespace", default="qlora")
    k8.add_argument("--service-account", default="qlora-job", help="bound to an IAM role for S3 (IRSA/Pod Identity)")
    k8.add_argument("--k8s-secret", default="", help="Secret with keys HF_TOKEN / WANDB_API_KEY (referenced, never read)")
    k8.add_argument("--scratch-storage-class", default="", help="per-pod volume of this class for /opt/ml (default: node disk)")
    k8.add_argument("--backoff-limit", type=int, default=None,
                    help="pod failures (not preemptions) before the Job fails (default 3 per pod: 3 x --count)")
    k8.add_argument("--ttl-hours", type=float, default=72.0, help="delete the finished Job after this long")
    k8.add_argument("--kubeconfig", default="")
    k8.add_argument("--context", default="")
    return ap


SAGEMAKER_MAX_RUNTIME_SECONDS = 28 * 24 * 3600  # StoppingCondition.MaxRuntimeInSeconds' maximum
# SageMaker's limits on Environment (the API model's; botocore does not check the lengths client-side).
ENVIRONMENT_MAX_ENTRIES = 100
ENVIRONMENT_MAX_CHARS = 512
# Hub organisations whose models are gated (a token of an account that accepted the license is needed).
GATED_HUB_ORGS = ("meta-llama/",)


def _timezone_problem(name: str) -> str | None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return (f"--timezone {name!r} is not an IANA time zone (both schedulers refuse it); use a name like"
                " Europe/Berlin or America/New_York, or leave it out for UTC")
    return None


def environment_problems(env: dict[str, str]) -> list[str]:
    """SageMaker refuses an Environment of more than 100 entries, or a key or value over 512 characters."""
    problems = []
    if len(env) > ENVIRONMENT_MAX_ENTRIES:
        problems.append(f"the job's environment has {len(env)} variables; SageMaker takes at most"
                        f" {ENVIRONMENT_MAX_ENTRIES}: drop plain variables from --env-file")
    for key, value in env.items():
        if len(key) > ENVIRONMENT_MAX_CHARS:
            problems.append(f"environment variable {key[:40]}...: its name has {len(key)} characters; SageMaker takes at"
                            f" most {ENVIRONMENT_MAX_CHARS}")
        if len(value) > ENVIRONMENT_MAX_CHARS:
            problems.append(f"{key}: its value has {len(value)} characters; SageMaker takes at most"
                            f" {ENVIRONMENT_MAX_CHARS}: shorten it (a long setting value can live in S3)")
    return problems


def _pairs(texts: Sequence[str], flag: str, problems: list[str]) -> dict[str, str]:
    out = {}
    for text in texts:
        key, eq, value = text.partition("=")
        if not eq or not key:
            problems.append(f"{flag} {text!r}: expected KEY=VALUE")
        else:
            out[key] = value
    return out


def _bucket_of(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0]


def make_plan(args: argparse.Namespace, problems: list[str], notes: list[str]) -> LaunchPlan | None:
    """Resolve and check everything; append every problem found (nothing is sent when there is one)."""
    try:
        instance = instances.lookup(args.instance)
    except ValueError as exc:
        problems.append(str(exc))
        instance = None
    if args.count < 1:
        problems.append(f"--count {args.count}: must be 1 or more")
    if args.spot and args.backend == "kubernetes":
        problems.append("--spot is SageMaker's managed spot; on Kubernetes pick a spot node group through its"
                        " instance type and taints instead")
    if int(args.max_run_hours * 3600) < 1:
        problems.append(f"--max-run-hours {args.max_run_hours:g}: must be at least one second (1/3600)")
    elif args.backend == "sagemaker" and args.max_run_hours * 3600 > SAGEMAKER_MAX_RUNTIME_SECONDS:
        problems.append(f"--max-run-hours {args.max_run_hours:g}: SageMaker stops training jobs after at most 28 days"
                        " (672 h); split the run and continue it with --resume-from")
    if args.volume_size_gb < 1:
        problems.append(f"--volume-size-gb {args.volume_size_gb}: must be 1 or more")
    if args.timezone:
        problem = _timezone_problem(args.timezone)
        if problem:
            problems.append(problem)
    if args.schedule and (args.wait or args.follow):
        problems.append("--schedule creates a schedule, not a run: --wait/--follow do not apply")

    job_settings, extra_env, setting_problems = settings.collect(args.sets, args.env_file)
    problems.extend(setting_problems)

    def fill(key: str, value: str, what: str) -> None:
        if not job_settings.get(key):
            if args.dry_run:
                job_settings[key] = value
                notes.append(f"placeholder {key}={value} (set {what} to submit)")
            elif key != env_name("data"):  # the job's own parser reports a missing QLORA_DATA
                problems.append(f"{key} is not set: give it with {what}")

    fill(env_name("data"), PLACEHOLDERS["data"], "--set data=s3://bucket/prefix")
    fill(env_name("output"), PLACEHOLDERS["output"], "--set output=s3://bucket/prefix")
    if args.schedule:
        mode = job_settings.get(env_name("output_exists"), "version")
        if mode != "version":
            problems.append(f"QLORA_OUTPUT_EXISTS={mode!r}: a scheduled run must use `version` (each run writes"
                            " <output>/runs/<time>/ and, when it succeeds, <output>/latest.json)")
        job_settings[env_name("output_exists")] = "version"
    if env_name("checkpoint_uri") in job_settings:
        problems.append("QLORA_CHECKPOINT_URI is set by the launcher (one prefix per run); use --checkpoint-prefix,"
                        " or --resume-from to continue an earlier run")
    if env_name("run_name") in job_settings:
        problems.append("QLORA_RUN_NAME is set by the launcher: the run is named like its job (W&B, the model card, the"
                        " job's resume hint); use --name")
    if args.resume_from and args.schedule:
        problems.append("--resume-from continues one earlier run; a schedule starts fresh runs: leave it out")

    image = args.image
    if not image:
        if args.dry_run:
            image = PLACEHOLDERS["image"]
            notes.append(f"placeholder image {image} (set --image to submit)")
        else:
            problems.append("--image is not set: the job image URI (infra/build_and_push.sh prints it)")

    tags = _pairs(args.tag, "--tag", problems)

    cfg = settings.validate(job_settings, problems)
    if cfg is None or instance is None:
        return None

    for name in ("data", "eval_data"):
        value = getattr(cfg, name)
        if value and not value.startswith("s3://"):
            problems.append(f"{env_name(name)}={value!r}: a remote job reads its data from S3; give an s3:// URI")
    local_suites = [uri for uri in suite_uris(cfg.eval_suite) if not uri.startswith("s3://")]
    if local_suites:
        problems.append(f"QLORA_EVAL_SUITE: {', '.join(local_suites)}: a remote job reads its eval suites from S3;"
                        " upload them (e.g. below the bucket's data/ prefix, which the job's role may read) and give"
                        " s3:// URIs")
    if not cfg.output.startswith("s3://"):
        problems.append(f"QLORA_OUTPUT={cfg.output!r}: a remote job writes its results to S3; give an s3:// prefix")
    if cfg.base_dir != "/opt/ml":
        problems.append(f"QLORA_BASE_DIR={cfg.base_dir!r}: SageMaker and the Kubernetes manifests use /opt/ml;"
                        " leave it unset")
    if args.backend == "sagemaker" and cfg.secrets_dir:
        problems.append("QLORA_SECRETS_DIR: nothing mounts secrets on SageMaker; use QLORA_SECRETS_ARN")
    if args.backend == "kubernetes" and cfg.secrets_arn and args.k8s_secret:
        notes.append("both QLORA_SECRETS_ARN and --k8s-secret are given; the environment (the Secret) wins")
    normalise_s3_inputs(cfg, job_settings, notes)
    gated = cfg.model.startswith(GATED_HUB_ORGS) and not cfg.model.startswith("s3://")
    has_token = bool(cfg.secrets_arn or (args.backend == "kubernetes" and args.k8s_secret))
    if gated and not has_token:
        where = "--set secrets_arn=<the stack's SecretArn>" + (" or --k8s-secret <Secret with HF_TOKEN>"
                                                               if args.backend == "kubernetes" else "")
        gated_problem = (f"QLORA_MODEL={cfg.model}: a gated Hub model, and the job gets no Hugging Face token (it would"
                         f" start a GPU and then fail with exit 4): give one with {where}, holding HF_TOKEN of an"
                         " account that accepted the model's license, or put the model in S3 (--set model=s3://...)")
        if args.dry_run:
            notes.append(gated_problem)
        else:
            problems.append(gated_problem)
    model_is_local = not cfg.model.startswith("s3://") and (cfg.model.startswith(("/", ".")) or Path(cfg.model).exists())
    if model_is_local:
        notes.append(f"QLORA_MODEL={cfg.model!r} is a path: it must exist inside the container")

    base = base_name(cfg.model, args.name_prefix)
    if args.name and not args.name.startswith(args.name_prefix + "-"):
        problems.append(f"--name {args.name!r}: must start with {args.name_prefix}- (the roles of"
                        " infra/cloudformation.yaml may only create, tag and pass roles to jobs and schedules named"
                        f" <JobNamePrefix>-...; its JobNamePrefix is {args.name_prefix!r} unless you deployed another:"
                        " then pass it as --name-prefix)")
    if args.schedule:
        name = args.name or base
        limit = 52 if args.backend == "kubernetes" else 64  # CronJob names leave room for the run suffix
        if len(name) > limit:
            problems.append(f"--name {name!r}: at most {limit} characters for a schedule")
    else:
        name = args.name or unique_name(base, max_length=55)
    problem = check_name(name, "--name")
    if problem:
        problems.append(problem)
    # Beside the outputs, not inside them: the execution role may write output/* and checkpoints/* only.
    checkpoint_prefix = args.checkpoint_prefix or (
        f"s3://{_bucket_of(cfg.output)}/checkpoints" if cfg.output.startswith("s3://") else "")
    if checkpoint_prefix and not checkpoint_prefix.startswith("s3://"):
        problems.append(f"--checkpoint-prefix {checkpoint_prefix!r}: must be an s3:// prefix")
    resume_from = ""
    if args.resume_from.startswith("s3://"):
        resume_from = args.resume_from.rstrip("/")
        if len(resume_from) <= len("s3://") or "/" not in resume_from[len("s3://"):]:
            problems.append(f"--resume-from {args.resume_from!r}: give the s3:// prefix of the earlier run's checkpoints,"
                            " e.g. s3://bucket/checkpoints/qlora-llama-2-7b-hf-20261130093000")
    elif args.resume_from:
        problem = check_name(args.resume_from, "--resume-from")
        if problem:
            problems.append(problem + " (or an s3:// prefix)")
        elif checkpoint_prefix:
            # A job name: its checkpoints are where the launcher put them. (On SageMaker a real submission reads the
            # job's own CheckpointConfig instead, which is right for a job that itself resumed another.)
            resume_from = join_s3(checkpoint_prefix, args.resume_from)
            if args.dry_run:
                notes.append(f"--resume-from {args.resume_from}: a real submission takes that job's own checkpoint"
                             f" prefix (read from SageMaker or the cluster); this dry run shows {resume_from}")
    max_run_seconds = int(args.max_run_hours * 3600)
    max_wait_seconds = int((args.max_wait_hours or 2 * args.max_run_hours) * 3600) if args.spot else None
    if max_wait_seconds is not None and max_wait_seconds < max_run_seconds:
        problems.append("--max-wait-hours must be at least --max-run-hours (it includes the run time)")
    if problems:
        return None
    return LaunchPlan(
        name=name, base_name=base, image=image, instance=instance, instance_count=args.count, spot=args.spot,
        cfg=cfg, settings=dict(sorted(job_settings.items())), extra_env=extra_env, output=cfg.output,
        checkpoint_prefix=checkpoint_prefix, max_run_seconds=max_run_seconds, max_wait_seconds=max_wait_seconds,
        volume_size_gb=args.volume_size_gb, tags=tags, schedule=args.schedule, timezone=args.timezone,
        resume_from=resume_from, resume_job=args.resume_from if not args.resume_from.startswith("s3://") else "",
    )


def normalise_s3_inputs(cfg, job_settings: dict[str, str], notes: list[str]) -> None:
    """One meaning for an s3:// data or model URI on both backends. The job reads `<uri>/` (every object below it) or,
    when nothing is there, the one object `<uri>`; SageMaker's S3Prefix channel takes every key that merely starts
    with `<uri>`: `data/chat` also brings `data/chat-old/*` and `data/chat.jsonl.bak`. So a URI that does not name a
    data file becomes the prefix `<uri>/` on both; a model is always a prefix (a directory); a data file stays one
    object (and the SageMaker backend lets the job download it itself, see sagemaker_backend.job_environment)."""
    for name in ("data", "eval_data", "model"):
        uri = getattr(cfg, name)
        if not uri.startswith("s3://") or uri.endswith("/"):
            continue
        if name != "model" and file_type(uri.rsplit("/", 1)[-1]) is not None:
            continue  # one data file
        job_settings[env_name(name)] = uri + "/"
        notes.append(f"{env_name(name)}={uri} is taken as the prefix {uri}/ (every object below it, on both backends;"
                     f" not other keys that merely start with it){'' if name == 'model' else ': name a data file to read just that one'}")


def sagemaker_options(args: argparse.Namespace, problems: list[str], notes: list[str]) -> SageMakerOptions:
    if bool(args.subnet) != bool(args.security_group):
        problems.append("--subnet and --security-group go together: a job in your VPC needs at least one of each"
                        " (SageMaker refuses a VpcConfig without either)")
    try:
        instance = instances.lookup(args.instance)
    except ValueError:
        instance = None
    if args.volume_kms_key and instance is not None and instance.has_instance_store:
        problems.append(f"--volume-kms-key: {instance.sagemaker_type} trains on its NVMe instance storage, which AWS"
                        " encrypts itself, and SageMaker refuses a VolumeKmsKeyId for such types: leave the flag out")
    if args.output_kms_key:
        notes.append(f"--output-kms-key {args.output_kms_key}: the execution role needs kms:GenerateDataKey and"
                     " kms:Decrypt on that key (deploy infra/cloudformation.yaml with OutputKmsKeyArn=<its ARN>)")
    if instance is not None and instance.has_instance_store and "--volume-size-gb" in (args.argv or []):
        notes.append(f"--volume-size-gb has no effect on SageMaker for {instance.sagemaker_type}: its training disk"
                     f" is its {instance.instance_store_gb} GB of NVMe instance storage")
    role, scheduler_role, dead_letter = args.role, args.scheduler_role, args.dead_letter_queue
    for flag, key, value in (("--role", "role", role), ("--scheduler-role", "scheduler_role", scheduler_role),
                             ("--dead-letter-queue", "dead_letter", dead_letter)):
        if value or (key != "role" and not args.schedule):
            continue
        if args.dry_run:
            notes.append(f"placeholder {flag} {PLACEHOLDERS[key]} (set {flag} to submit)")
        else:
            problems.append(f"{flag} is not set (infra/cloudformation.yaml outputs it)")
    return SageMakerOptions(
        # boto3 reads AWS_DEFAULT_REGION and the AWS config, not AWS_REGION, which the project's own scripts and the
        # container recipes set.
        role_arn=role or PLACEHOLDERS["role"], region=args.region or os.environ.get("AWS_REGION", ""),
        subnets=tuple(args.subnet),
        security_group_ids=tuple(args.security_group), volume_kms_key=args.volume_kms_key,
        output_kms_key=args.output_kms_key,
        scheduler_role_arn=scheduler_role or (PLACEHOLDERS["scheduler_role"] if args.schedule else ""),
        dead_letter_arn=dead_letter or (PLACEHOLDERS["dead_letter"] if args.schedule else ""),
    )


def kubernetes_options(args: argparse.Namespace, plan: LaunchPlan, problems: list[str]) -> KubernetesOptions:
    for key, value in plan.tags.items():
        if check_name(value.lower(), "label") or value != value.lower() and not value.replace("-", "").isalnum():
            problems.append(f"--tag {key}={value}: not a valid Kubernetes label value")
    return KubernetesOptions(
        namespace=args.namespace, service_account=args.service_account, secret_name=args.k8s_secret,
        scratch_gb=args.volume_size_gb, scratch_storage_class=args.scratch_storage_class,
        ttl_seconds_after_finished=int(args.ttl_hours * 3600),
        # One host's hard failure makes every other host of a multi-node Job fail too (they block in NCCL until its
        # timeout): retries must scale with the pod count, or one fault on --count 4 exhausts them.
        backoff_limit=args.backoff_limit if args.backoff_limit is not None else 3 * max(args.count, 1),
        region=args.region, labels=plan.tags, kubeconfig=args.kubeconfig, context=args.context,
    )


def preflight(plan: LaunchPlan, args: argparse.Namespace, problems: list[str]) -> None:
    """The memory fit check and the time/cost estimate, printed to stderr."""
    if args.model_config and not Path(args.model_config).is_file():
        problems.append(f"--model-config {args.model_config}: no such file (give the model's config.json)")
        return
    try:
        shape = shape_of_model(plan.cfg.model, Path(args.model_config) if args.model_config else None)
    except ValueError as exc:  # a config.json the memory model does not describe (an encoder-decoder model)
        shape, fit = None, estimate.Fit(True, True, f"GPU memory check skipped for {plan.cfg.model}: {exc}")
    else:
        fit = estimate.check_fit(shape, plan.cfg, plan.instance, plan.instance_count)
    if not fit.ok and not args.force:
        problems.append(f"GPU memory: {fit.message} (or pass --force to submit anyway)")
    else:
        print(f"GPU memory: {'WARNING: ' if fit.warning else ''}{fit.message}", file=sys.stderr)
    cost = estimate.time_and_cost(shape, plan.cfg, plan.instance, plan.instance_count, args.dataset_tokens or None)
    print(cost.message, file=sys.stderr)
    if cost.seconds is not None and cost.seconds > plan.max_run_seconds:
        stopper = "Kubernetes (activeDeadlineSeconds)" if args.backend == "kubernetes" else "SageMaker"
        print(f"WARNING: the estimate (~{cost.seconds / 3600:.1f} h) is longer than --max-run-hours"
              f" {args.max_run_hours:g}: {stopper} would stop the job at that limit (it saves a checkpoint and exits"
              " 75; --resume-from continues it). Raise --max-run-hours, or lower QLORA_MAX_STEPS", file=sys.stderr)
    if args.backend == "sagemaker" and plan.instance.has_instance_store:
        disk, where = plan.instance.instance_store_gb * estimate.GB, f"{plan.instance.sagemaker_type}'s NVMe storage"
    else:
        disk, where = plan.volume_size_gb * 2**30, f"the scratch volume (--volume-size-gb {plan.volume_size_gb})"
    disk_warning = estimate.check_disk(shape, plan.cfg, disk, where)
    if disk_warning:
        print(f"disk: {disk_warning}", file=sys.stderr)
    if plan.spot:
        print("spot: billed at the spot price, typically 50-70% below on-demand; interruptions resume from"
              " the last checkpoint", file=sys.stderr)


def overlap_problems(schedule: str, plan: LaunchPlan) -> list[str]:
    """EventBridge Scheduler starts a run at every tick, even while the last one still runs (it has nothing like
    CronJob's `concurrencyPolicy: Forbid`). SageMaker stops a run after MaxRuntime (spot: MaxWait, which includes the
    wait for capacity), so a limit shorter than the schedule's interval means two runs never overlap."""
    interval = cron.min_interval_seconds(schedule)
    longest = plan.max_wait_seconds if plan.spot and plan.max_wait_seconds else plan.max_run_seconds
    if interval is None or longest < interval:
        return []
    flag = "--max-wait-hours" if plan.spot else "--max-run-hours"
    return [f"--schedule {schedule!r} starts a run every {interval / 3600:g} h at the shortest, but a run may last"
            f" {longest / 3600:g} h ({flag}): EventBridge Scheduler would start the next run while the last one still"
            f" trains (both paying for GPUs). Set {flag} below {interval / 3600:g}, or schedule less often"]


def render(documents: list[dict], fmt: str) -> str:
    if fmt == "json":
        if len(documents) > 1 and all("apiVersion" in d for d in documents):
            # Several Kubernetes objects: one List, which kubectl apply -f takes as it is.
            return json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}, indent=2)
        return json.dumps(documents[0] if len(documents) == 1 else documents, indent=2)
    import yaml

    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)


def yaml_available() -> bool:
    try:
        import yaml  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    problems: list[str] = []
    notes: list[str] = []
    plan = make_plan(args, problems, notes)
    if plan is not None:
        preflight(plan, args, problems)
    schedule_expr = ""
    if args.schedule:
        try:
            schedule_expr = cron.to_eventbridge(args.schedule) if args.backend == "sagemaker" else \
                cron.to_kubernetes(args.schedule)
        except cron.CronError as exc:
            problems.append(f"--schedule: {exc}")
        if schedule_expr and plan is not None and args.backend == "sagemaker":
            problems.extend(overlap_problems(args.schedule, plan))
    if args.smoke_test and not (args.schedule and args.backend == "sagemaker"):
        problems.append("--smoke-test tests an EventBridge schedule: use it with --schedule on the SageMaker backend")
    sm = sagemaker_options(args, problems, notes) if args.backend == "sagemaker" else None
    k8s = kubernetes_options(args, plan, problems) if args.backend == "kubernetes" and plan else None
    if problems or plan is None:
        print(f"{len(problems)} problem(s); nothing was submitted:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    if args.backend == "sagemaker":
        return _sagemaker(plan, sm, args, schedule_expr)
    return _kubernetes(plan, k8s, args, schedule_expr)


def _sagemaker(plan: LaunchPlan, sm: SageMakerOptions, args: argparse.Namespace, schedule_expr: str) -> int:
    from launch import sagemaker_backend as backend

    smoke = None
    if schedule_expr:
        request = backend.schedule_request(plan, sm, schedule_expr)
        document = {"CreateSchedule": request}
        if args.smoke_test:
            smoke = backend.smoke_schedule_request(request, plan.output, time.time() + 180)
            document["CreateSchedule (smoke test)"] = smoke
    else:
        resume_from = ""
        if plan.resume_job and not args.dry_run:
            try:  # the earlier job's own checkpoint prefix (it may itself have resumed another)
                resume_from = backend.checkpoint_uri_of(plan.resume_job, sm)
            except LookupError as exc:
                print(f"1 problem(s); nothing was submitted:\n  - {exc}", file=sys.stderr)
                return EXIT_CONFIG
            except Exception as exc:  # noqa: BLE001 - an AWS failure before anything was sent
                return _submission_failed(exc)
        request = backend.run_request(plan, sm, plan.name, resume_from)
        document = {"CreateTrainingJob": request}
    jobs = [json.loads(r["Target"]["Input"]) for r in (request, smoke) if r] if schedule_expr else [request]
    env_problems = [p for job in jobs for p in environment_problems(job["Environment"])]
    if env_problems:
        print(f"{len(env_problems)} problem(s); nothing was submitted:", file=sys.stderr)
        for p in dict.fromkeys(env_problems):
            print(f"  - {p}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(render([document], args.format or "json"))
        return 0
    try:
        if schedule_expr:
            arn = backend.create_schedule(request, sm)
            print(f"created schedule {arn} ({schedule_expr}, {plan.timezone or 'UTC'}); each run writes"
                  f" {join_s3(plan.output, 'runs', '<time>')}/ and then {join_s3(plan.output, 'latest.json')}")
            if smoke is not None:
                arn = backend.create_schedule(smoke, sm)
                prefix = json.loads(smoke["Target"]["Input"])["TrainingJobName"].split(backend.EXECUTION_ID)[0]
                print(f"created the one-time smoke test {arn} ({smoke['ScheduleExpression']} UTC): a training job"
                      f" named {prefix}<16 characters> should appear within minutes (aws sagemaker list-training-jobs"
                      f" --name-contains {prefix}); none means the schedule cannot start runs: look in"
                      f" {sm.dead_letter_arn or 'the dead-letter queue'}")
            return 0
        job_name = backend.submit(request, sm, use_sdk=False if args.no_sdk else None)
    except Exception as exc:  # noqa: BLE001 - any AWS/SDK failure: one clear paragraph and its own exit code
        return _submission_failed(exc)
    print(f"submitted SageMaker training job {job_name}")
    if args.wait or args.follow:
        return backend.wait(job_name, sm, follow=args.follow)
    return 0


def _submission_failed(exc: Exception) -> int:
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in ("kubernetes", "yaml"):
        detail = (f"the Kubernetes backend needs the {exc.name.split('.')[0]} package, which the base install leaves"
                  " out: pip install -e '.[kubernetes]' in the checkout (the package is not published on an index)")
    else:
        detail = f"{type(exc).__name__}: {exc}"
    print(f"submission failed; nothing was started: {detail}", file=sys.stderr)
    return EXIT_SUBMISSION_FAILED


def _kubernetes(plan: LaunchPlan, k8s: KubernetesOptions, args: argparse.Namespace, schedule_expr: str) -> int:
    from launch import kubernetes_backend as backend

    objects = backend.manifests(plan, k8s, schedule_expr)
    if args.dry_run:
        fmt = args.format or "yaml"
        if fmt == "yaml" and not yaml_available():
            if args.format:
                print("1 problem(s); nothing was submitted:\n  - --format yaml needs PyYAML, which the base install"
                      " leaves out: pip install -e '.[kubernetes]', or use --format json (kubectl reads it too)",
                      file=sys.stderr)
                return EXIT_CONFIG
            print("note: JSON, not YAML: PyYAML is not installed (pip install -e '.[kubernetes]' for YAML);"
                  " kubectl apply -f reads either", file=sys.stderr)
            fmt = "json"
        print(render(objects, fmt))
        return 0
    try:
        api = backend.api_client(k8s)
        if plan.resume_job:
            # The earlier Job's own checkpoint prefix (it may itself have resumed another), while the Job exists.
            found = backend.checkpoint_uri_of(plan.resume_job, k8s, api)
            if found and found != plan.resume_from:
                plan = dataclasses.replace(plan, resume_from=found)
                objects = backend.manifests(plan, k8s, schedule_expr)
            elif not found:
                print(f"note: --resume-from {plan.resume_job}: no such Job in {k8s.namespace} (any more): resuming from"
                      f" {plan.resume_from}", file=sys.stderr)
        name = backend.submit(objects, k8s, api)
    except Exception as exc:  # noqa: BLE001 - any API/config failure: one clear paragraph and its own exit code
        return _submission_failed(exc)
    kind = "CronJob" if schedule_expr else "Job"
    print(f"created {kind} {k8s.namespace}/{name}")
    if args.wait or args.follow:
        return backend.wait(name, k8s, follow=args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
