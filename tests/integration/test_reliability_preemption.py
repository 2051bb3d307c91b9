"""Preemption and resume: real signals to the real entrypoint, then the final adapter against an uninterrupted run.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_reliability_preemption.py            # integration tier
    PYTHONPATH=$PWD python -m pytest tests/integration/test_reliability_preemption.py -m slow    # random kills, many times

Every run trains the tiny Llama-2-shaped model on CPU with the same seed, LoRA dropout on (so the restored
RNG state matters), gradient accumulation 2 (so a step is several micro-batches) and a shuffled sampler
(so a wrong data position changes the result). A resumed run must end with the same adapter as a run that
was never interrupted, and the steps it logs must continue exactly where the saved checkpoint stopped.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints import storage
from entrypoints.errors import EXIT_OK, EXIT_PREEMPTED
from entrypoints.train import SUMMARY_PREFIX

from ..jobrun import REPO, job_env

MAX_STEPS = 8
STEP_LINE = re.compile(r" qlora: step (\d+)/(\d+) ")
# Float32 LoRA weights on CPU; a resumed run reloads them bit for bit, so only summation order could differ.
ADAPTER_ATOL = 1e-5
# SIGTERM -> exit: the end of the current step + one checkpoint save + shutdown; generous for a busy CI machine.
PREEMPT_EXIT_SECONDS = 60
RECORDS = [{"messages": [{"role": "user", "content": f"What is the code of item {i}?"},
                         {"role": "assistant", "content": f"Item {i} has code {i * 37 % 101}, colour {i % 5}."}]}
           for i in range(40)]


class Job:
    """The training entrypoint as a child process whose log lines are read as they come."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self.steps: list[int] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = STEP_LINE.search(line)
            if m:
                self.steps.append(int(m.group(1)))

    def wait_for_step(self, step: int, timeout_seconds: float = 300) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not self.steps or self.steps[-1] < step:
            assert self.proc.poll() is None, f"job exited before step {step}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} within {timeout_seconds}s"
            time.sleep(0.01)

    def wait(self, timeout_seconds: float = 300) -> int:
        code = self.proc.wait(timeout=timeout_seconds)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def summary(self) -> dict | None:
        for line in self.lines:
            if line.startswith(SUMMARY_PREFIX):
                return json.loads(line[len(SUMMARY_PREFIX):])
        return None


def settings(tmp: Path, model: Path, data: Path, output: str, **extra: str) -> dict[str, str]:
    return job_env(tmp, **{
        "QLORA_MODEL": str(model), "QLORA_DATA": str(data), "QLORA_OUTPUT": output,
        "QLORA_MAX_STEPS": str(MAX_STEPS), "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "2",
        "QLORA_LEARNING_RATE": "1e-3", "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16", "QLORA_LORA_DROPOUT": "0.1",
        "QLORA_EVAL_FRACTION": "0", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_MERGE": "false",
        "QLORA_REPORT_TO": "none", "QLORA_LOGGING_STEPS": "1", "QLORA_SAVE_STEPS": "3", "QLORA_SAVE_TOTAL_LIMIT": "2",
        "QLORA_SEED": "1234", **extra,
    })


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    # The comparison means something only if training moved the weights far more than the tolerance.
    moved = max(want[k].float().abs().max().item() for k in want if "lora_B" in k)
    assert moved > 100 * ADAPTER_ATOL, moved
    assert diff <= ADAPTER_ATOL, f"resumed adapter differs from the uninterrupted one by {diff}"
    return diff


