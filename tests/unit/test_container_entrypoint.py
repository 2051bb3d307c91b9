"""The image's entrypoint, run as a real process: mode mapping, torchrun commands, errors, root drop, signals.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_container_entrypoint.py

`--dry-run` prints the exact command the entrypoint would exec; the last tests let it exec for real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "container" / "entrypoint.py"
PY = sys.executable
AS_ROOT = os.geteuid() == 0
SETPRIV = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--no-new-privs", "--"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A clean environment: nothing from the developer's shell (SM_*, NNODES, CUDA_VISIBLE_DEVICES) leaks in,
    # and PATH has no nvidia-smi, as on a CPU-only host.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO), "QLORA_BASE_DIR": str(tmp_path / "ml")}
    env.update(extra)
    return env


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ENTRYPOINT), *args], env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=60)


def _plan(tmp_path: Path, *args: str, **env: str) -> dict:
    out = _run(tmp_path, "--dry-run", *args, **env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # As root the job runs under setpriv as uid 1000; the rest of the command is the same either way.
    if AS_ROOT:
        assert plan["command"][: len(SETPRIV)] == SETPRIV
        assert plan["run_as"] == "1000:1000" and plan["env"]["HOME"] == "/home/app"
        plan["command"] = plan["command"][len(SETPRIV):]
    else:
        assert "(as started)" in plan["run_as"]
    return plan


def test_train_on_one_gpu_runs_the_job_directly(tmp_path):
    plan = _plan(tmp_path, "train", "--max-steps", "5", GPUS_PER_NODE="1")
    assert plan["command"] == [PY, "-m", "entrypoints.train", "--max-steps", "5"]
    assert plan["env"]["NCCL_NVLS_ENABLE"] == "0" and plan["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_train_without_gpus_runs_the_job_directly(tmp_path):
    assert _plan(tmp_path, "train")["command"] == [PY, "-m", "entrypoints.train"]


def test_train_on_four_gpus_uses_torchrun_one_process_per_gpu(tmp_path):
    plan = _plan(tmp_path, "train", GPUS_PER_NODE="4")
    assert plan["command"] == [PY, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4",
                               "--standalone", "-m", "entrypoints.train"]


def test_gpu_count_follows_cuda_visible_devices(tmp_path):
    plan = _plan(tmp_path, "train", CUDA_VISIBLE_DEVICES="0,1")
    assert "--nproc-per-node=2" in plan["command"]


def test_sagemaker_two_hosts_from_sm_hosts(tmp_path):
    plan = _plan(tmp_path, "train", SM_HOSTS='["algo-1", "algo-2"]', SM_CURRENT_HOST="algo-2", GPUS_PER_NODE="8")
    assert plan["command"] == [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                               "--node-rank=1", "--master-addr=algo-1", "--master-port=29500",
                               "--rdzv-conf=timeout=1800", "-m", "entrypoints.train"]
    assert plan["env"]["JOB_HOST_NAME"] == "algo-2"


def test_sagemaker_two_hosts_from_resourceconfig(tmp_path):
    """Without the training toolkit's SM_* variables, the platform's resourceconfig.json is read."""
    config = tmp_path / "ml" / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}))
    plan = _plan(tmp_path, "train", GPUS_PER_NODE="4")
    assert plan["command"][3:8] == ["--nnodes=2", "--nproc-per-node=4", "--node-rank=0", "--master-addr=algo-1",
                                    "--master-port=29500"]
    assert plan["env"]["NCCL_SOCKET_IFNAME"] == "eth0" and plan["env"]["GLOO_SOCKET_IFNAME"] == "eth0"
    # The ranks name a lost host as the platform names it.
    assert plan["env"]["JOB_HOST_NAME"] == "algo-1"


def test_kubernetes_indexed_job_rank_1(tmp_path):
    plan = _plan(tmp_path, "train", NNODES="2", JOB_COMPLETION_INDEX="1", MASTER_ADDR="qlora-0.qlora-workers",
                 MASTER_PORT="23456", GPUS_PER_NODE="4")
    assert plan["command"] == [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                               "--node-rank=1", "--master-addr=qlora-0.qlora-workers", "--master-port=23456",
                               "--rdzv-conf=timeout=1800", "-m", "entrypoints.train"]
    assert plan["env"]["JOB_HOST_NAME"] == socket.gethostname()  # a pod's host name: <job>-<index>


def test_multi_node_rendezvous_waits_for_pods_that_start_minutes_apart(tmp_path):
    """torch's static rendezvous gives up after 600 s; pods of one Job can start further apart than that."""
    plan = _plan(tmp_path, "train", NNODES="2", JOB_COMPLETION_INDEX="0", MASTER_ADDR="q-0.q", GPUS_PER_NODE="1")
    assert "--rdzv-conf=timeout=1800" in plan["command"]
    plan = _plan(tmp_path, "train", NNODES="2", JOB_COMPLETION_INDEX="0", MASTER_ADDR="q-0.q", GPUS_PER_NODE="1",
                 RENDEZVOUS_TIMEOUT_SECONDS="3600")
    assert "--rdzv-conf=timeout=3600" in plan["command"]


def test_user_settings_win_over_the_entrypoint_defaults(tmp_path):
    plan = _plan(tmp_path, "train", NCCL_NVLS_ENABLE="1")
    assert "NCCL_NVLS_ENABLE" not in plan["env"]


