"""Kubernetes path: manifests validated by kubernetes-validate --strict, and the official client against kmock.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_launch_kubernetes.py

No kube-apiserver can run here: kmock is a fake API server over real HTTP that stores what it is sent.
It runs no controllers, so the tests play the Job controller's part (a pod, the Job's status) themselves.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from launch import kubernetes_backend as kb
from launch import submit

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"  # oldest minor we support: podFailurePolicy, timeZone, the job-name label
BUCKET = "s3://qlora-job-123456789012-us-east-1"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/qlora-job:abc123"


def kubernetes_validate(paths: list[Path]) -> None:
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    proc = subprocess.run([exe, "--strict", "--kubernetes-version", K8S_VERSION, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout


def args(*extra: str) -> list[str]:
    return ["--backend", "kubernetes", "--image", IMAGE, "--set", f"data={BUCKET}/data/train.jsonl",
            "--set", f"output={BUCKET}/output/k8s", "--set", "max_steps=20", "--k8s-secret", "qlora-secrets",
            "--namespace", "ml", *extra]


def dry_run(argv: list[str], capsys) -> list[dict]:
    assert submit.main([*argv, "--dry-run"]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def env_of(pod_spec: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod_spec["containers"][0]["env"]}


VARIANTS = {
    "single": ["--instance", "g5.2xlarge"],
    "multi-node": ["--instance", "g6e.12xlarge", "--count", "3", "--scratch-storage-class", "gp3"],
    "cronjob": ["--instance", "g5.2xlarge", "--schedule", "@weekly", "--timezone", "Europe/Berlin"],
    "multi-node-cronjob": ["--instance", "p4d.24xlarge", "--count", "2", "--schedule", "0 2 1 * *"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_pass_kubernetes_validate_strict(variant, capsys, tmp_path):
    docs = dry_run(args(*VARIANTS[variant]), capsys)
    path = tmp_path / f"{variant}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kubernetes_validate([path])
    kinds = [d["kind"] for d in docs]
    assert kinds == {"single": ["Job"], "multi-node": ["Job", "Service"], "cronjob": ["CronJob"],
                     "multi-node-cronjob": ["CronJob", "Service"]}[variant]


def test_job_manifest_contents(capsys):
    [job] = dry_run(args("--instance", "g5.2xlarge", "--ttl-hours", "1", "--max-run-hours", "2"), capsys)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g5.2xlarge"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["args"] == ["train"] and "command" not in container
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "qlora-job"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/dev/shm": "dshm", "/tmp": "tmp", "/opt/ml": "scratch"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}} in pod["volumes"]
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 3600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In",
                                                             "values": [2, 3, 4, 6, 7, 9]}}
    assert {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In", "values": [75]}} in rules
    # A kubelet eviction (DisruptionTarget) is counted: ignoring it retried a pod on a too-small disk for 24 h.
    assert not any("onPodConditions" in r for r in rules)
    assert spec["backoffLimit"] == 3
    env = env_of(pod)
    assert env["QLORA_CHECKPOINT_URI"]["value"] == f"{BUCKET}/checkpoints/$(JOB_NAME)"
    names = [e["name"] for e in container["env"]]
    assert names.index("JOB_NAME") < names.index("QLORA_CHECKPOINT_URI")  # $(VAR) needs it defined first
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "qlora-secrets", "key": "HF_TOKEN",
                                                           "optional": True}
    assert "value" not in env["HF_TOKEN"] and "value" not in env["WANDB_API_KEY"]
    assert {k: env[k]["value"] for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")} == {
        "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "GPUS_PER_NODE": "1"}


def test_the_pod_requests_the_disk_it_fills(capsys):
    """An emptyDir's sizeLimit reserves nothing: the pod requests its scratch + /tmp as ephemeral-storage, so a node
    with a small disk is never picked (a visible 'Insufficient ephemeral-storage' event instead of evictions)."""
    [job] = dry_run(args("--instance", "g5.2xlarge", "--volume-size-gb", "300"), capsys)
    requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "310Gi"
    [job] = dry_run(args("--instance", "g5.2xlarge", "--scratch-storage-class", "gp3"), capsys)
    requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "10Gi"  # the scratch is a volume of its own: only /tmp is node disk


def test_retries_scale_with_the_pod_count(capsys):
    """One host's hard failure fails every host of the Job (they block in NCCL): 3 retries per pod."""
    job, _ = dry_run(args("--instance", "p5.48xlarge", "--count", "4"), capsys)
    assert job["spec"]["backoffLimit"] == 12
    job, _ = dry_run(args("--instance", "p5.48xlarge", "--count", "4", "--backoff-limit", "5"), capsys)
    assert job["spec"]["backoffLimit"] == 5


