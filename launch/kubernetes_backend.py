"""Kubernetes backend: the Job (or Indexed Job + headless Service, or CronJob) manifests, submission, wait/logs.

    python launch/submit.py --instance g5.2xlarge --backend kubernetes --dry-run

One function per resource builds a plain manifest dict with literal keys (resource quantities as
strings); `--dry-run` prints them as YAML, and the official `kubernetes` client sends the same dicts.
Checkpoints go to S3 (QLORA_CHECKPOINT_URI, one prefix per Job) because nothing syncs a pod's disk, so a
retried pod resumes from the last checkpoint. The variables the container's torchrun wrapper reads are
set in `container_env()` and listed in launch/README.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from entrypoints import errors
from launch.plan import LaunchPlan

CONTAINER = "train"
RUN_AS_UID = 1000  # the image's non-root user `app`
MASTER_PORT = 29500
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on every pod by the Job controller (Kubernetes >= 1.27)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GPU_RESOURCE = "nvidia.com/gpu"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
NAME_LABEL = "qlora-job/name"  # the Job's or CronJob's name, on every object the launch creates


@dataclass(frozen=True)
class KubernetesOptions:
    namespace: str = "qlora"
    service_account: str = "qlora-job"  # bound to an IAM role (IRSA / EKS Pod Identity) for S3
    secret_name: str = ""  # a Secret with keys HF_TOKEN and/or WANDB_API_KEY
    scratch_gb: int = 200  # /opt/ml: downloads, the model, checkpoints, the merge
    scratch_storage_class: str = ""  # set: a per-pod ephemeral volume of this class instead of node disk
    shm_gb: int = 0  # 0: an eighth of the instance's RAM (at most 64)
    ttl_seconds_after_finished: int = 3 * 24 * 3600  # keep the finished Job and its logs for 3 days
    backoff_limit: int = 3  # submit.py: 3 per pod of the Job (--backoff-limit)
    region: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    kubeconfig: str = ""
    context: str = ""


def labels(plan: LaunchPlan, k8s: KubernetesOptions) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "qlora-job",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": "qlora-submit",
        NAME_LABEL: plan.name,
        **k8s.labels,
    }


def multi_node(plan: LaunchPlan) -> bool:
    return plan.instance_count > 1


def container_env(plan: LaunchPlan, k8s: KubernetesOptions) -> list[dict]:
    """The container's environment. Order matters: $(VAR) only expands variables defined above it."""
    env: list[dict] = [
        # The Job's name (a CronJob's runs each get their own), for per-run checkpoint and rendezvous names.
        {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}}},
        # torchrun wrapper contract: hosts, this host's rank, GPUs per host, rendezvous address.
        {"name": "NNODES", "value": str(plan.instance_count)},
        {"name": "GPUS_PER_NODE", "value": str(plan.gpus_per_node)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    if multi_node(plan):
        env += [
            {"name": "NODE_RANK",
             "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
            # Index 0's stable DNS name through the headless Service (pod hostname <job>-<index>).
            {"name": "MASTER_ADDR", "value": f"$(JOB_NAME)-0.{plan.name}"},
        ]
    else:
        env += [{"name": "NODE_RANK", "value": "0"}, {"name": "MASTER_ADDR", "value": "127.0.0.1"}]
    env += [
        # The root file system is read-only: caches go to the scratch volume, HOME to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/opt/ml/work/.cache"},
    ]
    if k8s.region:
        env.append({"name": "AWS_REGION", "value": k8s.region})
    env += [{"name": k, "value": v} for k, v in sorted(plan.extra_env.items())]
    env += [{"name": k, "value": v} for k, v in sorted({**plan.settings, "QLORA_RUN_NAME": "$(JOB_NAME)"}.items())]
    # No SageMaker checkpoint sync here: the job mirrors checkpoints to S3, one prefix per Job, so a
    # retried pod of the same Job resumes and the next scheduled run starts fresh (--resume-from: an earlier Job's).
    env.append({"name": "QLORA_CHECKPOINT_URI", "value": plan.checkpoint_uri("$(JOB_NAME)")})
    if k8s.secret_name:
        # References only: the kubelet resolves the values when the pod starts.
        for key in ("HF_TOKEN", "WANDB_API_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.secret_name, "key": key,
                                                                    "optional": True}}})
    return env