def complete_checkpoints(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if (p / "COMPLETE").is_file())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model, dataset):
    """One uninterrupted run: its adapter and its logged steps are what every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("baseline")
    job = Job(settings(tmp, tiny_model, dataset, str(tmp / "out")))
    assert job.wait() == EXIT_OK, job.output[-4000:]
    assert job.steps == list(range(1, MAX_STEPS + 1)), job.steps
    return adapter(tmp / "out")


def test_sigterm_saves_a_checkpoint_exits_75_and_a_new_pod_resumes_to_the_same_adapter(
        s3_env, tmp_path, tiny_model, dataset, baseline):
    """SIGTERM mid-training, then a restart on an empty disk (a new Kubernetes pod): the checkpoint comes back
    from QLORA_CHECKPOINT_URI and training continues exactly where it stopped."""
    server, bucket = s3_env
    uri = f"s3://{bucket}/checkpoints/job-1"
    env = settings(tmp_path, tiny_model, dataset, str(tmp_path / "out"), **server.env(),
                   QLORA_S3_ENDPOINT_URL=server.endpoint, QLORA_CHECKPOINT_URI=uri)
    ckpt_dir = tmp_path / "opt-ml" / "checkpoints"
    first = Job(env)
    first.wait_for_step(4)  # past the regular checkpoint at step 3, so the preemption save is its own
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    code = first.wait()
    exit_seconds = time.monotonic() - sent
    assert code == EXIT_PREEMPTED, first.output[-4000:]
    assert exit_seconds < PREEMPT_EXIT_SECONDS, exit_seconds
    stopped_at = first.steps[-1]
    assert first.steps == list(range(1, stopped_at + 1))
    # The checkpoint is of the last step the job logged, and it is complete (locally and in S3).
    assert complete_checkpoints(ckpt_dir)[-1] == stopped_at, sorted(p.name for p in ckpt_dir.iterdir())
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith(f"preempted: SIGTERM received: checkpoint saved at step {stopped_at}"), failure
    # The exact command that continues this run (launch/submit.py --resume-from takes the checkpoint prefix).
    assert failure.rstrip().endswith(f"; to resume: python launch/submit.py <the same flags> --resume-from {uri}"), failure
    assert "Traceback" not in first.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    # A newer checkpoint whose upload never finished (no COMPLETE object) must not be restored.
    storage.write_text(f"{uri}/checkpoint-{MAX_STEPS - 1}/adapter_model.safetensors", "partial",
                       endpoint_url=server.endpoint)
    shutil.rmtree(tmp_path / "opt-ml")  # a new pod: nothing local survives

    second = Job(env)
    assert second.wait() == EXIT_OK, second.output[-4000:]
    assert f"restoring checkpoint checkpoint-{stopped_at} from {uri}" in second.output
    assert second.summary["resumed_from"] == f"checkpoint-{stopped_at}" and second.summary["global_step"] == MAX_STEPS
    # Logged steps continue where the first run stopped: none twice, none missing.
    assert first.steps + second.steps == list(range(1, MAX_STEPS + 1)), (first.steps, second.steps)
    diff = assert_same_adapter(adapter(tmp_path / "out"), baseline)
    print(f"SIGTERM at step {stopped_at}: exited 75 after {exit_seconds:.1f}s; adapter max abs diff {diff}")


def kill_mid_save(job: Job, ckpt_dir: Path, after_step: int, timeout_seconds: float = 300) -> int:
    """SIGKILL the job while it writes a checkpoint: stop it (SIGSTOP) the moment a checkpoint directory
    without its COMPLETE marker appears, check that the marker is still missing, then SIGKILL. Returns the
    step of the checkpoint that was being written."""
    seen_complete: set[str] = set()
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        assert job.proc.poll() is None, f"job ended before a save could be caught:\n{job.output[-3000:]}"
        for path in ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else ():
            step = int(path.name.split("-")[1])
            if step <= after_step or path.name in seen_complete or (path / "COMPLETE").exists():
                continue
            job.proc.send_signal(signal.SIGSTOP)
            if (path / "COMPLETE").exists():  # the save finished between the look and the stop: next one
                seen_complete.add(path.name)
                job.proc.send_signal(signal.SIGCONT)
                continue
            job.proc.kill()  # SIGKILL ends a stopped process too
            job.wait()
            return step
        time.sleep(0.002)
    raise AssertionError("no checkpoint save caught in time")


def test_sigkill_during_a_checkpoint_save_is_ignored_on_resume(tmp_path, tiny_model, dataset, baseline):
    env = settings(tmp_path, tiny_model, dataset, str(tmp_path / "out"), QLORA_SAVE_STEPS="1")
    ckpt_dir = tmp_path / "opt-ml" / "checkpoints"
    first = Job(env)
    first.wait_for_step(2)
    caught = kill_mid_save(first, ckpt_dir, after_step=2)
    assert first.proc.returncode == -signal.SIGKILL
    partial = ckpt_dir / f"checkpoint-{caught}"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    previous = complete_checkpoints(ckpt_dir)[-1]
    assert previous == caught - 1

    second = Job(env)
    assert second.wait() == EXIT_OK, second.output[-4000:]
    assert "ignoring incomplete checkpoint" in second.output
    assert second.summary["resumed_from"] == f"checkpoint-{previous}"
    # The step whose checkpoint never completed is trained again (once), from the previous checkpoint.
    assert second.steps == list(range(previous + 1, MAX_STEPS + 1)), second.steps
    assert_same_adapter(adapter(tmp_path / "out"), baseline)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_kills_until_done_match_the_uninterrupted_run(tmp_path, tiny_model, dataset, baseline, seed):
    """Kill the job again and again at random points (SIGTERM at a random step, SIGKILL at a random moment,
    SIGKILL in the middle of a checkpoint save) until a run finishes; the result must not change."""
    rng = random.Random(seed)
    env = settings(tmp_path, tiny_model, dataset, str(tmp_path / "out"), QLORA_SAVE_STEPS="1")
    ckpt_dir = tmp_path / "opt-ml" / "checkpoints"
    history = []
    for _attempt in range(8):
        job = Job(env)
        action = rng.choice(["sigterm", "sigkill-any", "sigkill-save", "none"]) if len(history) < 4 else "none"
        done = max(complete_checkpoints(ckpt_dir), default=0)
        if action != "none" and done < MAX_STEPS - 2:
            if action == "sigterm":
                job.wait_for_step(done + 1)
                job.proc.send_signal(signal.SIGTERM)
                assert job.wait() == EXIT_PREEMPTED, job.output[-3000:]
            elif action == "sigkill-any":
                time.sleep(rng.uniform(2.0, 25.0))
                if job.proc.poll() is None:
                    job.proc.kill()
                job.wait()
            else:
                job.wait_for_step(done + 1)
                kill_mid_save(job, ckpt_dir, after_step=done)
        code = job.wait()
        history.append((action, code, job.steps))
        if code == EXIT_OK:
            break
    else:
        raise AssertionError(f"never finished: {history}")
    print("history:", history)
    assert_same_adapter(adapter(tmp_path / "out"), baseline)


def test_preempted_before_training_exits_75_at_once(tmp_path, tiny_model, dataset):
    """SIGTERM while the job is still loading (no checkpoint yet): exit 75 at once, with the failure file."""
    job = Job(settings(tmp_path, tiny_model, dataset, str(tmp_path / "out"), QLORA_MAX_STEPS="2"))
    deadline = time.monotonic() + 120
    while not any(" qlora: output: " in line for line in job.lines):
        assert time.monotonic() < deadline and job.proc.poll() is None, job.output[-3000:]
        time.sleep(0.01)
    sent = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == EXIT_PREEMPTED, job.output[-3000:]
    assert time.monotonic() - sent < PREEMPT_EXIT_SECONDS
    assert (tmp_path / "opt-ml" / "output" / "failure").read_text().startswith("preempted:")
    assert "Traceback" not in job.output
