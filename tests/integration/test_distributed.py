"""The job under torchrun with two processes on CPU (gloo): who downloads, who writes, and what comes out.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_distributed.py -v

The real entrypoint runs as `python -m torch.distributed.run --nproc-per-node=2 -m entrypoints.train` with the
tiny Llama-2-shaped model in a real S3 server (so there is something to download) and local data and output.
Its outputs must have the same format (file names, tensor names, shapes, dtypes, configs) as a one-process
run of the same settings, with one manifest, one W&B run and one download. The Ranks helpers are also run in
two real gloo processes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from entrypoints import errors, storage
from entrypoints.checkpoints import StopFlag
from entrypoints.errors import EXIT_DATA, EXIT_PREEMPTED, DataError
from entrypoints.ranks import RankFailed, Ranks
from entrypoints.train import SUMMARY_PREFIX

from ..jobrun import REPO, job_env, run_job
from ..wandb_records import summarize

RECORDS = [{"instruction": f"What is code {i}?", "input": "", "output": f"Code {i} is {i * 7 % 13}."} for i in range(24)]
SETTINGS = {
    "QLORA_MAX_STEPS": "3", "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
    "QLORA_EVAL_FRACTION": "0.25", "QLORA_NUM_SAMPLE_GENERATIONS": "2", "QLORA_MAX_NEW_TOKENS": "4",
    "QLORA_LOGGING_STEPS": "1", "QLORA_SAVE_STEPS": "2", "QLORA_LEARNING_RATE": "1e-3",
    "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16",
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "entrypoints.train"]



def nothing_published(output) -> bool:
    """No file of a result at a local output: at most the job's hidden bookkeeping (the zero-byte lock file that
    claims on a local output take turns with)."""
    return not output.exists() or all(p.name.startswith(".") for p in output.rglob("*"))

def run_torchrun(env: dict[str, str], timeout: int = 300) -> tuple[int, str]:
    proc = subprocess.run(TORCHRUN, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def rank_lines(output: str, rank: int) -> list[str]:
    return [line for line in output.splitlines() if f" rank{rank} " in line]


def long_run_env(tmp_path: Path, model: Path) -> dict[str, str]:
    """A 30-step run over RECORDS without eval, merge or sample answers: long enough to be signalled mid-way."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return job_env(tmp_path, **{**SETTINGS, "QLORA_MAX_STEPS": "30", "QLORA_SAVE_STEPS": "100",
                                "QLORA_EVAL_FRACTION": "0", "QLORA_MERGE": "false", "QLORA_NUM_SAMPLE_GENERATIONS": "0"},
                   QLORA_MODEL=str(model), QLORA_DATA=str(data), QLORA_OUTPUT=str(tmp_path / "out"),
                   QLORA_REPORT_TO="none")