def volumes(plan: LaunchPlan, k8s: KubernetesOptions) -> list[dict]:
    shm_gb = k8s.shm_gb or max(1, min(64, plan.instance.ram_gib // 8))
    if k8s.scratch_storage_class:
        scratch = {"ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": k8s.scratch_storage_class,
            "resources": {"requests": {"storage": f"{k8s.scratch_gb}Gi"}},
        }}}}
    else:
        scratch = {"emptyDir": {"sizeLimit": f"{k8s.scratch_gb}Gi"}}
    return [
        # NCCL and the data loader workers share memory through /dev/shm; the default 64 MiB is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gb}Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GB}Gi"}},
        {"name": "scratch", **scratch},
    ]


TMP_GB = 10  # the /tmp emptyDir


def ephemeral_storage_gb(k8s: KubernetesOptions) -> int:
    """Node disk the pod's emptyDirs may fill: /tmp, plus the /opt/ml scratch unless it is a volume of its own."""
    return TMP_GB + (0 if k8s.scratch_storage_class else k8s.scratch_gb)


def resources(plan: LaunchPlan, k8s: KubernetesOptions) -> dict:
    inst = plan.instance
    gpus = str(inst.gpu_count)
    # Leave room for the kubelet, system daemons and DaemonSets: about 3/4 of the node's CPU and RAM.
    cpu = str(max(1, inst.vcpus * 3 // 4))
    memory = f"{max(4, inst.ram_gib * 3 // 4)}Gi"
    return {"requests": {
                "cpu": cpu, "memory": memory, GPU_RESOURCE: gpus,
                # An emptyDir's sizeLimit reserves nothing: without this request a pod lands on a node whose disk is
                # too small (EKS node groups default to 20 GiB), fills it, and is evicted over and over. With it, such
                # a node is never chosen and the pod shows "Insufficient ephemeral-storage" instead.
                "ephemeral-storage": f"{ephemeral_storage_gb(k8s)}Gi"},
            "limits": {"memory": memory, GPU_RESOURCE: gpus}}


def pod_template(plan: LaunchPlan, k8s: KubernetesOptions) -> dict:
    spec: dict = {
        # Required by podFailurePolicy; the Job controller makes the retries.
        "restartPolicy": "Never",
        "serviceAccountName": k8s.service_account,
        "nodeSelector": {INSTANCE_TYPE_LABEL: plan.instance.name},
        # GPU node groups are usually tainted so that only GPU work lands there.
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Time for the job to save a checkpoint on SIGTERM (it exits 75 = preempted, and is retried).
        "terminationGracePeriodSeconds": 300,
        "containers": [{
            "name": CONTAINER,
            "image": plan.image,
            # The image's own entrypoint runs `train` (the same command SageMaker uses).
            "args": ["train"],
            "env": container_env(plan, k8s),
            "resources": resources(plan, k8s),
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "scratch", "mountPath": "/opt/ml"},
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            # The job logs its failure message last; Kubernetes shows it as the termination message.
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }],
        "volumes": volumes(plan, k8s),
    }
    if multi_node(plan):
        spec["subdomain"] = plan.name  # pods get DNS names <job>-<index>.<service>
    return {"metadata": {"labels": labels(plan, k8s)}, "spec": spec}


def pod_failure_policy() -> dict:
    """Retry preemptions, fail fast on errors a retry cannot fix (the job's documented exit codes)."""
    return {"rules": [
        # Not promoted (7), Hub publish failed (9): the run is complete; a retry would train (and be judged) again.
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [
            errors.EXIT_CONFIG, errors.EXIT_DATA, errors.EXIT_MODEL, errors.EXIT_OUTPUT_EXISTS,
            errors.EXIT_NOT_PROMOTED, errors.EXIT_HUB_PUBLISH]}},
        # SIGTERM (node drain, spot reclaim): the job saved a checkpoint; not counted against backoffLimit.
        # No rule ignores the DisruptionTarget condition: a pod the kubelet evicts for disk or memory pressure would
        # otherwise be retried uncounted until activeDeadlineSeconds; such evictions count against backoffLimit.
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [errors.EXIT_PREEMPTED]}},
    ]}


