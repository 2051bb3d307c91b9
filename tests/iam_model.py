"""The IAM side of the tests: recorded AWS calls as IAM requests, infra/cloudformation.yaml's policies, and the verdict
of a real IAM policy simulator on each request.

    decisions = evaluate([(request, role_policies("ExecutionRole", names))], names)

- `requests_of(call)`: the IAM action(s), resource ARN and request condition keys AWS authorizes one recorded API call
  against (tests/aws_calls.py), following the Service Authorization Reference: HeadBucket and ListObjectsV2 are
  s3:ListBucket on the bucket (ListObjectsV2 with `s3:prefix`), HeadObject is s3:GetObject, a multipart upload is
  s3:PutObject, CreateTrainingJob with Tags also needs sagemaker:AddTags and with its RoleArn iam:PassRole, ...
  A GetObject/HeadObject answered 404 also needs s3:ListBucket without a prefix: without it S3 answers 403, and the
  job's "absent" (a new output's manifest.json, latest.json) would be a storage error.
- `role_policies(...)`: the policies of one principal of infra/cloudformation.yaml, rendered with cloud-radar
  (parameters, conditions, !Sub/!If resolved) and the other resources' ARNs filled in.
- `evaluate(...)`: @cloud-copilot/iam-simulate (npm, a maintained IAM policy simulator: every condition operator, a key
  missing from the request context makes a condition false, resource ARNs and context keys are validated per action),
  run by tests/iam/evaluate.mjs. moto's IAM enforcement is not used: it ignores StringLike conditions altogether.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "infra" / "cloudformation.yaml"
EVALUATOR = REPO / "tests" / "iam" / "evaluate.mjs"
ACCOUNT = "123456789012"
REGION = "us-east-1"


@dataclass(frozen=True)
class IamRequest:
    action: str
    resource: str
    context: dict = field(default_factory=dict)
    why: str = ""  # the API call (or platform step) it comes from

    def key(self) -> tuple:
        return self.action, self.resource, json.dumps(self.context, sort_keys=True)


@dataclass(frozen=True)
class Names:
    """The real names a stack of the template gets, for the test's resources."""

    bucket: str
    secret_arn: str = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:qlora-job/job-AbCdEf"
    name: str = "qlora-job"

    def role_arn(self, role: str) -> str:
        return f"arn:aws:iam::{ACCOUNT}:role/{role}"

    @property
    def attributes(self) -> dict[str, str]:
        """What !GetAtt/!Ref of the template's resources stand for (cloud-radar leaves them as names)."""
        return {
            "Bucket.Arn": f"arn:aws:s3:::{self.bucket}", "Bucket": self.bucket, "JobSecret": self.secret_arn,
            "Repository.Arn": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{self.name}",
            "ExecutionRole.Arn": self.role_arn(f"{self.name}-sagemaker-execution"),
            "SchedulerRole.Arn": self.role_arn(f"{self.name}-scheduler"),
            "PodRole.Arn": self.role_arn(f"{self.name}-eks-pod"),
            "ScheduleDeadLetterQueue.Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{self.name}-schedule-dead-letters",
        }


# ------------------------------------------------------------------------------------------------ API call -> IAM
S3_ACTIONS = {
    "HeadBucket": "s3:ListBucket", "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "DeleteObject": "s3:DeleteObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
}
ALWAYS_ALLOWED = {("sts", "GetCallerIdentity")}  # needs no permission


def _arn(service: str, resource: str, region: str = REGION) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


def s3_requests(operation: str, params: dict, status: int, why: str) -> list[IamRequest]:
    bucket, key = params["Bucket"], params.get("Key")
    if operation not in S3_ACTIONS:
        raise AssertionError(f"{why}: no IAM mapping for s3:{operation}; add it to tests/iam_model.py S3_ACTIONS")
    action = S3_ACTIONS[operation]
    out = []
    if action == "s3:ListBucket":
        context = {"s3:prefix": params["Prefix"]} if "Prefix" in params else {}
        if "Delimiter" in params:
            context["s3:delimiter"] = params["Delimiter"]
        out.append(IamRequest(action, f"arn:aws:s3:::{bucket}", context, why))
    else:
        context = {}
        if operation == "PutObject" and "IfNoneMatch" in params:
            context["s3:if-none-match"] = params["IfNoneMatch"]
        if operation == "PutObject" and "IfMatch" in params:
            context["s3:if-match"] = params["IfMatch"]
        out.append(IamRequest(action, f"arn:aws:s3:::{bucket}/{key}", context, why))
        if operation in ("GetObject", "HeadObject") and status == 404:
            # S3 answers 404 (not 403) for a missing key only to a caller allowed s3:ListBucket on the bucket.
            out.append(IamRequest("s3:ListBucket", f"arn:aws:s3:::{bucket}", {}, why + " (answered 404)"))
    return out


