"""Never a wrong result with exit 0: the job as users run it, on small and odd data, rerun in place, interrupted.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_never_wrong.py

Each test runs the real training entrypoint as a subprocess on the tiny Llama-2-shaped model (CPU) and checks that
the run either trains what the settings name and publishes it, or ends with the documented exit code and a message
that names the cause and the fix. Each one failed on the code before its fix (the finding is named in its doc).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from entrypoints.errors import EXIT_CONFIG, EXIT_PREEMPTED, EXIT_STORAGE

from ..jobrun import REPO, job_env, run_job

QUICK = {"QLORA_MERGE": "false", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_REPORT_TO": "none"}


def short_records(n: int) -> list[dict]:
    """Short question/answer pairs (~25 tokens each), like the demo's facts."""
    return [{"messages": [{"role": "user", "content": f"What is the code of item {i}?"},
                          {"role": "assistant", "content": f"Item {i} has code {i * 37 % 101}."}]} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def logged_steps(output: str) -> list[tuple[int, int, dict]]:
    steps = []
    for line in output.splitlines():
        if " qlora: step " in line:
            head, _, payload = line.partition(" qlora: step ")[2].partition(" ")
            done, _, total = head.partition("/")
            steps.append((int(done), int(total), json.loads(payload)))
    return steps


def lora_b(adapter_dir: Path) -> list[torch.Tensor]:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return [t for name, t in weights.items() if "lora_B" in name]


def test_defaults_on_a_few_dozen_short_records_train_every_step(tmp_path, tiny_model):
    """Finding 1: with the defaults (1 epoch, max_seq_length 2048, packing) 76 short records made one optimizer step
    at learning rate 0, an all-zero adapter and exit 0. A step is micro_batch_size x accumulation x the mean sample
    (16 samples here), so an epoch is several steps, and none of them runs at learning rate 0."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(80))
    result = run_job(job_env(tmp_path, **QUICK, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                             QLORA_LOGGING_STEPS="1", QLORA_OUTPUT=str(tmp_path / "out")))
    assert result.code == 0, result.output[-3000:]
    steps = logged_steps(result.output)
    assert result.summary["global_step"] >= 4, steps  # ~76 samples / 16 per step
    assert all(info["learning_rate"] > 0 for _, _, info in steps if "learning_rate" in info), steps
    assert any(t.abs().max() > 0 for t in lora_b(tmp_path / "out" / "adapter"))
    assert "packed rows of" in result.output  # the plan says why a row is shorter than max_seq_length


def test_a_rerun_over_the_finished_checkpoint_redoes_nothing(tmp_path, tiny_model):
    """Finding 5: a rerun over a finished checkpoint trained one step past the end ("step 18/17") and published
    that adapter; each further rerun added a step. The rerun after a stop during eval, merge or upload must publish
    the finished adapter as it is."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(40))
    common = {**QUICK, "QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(data), "QLORA_MAX_SEQ_LENGTH": "64",
              "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "3", "QLORA_MICRO_BATCH_TOKENS": "64",
              "QLORA_NUM_EPOCHS": "1.5", "QLORA_EVAL_FRACTION": "0"}
    first = run_job(job_env(tmp_path, **common, QLORA_OUTPUT=str(tmp_path / "o1")))
    assert first.code == 0, first.output[-3000:]
    total = first.summary["global_step"]
    for name in ("o2", "o3"):
        again = run_job(job_env(tmp_path, **common, QLORA_OUTPUT=str(tmp_path / name)))
        assert again.code == 0, again.output[-3000:]
        assert again.summary["global_step"] == total and again.summary["steps_this_run"] == 0
        assert again.summary["train_loss"] is None and "n/a (resumed at the final step)" in again.output
        assert not logged_steps(again.output)
        for a, b in zip(lora_b(tmp_path / "o1" / "adapter"), lora_b(tmp_path / name / "adapter"), strict=True):
            assert torch.equal(a, b)


def test_changed_data_under_the_same_name_is_never_resumed(tmp_path, tiny_model):
    """Finding 4: the checkpoint guard compared the data URI, not its content: data changed in place resumed the
    old run (or trained 0 steps at the final step) and published the old adapter with the new data's fingerprint."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(40))
    common = {**QUICK, "QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(data), "QLORA_MAX_STEPS": "2",
              "QLORA_EVAL_FRACTION": "0", "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1"}
    first = run_job(job_env(tmp_path, **common, QLORA_OUTPUT=str(tmp_path / "o1")))
    assert first.code == 0, first.output[-3000:]
    records = short_records(40)
    records[3]["messages"][1]["content"] = "Item 3 has another code."
    write_jsonl(data, records)  # same path, same record count, other content
    second = run_job(job_env(tmp_path, **common, QLORA_OUTPUT=str(tmp_path / "o2")))
    assert second.code == EXIT_CONFIG, second.output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert "data_sha256" in failure and "QLORA_RESUME=false" in failure
    assert not (tmp_path / "o2" / "manifest.json").exists()
    fresh = run_job(job_env(tmp_path, **common, QLORA_RESUME="false", QLORA_OUTPUT=str(tmp_path / "o3")))
    assert fresh.code == 0, fresh.output[-3000:]
    assert fresh.summary["resumed_from"] is None and [s for s, _, _ in logged_steps(fresh.output)][0] == 1
    manifest = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert manifest["data"]["fingerprint_sha256"] != json.loads((tmp_path / "o1" / "manifest.json").read_text()
                                                                )["data"]["fingerprint_sha256"]


def test_a_shorter_run_than_its_checkpoint_is_refused(tmp_path, tiny_model):
    """Finding 4: a lower max_steps on resume was ignored silently and the longer run's adapter published."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(40))
    common = {**QUICK, "QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(data), "QLORA_EVAL_FRACTION": "0",
              "QLORA_SAVE_STEPS": "2", "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1"}
    assert run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="4", QLORA_OUTPUT=str(tmp_path / "o1"))).code == 0
    shorter = run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="3", QLORA_OUTPUT=str(tmp_path / "o2")))
    assert shorter.code == EXIT_CONFIG, shorter.output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert "checkpoint-4 is at step 4, past this run's last step 3" in failure