def job_spec(plan: LaunchPlan, k8s: KubernetesOptions) -> dict:
    spec: dict = {
        "backoffLimit": k8s.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        # Upper bound of the whole Job, retries included (--max-run-hours).
        "activeDeadlineSeconds": plan.max_run_seconds,
        "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
        "template": pod_template(plan, k8s),
    }
    if multi_node(plan):
        # One pod per host; the completion index is the node rank.
        spec.update({"completionMode": "Indexed", "completions": plan.instance_count,
                     "parallelism": plan.instance_count})
    return spec


def job(plan: LaunchPlan, k8s: KubernetesOptions) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": plan.name, "namespace": k8s.namespace, "labels": labels(plan, k8s)},
            "spec": job_spec(plan, k8s)}


def cron_job(plan: LaunchPlan, k8s: KubernetesOptions, schedule: str) -> dict:
    spec: dict = {
        "schedule": schedule,
        # Never two trainings at once: a run still going when the next tick comes makes that tick skip.
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"metadata": {"labels": labels(plan, k8s)}, "spec": job_spec(plan, k8s)},
    }
    if plan.timezone:
        spec["timeZone"] = plan.timezone
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": plan.name, "namespace": k8s.namespace, "labels": labels(plan, k8s)},
            "spec": spec}


def headless_service(plan: LaunchPlan, k8s: KubernetesOptions) -> dict:
    """DNS for the Indexed Job's pods, so every host finds rank 0 for the torchrun rendezvous."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": plan.name, "namespace": k8s.namespace, "labels": labels(plan, k8s)},
            "spec": {
                "clusterIP": "None",
                "selector": {NAME_LABEL: plan.name},
                # Rank 0 must be resolvable before any pod is Ready (there is no readiness probe).
                "publishNotReadyAddresses": True,
                "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
            }}


def manifests(plan: LaunchPlan, k8s: KubernetesOptions, schedule: str = "") -> list[dict]:
    """Everything one launch creates, in creation order (the owner first)."""
    main = cron_job(plan, k8s, schedule) if schedule else job(plan, k8s)
    return [main, headless_service(plan, k8s)] if multi_node(plan) else [main]


# ------------------------------------------------------------------------------------------------ submission
def api_client(k8s: KubernetesOptions):
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=k8s.kubeconfig or None, context=k8s.context or None)
    except config.ConfigException:
        config.load_incluster_config()  # running inside the cluster (a CI runner pod)
    return client.ApiClient()


def checkpoint_uri_of(job_name: str, k8s: KubernetesOptions, api) -> str:
    """The QLORA_CHECKPOINT_URI an earlier Job's pods used (for --resume-from <job name>), or "" when the Job is gone."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        found = client.BatchV1Api(api).read_namespaced_job(job_name, k8s.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return ""
        raise
    for container in found.spec.template.spec.containers:
        for var in container.env or []:
            if var.name == "QLORA_CHECKPOINT_URI" and var.value:
                return var.value.replace("$(JOB_NAME)", job_name)
    return ""


class RolledBack(Exception):
    """The Service of a multi-node launch could not be created, and the Job/CronJob created before it was deleted."""


def submit(objects: list[dict], k8s: KubernetesOptions, api=None) -> str:
    """Create the objects; a Service is owned by the Job/CronJob so it is deleted with it.

    When the Service cannot be created (a name the API refuses, no `services/create` permission), the Job/CronJob
    is deleted again: its pods would wait for a rendezvous address that never resolves.
    """
    from kubernetes import client

    api = api or api_client(k8s)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    owner = None
    for obj in objects:
        if obj["kind"] == "Job":
            owner = batch.create_namespaced_job(k8s.namespace, obj)
        elif obj["kind"] == "CronJob":
            owner = batch.create_namespaced_cron_job(k8s.namespace, obj)
        elif obj["kind"] == "Service":
            if owner is not None and owner.metadata.uid:  # a server that assigns no uid gets no owner link
                obj = {**obj, "metadata": {**obj["metadata"], "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": owner.kind or objects[0]["kind"],
                    "name": owner.metadata.name, "uid": owner.metadata.uid}]}}
            try:
                core.create_namespaced_service(k8s.namespace, obj)
            except Exception as exc:  # noqa: BLE001 - any failure: undo the Job, then report
                _roll_back(batch, objects[0], k8s.namespace, exc)
        else:
            raise ValueError(f"unexpected kind {obj['kind']}")
    return objects[0]["metadata"]["name"]


