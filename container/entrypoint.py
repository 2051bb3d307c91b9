"""The image's entrypoint: maps how a platform starts the container to the job's command, then execs it.

    python container/entrypoint.py [--dry-run] train|merge|benchmark|demo|chat|publish [job flags...]

SageMaker starts the image as `<image> train`; Kubernetes and `docker run` pass the mode as the first
argument too (the image's default is `train`). With `--dry-run` the command, the environment it adds and
the user it would run as are printed as JSON and nothing runs.

`train` runs `python -m entrypoints.train` directly on one GPU (or on CPU), and under torchrun with one
process per GPU when there are several GPUs or several hosts. Hosts come from SageMaker (`SM_HOSTS` and
`SM_CURRENT_HOST`, else /opt/ml/input/config/resourceconfig.json) or from a Kubernetes Indexed Job
(`NNODES`, `JOB_COMPLETION_INDEX`, `MASTER_ADDR`, `MASTER_PORT`); GPUs per host from `GPUS_PER_NODE`,
else `CUDA_VISIBLE_DEVICES`, else `nvidia-smi`. The job learns this host's name from `JOB_HOST_NAME` (SageMaker's
current host, else the machine's: a pod's `<job>-<index>`), to name a lost host.

Started as root (SageMaker, plain `docker run`), it hands the writable /opt/ml folders to uid 1000 and
drops to that user with `setpriv`; started as any other user (Kubernetes `runAsUser: 1000`) it runs as is.
A one-process job is exec'd, so SIGTERM reaches it and a preemption can checkpoint. A torchrun launch is
supervised instead: the entrypoint forwards SIGTERM/SIGINT to torchrun (which forwards them to every
worker) and exits with the job's own exit code, which torchrun loses (it exits 1 whenever a worker fails):
the first rank's failure other than a preemption (2 config, 3 data, ...), else 75 when ranks were
preempted. Standard library only: no torch import, so it starts in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from entrypoints.errors import EXIT_CONFIG, EXIT_PREEMPTED, HOST_NAME_ENV, RANK_EXIT_DIR_ENV, write_failure_file
from entrypoints.paths import DEFAULT_BASE_DIR, container_paths

# mode -> (the module `python -m` runs, what it does)
MODES = {
    "train": ("entrypoints.train", "fine-tune (the job SageMaker runs)"),
    "merge": ("entrypoints.merge", "merge a saved adapter into its base model"),
    "benchmark": ("entrypoints.bench.throughput", "measure training throughput on this machine's GPUs"),
    "demo": ("entrypoints.demo", "the local end-to-end demo (a local S3 server, a small model, a few steps)"),
    "chat": ("entrypoints.chat", "talk to a result (docker run -it), or answer one --prompt as JSON"),
    "publish": ("entrypoints.hub", "publish a complete output to the Hugging Face Hub (the retry after exit 9)"),
}
APP_UID = 1000
APP_GID = 1000
APP_HOME = "/home/app"
DEFAULT_MASTER_PORT = 29500
# How long the hosts of a multi-node launch wait for one another at the static rendezvous. torch's default is 600 s,
# but pods of one Kubernetes Job may start many minutes apart (a new GPU node, a multi-GB image pull) and there is
# no gang scheduling. RENDEZVOUS_TIMEOUT_SECONDS overrides it.
DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 1800
# CUDA 12.x minor-version compatibility: any CUDA 12 build runs on a Linux driver >= 525.60.13.
MIN_DRIVER = (525, 60, 13)
# Defaults the job needs on every platform; a value set by the platform or the user wins.
ENV_DEFAULTS = {
    # NVLink SHARP / multicast objects fail on hosts (and in containers) without the fabric manager
    # or IMEX channels; plain NVLink rings are as fast for a LoRA's small all-reduces.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}


class EntrypointError(Exception):
    """A problem with how the container was started; the message says how to fix it."""


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # where the host list came from: "single", "sagemaker" or "kubernetes"
    network_interface: str = ""
    host_name: str = ""  # this host as the platform names it (SageMaker's algo-N); else the machine's (the pod's) name


def usage() -> str:
    lines = ["usage: <image> [--dry-run] MODE [job flags...]", "", "modes:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in MODES.items()]
    return "\n".join(lines)


def _int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        if default is None:
            raise EntrypointError(f"{name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EntrypointError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise EntrypointError(f"{name}={raw!r} must be {minimum} or more")
    return value


def sagemaker_hosts(env: Mapping[str, str], resource_config: Path) -> tuple[list[str], str, str] | None:
    """(hosts, current host, network interface) on SageMaker, or None elsewhere.

    The SageMaker training toolkit exports SM_HOSTS / SM_CURRENT_HOST; the platform itself writes
    resourceconfig.json for every training container, so that file is the fallback.
    """
    if env.get("SM_HOSTS") or env.get("SM_CURRENT_HOST"):
        try:
            hosts = json.loads(env.get("SM_HOSTS", ""))
        except json.JSONDecodeError:
            raise EntrypointError(f"SM_HOSTS={env.get('SM_HOSTS', '')!r} is not a JSON list of host names") from None
        current = env.get("SM_CURRENT_HOST", "")
        interface = env.get("SM_NETWORK_INTERFACE_NAME", "")
        where = "SM_HOSTS"
    elif resource_config.is_file():
        try:
            data = json.loads(resource_config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EntrypointError(f"{resource_config} cannot be read as JSON: {exc}") from None
        hosts, current = data.get("hosts"), data.get("current_host", "")
        interface = data.get("network_interface_name", "")
        where = f"{resource_config} key 'hosts'"
    else:
        return None
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise EntrypointError(f"{where} must be a non-empty JSON list of host names, got {hosts!r}")
    if current not in hosts:
        raise EntrypointError(f"the current host {current!r} (SM_CURRENT_HOST) is not in the host list {hosts}")
    return hosts, current, interface


def topology(env: Mapping[str, str], resource_config: Path) -> Topology:
    sm = sagemaker_hosts(env, resource_config)
    port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT, minimum=1)
    if sm is not None:
        hosts, current, interface = sm
        # Every host reads the same list, so its first entry is an address all of them agree on.
        return Topology(len(hosts), hosts.index(current), hosts[0], port, "sagemaker", interface, current)
    nnodes = _int(env, "NNODES", 1, minimum=1)
    if nnodes == 1:
        return Topology(1, 0, "127.0.0.1", port, "single")
    # A Kubernetes Indexed Job gives each pod its index; NODE_RANK, when set, says the same thing explicitly.
    rank_var = "NODE_RANK" if env.get("NODE_RANK", "").strip() else "JOB_COMPLETION_INDEX"
    if not env.get(rank_var, "").strip():
        raise EntrypointError(
            f"NNODES={nnodes} but neither JOB_COMPLETION_INDEX (set by an Indexed Job) nor NODE_RANK is set;"
            " run the pods as an Indexed Job (completionMode: Indexed) or set NODE_RANK on each host")
    rank = _int(env, rank_var)
    if rank >= nnodes:
        raise EntrypointError(f"{rank_var}={rank} must be below NNODES={nnodes}")
    master = env.get("MASTER_ADDR", "").strip()
    if not master:
        raise EntrypointError(
            f"NNODES={nnodes} needs MASTER_ADDR: the DNS name of the index-0 pod behind the Job's headless"
            " service, e.g. <job>-0.<service>")
    return Topology(nnodes, rank, master, port, "kubernetes")


def nvidia_smi(args: Sequence[str]) -> list[str] | None:
    """Lines printed by `nvidia-smi ARGS`, or None without a usable driver (no GPU, CPU-only host)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"warning: nvidia-smi failed ({exc}); assuming no GPU")
        return None
    if out.returncode != 0:
        log(f"warning: nvidia-smi exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def parse_driver_version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.strip().split("."))
    except ValueError:
        raise EntrypointError(f"cannot read the NVIDIA driver version {text!r}") from None


def check_driver(version: str) -> None:
    if parse_driver_version(version) < MIN_DRIVER:
        floor = ".".join(map(str, MIN_DRIVER))
        raise EntrypointError(
            f"the host's NVIDIA driver {version} is older than {floor}, the oldest that runs this image's CUDA 12"
            " build of PyTorch; use an instance type, AMI or node image with a newer driver (see the image README)")


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs this host gives the job. An explicit GPUS_PER_NODE wins (the Kubernetes launcher sets it)."""
    if env.get("GPUS_PER_NODE", "").strip():
        return _int(env, "GPUS_PER_NODE")
    lines = nvidia_smi(["--query-gpu=index,driver_version", "--format=csv,noheader"])
    if lines:
        check_driver(lines[0].split(",")[-1])
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "all"):
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(lines or [])


def job_command(mode: str, job_args: Sequence[str], env: Mapping[str, str], resource_config: Path,
                python: str) -> tuple[list[str], dict[str, str]]:
    """The command to exec and the variables to add to its environment."""
    extra_env = {k: v for k, v in ENV_DEFAULTS.items() if k not in env}
    module = MODES[mode][0]
    if mode != "train":
        return [python, "-m", module, *job_args], extra_env
    topo = topology(env, resource_config)
    gpus = gpus_per_node(env)
    if topo.nnodes == 1 and gpus <= 1:
        return [python, "-m", module, *job_args], extra_env
    if topo.network_interface:
        # SageMaker hosts talk over this interface; NCCL and Gloo may otherwise pick a docker bridge.
        for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            if name not in env:
                extra_env[name] = topo.network_interface
    # The ranks name a lost host by this (a pod's host name is its <job>-<index>).
    extra_env[HOST_NAME_ENV] = env.get(HOST_NAME_ENV) or topo.host_name or socket.gethostname()
    nproc = max(gpus, 1)
    run = [python, "-m", "torch.distributed.run", f"--nnodes={topo.nnodes}", f"--nproc-per-node={nproc}"]
    if topo.nnodes == 1:
        # One host: a private rendezvous on a free local port, so two jobs on one machine cannot collide.
        run.append("--standalone")
    else:
        # Static rendezvous: every host knows the master and its own rank up front (SageMaker's host
        # list, the Indexed Job's index), so no etcd or c10d store outlives the master.
        timeout = _int(env, "RENDEZVOUS_TIMEOUT_SECONDS", DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS, minimum=1)
        run += [f"--node-rank={topo.node_rank}", f"--master-addr={topo.master_addr}",
                f"--master-port={topo.master_port}", f"--rdzv-conf=timeout={timeout}"]
    return [*run, "-m", module, *job_args], extra_env


def writable_dirs(env: Mapping[str, str]) -> list[Path]:
    """Folders the job writes under the container layout (input/ stays read-only and is left alone)."""
    paths = container_paths(env.get("QLORA_BASE_DIR") or DEFAULT_BASE_DIR)
    dirs = [paths.base, paths.model_dir, paths.checkpoint_dir, paths.work_dir, paths.failure_file.parent]
    if env.get("QLORA_CHECKPOINT_DIR"):
        dirs.append(Path(env["QLORA_CHECKPOINT_DIR"]))
    return dirs


def hand_over(dirs: Sequence[Path], uid: int, gid: int) -> None:
    """As root: create the job's writable folders and give them (recursively) to the job's user.

    SageMaker creates /opt/ml/model, /opt/ml/output and restored checkpoints as root. Trees already owned
    by `uid` are not walked again; a folder that cannot be changed (a read-only or root-squashed mount)
    is reported and left as it is, and the job then says what it could not write.
    """
    for top in dirs:
        try:
            top.mkdir(parents=True, exist_ok=True)
            if top.stat().st_uid == uid:
                continue
            os.chown(top, uid, gid)
            if top == dirs[0]:  # the base folder itself: its input/ subtree stays root's
                continue
            for root, subdirs, files in os.walk(top):
                for name in subdirs + files:
                    os.lchown(os.path.join(root, name), uid, gid)
        except OSError as exc:
            log(f"warning: cannot hand {top} to uid {uid}: {exc}")


def read_rank_exits(folder: Path) -> dict[int, tuple[int, float]]:
    """rank -> (exit code, when it ended) from the files each rank of a torchrun launch leaves (errors.py)."""
    found: dict[int, tuple[int, float]] = {}
    for path in folder.glob("rank-*"):
        try:
            code, ended = path.read_text().split()
            found[int(path.name.removeprefix("rank-"))] = (int(code), float(ended))
        except (OSError, ValueError):
            continue
    return found


def job_exit_code(torchrun_code: int, ranks: Mapping[int, tuple[int, float]]) -> int:
    """The job's exit code for a torchrun launch: 0 when torchrun succeeded; else the first failing rank's code
    other than a preemption (the cause: torchrun then stops the other ranks with SIGTERM, and they exit 75);
    else 75 when ranks were preempted; else torchrun's own (a rank killed before it could record one)."""
    if torchrun_code == 0:
        return 0
    failures = sorted((ended, code) for code, ended in ranks.values() if code != 0)
    causes = [code for _, code in failures if code != EXIT_PREEMPTED]
    if causes:
        return causes[0]
    if failures:
        return EXIT_PREEMPTED
    return torchrun_code


def supervise(command: Sequence[str], env: dict[str, str], owner: tuple[int, int] | None) -> int:
    """Run a torchrun launch as a child: forward termination signals, then exit with the job's exit code."""
    folder = Path(tempfile.mkdtemp(prefix="qlora-rank-exits-"))
    try:
        if owner is not None:
            os.chown(folder, *owner)  # the job runs as uid 1000 and writes its exit codes here
        child = subprocess.Popen(list(command), env={**env, RANK_EXIT_DIR_ENV: str(folder)})

        def forward(signum, _frame):
            log(f"forwarding {signal.Signals(signum).name} to torchrun (pid {child.pid})")
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        returncode = child.wait()
        ranks = read_rank_exits(folder)
        torchrun_code = returncode if returncode >= 0 else 128 - returncode
        code = job_exit_code(torchrun_code, ranks)
        shown = ", ".join(f"rank {r}: {c}" for r, (c, _) in sorted(ranks.items())) or "none recorded"
        log(f"torchrun exited {torchrun_code} (ranks: {shown}); the job's exit code is {code}")
        return code
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log(message: str) -> None:
    print(f"[entrypoint] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    dry_run = bool(args) and args[0] == "--dry-run"
    if dry_run:
        args = args[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_CONFIG
    mode, job_args = args[0], args[1:]
    base_dir = Path(env.get("QLORA_BASE_DIR") or DEFAULT_BASE_DIR)
    failure_file = container_paths(base_dir).failure_file
    if mode not in MODES:
        message = (f"configuration error: unknown mode {mode!r}; the first argument must be one of"
                   f" {', '.join(MODES)}\n{usage()}")
        log(message)
        write_failure_file(failure_file, message)
        return EXIT_CONFIG
    module = MODES[mode][0]
    module_found = importlib.util.find_spec(module) is not None
    try:
        resource_config = container_paths(base_dir).base / "input" / "config" / "resourceconfig.json"
        command, extra_env = job_command(mode, job_args, env, resource_config, sys.executable)
    except EntrypointError as exc:
        message = f"configuration error: {exc}"
        log(message)
        write_failure_file(failure_file, message)
        return EXIT_CONFIG
    as_root = os.geteuid() == 0
    if as_root:
        # HOME etc. follow the user: libraries write caches and configs below it.
        extra_env.update({"HOME": APP_HOME, "USER": "app", "LOGNAME": "app"})
        command = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_GID}", "--clear-groups", "--no-new-privs",
                   "--", *command]
    if dry_run:
        print(json.dumps({
            "mode": mode,
            "module": module,
            "module_found": module_found,
            "command": command,
            "env": extra_env,
            "run_as": f"{APP_UID}:{APP_GID}" if as_root else f"{os.geteuid()}:{os.getegid()} (as started)",
        }, indent=2))
        return 0
    if not module_found:
        message = (f"configuration error: mode {mode!r} needs the module {module}, which this image does not"
                   " contain; use an image built from a version of the project that has it")
        log(message)
        write_failure_file(failure_file, message)
        return EXIT_CONFIG
    if as_root:
        hand_over(writable_dirs(env), APP_UID, APP_GID)
    env.update(extra_env)
    if "torch.distributed.run" in command:
        log("run: " + " ".join(command))
        return supervise(command, env, (APP_UID, APP_GID) if as_root else None)
    log("exec: " + " ".join(command))
    os.execvpe(command[0], command, env)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
