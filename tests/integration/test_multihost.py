"""Two hosts for real: two container entrypoints that rendezvous, train together and publish one result.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_multihost.py              # the SageMaker two-host run
    PYTHONPATH=$PWD python -m pytest tests/integration/test_multihost.py -m slow      # Kubernetes, SIGTERM, SIGKILL

Each "host" is `python container/entrypoint.py train`, the image's own entrypoint, started the way a container
starts: as root (it hands its /opt/ml folders to uid 1000 and drops to that user), as PID 1 of its own PID
namespace (killing it ends every process of the host, as when a container or its machine dies), with its own
host name (UTS namespace) and its own /etc/hosts (a mount namespace; Docker and the kubelet write a container's
/etc/hosts the same way), in which the platform's host names (SageMaker's algo-1/algo-2, the Indexed Job's
`<job>-<index>.<service>`) resolve to loopback. Each host has its own base dir (QLORA_BASE_DIR: /opt/ml) and
reads the platform's description of the cluster the way the real one gives it: SageMaker's
input/config/resourceconfig.json, or the Indexed Job's NNODES / JOB_COMPLETION_INDEX / MASTER_ADDR / MASTER_PORT.
On CPU each host runs one process (gloo). The tiny Llama-2-shaped model and the data come from the real S3 server.

What is proved: one output, of the same format and steps as a one-process run, written by the world leader alone
(the other host's output location stays empty); every host downloads, caches and checkpoints on its own disk; one
W&B run; a SIGTERM to one host stops both with a complete checkpoint on each and exit 75, and a rerun resumes;
a SIGKILL of one host ends the other at once with exit 10 and a message naming the lost host; a host that freezes
(no answer, connections left open) is given up after QLORA_DISTRIBUTED_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from entrypoints.demo.local_s3 import free_port
from entrypoints.errors import EXIT_PEER_LOST, EXIT_PREEMPTED
from entrypoints.train import SUMMARY_PREFIX

from ..jobrun import REPO, job_env, run_job
from ..wandb_records import summarize
from .test_distributed import RECORDS, SETTINGS, output_format

ENTRYPOINT = REPO / "container" / "entrypoint.py"
AS_ROOT = os.geteuid() == 0
# A host's PID 1 (the entrypoint) gets its own /etc/hosts and host name, then becomes the entrypoint.
HOST_SHELL = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
HOSTS_FILE = ("127.0.0.1 localhost\n127.0.0.1 algo-1 algo-2\n"
              "127.0.0.1 qlora-0.qlora qlora-0 qlora-1.qlora qlora-1\n")
LONG_RUN = {"QLORA_MAX_STEPS": "30", "QLORA_SAVE_STEPS": "100", "QLORA_EVAL_FRACTION": "0", "QLORA_MERGE": "false",
            "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_REPORT_TO": "none"}
STEP = re.compile(r" qlora: step (\d+)/(\d+) ")


def _isolation_problem() -> str | None:
    """Why hosts cannot be isolated here (None when they can): they need root for the namespaces and the drop."""
    if not AS_ROOT:
        return "needs root: each host is a PID/UTS/mount namespace and the entrypoint drops root as in the image"
    if not shutil.which("unshare"):
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--", "true"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare cannot create namespaces here: {probe.stderr.strip()}"


pytestmark = pytest.mark.skipif(_isolation_problem() is not None, reason=str(_isolation_problem()))


# ------------------------------------------------------------------------------------------- fixtures
def _uid_1000_can_spawn(python: str) -> bool:
    """Whether the job's user can start `python` and have it start itself again (torchrun starts the workers)."""
    probe = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", python, "-c",
         "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', 'pass']).returncode)"],
        capture_output=True, text=True, cwd="/", timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def image_python():
    """A Python with the job's packages that uid 1000 can run, as /opt/venv/bin/python is in the image.

    This machine's interpreter may live below a folder only root may enter (a pyenv under /root): then a venv of the
    system's Python of the same version, world-readable, that sees the same site-packages."""
    if _uid_1000_can_spawn(sys.executable):
        yield sys.executable
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = Path(f"/usr/bin/python{version}")
    if not system.exists():
        pytest.skip(f"uid 1000 cannot run {sys.executable} and there is no {system} to make a venv from")
    venv = Path(tempfile.mkdtemp(prefix="qlora-uid1000-venv-", dir="/tmp"))
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{version}" / "site-packages"
    (site / "qlora-job-packages.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    for path in [venv, *venv.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444)
    python = str(venv / "bin" / "python")
    try:
        if not _uid_1000_can_spawn(python):
            pytest.skip(f"uid 1000 cannot run {python} either")
        yield python
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@dataclass
class Inputs:
    endpoint: str
    aws: dict[str, str]
    bucket: str
    model: str
    data: str


@pytest.fixture(scope="module")
def inputs(s3_server, tiny_model) -> Inputs:
    """The tiny model and RECORDS in a bucket of the real S3 server."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in tiny_model.iterdir() if p.is_file()):
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    return Inputs(s3_server.endpoint, s3_server.env(), bucket, f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/train.jsonl")


@pytest.fixture
def cluster_root():
    """A folder uid 1000 can reach (pytest's own tmp folders are root's alone), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="qlora-hosts-", dir="/tmp"))
    root.chmod(0o777)
    (root / "hosts").write_text(HOSTS_FILE)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Host:
    name: str
    dir: Path
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "host.log"

    @property
    def opt_ml(self) -> Path:
        return self.dir / "opt-ml"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def entrypoint_pid(self) -> int:
        """The entrypoint: PID 1 of the host's namespace, the only child of `unshare --fork`."""
        import psutil

        return psutil.Process(self.proc.pid).children()[0].pid

    def processes(self) -> list:
        import psutil

        top = psutil.Process(self.entrypoint_pid())
        return [top, *top.children(recursive=True)]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def lines_of_rank(self, rank: int) -> list[str]:
        return [line for line in self.output.splitlines() if f" rank{rank} " in line]

    def summary(self) -> dict | None:
        found = [line for line in self.output.splitlines() if line.startswith(SUMMARY_PREFIX)]
        return json.loads(found[-1][len(SUMMARY_PREFIX):]) if found else None