def _roll_back(batch, owner: dict, namespace: str, cause: Exception) -> None:
    name, kind = owner["metadata"]["name"], owner["kind"]
    why = getattr(cause, "reason", "") or type(cause).__name__
    detail = (getattr(cause, "body", "") or str(cause))[:300]
    try:
        delete = batch.delete_namespaced_job if kind == "Job" else batch.delete_namespaced_cron_job
        delete(name, namespace, propagation_policy="Background")  # its pods too
        undone = f"the {kind} {namespace}/{name} was deleted again, so nothing is left running"
    except Exception as exc:  # noqa: BLE001 - report both
        undone = (f"deleting the {kind} {namespace}/{name} failed too ({exc}): delete it with"
                  f" kubectl -n {namespace} delete {kind.lower()} {name}")
    raise RolledBack(f"the rendezvous Service {namespace}/{name} could not be created ({why}: {detail}); {undone}."
                     " Check the name (a Service name starts with a letter) and that you may create Services in"
                     f" {namespace} (infra/kubernetes/rbac.yaml)") from None


# ------------------------------------------------------------------------------------------------ wait/follow
def _true_conditions(job_obj) -> dict[str, object]:
    return {c.type: c for c in (job_obj.status.conditions or []) if c.status == "True"}


def _created(pod) -> float:
    stamp = pod.metadata.creation_timestamp
    return stamp.timestamp() if stamp is not None else 0.0


def failed_exit_code(pods) -> int:
    """The exit code of the newest failed `train` container: the job's own documented code."""
    for pod in sorted(pods, key=_created, reverse=True):
        for status in (pod.status.container_statuses or []) if pod.status else []:
            terminated = status.state.terminated if status.state else None
            if status.name == CONTAINER and terminated is not None and terminated.exit_code:
                return int(terminated.exit_code)
    return errors.EXIT_INTERNAL


def wait(name: str, k8s: KubernetesOptions, follow: bool, poll_seconds: float = 10.0,
         write: Callable[[str], None] = print, api=None) -> int:
    """Watch the Job until it completes or fails, streaming rank 0's logs; returns the job's exit code."""
    from kubernetes import client, watch

    api = api or api_client(k8s)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    selector = f"{JOB_NAME_LABEL}={name}"
    streamed: set[str] = set()
    last = None
    while True:
        job_obj = batch.read_namespaced_job(name, k8s.namespace)
        conditions = _true_conditions(job_obj)
        st = job_obj.status
        summary = f"active={st.active or 0} succeeded={st.succeeded or 0} failed={st.failed or 0}"
        if summary != last:
            print(f"[launcher] job {name}: {summary}", file=sys.stderr)
            last = summary
        pods = core.list_namespaced_pod(k8s.namespace, label_selector=selector).items
        if follow:
            for pod in sorted(pods, key=_created):
                index = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION, "0")
                phase = pod.status.phase if pod.status else None
                if pod.metadata.name in streamed or index != "0" or phase not in ("Running", "Succeeded", "Failed"):
                    continue
                streamed.add(pod.metadata.name)
                write(f"[launcher] logs of pod {pod.metadata.name}")
                for line in watch.Watch().stream(core.read_namespaced_pod_log, pod.metadata.name, k8s.namespace,
                                                 container=CONTAINER, follow=True):
                    write(line)
        if "Complete" in conditions:
            return errors.EXIT_OK
        if "Failed" in conditions:
            cond = conditions["Failed"]
            print(f"[launcher] job {name} failed: {cond.reason}: {cond.message}", file=sys.stderr)
            code = failed_exit_code(pods)
            if code == errors.EXIT_NOT_PROMOTED:
                print(f"[launcher] job {name}: exit {code}: {errors.NOT_PROMOTED_MEANING} (the reason is above)",
                      file=sys.stderr)
            return code
        time.sleep(poll_seconds)