def test_a_name_the_service_would_refuse_is_refused_up_front(capsys):
    assert submit.main([*args("--instance", "g5.12xlarge", "--count", "2", "--name", "1run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--name '1run'" in err and "start with a letter" in err and "nothing was submitted" in err


def test_multi_node_is_an_indexed_job_with_a_headless_service(capsys):
    job, service = dry_run(args("--instance", "p5.48xlarge", "--count", "4"), capsys)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert all(spec["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    env = env_of(pod)
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["MASTER_ADDR"]["value"] == f"$(JOB_NAME)-0.{service['metadata']['name']}"
    assert env["NNODES"]["value"] == "4" and env["GPUS_PER_NODE"]["value"] == "8"


def test_cronjob_forbids_overlap_and_versions_outputs(capsys):
    [cron] = dry_run(args("--instance", "g5.2xlarge", "--schedule", "15 4 * * SUN"), capsys)
    assert cron["spec"]["schedule"] == "15 4 * * SUN" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    env = env_of(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    assert env["QLORA_OUTPUT_EXISTS"]["value"] == "version"
    # The same pod template as a one-off Job, so a scheduled run is the same training.
    [job] = dry_run(args("--instance", "g5.2xlarge", "--name", cron["metadata"]["name"]), capsys)
    job_env = env_of(job["spec"]["template"]["spec"])
    job_env.pop("QLORA_OUTPUT_EXISTS", None)
    env.pop("QLORA_OUTPUT_EXISTS")
    assert job_env == env


def test_secret_values_are_refused(capsys, tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("WANDB_API_KEY=0123456789abcdef\n")
    assert submit.main([*args("--instance", "g5.2xlarge", "--env-file", str(env_file)), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "WANDB_API_KEY looks like a secret" in captured.err
    assert "0123456789abcdef" not in captured.out + captured.err


# ------------------------------------------------------------------------------------------------ kmock
@pytest.fixture
def kube():
    """A kmock Kubernetes emulator on a loopback port, served from its own event loop thread."""
    import kmock
    from kubernetes import client

    ready = threading.Event()
    state: dict = {}

    async def serve():
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            state.update(emulator=emulator, url=str(server.url).rstrip("/"), stop=asyncio.Event(),
                         loop=asyncio.get_running_loop())
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    configuration = client.Configuration(host=state["url"])
    api = client.ApiClient(configuration)
    yield state["emulator"], api
    api.close()
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def test_submit_through_the_official_client(kube, capsys):
    from kubernetes import client

    emulator, api = kube
    docs = dry_run(args("--instance", "g6e.12xlarge", "--count", "2", "--name", "qlora-multi"), capsys)
    k8s = kb.KubernetesOptions(namespace="ml")
    assert kb.submit(docs, k8s, api=api) == "qlora-multi"
    posted = [r.data for r in emulator["post"]]
    assert posted[0] == docs[0]  # the Job, exactly as printed by --dry-run
    assert {k: v for k, v in posted[1].items() if k != "metadata"} == {k: v for k, v in docs[1].items()
                                                                      if k != "metadata"}
    # Read back through the client's typed models: every field we send is one the API knows.
    job = client.BatchV1Api(api).read_namespaced_job("qlora-multi", "ml")
    assert job.spec.pod_failure_policy.rules[0].on_exit_codes.values == [2, 3, 4, 6, 7, 9]
    assert job.spec.completion_mode == "Indexed"
    assert api.sanitize_for_serialization(job)["spec"] == docs[0]["spec"]
    svc = client.CoreV1Api(api).read_namespaced_service("qlora-multi", "ml")
    assert svc.spec.cluster_ip == "None"


def _finish(api, emulator, name: str, exit_code: int, log_lines: list[str]) -> None:
    """Play the Job controller and kubelet: one pod with logs and an exit code, then the Job's condition."""
    from kubernetes import client

    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    pod_name = f"{name}-abcde"
    emulator[f"get /api/v1/namespaces/ml/pods/{pod_name}/log"] << ("\n".join(log_lines) + "\n").encode()
    phase = "Succeeded" if exit_code == 0 else "Failed"
    core.create_namespaced_pod("ml", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": "ml", "labels": {kb.JOB_NAME_LABEL: name}},
        "spec": {"containers": [{"name": "train", "image": IMAGE}]},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "train", "image": IMAGE, "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}}}]},
    })
    condition = "Complete" if exit_code == 0 else "Failed"
    batch.patch_namespaced_job_status(name, "ml", {"status": {
        "succeeded" if exit_code == 0 else "failed": 1,
        "conditions": [{"type": condition, "status": "True", "reason": "PodFailurePolicy" if exit_code else "",
                        "message": f"container train exited with code {exit_code}"}]}})


@pytest.mark.parametrize("exit_code", [0, 3, 7])
def test_follow_streams_logs_and_returns_the_jobs_exit_code(kube, capsys, exit_code):
    emulator, api = kube
    docs = dry_run(args("--instance", "g5.2xlarge", "--name", "qlora-follow"), capsys)
    k8s = kb.KubernetesOptions(namespace="ml")
    kb.submit(docs, k8s, api=api)
    _finish(api, emulator, "qlora-follow", exit_code, ["step 1 loss 2.0", "step 2 loss 1.5"])
    lines: list[str] = []
    assert kb.wait("qlora-follow", k8s, follow=True, poll_seconds=0.05, write=lines.append, api=api) == exit_code
    assert lines == ["[launcher] logs of pod qlora-follow-abcde", "step 1 loss 2.0", "step 2 loss 1.5"]
    # A job the promotion gate refused failed as a Kubernetes Job, but its result is complete: the launcher says so.
    not_promoted = "exit 7: the run is complete but was not promoted" in capsys.readouterr().err
    assert not_promoted == (exit_code == 7)


def test_a_failed_service_create_rolls_the_job_back(kube, capsys):
    """Without the Service the pods would wait for an unresolvable rendezvous address: the Job is deleted again."""
    from kubernetes import client

    emulator, api = kube
    emulator["post /api/v1/namespaces/ml/services"] << 403
    docs = dry_run(args("--instance", "g6e.12xlarge", "--count", "2", "--name", "qlora-rollback"), capsys)
    with pytest.raises(kb.RolledBack, match="qlora-rollback was deleted again") as info:
        kb.submit(docs, kb.KubernetesOptions(namespace="ml"), api=api)
    assert "starts with a letter" in str(info.value)
    assert [r.method for r in emulator["post"]] == ["POST", "POST"]  # the Job, then the Service
    jobs = client.BatchV1Api(api).list_namespaced_job("ml").items
    assert [j.metadata.name for j in jobs] == []


def test_resume_from_an_earlier_job_or_prefix(capsys):
    [job] = dry_run(args("--instance", "g5.2xlarge", "--resume-from", "qlora-first"), capsys)
    env = env_of(job["spec"]["template"]["spec"])
    assert env["QLORA_CHECKPOINT_URI"]["value"] == f"{BUCKET}/checkpoints/qlora-first"
    assert env["QLORA_RUN_NAME"]["value"] == "$(JOB_NAME)"  # the job's resume hint names the checkpoint prefix
    [job] = dry_run(args("--instance", "g5.2xlarge", "--resume-from", f"{BUCKET}/checkpoints/other/"), capsys)
    assert env_of(job["spec"]["template"]["spec"])["QLORA_CHECKPOINT_URI"]["value"] == f"{BUCKET}/checkpoints/other"
    assert submit.main([*args("--instance", "g5.2xlarge", "--set", "run_name=x"), "--dry-run"]) == 2
    assert "QLORA_RUN_NAME is set by the launcher" in capsys.readouterr().err


@pytest.fixture(scope="module")
def base_install(tmp_path_factory):
    """A fresh venv with only `pip install -e .`: boto3, no PyYAML, no kubernetes client (what the README installs)."""
    venv = tmp_path_factory.mktemp("base-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    missing = subprocess.run([str(python), "-c", "import yaml"], capture_output=True, timeout=60)
    assert missing.returncode != 0, "the base install brought PyYAML along"
    return python


def test_base_install_dry_run_and_submit_name_what_is_missing(base_install, tmp_path):
    """A Kubernetes dry run with the base install printed a traceback (ModuleNotFoundError: yaml); a submission
    one for the kubernetes client. Now: JSON, which kubectl reads, and the extra to install."""
    cmd = [str(base_install), "launch/submit.py", "--instance", "g5.12xlarge", "--count", "2", "--backend", "kubernetes",
           "--set", f"data={BUCKET}/data/chat/", "--set", f"output={BUCKET}/output/k8s", "--image", IMAGE,
           "--k8s-secret", "qlora-secrets"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    dry = subprocess.run([*cmd, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert listed["kind"] == "List" and [i["kind"] for i in listed["items"]] == ["Job", "Service"]
    assert "JSON, not YAML: PyYAML is not installed" in dry.stderr
    path = tmp_path / "list.json"
    path.write_text(dry.stdout)
    kubernetes_validate([path])
    asked = subprocess.run([*cmd, "--dry-run", "--format", "yaml"], cwd=REPO, capture_output=True, text=True,
                           timeout=120, env=env)
    assert asked.returncode == 2 and "pip install -e '.[kubernetes]'" in asked.stderr
    sent = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert sent.returncode == 8, sent.stderr
    assert "the Kubernetes backend needs the kubernetes package" in sent.stderr
    assert "pip install -e '.[kubernetes]'" in sent.stderr and "Traceback" not in sent.stderr


def test_resume_from_a_job_that_itself_resumed_leads_to_its_prefix(kube, capsys, tmp_path):
    """--resume-from <job name> reads that Job's own QLORA_CHECKPOINT_URI from the cluster."""
    emulator, api = kube
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": api.configuration.host}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    older = f"{BUCKET}/checkpoints/qlora-older"
    common = [*args("--instance", "g5.2xlarge"), "--kubeconfig", str(kubeconfig)]
    assert submit.main([*common, "--name", "qlora-a", "--resume-from", older]) == 0
    assert submit.main([*common, "--name", "qlora-b", "--resume-from", "qlora-a"]) == 0
    assert submit.main([*common, "--name", "qlora-c", "--resume-from", "qlora-gone"]) == 0
    assert "no such Job in ml (any more): resuming from" in capsys.readouterr().err
    posted = {r.data["metadata"]["name"]: env_of(r.data["spec"]["template"]["spec"]) for r in emulator["post"]}
    assert posted["qlora-b"]["QLORA_CHECKPOINT_URI"]["value"] == older
    assert posted["qlora-c"]["QLORA_CHECKPOINT_URI"]["value"] == f"{BUCKET}/checkpoints/qlora-gone"