def host_env(host: Host, inputs: Inputs, settings: dict[str, str], platform: dict[str, str]) -> dict[str, str]:
    """The job's environment on one host: the image's own variables (Dockerfile ENV) below the host's folders."""
    tmp = host.dir / "tmp"
    env = job_env(host.dir, **inputs.aws, **{**SETTINGS, **settings}, QLORA_MODEL=inputs.model, QLORA_DATA=inputs.data,
                  QLORA_S3_ENDPOINT_URL=inputs.endpoint)
    env.update({
        "HF_HOME": str(host.opt_ml / "work" / "huggingface"), "WANDB_DIR": str(host.opt_ml / "work"),
        "WANDB_DATA_DIR": str(host.opt_ml / "work" / "wandb-data"), "WANDB_CACHE_DIR": str(tmp / "cache" / "wandb"),
        "WANDB_CONFIG_DIR": str(tmp / "config" / "wandb"), "XDG_CACHE_HOME": str(tmp / "cache"),
        "XDG_CONFIG_HOME": str(tmp / "config"), "MPLCONFIGDIR": str(tmp / "config" / "matplotlib"),
        **platform,
    })
    for name in ("SM_HOSTS", "SM_CURRENT_HOST", "NNODES", "NODE_RANK", "JOB_COMPLETION_INDEX", "MASTER_ADDR",
                 "MASTER_PORT", "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "JOB_HOST_NAME"):
        if name not in platform:
            env.pop(name, None)
    return env


def start_host(root: Path, name: str, python: str, env_of) -> Host:
    host = Host(name, root / name)
    host.dir.mkdir(exist_ok=True)
    host.dir.chmod(0o777)
    env = env_of(host)
    cmd = ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
           "sh", "-c", HOST_SHELL, "host", str(root / "hosts"), name, python, str(ENTRYPOINT), "train"]
    with open(host.log, "a") as log:
        host.proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    return host


def sagemaker_hosts(root: Path, python: str, inputs: Inputs, settings: dict[str, str] | None = None) -> list[Host]:
    """Two SageMaker hosts as the platform describes them to a container: input/config/resourceconfig.json."""
    port = str(free_port())
    hosts = []
    for name in ("algo-1", "algo-2"):
        config = root / name / "opt-ml" / "input" / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "resourceconfig.json").write_text(json.dumps({
            "current_host": name, "current_instance_type": "ml.m5.xlarge", "current_group_name": "homogeneousCluster",
            "hosts": ["algo-1", "algo-2"], "network_interface_name": "lo",
            "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.m5.xlarge",
                                 "hosts": ["algo-1", "algo-2"]}]}))
        hosts.append(start_host(root, name, python, lambda h: host_env(h, inputs, settings or {},
                                                                        {"MASTER_PORT": port})))
    return hosts