def requests_of(call: dict) -> list[IamRequest]:
    service, operation, params = call["service"], call["operation"], call["params"]
    region = call.get("region") or REGION
    why = f"{service}:{operation} {json.dumps(params, sort_keys=True)[:160]}"
    if (service, operation) in ALWAYS_ALLOWED:
        return []
    if service == "s3":
        return s3_requests(operation, params, call.get("status", 200), why)
    if service == "secretsmanager":
        return [IamRequest(f"secretsmanager:{operation}", params["SecretId"], {}, why)]
    if service == "sagemaker":
        job = _arn("sagemaker", f"training-job/{params['TrainingJobName'].lower()}", region)
        out = [IamRequest(f"sagemaker:{operation}", job, {}, why)]
        if operation == "CreateTrainingJob":
            if params.get("Tags"):
                out.append(IamRequest("sagemaker:AddTags", job, {}, why + " (Tags)"))
            out.append(IamRequest("iam:PassRole", params["RoleArn"], {"iam:PassedToService": "sagemaker.amazonaws.com"},
                                  why + " (RoleArn)"))
        return out
    if service == "logs":
        group = params["logGroupName"]
        if "logStreamName" in params:
            return [IamRequest(f"logs:{operation}", _arn("logs", f"log-group:{group}:log-stream:{params['logStreamName']}",
                                                         region), {}, why)]
        return [IamRequest(f"logs:{operation}", _arn("logs", f"log-group:{group}", region), {}, why)]
    if service == "scheduler":
        target = params["Target"]
        group = params.get("GroupName", "default")
        return [IamRequest(f"scheduler:{operation}", _arn("scheduler", f"schedule/{group}/{params['Name']}", region), {},
                           why),
                IamRequest("iam:PassRole", target["RoleArn"], {"iam:PassedToService": "scheduler.amazonaws.com"},
                           why + " (Target.RoleArn)")]
    raise AssertionError(f"{why}: no IAM mapping for {service}:{operation}; add it to tests/iam_model.py")


def _s3_object(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def sagemaker_platform_requests(job: dict) -> list[IamRequest]:
    """What SageMaker itself does with the execution role for one CreateTrainingJob request (AWS's docs of the
    execution role: pull the image, download the channels, sync the checkpoints, upload the output, write logs and
    metrics), as IAM requests."""
    name = job["TrainingJobName"]
    why = f"SageMaker running {name}"
    out = []
    image = job["AlgorithmSpecification"]["TrainingImage"]
    repository = image.split("/", 1)[1].split(":")[0].split("@")[0]
    for action in ("ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"):
        out.append(IamRequest(action, _arn("ecr", f"repository/{repository}"), {}, why + ": image pull"))
    out.append(IamRequest("ecr:GetAuthorizationToken", "*", {}, why + ": image pull"))
    for channel in job.get("InputDataConfig", []):
        bucket, key = _s3_object(channel["DataSource"]["S3DataSource"]["S3Uri"])
        out.append(IamRequest("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": key}, why + ": channel"))
        obj = key + "part-0.jsonl" if key.endswith("/") else key
        out.append(IamRequest("s3:GetObject", f"arn:aws:s3:::{bucket}/{obj}", {}, why + ": channel"))
    bucket, key = _s3_object(job["CheckpointConfig"]["S3Uri"])
    out.append(IamRequest("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": key.rstrip("/") + "/"},
                          why + ": checkpoint restore"))
    for action in ("s3:GetObject", "s3:PutObject"):
        out.append(IamRequest(action, f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/checkpoint-10/adapter_model.safetensors",
                              {}, why + ": checkpoint sync"))
    bucket, key = _s3_object(job["OutputDataConfig"]["S3OutputPath"])
    out.append(IamRequest("s3:PutObject", f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/{name}/output/output.tar.gz", {},
                          why + ": output upload"))
    group = "/aws/sagemaker/TrainingJobs"
    out.append(IamRequest("logs:CreateLogGroup", _arn("logs", f"log-group:{group}"), {}, why + ": logs"))
    for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
        out.append(IamRequest(action, _arn("logs", f"log-group:{group}:log-stream:{name}/algo-1-1700000000"), {},
                              why + ": logs"))
    out.append(IamRequest("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"},
                          why + ": metrics"))
    return out