def follow_until_step(proc: subprocess.Popen, step: int, timeout: float = 180) -> tuple[list[str], threading.Thread]:
    """Collect the launch's output in the background and return once rank 0 has logged optimizer step `step`."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not any(f" qlora: step {step}/" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.05)
    return lines, reader


# ------------------------------------------------------------------------------------------- formats
def tensor_formats(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def output_format(out: Path) -> dict:
    """Everything about an output that does not depend on the trained values or on where the run happened."""
    manifest = json.loads((out / "manifest.json").read_text())
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    adapter_config.pop("base_model_name_or_path")  # the base model's local path (each run has its own work dir)
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # a set in peft: any order
    config = {k: v for k, v in manifest["config"].items() if k not in ("output", "base_dir")}
    return {
        "files": sorted(f["path"] for f in manifest["files"]),
        "tensors": {f["path"]: tensor_formats(out / f["path"]) for f in manifest["files"]
                    if f["path"].endswith(".safetensors")},
        "adapter_config": adapter_config,
        "merged_config": json.loads((out / "merged" / "config.json").read_text()),
        "generation_config": (json.loads((out / "merged" / "generation_config.json").read_text())
                              if (out / "merged" / "generation_config.json").is_file() else None),
        "settings": config,
        "steps": manifest["metrics"]["global_step"],
        "records": (manifest["data"]["train_records"], manifest["data"]["eval_records"]),
    }


# Slow tier (23 s): the default tier's two-host run (test_multihost.py, SageMaker's host description) also trains two
# gloo ranks through the entrypoint and checks one output of the one-process format.
@pytest.mark.slow
def test_two_ranks_on_cpu_write_one_output_of_the_same_format_as_one_process(s3_env, tiny_model, tmp_path):
    server, bucket = s3_env
    storage.upload_tree(tiny_model, f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    def env(name: str) -> dict[str, str]:
        (tmp_path / name).mkdir()
        return job_env(tmp_path / name, **server.env(), **SETTINGS, QLORA_MODEL=f"s3://{bucket}/models/tiny",
                       QLORA_S3_ENDPOINT_URL=server.endpoint, QLORA_DATA=str(data),
                       QLORA_OUTPUT=str(tmp_path / name / "out"))

    started = time.monotonic()
    single = run_job(env("one"))
    single_seconds = time.monotonic() - started
    assert single.code == 0, single.output[-4000:]
    started = time.monotonic()
    code, output = run_torchrun(env("two"))
    two_seconds = time.monotonic() - started
    assert code == 0, output[-6000:]
    assert "rank 1 of 2 (local rank 1, backend gloo)" in output

    # One result: one summary line, one manifest, no second (versioned or not) output anywhere.
    assert sum(line.startswith(SUMMARY_PREFIX) for line in output.splitlines()) == 1
    summary = json.loads(next(line for line in output.splitlines() if line.startswith(SUMMARY_PREFIX))[len(SUMMARY_PREFIX):])
    assert summary["global_step"] == 3 and summary["output"] == str(tmp_path / "two" / "out")
    # (the published manifest, and the copy in world rank 0's staging folder it was uploaded from)
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("manifest.json")) == [
        "opt-ml/work/output/manifest.json", "out/manifest.json"]

    one, two = output_format(tmp_path / "one" / "out"), output_format(tmp_path / "two" / "out")
    assert two["files"] == one["files"] and "merged/model.safetensors" in two["files"]
    assert two["tensors"] == one["tensors"] and len(two["tensors"]["adapter/adapter_model.safetensors"]) == 28
    for key in ("adapter_config", "merged_config", "generation_config", "settings", "steps", "records"):
        assert two[key] == one[key], key

    # One W&B run, with the loss of every step (logged by rank 0 for both ranks).
    runs = list((tmp_path / "two").rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = summarize(runs[0])["history"]
    assert len([h for h in history if "train/loss" in h]) == 3
    assert "W&B run" not in "\n".join(rank_lines(output, 1))

    # The model was downloaded once, by rank 0; rank 1 waited and used its files; the data caches likewise.
    rank0, rank1 = "\n".join(rank_lines(output, 0)), "\n".join(rank_lines(output, 1))
    assert f"downloading s3://{bucket}/models/tiny/" in rank0
    assert "downloading" not in rank1 and "waiting for rank 0: the input downloads" in rank1
    assert "data: reused the Arrow caches" in rank1 and "data: reused" not in rank0
    assert not list((tmp_path / "two").rglob("*.partial"))
    # Both ranks trained (DDP): each evaluated its half and they agree on the loss.
    losses = [re.search(r"eval loss after training: (\S+)", text).group(1) for text in (rank0, rank1)]
    assert losses[0] == losses[1]
    print(f"one process {single_seconds:.1f}s, two ranks {two_seconds:.1f}s")


def test_a_data_error_on_rank_0_stops_every_rank_with_its_exit_code(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    code, output = run_torchrun(job_env(tmp_path, **SETTINGS, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                                        QLORA_OUTPUT=str(tmp_path / "out"), QLORA_REPORT_TO="none"), timeout=180)
    assert code != 0
    for rank in (0, 1):
        assert any("ERROR" in line and "data error: " in line and "train.jsonl:2" in line
                   for line in rank_lines(output, rank)), output[-4000:]
    # torchrun's own summary names the exit code of the rank that ended first: the data error's, not 1 or 75.
    assert re.search(r"exitcode\s*:\s*3 ", output), output[-3000:]
    assert (tmp_path / "opt-ml" / "output" / "failure").read_text().startswith("data error: ")
    assert nothing_published(tmp_path / "out")


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_complete_checkpoint(tiny_model, tmp_path):
    """SIGTERM reaches each rank on its own (here: rank 1 only). The ranks agree on it at the next step end, save
    one checkpoint together and both exit 75; a rerun resumes from it."""
    import psutil

    env = long_run_env(tmp_path, tiny_model)
    proc = subprocess.Popen(TORCHRUN, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        lines, reader = follow_until_step(proc, 2)
        workers = psutil.Process(proc.pid).children()
        next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGTERM)
        proc.wait(timeout=120)  # without the ranks' agreement, rank 0 waits in the next all-reduce: a timeout here
        reader.join(timeout=10)
    finally:  # never leave a hung launch behind
        if proc.poll() is None:
            proc.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    output = "".join(lines)
    assert proc.returncode != 0
    saved = [int(m.group(1)) for line in rank_lines(output, 1)
             if (m := re.search(r"ERROR .*preempted: SIGTERM received: checkpoint saved at step (\d+)", line))]
    assert len(saved) == 1, output[-4000:]
    step = saved[0]
    # Rank 0 (which logs the steps) stopped at the same step: without the agreement it would train on alone and
    # wait for rank 1 in the next step's all-reduce until torchrun killed it.
    steps = [int(m.group(1)) for line in rank_lines(output, 0) if (m := re.search(r" qlora: step (\d+)/30 ", line))]
    assert steps[-1] == step and any("preempted: " in line for line in rank_lines(output, 0)), output[-4000:]
    assert step < 30
    ckpt = tmp_path / "opt-ml" / "checkpoints" / f"checkpoint-{step}"
    assert [p.name for p in ckpt.parent.glob("checkpoint-*")] == [ckpt.name]
    assert (ckpt / "COMPLETE").is_file() and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert (tmp_path / "opt-ml" / "output" / "failure").read_text().startswith("preempted: SIGTERM")
    assert nothing_published(tmp_path / "out")

    code, output = run_torchrun(env)  # the same settings: the checkpoint's 30-step schedule goes on
    assert code == 0, output[-4000:]
    summary = json.loads(next(line for line in output.splitlines() if line.startswith(SUMMARY_PREFIX))[len(SUMMARY_PREFIX):])
    assert summary["resumed_from"] == f"checkpoint-{step}" and summary["global_step"] == 30
    assert "waiting for rank 0: checkpoint restore" in "\n".join(rank_lines(output, 1))


# ------------------------------------------------------------------------------------------- the container's launch
# container/entrypoint.py's torchrun path: the command it builds for 2 processes per host and its supervision
# (signal forwarding, the job's exit code). Started by a small driver rather than the entrypoint's main(), which
# as root (this machine) drops to uid 1000 first, and uid 1000 may not be able to run this machine's Python
# (the drop itself is tested in test_container_entrypoint.py).
LAUNCH = """
import os, sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "container"))
import entrypoint
command, extra = entrypoint.job_command("train", [], os.environ, entrypoint.Path("/nonexistent"), sys.executable)
print("launch:", " ".join(command), flush=True)
sys.exit(entrypoint.supervise(command, {**os.environ, **extra}, None))
"""


def launch(env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH], env={**env, "REPO": str(REPO), "GPUS_PER_NODE": "2"},
                            cwd=REPO, text=True, **popen)


def test_the_entrypoints_torchrun_launch_exits_with_the_failing_ranks_code(tiny_model, tmp_path):
    """torchrun itself exits 1 when a worker fails; the entrypoint exits with the job's code (3: data error)."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    env = job_env(tmp_path, **SETTINGS, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                  QLORA_OUTPUT=str(tmp_path / "out"), QLORA_REPORT_TO="none")
    proc = launch(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=180)
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone" in output, output[-3000:]
    assert proc.returncode == EXIT_DATA, output[-4000:]
    assert re.search(r"torchrun exited 1 \(ranks: rank 0: 3, rank 1: 3\); the job's exit code is 3", output), \
        output[-3000:]
    assert (tmp_path / "opt-ml" / "output" / "failure").read_text().startswith("data error: ")
    assert nothing_published(tmp_path / "out")