def kubernetes_hosts(root: Path, python: str, inputs: Inputs, settings: dict[str, str] | None = None) -> list[Host]:
    """Two pods of an Indexed Job, with the variables the launcher's manifest gives them."""
    port = str(free_port())
    return [start_host(root, f"qlora-{index}", python, lambda h, index=index: host_env(h, inputs, settings or {}, {
        "NNODES": "2", "JOB_COMPLETION_INDEX": str(index), "MASTER_ADDR": "qlora-0.qlora", "MASTER_PORT": port}))
        for index in (0, 1)]


def wait_all(hosts: list[Host], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [host.wait(max(1.0, deadline - time.monotonic())) for host in hosts]
    finally:
        stop_all(hosts)


def stop_all(hosts: list[Host]) -> None:
    """Never leave a host behind: SIGKILL to a host's PID 1 ends every process in it."""
    for host in hosts:
        if host.proc and host.proc.poll() is None:
            with contextlib.suppress(Exception):
                os.kill(host.entrypoint_pid(), signal.SIGKILL)
            with contextlib.suppress(Exception):
                host.proc.kill()
            host.proc.wait(timeout=30)


def wait_for_step(host: Host, others: list[Host], step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(int(m.group(1)) >= step for m in STEP.finditer(host.output)):
        for h in others:
            assert h.proc.poll() is None, f"{h.name} ended early ({h.proc.returncode}):\n{h.output[-4000:]}"
        assert time.monotonic() < deadline, host.output[-4000:]
        time.sleep(0.1)


def published(folder: Path) -> list[str]:
    """The files of a result at a local output (the job's hidden bookkeeping aside)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def checkpoints(host: Host) -> dict[str, bool]:
    """checkpoint-N -> complete, in the host's own checkpoint directory."""
    folder = host.opt_ml / "checkpoints"
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(folder.glob("checkpoint-*"))}


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    """The output of one process of the same job (same settings, model and data), for the format comparison."""
    base = tmp_path_factory.mktemp("one-process")
    result = run_job(job_env(base, **inputs.aws, **SETTINGS, QLORA_MODEL=inputs.model, QLORA_DATA=inputs.data,
                             QLORA_S3_ENDPOINT_URL=inputs.endpoint, QLORA_OUTPUT=str(base / "out")))
    assert result.code == 0, result.output[-4000:]
    return base / "out"


# ------------------------------------------------------------------------------------------- the tests
def test_two_sagemaker_hosts_train_together_and_publish_one_output_like_one_process(
        image_python, inputs, cluster_root, one_process):
    started = time.monotonic()
    algo1, algo2 = hosts = sagemaker_hosts(cluster_root, image_python, inputs)
    codes = wait_all(hosts)
    seconds = time.monotonic() - started
    assert codes == [0, 0], "\n".join(f"--- {h.name}\n{h.output[-5000:]}" for h in hosts)
    # The entrypoint read the platform's host description and started torchrun with a static rendezvous on algo-1.
    assert "--nnodes=2 --nproc-per-node=1 --node-rank=0 --master-addr=algo-1" in algo1.output
    assert "--nnodes=2 --nproc-per-node=1 --node-rank=1 --master-addr=algo-1" in algo2.output
    assert "rank 1 of 2 (local rank 0, backend gloo) on host algo-2; hosts: algo-1, algo-2" in algo2.output

    # One result, at the world leader's output location (SageMaker uploads algo-1's /opt/ml/model); algo-2's stays
    # empty and it staged nothing; one summary, one W&B run.
    assert published(algo2.opt_ml / "model") == [] and not (algo2.opt_ml / "work" / "output").exists()
    assert algo2.summary() is None and algo1.summary()["global_step"] == 3
    assert algo1.summary()["output"] == str(algo1.opt_ml / "model")
    one, two = output_format(one_process), output_format(algo1.opt_ml / "model")
    assert two["files"] == one["files"] and "merged/model.safetensors" in two["files"]
    for key in ("tensors", "adapter_config", "merged_config", "generation_config", "settings", "steps", "records"):
        assert two[key] == one[key], key
    runs = list(cluster_root.rglob("offline-run-*/run-*.wandb"))
    assert [r.relative_to(cluster_root).parts[0] for r in runs] == ["algo-1"], runs
    assert len([h for h in summarize(runs[0])["history"] if "train/loss" in h]) == 3
    # The job ran as uid 1000, not root (the entrypoint's drop), on both hosts.
    assert {(algo1.opt_ml / "model" / "manifest.json").stat().st_uid,
            (algo2.opt_ml / "work" / "base-model" / "config.json").stat().st_uid} == {1000}

    # Each host downloaded the inputs and built its data caches on its own disk (its host leader: rank 1 on algo-2).
    for host, rank in ((algo1, 0), (algo2, 1)):
        lines = "\n".join(host.lines_of_rank(rank))
        assert f"downloading {inputs.model}/ to {host.opt_ml}/work/base-model" in lines
        assert "data: reused" not in lines and (host.opt_ml / "work" / "datasets-cache").is_dir()
        # ... and checkpoints there, complete: each host resumes from its own disk.
        assert checkpoints(host) == {"checkpoint-2": True, "checkpoint-3": True}, host.name
        assert not (host.opt_ml / "output" / "failure").exists()
    print(f"two SageMaker hosts: {seconds:.1f}s")


@pytest.mark.slow
def test_two_kubernetes_pods_of_an_indexed_job_publish_one_output_to_s3(image_python, inputs, cluster_root,
                                                                        one_process, monkeypatch):
    output = f"s3://{inputs.bucket}/out-k8s-{uuid.uuid4().hex[:8]}"
    pod0, pod1 = hosts = kubernetes_hosts(cluster_root, image_python, inputs, {"QLORA_OUTPUT": output})
    codes = wait_all(hosts)
    assert codes == [0, 0], "\n".join(f"--- {h.name}\n{h.output[-5000:]}" for h in hosts)
    assert "--nnodes=2 --nproc-per-node=1 --node-rank=1 --master-addr=qlora-0.qlora" in pod1.output
    assert "on host qlora-1; hosts: qlora-0, qlora-1" in pod1.output
    assert pod1.summary() is None and pod0.summary()["output"] == output
    # Neither pod left a result on its own disk; the one in S3 has the one-process run's format.
    for pod in hosts:
        assert published(pod.opt_ml / "model") == []
    assert not (pod1.opt_ml / "work" / "output").exists()
    for key, value in inputs.aws.items():
        monkeypatch.setenv(key, value)
    from entrypoints import storage

    local = storage.fetch(output, cluster_root / "downloaded", endpoint_url=inputs.endpoint)
    one, two = output_format(one_process), output_format(local)
    for key in ("files", "tensors", "adapter_config", "merged_config", "generation_config", "steps", "records"):
        assert two[key] == one[key], key
    assert {k: v for k, v in two["settings"].items() if k != "data"} == {
        k: v for k, v in one["settings"].items() if k != "data"}
    runs = list(cluster_root.rglob("offline-run-*/run-*.wandb"))
    assert [r.relative_to(cluster_root).parts[0] for r in runs] == ["qlora-0"], runs


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_with_a_complete_checkpoint_each_and_a_rerun_resumes(
        image_python, inputs, cluster_root):
    """The platform signals one container (spot reclaim, a node drain); the hosts agree on it at the next step end,
    save one checkpoint together (each host's copy complete) and both exit 75; the same job started again resumes."""
    algo1, algo2 = hosts = sagemaker_hosts(cluster_root, image_python, inputs, LONG_RUN)
    try:
        wait_for_step(algo1, hosts, 2)
        os.kill(algo2.entrypoint_pid(), signal.SIGTERM)
        codes = wait_all(hosts, timeout=120)  # without the hosts' agreement, algo-1 waits in an all-reduce: a hang
    finally:
        stop_all(hosts)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n".join(f"--- {h.name}\n{h.output[-5000:]}" for h in hosts)
    assert "forwarding SIGTERM to torchrun" in algo2.output and "forwarding" not in algo1.output
    saved = {int(m.group(1)) for m in re.finditer(r"preempted: SIGTERM .*checkpoint saved at step (\d+)", algo2.output)}
    assert len(saved) == 1, algo2.output[-4000:]
    step = saved.pop()
    assert step < 30 and max(int(m.group(1)) for m in STEP.finditer(algo1.output)) == step
    for host in hosts:
        assert checkpoints(host) == {f"checkpoint-{step}": True}, host.name
        assert (host.opt_ml / "output" / "failure").read_text().startswith("preempted: SIGTERM")
        assert published(host.opt_ml / "model") == []
    assert re.search(r"\(ranks: rank 0: 75\); the job's exit code is 75", algo1.output)
    assert re.search(r"\(ranks: rank 1: 75\); the job's exit code is 75", algo2.output)

    # SageMaker restarts the job on the same hosts' volumes (or restores checkpoint_dir on new ones): it resumes.
    for host in hosts:
        host.log.rename(host.dir / "preempted.log")
    hosts = sagemaker_hosts(cluster_root, image_python, inputs, LONG_RUN)
    codes = wait_all(hosts)
    assert codes == [0, 0], "\n".join(f"--- {h.name}\n{h.output[-5000:]}" for h in hosts)
    summary = hosts[0].summary()
    assert summary["resumed_from"] == f"checkpoint-{step}" and summary["global_step"] == 30
    assert f"resuming from {hosts[1].opt_ml}/checkpoints/checkpoint-{step}" in hosts[1].output


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["the-master-pod", "the-other-pod"])
def test_sigkill_of_one_host_ends_the_other_at_once_with_exit_10_naming_the_lost_host(
        image_python, inputs, cluster_root, victim):
    """A pod killed outright (OOM kill, node failure, kubectl delete --force): its connections close, and the other
    pod stops within seconds with exit 10 and a message naming the lost pod, instead of waiting in a collective."""
    hosts = kubernetes_hosts(cluster_root, image_python, inputs, LONG_RUN)
    killed, survivor = hosts[victim], hosts[1 - victim]
    try:
        wait_for_step(hosts[0], hosts, 2)
        os.kill(killed.entrypoint_pid(), signal.SIGKILL)
        killed_at = time.monotonic()
        code = survivor.wait(timeout=120)
        seconds = time.monotonic() - killed_at
    finally:
        stop_all(hosts)
    assert code == EXIT_PEER_LOST, survivor.output[-5000:]
    assert seconds < 60, seconds
    rank, lost = 1 - victim, victim
    message = (f"lost a process of the job: rank {rank} on host qlora-{rank} lost contact with rank {lost} on host"
               f" qlora-{lost} (")
    assert message in survivor.output, survivor.output[-5000:]
    failure = (survivor.opt_ml / "output" / "failure").read_text()
    assert failure.startswith(message) and "Rerun the job to resume" in failure
    assert f"the job's exit code is {EXIT_PEER_LOST}" in survivor.output
    assert published(survivor.opt_ml / "model") == []
    print(f"the survivor stopped {seconds:.1f}s after the kill: {failure}")


