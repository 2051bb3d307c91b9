"""Storage faults: a real S3 server (SeaweedFS) killed in the middle of transfers and started again.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_reliability_storage.py

The server here is this module's own (the session-wide one stays up): it is SIGKILLed (a crash, not a
clean shutdown) and restarted on the same ports and data directory. Transfers must retry with backoff and
complete; an outage longer than the retry budget must fail the job with exit code 5 and a clear message,
never leave a manifest for incomplete outputs, and a plain rerun must then succeed.
The retry budget is shortened where needed with botocore's own AWS_MAX_ATTEMPTS, which the job honours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from entrypoints import storage
from entrypoints.demo.assets import tiny_llama2
from entrypoints.demo.local_s3 import S3Server
from entrypoints.errors import EXIT_OK, EXIT_STORAGE, StorageError
from entrypoints.train import SUMMARY_PREFIX

from ..jobrun import REPO, can_unshare, job_env, with_tmpfs

DOWN_SECONDS = 3.0
BIG_BYTES = 80 * 2**20  # above the 64 MiB multipart threshold, and big enough to log progress


class FlakyS3:
    """A SeaweedFS server that can crash and come back on the same ports with the same data."""

    def __init__(self, data_dir: Path):
        for attempt in range(3):  # a free port can be taken by another process before weed binds it
            try:
                self.server = S3Server(data_dir / f"try{attempt}").start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        self.outages: list[tuple[float, float]] = []  # (killed at, serving again at), time.monotonic()
        self.threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def kill(self) -> float:
        proc = self.server.proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return time.monotonic()

    def start(self) -> float:
        self.server = S3Server(self.server.data_dir, ports=self.server.ports).start()
        return time.monotonic()

    def outage(self, down_seconds: float = DOWN_SECONDS) -> None:
        """Kill now; start again `down_seconds` later, in the background."""
        killed = self.kill()

        def later() -> None:
            time.sleep(down_seconds)
            self.outages.append((killed, self.start()))

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)

    def stop(self) -> None:
        self.join()
        self.server.stop()


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    s3 = FlakyS3(tmp_path / "weed")
    for key, value in s3.server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    storage._client.cache_clear()
    yield s3
    s3.stop()
    storage._client.cache_clear()


class OnLog(logging.Handler):
    """Runs `action` once, the first time a log message contains `text` (here: a transfer's progress line)."""

    def __init__(self, text: str, action):
        super().__init__()
        self.text, self.action, self.fired_at = text, action, None

    def emit(self, record: logging.LogRecord) -> None:
        if self.fired_at is None and self.text in record.getMessage():
            self.fired_at = time.monotonic()
            self.action()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_file(path: Path) -> Path:
    with open(path, "wb") as fh:
        for _ in range(BIG_BYTES // 2**20):
            fh.write(os.urandom(2**20))
    return path


def watch(name: str, text: str, action) -> OnLog:
    handler = OnLog(text, action)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


# The download case in the slow tier (31 s): the upload case runs the same resume-after-crash path by default.
@pytest.mark.parametrize("direction", [pytest.param("download", marks=pytest.mark.slow), "upload"])
def test_transfer_survives_a_crash_mid_transfer(flaky, tmp_path, direction):
    flaky.server.client().create_bucket(Bucket="faults")
    source = big_file(tmp_path / "big.bin")
    uri = "s3://faults/big/big.bin"
    if direction == "download":
        storage.upload_file(source, uri, endpoint_url=flaky.endpoint)
    handler = watch("qlora.storage", f"{direction} big.bin: 10%", flaky.outage)
    try:
        started = time.monotonic()
        if direction == "download":
            target = storage.download_file(uri, tmp_path / "got" / "big.bin", size=BIG_BYTES, endpoint_url=flaky.endpoint)
        else:
            storage.upload_file(source, uri, endpoint_url=flaky.endpoint)
            target = storage.download_file(uri, tmp_path / "got" / "big.bin", size=BIG_BYTES, endpoint_url=flaky.endpoint)
        finished = time.monotonic()
    finally:
        logging.getLogger("qlora.storage").removeHandler(handler)
    flaky.join()
    assert handler.fired_at is not None, "the transfer finished before 10% was reported"
    [(killed, back)] = flaky.outages
    # The server died mid-transfer and the transfer outlived the outage (the server serves again a moment
    # before our readiness probe returns at `back`, so the restart's start is the bound).
    assert started < killed < back and finished > killed + DOWN_SECONDS
    assert sha256(target) == sha256(source)
    assert not list(target.parent.glob("*.partial*"))


def test_outage_longer_than_the_retry_budget_is_a_clear_storage_error(flaky, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage._client.cache_clear()
    flaky.server.client().create_bucket(Bucket="faults")
    flaky.kill()
    source = tmp_path / "small.txt"
    source.write_text("x")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.upload_file(source, "s3://faults/small.txt", endpoint_url=flaky.endpoint)
    assert "cannot reach the S3 endpoint to upload s3://faults/small.txt" in str(err.value)
    assert "QLORA_S3_ENDPOINT_URL" in str(err.value)
    assert time.monotonic() - started < 60  # 4 whole-transfer tries with 2 s, 4 s, 8 s between them
    flaky.start()


def test_upload_to_a_missing_bucket_is_a_storage_error_not_a_crash(flaky, tmp_path):
    """boto3's transfer manager wraps an upload's ClientError in S3UploadFailedError: it must still map."""
    source = tmp_path / "small.txt"
    source.write_text("x")
    with pytest.raises(StorageError) as err:
        storage.upload_file(source, "s3://no-such-bucket-here/k.txt", endpoint_url=flaky.endpoint)
    assert "no-such-bucket-here" in str(err.value)


# ----------------------------------------------------------------------------------------------- the job
class Job:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self.triggers: list[tuple[str, object]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def on(self, text: str, action) -> None:
        self.triggers.append((text, action))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            for trigger in list(self.triggers):
                if trigger[0] in line:
                    self.triggers.remove(trigger)
                    trigger[1]()

    def wait(self, timeout_seconds: float = 400) -> int:
        code = self.proc.wait(timeout=timeout_seconds)
        self.reader.join(timeout=10)
        return code

    def first(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    @property
    def summary(self) -> dict | None:
        for _, line in self.lines:
            if line.startswith(SUMMARY_PREFIX):
                return json.loads(line[len(SUMMARY_PREFIX):])
        return None


@pytest.fixture
def job_setup(flaky, tmp_path, cache_dir):
    model = tiny_llama2(cache_dir)
    flaky.server.client().create_bucket(Bucket="jobs")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code {i}?", "output": f"Code {i} is {i * 7 % 13}."}) + "\n"
                            for i in range(16)))
    storage.upload_tree(model, "s3://jobs/models/tiny", endpoint_url=flaky.endpoint)
    storage.upload_file(data, "s3://jobs/data/train.jsonl", endpoint_url=flaky.endpoint)
    env = job_env(tmp_path, **flaky.server.env(), **{
        "QLORA_MODEL": "s3://jobs/models/tiny", "QLORA_DATA": "s3://jobs/data/train.jsonl",
        "QLORA_OUTPUT": "s3://jobs/out", "QLORA_CHECKPOINT_URI": "s3://jobs/checkpoints/run-1",
        "QLORA_S3_ENDPOINT_URL": flaky.endpoint, "QLORA_MAX_STEPS": "4", "QLORA_SAVE_STEPS": "2",
        "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_EVAL_FRACTION": "0",
        "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_MERGE": "false", "QLORA_REPORT_TO": "none",
        "QLORA_LOGGING_STEPS": "1", "QLORA_LORA_R": "4", "QLORA_LORA_ALPHA": "8",
    })
    return env


def manifest(flaky) -> dict | None:
    text = storage.read_text("s3://jobs/out/manifest.json", endpoint_url=flaky.endpoint)
    return json.loads(text) if text else None


@pytest.mark.slow  # about 60-100 s; the integration tier shows the same retries mid-transfer, in-process, above
def test_job_rides_out_crashes_during_download_checkpoint_upload_and_final_upload(flaky, job_setup):
    job = Job({**job_setup, "QLORA_MERGE": "true"})
    job.on("downloading s3://jobs/data/train.jsonl", flaky.outage)  # the model download comes next
    job.on(" qlora: step 1/4 ", flaky.outage)  # the checkpoint of step 2 is mirrored to S3 during it
    job.on("merging the adapter", flaky.outage)  # each merged shard is uploaded as it is written, then the manifest
    assert job.wait() == EXIT_OK, job.output[-4000:]
    flaky.join()
    assert len(flaky.outages) == 3, flaky.outages
    (k1, up1), (k2, up2), (k3, up3) = flaky.outages
    # Each phase was still waiting on storage when the server came back: its next line comes after the server
    # started again (it serves a moment before our readiness probe returns at up1/up2/up3).
    assert job.first("downloading s3://jobs/data/train.jsonl") < k1 and job.first(" qlora.dataset: data: ") > k1 + DOWN_SECONDS
    assert job.first("checkpoint checkpoint-2 complete") > k2 + DOWN_SECONDS and k2 > job.first(" qlora: step 1/4 ")
    assert job.first("manifest written last") > k3 + DOWN_SECONDS and k3 > job.first("merging the adapter")
    assert k1 < up1 < k2 < up2 < k3 < up3
    got = manifest(flaky)
    assert got and got["complete"] and got["metrics"]["global_step"] == 4
    assert any(f["path"].startswith("merged/") for f in got["files"])
    remote = {o.relative for o in storage.list_objects("s3://jobs/checkpoints/run-1/", endpoint_url=flaky.endpoint)}
    assert {"checkpoint-2/COMPLETE", "checkpoint-4/COMPLETE", "checkpoint-2/adapter_model.safetensors"} <= remote


@pytest.mark.slow  # 48 s; test_outage_longer_than_the_retry_budget_is_a_clear_storage_error covers the error by default
def test_job_fails_cleanly_when_the_outage_outlasts_the_retries_and_a_rerun_succeeds(flaky, job_setup, tmp_path):
    env = {**job_setup, "AWS_MAX_ATTEMPTS": "2"}
    job = Job(env)
    job.on("eval loss after training", flaky.kill)  # down for good, until the job has given up
    code = job.wait()
    assert code == EXIT_STORAGE, job.output[-4000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith("storage error: cannot reach the S3 endpoint to upload s3://jobs/out/"), failure
    assert "QLORA_S3_ENDPOINT_URL" in failure
    assert "Traceback" not in job.output
    assert job.output.rstrip().splitlines()[-1].endswith(failure.strip().splitlines()[0])

    flaky.start()
    assert manifest(flaky) is None  # incomplete outputs never look complete
    again = Job(env)  # no cleanup: the same settings, the same disk
    assert again.wait() == EXIT_OK, again.output[-4000:]
    assert again.summary["resumed_from"] == "checkpoint-4"
    got = manifest(flaky)
    assert got and got["complete"]
    for entry in got["files"]:
        obj = storage.list_objects(f"s3://jobs/out/{entry['path']}", endpoint_url=flaky.endpoint)
        assert [o.size for o in obj] == [entry["bytes"]], entry


# ----------------------------------------------------------------------------------------------- full disks
FULL_DISK_SCRIPT = """
import json, os, sys
from pathlib import Path
from entrypoints import storage
from entrypoints.errors import StorageError

small, endpoint, bucket, big = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
cases = {
    "fetch": lambda: storage.fetch(f"s3://{bucket}/big/", small / "fetched", endpoint_url=endpoint),
    "download": lambda: storage.download_file(f"s3://{bucket}/big/a.bin", small / "one" / "a.bin",
                                              size=big.stat().st_size, endpoint_url=endpoint),
    "copy": lambda: storage.upload_file(big, str(small / "out" / "a.bin")),
}
result = {}
for name, case in cases.items():
    try:
        case()
        result[name] = "no error"
    except StorageError as exc:
        result[name] = str(exc)
result["left"] = sorted(p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file())
print(json.dumps(result))
"""


@pytest.mark.skipif(not can_unshare(), reason="needs `unshare -r -m` (user and mount namespaces) for a real small tmpfs")
def test_a_full_disk_is_a_storage_error_with_the_numbers_and_leaves_no_partial_file(s3_env, tmp_path):
    """A 2 MiB tmpfs and a 3 MiB object: the fetch refuses before downloading; a single download and a local copy
    (the job's local output) fail mid-write with ENOSPC. Each is a StorageError naming the path, the free and the
    needed bytes, never a retry loop, and no `.partial` file stays behind."""
    server, bucket = s3_env
    big = tmp_path / "a.bin"
    big.write_bytes(os.urandom(3 * 2**20))
    storage.upload_file(big, f"s3://{bucket}/big/a.bin", endpoint_url=server.endpoint)
    small = tmp_path / "small"
    small.mkdir()
    started = time.monotonic()
    proc = subprocess.run(with_tmpfs({small: "size=2m"}, 'exec "$0" -c "$1" "$2" "$3" "$4" "$5"') + [
        sys.executable, FULL_DISK_SCRIPT, str(small), server.endpoint, bucket, str(big)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert time.monotonic() - started < 60  # no retrying of a full disk
    size = big.stat().st_size
    assert result["fetch"].startswith(f"not enough disk space to download s3://{bucket}/big/ to {small}/fetched:"
                                      f" {size} bytes to download (1 file(s)), "), result["fetch"]
    assert "bytes free there" in result["fetch"] and "larger disk" in result["fetch"]
    for case, path in (("download", small / "one" / "a.bin"), ("copy", small / "out" / "a.bin")):
        assert result[case].startswith(f"no space left on the device while writing {path}: "), result[case]
        assert f"bytes free there, {size} bytes needed" in result[case], result[case]
    assert [f for f in result["left"] if not f.startswith(".")] == [], result["left"]  # only the fetch index