@pytest.mark.parametrize(("mode", "module"), [("merge", "entrypoints.merge"), ("demo", "entrypoints.demo"),
                                              ("benchmark", "entrypoints.bench.throughput"),
                                              ("chat", "entrypoints.chat"), ("publish", "entrypoints.hub")])
def test_other_modes_run_their_module_in_one_process(tmp_path, mode, module):
    plan = _plan(tmp_path, mode, "--x", "1", GPUS_PER_NODE="8")
    assert plan["command"] == [PY, "-m", module, "--x", "1"]
    import importlib.util

    assert importlib.util.find_spec(module) is not None  # the map names modules that exist


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["serve"], {}, "unknown mode 'serve'"),
    (["train"], {"NNODES": "2", "MASTER_ADDR": "m"}, "neither JOB_COMPLETION_INDEX"),
    (["train"], {"NNODES": "2", "JOB_COMPLETION_INDEX": "0"}, "needs MASTER_ADDR"),
    (["train"], {"NNODES": "2", "JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "m"}, "must be below NNODES=2"),
    (["train"], {"NNODES": "two"}, "NNODES='two' is not an integer"),
    (["train"], {"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE='-1' must be 0 or more"),
    (["train"], {"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-3"}, "'algo-3' (SM_CURRENT_HOST) is not in"),
    (["train"], {"SM_HOSTS": "algo-1", "SM_CURRENT_HOST": "algo-1"}, "is not a JSON list"),
])
def test_bad_invocations_fail_clearly_with_the_config_exit_code(tmp_path, args, env, expected):
    out = _run(tmp_path, *args, **env)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    # SageMaker shows this file as the job's FailureReason.
    assert expected in (tmp_path / "ml" / "output" / "failure").read_text()


def test_no_mode_prints_usage_and_fails(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 2 and "modes:" in out.stderr and "benchmark" in out.stderr


def test_driver_floor():
    sys.path.insert(0, str(REPO / "container"))
    try:
        import entrypoint
    finally:
        sys.path.pop(0)
    entrypoint.check_driver("525.60.13")
    entrypoint.check_driver("570.172.08")
    with pytest.raises(entrypoint.EntrypointError, match="older than 525.60.13"):
        entrypoint.check_driver("470.256.02")
    with pytest.raises(entrypoint.EntrypointError, match="older than 525.60.13"):
        entrypoint.check_driver("525.60.11")


# ---------------------------------------------------------------- for real: exec, user, signals
JOB_PROBE = '''
import json, os, signal, sys, time
from pathlib import Path
out = Path(os.environ["PROBE_OUT"])
def on_term(signum, frame):
    (out / "signal").write_text(str(signum))
    sys.exit(75)  # EXIT_PREEMPTED, as the job does after its checkpoint
signal.signal(signal.SIGTERM, on_term)
(out / "report.json").write_text(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
    "groups": os.getgroups(), "home": os.environ.get("HOME"), "argv": sys.argv[1:],
    "nvls": os.environ.get("NCCL_NVLS_ENABLE")}))
time.sleep(60)
'''


@pytest.fixture
def probe_package():
    """A copy of the job's package whose `train` module reports how it was started and waits for SIGTERM.

    It lives in a world-readable folder so that uid 1000 can import it after the entrypoint drops root.
    """
    root = Path(tempfile.mkdtemp(prefix="qlora-entrypoint-", dir="/tmp"))
    try:
        shutil.copytree(REPO / "entrypoints", root / "entrypoints", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "entrypoints" / "train.py").write_text(JOB_PROBE)
        out = root / "out"
        out.mkdir()
        for path in (root, out):
            path.chmod(0o777)
        yield root, out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"{path} never appeared; the job's stderr:\n{stderr}")
        time.sleep(0.05)


def test_entrypoint_execs_the_job_which_receives_sigterm(probe_package, tmp_path):
    root, out = probe_package
    base = root / "ml"
    env = _env(tmp_path, PYTHONPATH=str(root), PROBE_OUT=str(out), QLORA_BASE_DIR=str(base))
    # cwd: `python -m` puts the working folder first on sys.path, and the repo's own package must not win.
    proc = subprocess.Popen([PY, str(ENTRYPOINT), "train", "--max-steps", "3"], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "report.json", proc)
        time.sleep(0.2)  # the report is written before the job sleeps; let the write land
        report = json.loads((out / "report.json").read_text())
        # exec, not a child: the process we started IS the job, so a platform's SIGTERM reaches it directly.
        assert report["pid"] == proc.pid
        assert report["argv"] == ["--max-steps", "3"]
        assert report["nvls"] == "0"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    assert (out / "signal").read_text() == str(int(signal.SIGTERM))
    if AS_ROOT:
        assert report["uid"] == 1000 and report["gid"] == 1000 and report["groups"] == []
        assert report["home"] == "/home/app"
        # The writable folders were created and handed to the job's user before it started.
        for sub in ("", "model", "checkpoints", "work", "output"):
            assert (base / sub).stat().st_uid == 1000, sub
    else:
        assert report["uid"] == os.getuid()


def test_missing_job_module_is_a_clear_error(probe_package, tmp_path):
    root, _ = probe_package
    (root / "entrypoints" / "train.py").unlink()
    # -S: no site-packages, so an editable install of the project (CI's) cannot supply the deleted module.
    out = subprocess.run([PY, "-S", str(ENTRYPOINT), "train"], env=_env(tmp_path, PYTHONPATH=str(root)), cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "needs the module entrypoints.train, which this image does not contain" in out.stderr