@pytest.mark.slow
def test_a_frozen_host_is_given_up_after_the_distributed_timeout(image_python, inputs, cluster_root):
    """A host that stops answering without closing its connections (a machine or network gone silent; here every
    process of it SIGSTOPped) is given up after QLORA_DISTRIBUTED_TIMEOUT_SECONDS: exit 10, the host named."""
    timeout = 20
    algo1, algo2 = hosts = sagemaker_hosts(cluster_root, image_python, inputs,
                                           {**LONG_RUN, "QLORA_DISTRIBUTED_TIMEOUT_SECONDS": str(timeout)})
    try:
        wait_for_step(algo1, hosts, 2)
        for proc in algo2.processes():
            proc.suspend()
        frozen_at = time.monotonic()
        code = algo1.wait(timeout=timeout + 120)
        seconds = time.monotonic() - frozen_at
    finally:
        stop_all(hosts)
    assert code == EXIT_PEER_LOST, algo1.output[-5000:]
    assert timeout - 2 <= seconds < timeout + 60, seconds
    assert ("lost a process of the job: rank 0 on host algo-1 lost contact with rank 1 on host algo-2 ("
            in algo1.output), algo1.output[-4000:]
    assert f"given up after distributed_timeout_seconds ({timeout} s)" in algo1.output
    print(f"the frozen host was given up after {seconds:.1f}s")