def scheduler_requests(schedule: dict, execution_id: str = "d32c5kddcf5bb8c3") -> tuple[list[IamRequest], dict]:
    """What EventBridge Scheduler does with the scheduler role on each tick: the CreateTrainingJob of the target's
    Input (the execution id filled in) and, when that fails, the message to the dead-letter queue."""
    target = schedule["Target"]
    job = json.loads(target["Input"].replace("<aws.scheduler.execution-id>", execution_id))
    out = requests_of({"service": "sagemaker", "operation": "CreateTrainingJob", "params": job})
    if target.get("DeadLetterConfig", {}).get("Arn"):
        out.append(IamRequest("sqs:SendMessage", target["DeadLetterConfig"]["Arn"], {}, "scheduler: dead letter"))
    return out, job


# ------------------------------------------------------------------------------------------------ the template
def _fill(value, attributes: dict[str, str]):
    if isinstance(value, dict):
        return {k: _fill(v, attributes) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, attributes) for v in value]
    if isinstance(value, str):
        for name, real in attributes.items():
            if value == name or value.startswith(name + "/"):
                return real + value[len(name):]
    return value


def role_policies(resource: str, names: Names, params: dict[str, str] | None = None) -> list[dict]:
    """The policy documents of one principal resource of the template (a role's inline policies, or a managed
    policy), as a stack with `params` would have them."""
    from cloud_radar.cf.unit import Template

    template = Template.from_yaml(str(TEMPLATE))
    template.AccountId = ACCOUNT
    stack = template.create_stack({"EksClusterName": "cluster", **(params or {})}, region=REGION)
    res = stack.get_resource(resource)
    if res.get_type_value() == "AWS::IAM::ManagedPolicy":
        docs = [(resource, res.get_property_value("PolicyDocument"))]
    else:
        # A policy left out by its condition (!If [..., !Ref AWS::NoValue]) is not a dict.
        docs = [(p["PolicyName"], p["PolicyDocument"]) for p in res.get_property_value("Policies") if isinstance(p, dict)]
    return [{"name": name, "policy": _fill(doc, names.attributes)} for name, doc in docs]


def bucket_policy(names: Names) -> dict:
    from cloud_radar.cf.unit import Template

    template = Template.from_yaml(str(TEMPLATE))
    template.AccountId = ACCOUNT
    stack = template.create_stack({"EksClusterName": "cluster"}, region=REGION)
    return _fill(stack.get_resource("BucketPolicy").get_property_value("PolicyDocument"), names.attributes)


# ------------------------------------------------------------------------------------------------ the simulator
def simulator_available() -> str | None:
    """Why the simulator cannot run here, or None (.ci/setup installs it: npm ci --prefix tests/iam)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (EVALUATOR.parent / "node_modules" / "@cloud-copilot" / "iam-simulate").is_dir():
        return "the IAM simulator is not installed: npm ci --prefix tests/iam"
    return None


@dataclass(frozen=True)
class Decision:
    request: IamRequest
    principal: str
    result: str  # Allowed, ImplicitlyDenied, ExplicitlyDenied, Error
    allowed_by: tuple[str, ...]
    errors: object = None

    def __str__(self) -> str:
        ctx = f" {self.request.context}" if self.request.context else ""
        extra = f" {self.errors}" if self.errors else ""
        return (f"{self.result}: {self.principal.rsplit('/', 1)[-1]} {self.request.action} {self.request.resource}{ctx}"
                f"{extra}  <- {self.request.why}")


def evaluate(cases: list[tuple[IamRequest, str, list[dict]]], names: Names, resource_policies: bool = True) -> list[Decision]:
    """One decision per (request, principal ARN, identity policies); S3 requests also meet the bucket policy."""
    unique: dict[tuple, tuple[IamRequest, str, list[dict]]] = {}
    for request, principal, policies in cases:
        unique.setdefault((*request.key(), principal), (request, principal, policies))
    bucket_doc = bucket_policy(names) if resource_policies else None
    payload = []
    for request, principal, policies in unique.values():
        item = {"principal": principal, "action": request.action, "resource": request.resource, "accountId": ACCOUNT,
                "context": {**request.context}, "identityPolicies": policies}
        if request.action.startswith("s3:") and bucket_doc is not None:
            item["resourcePolicy"] = bucket_doc
            item["context"]["aws:SecureTransport"] = "true"
        if request.action.startswith("kms:"):
            # A KMS key's own policy decides whether IAM policies count at all: a key made with the default key
            # policy lets the account's IAM policies grant its use.
            item["resourcePolicy"] = {"Version": "2012-10-17", "Statement": [{
                "Sid": "Enable IAM User Permissions", "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"}]}
        payload.append(item)
    proc = subprocess.run(["node", str(EVALUATOR)], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=300, cwd=EVALUATOR.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout)
    return [Decision(req, principal, a["result"], tuple(a["allowedBy"]), a["errors"])
            for (req, principal, _), a in zip(unique.values(), answers, strict=True)]