def test_sigterm_during_multi_process_tokenization_exits_75_in_seconds(tmp_path, tiny_model):
    """Finding 10: above 20,000 records the data is tokenized by worker processes, which inherited the job's signal
    handler: a SIGTERM there hung the job (the pool's shutdown waited on a lock a worker held)."""
    records = [{"messages": [{"role": "user", "content": f"Question {i}? " * 30},
                             {"role": "assistant", "content": f"Answer {i}. " * 30}]} for i in range(24_000)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    env = job_env(tmp_path, **QUICK, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                  QLORA_OUTPUT=str(tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = psutil.Process(proc.pid)
    deadline = time.monotonic() + 240
    while len(job.children()) < 2:  # the tokenizing worker processes (the reader thread is not started yet)
        assert proc.poll() is None and time.monotonic() < deadline, "no worker processes appeared"
        time.sleep(0.1)
    time.sleep(1.0)  # into the pool's work
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not exit within 60 s of SIGTERM")
    assert proc.returncode == EXIT_PREEMPTED, rest[-3000:]
    assert time.monotonic() - sent < 30
    assert (tmp_path / "opt-ml" / "output" / "failure").read_text().startswith("preempted: SIGTERM received")


def test_a_second_job_on_the_same_directories_is_refused(tmp_path, tiny_model):
    """Two runs at once: a second job started on a base directory in use would overwrite the first one's
    downloads, data caches and checkpoints."""
    import fcntl

    data = write_jsonl(tmp_path / "train.jsonl", short_records(8))
    work = tmp_path / "opt-ml" / "work"
    work.mkdir(parents=True)
    with open(work / ".qlora-job.lock", "a+") as held:  # another job's lock (another open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on another-host since 2026-11-30T00:00:00Z\n")
        held.flush()
        result = run_job(job_env(tmp_path, **QUICK, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data),
                                 QLORA_OUTPUT=str(tmp_path / "out")), timeout=120)
    assert result.code == EXIT_CONFIG, result.output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert "in use by another job (pid 4242 on another-host" in failure and "QLORA_BASE_DIR" in failure


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare (a user+mount namespace) to mount a small tmpfs")
def test_a_full_checkpoint_disk_is_a_storage_error_naming_the_directory(tmp_path, tiny_model):
    """Finding 12: a full disk ended as exit 1 with a library's traceback. A 1 MiB tmpfs as the checkpoint
    directory (a real full disk, in a user+mount namespace): the first checkpoint does not fit."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(20))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = job_env(tmp_path, **QUICK, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data), QLORA_MAX_STEPS="2",
                  QLORA_SAVE_STEPS="1", QLORA_CHECKPOINT_DIR=str(ckpt), QLORA_OUTPUT=str(tmp_path / "out"))
    script = f"mount -t tmpfs -o size=1m tmpfs {ckpt} && exec {sys.executable} -m entrypoints.train"
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_STORAGE, output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith("storage error: the disk is full while saving a checkpoint in " + str(ckpt))
    assert "bytes free" in failure and "Traceback" not in output


def test_sigterm_during_the_merge_then_a_rerun_publishes_the_trained_adapter_without_training(tmp_path, tiny_model):
    """A signal at any moment: preempted while merging (after training, before the manifest), the job exits 75 and
    publishes nothing; the rerun takes the finished checkpoint as it is (no step trained again) and publishes it."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(24))
    env = job_env(tmp_path, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data), QLORA_MAX_STEPS="3",
                  QLORA_NUM_SAMPLE_GENERATIONS="0", QLORA_REPORT_TO="none", QLORA_OUTPUT=str(tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "merging the adapter" in line:
            proc.send_signal(signal.SIGSTOP)  # hold it inside the merge: the signal lands there, not after it
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, ("".join(lines) + rest)[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()
    again = run_job(env)
    assert again.code == 0, again.output[-3000:]
    assert again.summary["steps_this_run"] == 0 and again.summary["global_step"] == 3 and not logged_steps(again.output)
    trained = load_file(str(tmp_path / "opt-ml" / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    published = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert trained.keys() == published.keys() and all(torch.equal(trained[k], published[k]) for k in trained)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]} | {"manifest.json"}
    on_disk = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
               if p.is_file() and not p.name.startswith(".")}
    assert on_disk == listed and any(p.startswith("merged/") for p in listed)


def test_a_checkpoint_of_a_longer_schedule_is_not_taken_for_a_finished_shorter_run(tmp_path, tiny_model):
    """Preempted at step 3 of 6, then rerun with max_steps=3: the checkpoint's step equals the new end, but its
    learning rates were those of a 6-step schedule; it was published as a finished 3-step run with exit 0."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(40))
    common = {**QUICK, "QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(data), "QLORA_EVAL_FRACTION": "0",
              "QLORA_SAVE_STEPS": "3", "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1"}
    assert run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="6", QLORA_OUTPUT=str(tmp_path / "o1"))).code == 0
    shutil.rmtree(tmp_path / "opt-ml" / "checkpoints" / "checkpoint-6")  # as if preempted after step 3's save
    shorter = run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="3", QLORA_OUTPUT=str(tmp_path / "o2")))
    assert shorter.code == EXIT_CONFIG, shorter.output[-3000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert "checkpoint-3 is step 3 of a run planned for 6 steps, and this run plans 3" in failure
    assert not (tmp_path / "o2" / "manifest.json").exists()


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare (a user+mount namespace) to mount a small tmpfs")
def test_a_merge_that_cannot_fit_the_disk_fails_before_training_with_the_numbers(tmp_path, tiny_model):
    """The merged model (about the size of the base's weights, ~17 MB here) cannot fit an 8 MiB work volume: the
    job says so before training, instead of after it."""
    data = write_jsonl(tmp_path / "train.jsonl", short_records(20))
    base = tmp_path / "small"
    base.mkdir()
    env = job_env(tmp_path, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data), QLORA_MAX_STEPS="2",
                  QLORA_NUM_SAMPLE_GENERATIONS="0", QLORA_REPORT_TO="none", QLORA_BASE_DIR=str(base),
                  QLORA_OUTPUT=str(tmp_path / "out"))
    script = f"mount -t tmpfs -o size=8m tmpfs {base} && exec {sys.executable} -m entrypoints.train"
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_STORAGE, output[-3000:]
    assert "not enough disk space for the merged model" in output and "QLORA_MERGE=false" in output
    assert " qlora: step " not in output and "disk: work" in output