def test_the_entrypoint_forwards_a_platforms_sigterm_to_torchrun_and_exits_75(tiny_model, tmp_path):
    """The platform signals the container's first process (the entrypoint); every rank checkpoints; exit 75."""
    env = long_run_env(tmp_path, tiny_model)
    proc = launch(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines, reader = follow_until_step(proc, 2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert "forwarding SIGTERM to torchrun" in output, output[-3000:]
    assert proc.returncode == EXIT_PREEMPTED, output[-4000:]
    assert re.search(r"\(ranks: rank 0: 75, rank 1: 75\); the job's exit code is 75", output), output[-3000:]
    ckpts = list((tmp_path / "opt-ml" / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file(), output[-3000:]
    assert nothing_published(tmp_path / "out")


def _entrypoint_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("container_entrypoint", REPO / "container" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_job_exit_code_prefers_the_cause_over_preemptions_and_torchruns_code():
    job_exit_code = _entrypoint_module().job_exit_code

    assert job_exit_code(0, {}) == 0
    # rank 1 failed first with a data error; torchrun then stopped rank 0, which exited 75
    assert job_exit_code(1, {0: (75, 20.0), 1: (3, 10.0)}) == 3
    assert job_exit_code(1, {0: (3, 10.0), 1: (3, 10.5)}) == 3
    assert job_exit_code(1, {0: (75, 10.0), 1: (75, 10.2)}) == EXIT_PREEMPTED
    assert job_exit_code(1, {0: (0, 10.0)}) == 1  # a rank killed before it could record its code
    assert job_exit_code(137, {}) == 137


def test_ranks_record_their_exit_codes_for_the_entrypoint(tmp_path, monkeypatch):
    read_rank_exits = _entrypoint_module().read_rank_exits

    monkeypatch.setenv(errors.RANK_EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert errors.run_guarded(lambda: _raise(DataError("bad record at line 7")), lambda: None) == EXIT_DATA
    monkeypatch.setenv("RANK", "0")
    assert errors.run_guarded(lambda: None, lambda: None) == 0
    (tmp_path / "rank-x").write_text("garbage")
    found = read_rank_exits(tmp_path)
    assert sorted(found) == [0, 1] and found[1][0] == EXIT_DATA and found[0][0] == 0


# ------------------------------------------------------------------------------------------- helpers (unit)
def _raise(exc: BaseException):
    raise exc


def test_one_process_ranks_just_run_the_step():
    ranks = Ranks()
    assert ranks.is_main and ranks.is_local_main and ranks.host_leader == 0
    assert ranks.on_world_leader(lambda: 1, "x") == 1 and ranks.on_host_leader(lambda: 2, "x") == 2
    assert ranks.host_leader_first(lambda: 3, "x") == 3 and ranks.gather("v") == ["v"]
    with pytest.raises(DataError):
        ranks.on_host_leader(lambda: _raise(DataError("bad")), "x")


def test_host_leader_is_the_first_rank_of_the_host():
    assert Ranks(world_size=8, rank=5, local_rank=1).host_leader == 4
    assert not Ranks(world_size=8, rank=4, local_rank=0).is_main and Ranks(world_size=8, rank=4, local_rank=0).is_local_main


def test_a_collective_that_lost_its_peer_names_the_lost_rank_and_host():
    """What gloo raises in a collective when the other host's process was killed, as the job's own exit 10."""
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
                        " [127.0.0.1]:31384. This is typically caused by a remote worker crashing.\nmore")
    lost = Ranks(world_size=2, rank=0, hosts=("algo-1", "algo-2"), timeout_seconds=1800).lost_peer(gloo)
    assert isinstance(lost, errors.PeerLost) and lost.exit_code == errors.EXIT_PEER_LOST == 10
    assert str(lost).startswith("rank 0 on host algo-1 lost contact with rank 1 on host algo-2 (Connection closed by"
                                " peer [127.0.0.1]:31384). That process was killed")
    assert "pair.cc" not in str(lost) and "typically" not in str(lost) and "more" not in str(lost)
    assert "distributed_timeout_seconds (1800 s)" in str(lost)
    # Raised from within a library's own error (the Trainer's), and with two ranks on each of three hosts.
    try:
        try:
            raise RuntimeError("Timed out waiting 20000ms for recv operation to complete")
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as wrapped:
        lost = Ranks(world_size=6, rank=1, local_rank=1, hosts=("a", "a", "b", "b", "c", "c")).lost_peer(wrapped)
    assert str(lost).startswith("rank 1 on host a lost contact with a process on another host (ranks 2, 3 on host b;"
                                " ranks 4, 5 on host c) (Timed out waiting 20000ms")
    # Anything else is left as it is: a bug, the job's own errors, a single process.
    assert Ranks(world_size=2, hosts=("a", "b")).lost_peer(RuntimeError("size mismatch for lora_A")) is None
    assert Ranks(world_size=2, hosts=("a", "b")).lost_peer(DataError("Connection closed by peer")) is None
    assert Ranks().lost_peer(gloo) is None


def _gloo_worker(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ranks = Ranks(world_size=2, rank=rank, local_rank=rank)
    out: dict = {"main": ranks.on_world_leader(lambda: f"made by {rank}", "x")}
    order: list[str] = []

    def step() -> str:
        order.append(f"ran {rank} at {time.monotonic()}")
        time.sleep(0.3 if rank == 0 else 0)
        return f"own {rank}"

    out["first"] = ranks.host_leader_first(step, "x")
    out["first_time"] = float(order[0].split(" at ")[1])
    try:
        ranks.on_host_leader(lambda: _raise(DataError("bad record at line 7")), "x")
    except RankFailed as exc:
        out["error"] = ("RankFailed", exc.exit_code, exc.kind, str(exc))
    except DataError as exc:
        out["error"] = ("DataError", exc.exit_code, exc.kind, str(exc))
    try:
        ranks.on_world_leader(lambda: _raise(KeyboardInterrupt()), "x")
    except RankFailed as exc:
        out["interrupt"] = exc.exit_code
    except KeyboardInterrupt:
        out["interrupt"] = "KeyboardInterrupt"
    dist.destroy_process_group()
    results.put((rank, out))


def test_ranks_share_results_order_steps_and_pass_failures_between_two_gloo_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got[0]["main"] == got[1]["main"] == "made by 0"
    assert got[0]["first"] == "own 0" and got[1]["first"] == "own 1"
    assert got[1]["first_time"] >= got[0]["first_time"] + 0.3  # rank 1 ran only after rank 0 had finished
    assert got[0]["error"] == ("DataError", EXIT_DATA, "data error", "bad record at line 7")
    assert got[1]["error"] == ("RankFailed", EXIT_DATA, "data error", "bad record at line 7")
    assert got[0]["interrupt"] == "KeyboardInterrupt" and got[1]["interrupt"] == EXIT_PREEMPTED


def test_stop_flag_set_by_another_rank_keeps_its_own_signal():
    flag = StopFlag()
    flag.set_by_other_rank()
    assert flag.is_set() and "another rank" in flag.signal_name
    own = StopFlag()
    own.signal_name = "SIGTERM"
    own.event.set()
    own.set_by_other_rank()
    assert own.signal_name == "SIGTERM"


def test_first_failure_wins_keeps_a_failure_file_written_during_the_run(tmp_path):
    failure = tmp_path / "failure"
    failure.write_text("old failure of an earlier job\n")
    os.utime(failure, (time.time() - 60, time.time() - 60))

    def preempted():
        raise KeyboardInterrupt

    # A failure file older than this process is replaced ...
    assert errors.run_guarded(preempted, lambda: failure, first_failure_wins=True) == EXIT_PREEMPTED
    assert failure.read_text().startswith("preempted: ")

    def other_rank_then_preempted():
        failure.write_text("data error: line 7\n")  # another rank's failure, written while this one runs
        raise KeyboardInterrupt

    assert errors.run_guarded(other_rank_then_preempted, lambda: failure, first_failure_wins=True) == EXIT_PREEMPTED
    assert failure.read_text() == "data error: line 7\n"
    # ... and a single process always writes its own.
    assert errors.run_guarded(other_rank_then_preempted, lambda: failure) == EXIT_PREEMPTED
    assert failure.read_text().startswith("preempted: ")


def test_fsdp_on_cpu_ranks_is_refused_before_the_model_loads(tiny_model, tmp_path):
    """accelerate shards only across GPUs; on CPU ranks it would quietly train DDP. The job says so, exit 2."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    code, output = run_torchrun(job_env(tmp_path, **SETTINGS, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                                        QLORA_OUTPUT=str(tmp_path / "out"), QLORA_REPORT_TO="none",
                                        QLORA_PARALLELISM="fsdp"), timeout=180)
    assert code != 0 and re.search(r"exitcode\s*:\s*2 ", output), output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith("configuration error: ") and "QLORA_PARALLELISM=fsdp: FSDP runs on CUDA GPUs only" in \
        failure and "QLORA_PARALLELISM=ddp" in failure, failure
    assert "loading " not in output  # refused before minutes of model loading
    assert nothing_published(tmp_path / "out")


def _heartbeat_worker(rank: int, store: str, scenario: str, folder: str) -> None:
    """One of two gloo processes inside `Ranks.watching_peers`, as training runs in it. `lost`: rank 1 dies abruptly
    while rank 0 is busy (stuck as it would be in an NCCL collective). `leave`: both leave, three seconds apart."""
    from datetime import timedelta

    import torch.distributed as dist

    from entrypoints.ranks import exit_lost

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    heartbeat = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    ranks = Ranks(world_size=2, rank=rank, local_rank=0, hosts=("algo-1", "algo-2"), timeout_seconds=60,
                  heartbeat_group=heartbeat)
    failure = Path(folder) / f"failure-{rank}"
    released = Path(folder) / f"released-{rank}"
    with ranks.watching_peers(lambda lost: exit_lost(lost, failure, released.touch), interval=0.2):
        if scenario == "lost":
            if rank == 1:
                time.sleep(1)
                os._exit(9)  # gone without a word, as a SIGKILLed host is
            time.sleep(120)  # never returns by itself: only the heartbeat can end this process
        else:
            time.sleep(0.5 if rank == 0 else 3.5)
    Path(folder, f"left-{rank}").write_text(str(time.monotonic()))
    os._exit(0)


@pytest.mark.parametrize("scenario", ["lost", "leave"])
def test_the_heartbeat_ends_a_stuck_rank_when_its_peer_dies_and_never_when_ranks_leave_apart(tmp_path, scenario):
    """NCCL notices a dead peer only at its timeout and then aborts the process (SIGABRT, no exit code of the job's):
    the heartbeat must end a rank stuck in training within seconds, with exit 10 naming the lost host, the output
    claim given up; and ranks that leave training seconds apart must not take each other for lost."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_heartbeat_worker, args=(r, str(tmp_path / "store"), scenario, str(tmp_path)))
             for r in (0, 1)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    elapsed = time.monotonic() - started
    codes = [p.exitcode for p in procs]
    if scenario == "lost":
        assert codes == [errors.EXIT_PEER_LOST, 9] and elapsed < 60, (codes, elapsed)
        message = (tmp_path / "failure-0").read_text()
        assert message.startswith("lost a process of the job: rank 0 on host algo-1 lost contact with rank 1 on host"
                                  " algo-2"), message
        assert (tmp_path / "released-0").exists()  # the output claim was given up before the exit
    else:
        assert codes == [0, 0], codes
        assert not list(tmp_path.glob("failure-*"))
        left = [float((tmp_path / f"left-{r}").read_text()) for r in (0, 1)]
        # rank 0 left (and exited) seconds before rank 1: the heartbeats had stopped together when rank 0 left, so
        # rank 1 did not take rank 0's exit for a lost peer
        assert left[1] - left[0] > 2, left


def test_every_rank_ends_with_the_outcome_of_rank_0s_outputs(tiny_model, tmp_path):
    """After training, world rank 0 alone merges and publishes; the other ranks wait for it and end with its exit
    code, not 0 while rank 0 fails (a host that exited 0 would leave a Kubernetes retry of rank 0 waiting at the
    rendezvous for hosts that are gone). Here the Hub publish fails: both ranks exit 9, rank 1 after rank 0's
    outputs were complete."""
    from ..hub_server import HubServer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with HubServer(fail=("commit",)) as hub:
        env = job_env(tmp_path, **{**SETTINGS, "QLORA_MAX_STEPS": "2", "QLORA_EVAL_FRACTION": "0",
                                   "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_MERGE": "false"},
                      QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data), QLORA_OUTPUT=str(tmp_path / "out"),
                      QLORA_REPORT_TO="none", QLORA_HUB_REPO="acme/tiny-qlora", HF_ENDPOINT=hub.url,
                      HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
        exits = tmp_path / "rank-exits"
        exits.mkdir()
        code, out = run_torchrun({**env, errors.RANK_EXIT_DIR_ENV: str(exits)})
    assert code != 0, out[-3000:]
    recorded = {p.name: p.read_text().split() for p in exits.iterdir()}
    assert {name: int(v[0]) for name, v in recorded.items()} == {"rank-0": errors.EXIT_HUB_PUBLISH,
                                                                 "rank-1": errors.EXIT_HUB_PUBLISH}, out[-3000:]
    assert float(recorded["rank-1"][1]) >= float(recorded["rank-0"][1]) - 1.0  # rank 1 waited for rank 0's outcome
    assert any("Hub publish failed (outputs complete)" in line for line in rank_lines(out, 1)), out[-3000:]
    assert (tmp_path / "out" / "manifest.json").is_file()  # the output itself is complete, as exit 9 says
