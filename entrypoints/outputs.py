"""Outputs: where they go, who may write them, the model card, the manifest, and publishing it last.

A reader who finds `<output>/manifest.json` knows every file it lists is complete: files are uploaded
first (each atomically), the manifest last. Overwriting deletes the old manifest before anything else.

One run at a time per output: before any download or GPU work, the run claims its output with a conditional
create (`<output>/.qlora-claim.json`, or `<output>/runs/<run id>/.qlora-claim.json` in `version` mode, where
every run gets its own id). That write is also the probe that the output is writable. A claim lives while its
run refreshes it (a heartbeat thread); one without heartbeat for its lease is abandoned and may be taken over.
The claim is removed when the run ends, however it ends. After the manifest, the job's own files that it does
not list (an old `merged/`, say) are deleted, and `latest.json` moves only forward, to a newer run.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import os
import platform
import queue
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from entrypoints import storage
from entrypoints.config import JobConfig
from entrypoints.errors import OutputExistsError, StorageError

log = logging.getLogger("qlora.outputs")

MANIFEST = "manifest.json"
LATEST = "latest.json"
CLAIM = ".qlora-claim.json"
MANIFEST_FORMAT = "qlora-job/manifest/v1"
CLAIM_FORMAT = "qlora-job/claim/v1"
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "wandb", "qlora-job")
# A claim is refreshed every HEARTBEAT_SECONDS; one not refreshed for LEASE_SECONDS belongs to a run that is gone
# (killed, its machine lost) and is taken over. The lease covers several missed heartbeats (an S3 outage the
# transfers ride out lasts about two minutes) and clock differences between machines.
HEARTBEAT_SECONDS = 60.0
LEASE_SECONDS = 600.0
# What the job writes at an output, below which its own files live: only these are ever deleted there.
JOB_DIRS = ("adapter/", "merged/", "evaluation/")
JOB_FILES = ("README.md", MANIFEST, CLAIM)
# The longest relative names the job writes (checked against the file system's and S3's limits up front).
DEEPEST_FILES = ("merged/model-00001-of-00009.safetensors", "merged/model.safetensors.index.json")
S3_KEY_LIMIT_BYTES = 1024
RUN_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class OutputTarget:
    uri: str  # where this run's files go
    base_uri: str  # the configured output (differs from uri in `version` mode)
    versioned: bool
    replaces_existing: bool
    run_id: str = ""  # `<UTC stamp>-<random>`: the runs/ prefix in `version` mode, the claim's owner in every mode
    started_at: float = 0.0  # when the run claimed its output (Unix time): orders runs for latest.json


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def check_path_limits(uri: str) -> None:
    """Fail in seconds, not after training, when the deepest file the job writes below `uri` cannot exist there."""
    if storage.is_s3(uri):
        _, key = storage.split_s3(uri)
        for rel in DEEPEST_FILES:
            full = f"{key.rstrip('/')}/{rel}".lstrip("/")
            if len(full.encode()) > S3_KEY_LIMIT_BYTES:
                raise StorageError(f"the output {uri} is too long: the job writes keys like {rel} below it, and"
                                   f" {len(full.encode())} bytes is over S3's {S3_KEY_LIMIT_BYTES}-byte key limit."
                                   " Choose a shorter QLORA_OUTPUT")
        return
    root = Path(uri).absolute()
    existing = next(p for p in (root, *root.parents) if _is_dir(p))
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    for rel in DEEPEST_FILES:
        deepest = root / (rel + ".partial")  # written through a temporary name
        long_names = [part for part in deepest.parts if len(os.fsencode(part)) > name_max]
        if long_names:
            raise StorageError(f"the output {uri} cannot be written: the name {long_names[0][:60]!r}... is"
                               f" {len(os.fsencode(long_names[0]))} bytes, over the file system's {name_max}-byte"
                               " limit for one name. Choose a shorter QLORA_OUTPUT")
        if len(os.fsencode(str(deepest))) >= path_max:
            raise StorageError(f"the output {uri} is too long: the job writes {rel} below it, and"
                               f" {len(os.fsencode(str(deepest)))} bytes is over the {path_max}-byte path limit."
                               " Choose a shorter QLORA_OUTPUT")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to even look up
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


class OutputClaim:
    """This run's exclusive right to write its output, from before any download until the run ends.

    `acquire()` (world rank 0 only) decides where the run writes and claims it; `release()` (in a `finally`) gives
    the claim up and is a no-op for a claim never acquired. `check()` raises OutputExistsError when another run has
    taken the claim over since (this run then must not publish).

    `record`: a file in the job's own work directory where the claim is noted until it is released. A claim that an
    earlier run in the same work directory could not release (storage was down when it ended) is then known to be
    this job's own and is taken over at once, instead of after the lease: a plain rerun succeeds. (One job per work
    directory at a time: two would overwrite each other's downloads and checkpoints anyway.)
    `owner`: the identity of the job across machines (a retried Kubernetes pod or a restarted SageMaker job gets a
    fresh disk but keeps it): a claim left by an earlier attempt of the same job (killed without running its
    `finally`: an OOM kill, a lost node) is taken over at once too.
    """

    def __init__(self, base_uri: str, mode: str, endpoint_url: str = "", *, record: Path | None = None, owner: str = "",
                 heartbeat_seconds: float = HEARTBEAT_SECONDS, lease_seconds: float = LEASE_SECONDS):
        self.base_uri, self.mode, self.endpoint, self.record = base_uri, mode, endpoint_url, record
        self.owner = owner
        self.heartbeat_seconds, self.lease_seconds = heartbeat_seconds, lease_seconds
        self.target: OutputTarget | None = None
        self.claim_uri = ""
        self.etag = ""
        self.lost = ""  # why the claim is no longer this run's, once it is not
        self._written = ""  # the claim's text as this run last wrote it
        self._lock = threading.Lock()  # the heartbeat, check() and release() take turns with the claim's ETag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------- acquire
    def acquire(self, now: float | None = None) -> OutputTarget:
        started = time.time() if now is None else now
        base, versioned = self.base_uri, self.mode == "version"
        run_id = self._new_run_id(started)
        check_path_limits(storage.join(base, "runs", run_id) if versioned else base)
        storage.check_bucket(base, endpoint_url=self.endpoint)
        if versioned:
            for _ in range(5):  # another run with the same id in the same second: vanishingly rare, try another
                uri = storage.join(base, "runs", run_id)
                self.claim_uri = storage.join(uri, CLAIM)
                if self._create(self._body(run_id, uri, started, started)):
                    break
                run_id = self._new_run_id(started)
            else:
                raise OutputExistsError(f"could not claim a new run prefix below {base}/runs/: every id tried was taken")
            self.target = OutputTarget(uri, base, True, False, run_id, started)
            log.info("claimed %s for run %s (QLORA_OUTPUT_EXISTS=version)", uri, run_id)
            return self.target
        self.claim_uri = storage.join(base, CLAIM)
        self._claim(self._body(run_id, base, started, started))
        try:
            existing = storage.read_text(storage.join(base, MANIFEST), endpoint_url=self.endpoint)
            if existing is not None and self.mode == "error":
                raise OutputExistsError(f"{base} already holds a complete result ({MANIFEST} exists). Choose another"
                                        " QLORA_OUTPUT, or set QLORA_OUTPUT_EXISTS=overwrite to replace it or"
                                        " QLORA_OUTPUT_EXISTS=version to write runs/<timestamp>-<id>/ below it")
        except BaseException:
            self.release()
            raise
        self.target = OutputTarget(base, base, False, existing is not None, run_id, started)
        self._thread = threading.Thread(target=self._beat, name="output-claim-heartbeat", daemon=True)
        self._thread.start()
        return self.target

    @staticmethod
    def _new_run_id(started: float) -> str:
        return f"{time.strftime(RUN_STAMP, time.gmtime(started))}-{secrets.token_hex(3)}"

    def _body(self, run_id: str, uri: str, started: float, heartbeat: float) -> str:
        return json.dumps({
            "format": CLAIM_FORMAT, "run_id": run_id, "output": uri, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": _iso(started), "started_unix": started, "heartbeat_at": _iso(heartbeat),
            "heartbeat_unix": heartbeat, "lease_seconds": self.lease_seconds, "owner": self.owner,
        }, indent=1)

    def _create(self, body: str) -> bool:
        try:
            self.etag = storage.put_if(self.claim_uri, body, etag=None, endpoint_url=self.endpoint)
        except storage.Conflict:
            return False
        except StorageError as exc:
            raise StorageError(f"cannot claim the output {self.base_uri} (the job makes sure it can write there"
                               f" before any download or training): {exc}") from None
        self._written = body
        return True

    def _claim(self, body: str) -> None:
        """Create the claim, refuse a live one of another run, take over an abandoned one."""
        for _ in range(10):
            if self._create(body):
                log.info("claimed %s for run %s (%s)", self.base_uri, _parse_claim(body)["run_id"], self.claim_uri)
                self._note(body)
                return
            current = storage.read_versioned(self.claim_uri, endpoint_url=self.endpoint)
            if current is None:
                continue  # released in between: try again
            holder = _parse_claim(current.text)
            age = time.time() - holder.get("heartbeat_unix", 0.0)
            lease = holder.get("lease_seconds", LEASE_SECONDS)
            own = (holder.get("run_id") == self._noted_run() != ""
                   or (self.owner != "" and holder.get("owner") == self.owner))
            if age <= lease and not own:
                expires = _iso(holder.get("heartbeat_unix", 0.0) + lease)
                raise OutputExistsError(
                    f"{self.base_uri} is being written by another run: {_describe(holder)}, last heartbeat"
                    f" {max(age, 0):.0f} s ago. Two runs on one output would mix their files. Wait for that run to"
                    f" end (it then removes its claim {self.claim_uri}; a claim without heartbeat for {lease:.0f} s"
                    f" is abandoned and taken over, this one from {expires} on), or write elsewhere: another"
                    " QLORA_OUTPUT, or QLORA_OUTPUT_EXISTS=version, which gives every run its own runs/<id>/ prefix")
            try:
                self.etag = storage.put_if(self.claim_uri, body, etag=current.etag, endpoint_url=self.endpoint)
            except storage.Conflict:
                continue  # another run took it over first, or its owner came back: look again
            self._written = body
            self._note(body)
            if own:
                log.warning("took over the claim on %s of %s, an earlier attempt of this job that could not release it",
                            self.base_uri, _describe(holder))
            else:
                log.warning("took over the claim on %s of %s: no heartbeat for %.0f s (lease %.0f s), so that run is"
                            " gone", self.base_uri, _describe(holder), age, lease)
            return
        raise OutputExistsError(f"could not claim {self.base_uri}: its claim {self.claim_uri} kept changing while this"
                                " run tried to take it. Another run is starting there: wait for it, or write elsewhere")

    def _noted_run(self) -> str:
        try:
            noted = json.loads(self.record.read_text()) if self.record else {}
        except (OSError, ValueError):
            return ""
        return str(noted.get("run_id", "")) if noted.get("claim") == self.claim_uri else ""

    def _note(self, body: str) -> None:
        if self.record is None:
            return
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({"claim": self.claim_uri, "run_id": _parse_claim(body)["run_id"]}))
        except OSError as exc:  # only a shortcut for reruns: the claim itself is what counts
            log.warning("could not note the claim in %s: %s", self.record, exc)

    def _forget(self) -> None:
        if self._noted_run():  # the note of this claim (not one another output's run left)
            try:
                self.record.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", self.record, exc)

    # -------------------------------------------------------------------------------------- while running
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._lock:
                if self._stop.is_set() or self.lost:
                    return
                holder = _parse_claim(self._written)
                now = time.time()
                body = self._body(holder["run_id"], holder["output"], holder["started_unix"], now)
                try:
                    self.etag = storage.put_if(self.claim_uri, body, etag=self.etag, endpoint_url=self.endpoint,
                                               attempts=3)
                    self._written = body
                except storage.Conflict:
                    self._mark_lost()
                    return
                except StorageError as exc:  # the next beat tries again; the lease covers several missed ones
                    log.warning("could not refresh the claim %s (%s); trying again in %.0f s", self.claim_uri, exc,
                                self.heartbeat_seconds)

    def _mark_lost(self) -> None:
        try:
            current = storage.read_versioned(self.claim_uri, endpoint_url=self.endpoint)
            other = _describe(_parse_claim(current.text)) if current else "nobody (the claim was deleted)"
        except StorageError as exc:
            other = f"another run (the claim could not be read back: {exc})"
        self.lost = (f"this run's claim on {self.base_uri} now belongs to {other}: this run went without a heartbeat"
                     f" for longer than its lease ({self.lease_seconds:.0f} s; the process was stopped, or storage was"
                     " unreachable), so another run took the output over. This run's result is not published, to"
                     " leave that run's result intact; rerun if you still need this one")
        log.error("%s", self.lost)

    def check(self) -> None:
        """Raise OutputExistsError unless the claim is still this run's (read back from storage, now)."""
        if self.target is None:
            return
        with self._lock:
            if not self.lost:
                current = storage.read_versioned(self.claim_uri, endpoint_url=self.endpoint)
                if current is None or current.etag != self.etag:
                    self._mark_lost()
        if self.lost:
            raise OutputExistsError(self.lost)

    # -------------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Give the claim up. Never raises: it runs in a `finally`, after success, failure or preemption alike."""
        if not self.etag:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_seconds + 300)
        with self._lock:
            etag, self.etag = self.etag, ""
            if self.lost:
                self._forget()
                return
            try:
                if self.mode == "version":  # this run's own prefix: nobody else writes there
                    storage.delete(self.claim_uri, endpoint_url=self.endpoint)
                else:
                    storage.delete_if(self.claim_uri, etag, endpoint_url=self.endpoint)
                log.info("released the claim %s", self.claim_uri)
            except storage.Conflict:
                log.warning("the claim %s belongs to another run now: left to it", self.claim_uri)
            except Exception as exc:  # noqa: BLE001 - must not hide how the run ended
                log.warning("could not remove the claim %s (%s): a rerun in this work directory takes it over; any"
                            " other run only %.0f s after its last heartbeat", self.claim_uri, exc, self.lease_seconds)
                return
            self._forget()


def _parse_claim(text: str) -> dict[str, Any]:
    """A claim's fields; an unreadable claim (not written by this job) counts as abandoned long ago."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != CLAIM_FORMAT:
        return {"run_id": "?", "host": "?", "pid": "?", "started_at": "?", "heartbeat_unix": 0.0}
    return data


def _describe(holder: dict[str, Any]) -> str:
    return (f"run {holder.get('run_id', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}),"
            f" started {holder.get('started_at', '?')}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_model_card(stage: Path, cfg: JobConfig, metrics: dict[str, Any], samples: list[dict[str, Any]],
                     has_merged: bool, adapter: dict[str, Any] | None = None, seq2seq: bool = False,
                     suites: list[dict[str, Any]] | None = None, promotion: dict[str, Any] | None = None,
                     base_stored: str | None = None) -> Path:
    """README.md of the output. `adapter`: what save_adapter reports (dtype, parameters, bytes, compute_dtype), stated
    in the card. `seq2seq`: an encoder-decoder model, whose prompts are plain text (the format is written down, since
    no chat template saved with the tokenizer carries it). `suites`, `promotion`: the eval suites' scores and the
    promotion decision. `base_stored`: the form of a pre-quantized base (e.g. `bitsandbytes nf4, double quantization
    on`), whose 4-bit weights the adapter was trained on and the merged model holds dequantized."""
    name = cfg.base_model_name
    auto_class = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    lines = [
        "---",
        f"base_model: {name}",
        "library_name: peft",
        f"tags: [qlora, lora, {'seq2seq' if seq2seq else 'sft, trl'}]",
        "---",
        f"# {cfg.run_name or 'QLoRA fine-tune'}",
        "",
        f"A LoRA adapter (r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets `{cfg.lora_target_modules}`) trained with"
        f" QLoRA ({cfg.quantization}, double quantization {'on' if cfg.double_quant else 'off'}) on top of `{name}`"
        + (f", a pre-quantized checkpoint ({base_stored}) whose 4-bit weights were trained on as stored." if base_stored
           else "."),
        "",
        "## Files",
        "- `adapter/`: the PEFT adapter and tokenizer (`PeftModel.from_pretrained(base, 'adapter')`).",
    ]
    if adapter:
        lines.append(f"  Its weights are {adapter['dtype']}: {adapter['parameters']:,} parameters, {adapter['bytes']:,}"
                     " bytes. LoRA weights are trained in float32 (the master weights; the 4-bit base computes in"
                     f" {adapter['compute_dtype']}) and saved as trained.")
    if has_merged:
        into = (f"the dequantized 4-bit weights of `{name}` (16-bit)" if base_stored else "the 16-bit base")
        lines.append(f"- `merged/`: the adapter merged into {into}, loadable with"
                     f" `{auto_class}.from_pretrained('merged')` alone.")
    lines.append("- `manifest.json`: every file with size and sha256, the settings, metrics and versions.")
    if seq2seq:
        lines += ["", "## Prompt format",
                  "Trained on (input, target) pairs: the target is a conversation's last answer, the input the turns"
                  " before it, one `role: text` line each (`system: ...`, `user: ...`, `assistant: ...`, joined by"
                  " newlines); a single user turn is its text alone. Give the model its input the same way."]
    lines += ["", "## Metrics", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if suites:
        lines += ["", "## Evaluation suites", "Answered by the base model (before) and by this adapter (after); the"
                  " answers are in `evaluation/<suite>.jsonl`.", "",
                  "| suite | items | metric | before | after |", "| --- | --- | --- | --- | --- |"]
        for suite in suites:
            for metric in ("score", "exact_match", "contains", "token_f1", "rouge_l"):
                lines.append(f"| {suite['name']} | {suite['count']} | {metric} | {suite['before'][metric]:.4f} |"
                             f" {suite['after'][metric]:.4f} |")
    if promotion:
        lines += ["", "## Promotion", f"{'Promoted' if promotion['promoted'] else 'Not promoted'} to `latest.json`"
                  f" ({promotion['policy']}, on {promotion['metric']}): {promotion['reason']}."]
    if samples:
        lines += ["", "## Held-out samples", "| prompt | reference | before | after |", "| --- | --- | --- | --- |"]
        for s in samples:
            cells = [str(s.get(k, "")).replace("|", "/").replace("\n", " ")[:200] for k in ("prompt", "reference", "before", "after")]
            lines.append("| " + " | ".join(cells) + " |")
    path = stage / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_manifest(stage: Path, cfg: JobConfig, extra: dict[str, Any]) -> dict[str, Any]:
    files = []
    for path in storage.iter_tree(stage):
        rel = path.relative_to(stage).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return {
        "format": MANIFEST_FORMAT,
        "complete": True,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "config": cfg.to_public_dict(),
        "versions": package_versions(),
        **extra,
    }


class Publisher:
    """Uploads finished files in a background thread while the job keeps working (e.g. merging the next shard).

    With a claim, nothing more is uploaded once the claim is lost, and the manifest is written only while the
    claim is still this run's. `finish()` publishes the manifest last; `close()` only waits for the uploads (the
    merge CLI's output has no manifest: its index is the last file submitted).

    `delete_uploaded`: delete each local file once it is uploaded, so local disk holds only what is still queued
    (a shard or two of a merge). A failed upload is then raised by the next `submit()`, instead of by `close()` or
    `finish()` only: the files submitted after it would never be uploaded nor deleted.
    """

    def __init__(self, stage: Path, target: OutputTarget, endpoint_url: str, claim: OutputClaim | None = None, *,
                 delete_uploaded: bool = False):
        self.stage, self.target, self.endpoint, self.claim = stage, target, endpoint_url, claim
        self.delete_uploaded = delete_uploaded
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.errors: list[BaseException] = []
        self.submitted: set[str] = set()
        self.uploaded: list[str] = []  # relative paths, in the order their uploads completed
        if target.replaces_existing:
            # The old result stops being "complete" before any of its files is replaced.
            storage.delete(storage.join(target.uri, MANIFEST), endpoint_url=endpoint_url)
            log.info("replacing the existing output at %s (QLORA_OUTPUT_EXISTS=overwrite)", target.uri)
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            path = self.queue.get()
            if path is None:
                return
            if self.errors:
                continue
            if self.claim is not None and self.claim.lost:
                self.errors.append(OutputExistsError(self.claim.lost))
                continue
            rel = path.relative_to(self.stage).as_posix()
            try:
                storage.upload_file(path, storage.join(self.target.uri, rel), endpoint_url=self.endpoint)
                self.uploaded.append(rel)
                if self.delete_uploaded:
                    path.unlink()
            except BaseException as exc:  # noqa: BLE001 - re-raised in submit(), close() or finish()
                self.errors.append(exc)

    def submit(self, path: Path) -> None:
        if self.delete_uploaded and self.errors:
            raise self.errors[0]
        self.submitted.add(path.relative_to(self.stage).as_posix())
        self.queue.put(path)

    def close(self) -> None:
        """Wait for every upload submitted so far; raise the first that failed."""
        self.queue.put(None)
        self.thread.join()
        if self.errors:
            raise self.errors[0]

    def finish(self, manifest: dict[str, Any], promote: bool = True) -> str:
        """Upload what is left, wait, then write the manifest (and, in version mode when `promote`, the `latest`
        pointer)."""
        for path in storage.iter_tree(self.stage):
            rel = path.relative_to(self.stage).as_posix()
            if rel != MANIFEST and rel not in self.submitted:
                self.submit(path)
        self.close()
        manifest = {**manifest, "run": {"id": self.target.run_id, "started_at": _iso(self.target.started_at),
                                        "started_unix": self.target.started_at}}
        text = json.dumps(manifest, indent=2, sort_keys=False)
        (self.stage / MANIFEST).write_text(text, encoding="utf-8")
        manifest_uri = storage.join(self.target.uri, MANIFEST)
        if self.claim is not None:
            self.claim.check()
        try:
            # The old manifest (overwrite) was deleted before the first upload: one found now was written by another
            # run, whose complete result this run must not replace.
            storage.put_if(manifest_uri, text, etag=None, endpoint_url=self.endpoint)
        except storage.Conflict:
            raise OutputExistsError(f"another run published a result at {self.target.uri} while this run was"
                                    f" writing there ({MANIFEST} appeared): this run's result is not published, to"
                                    " keep that one intact. Rerun if you still need this one") from None
        log.info("published %d file(s) to %s; manifest written last", len(manifest["files"]), self.target.uri)
        remove_unlisted(self.target.uri, {f["path"] for f in manifest["files"]}, self.endpoint)
        if self.target.versioned and promote:
            advance_latest(self.target, manifest_uri, manifest["created_at"], self.endpoint)
        return manifest_uri


def _kind(rel: str) -> str:
    """`job`: a file the job writes at an output (or a leftover temporary of one); `kept`: the manifest, claims,
    the version series and the lock, which other code manages; `foreign`: anything else."""
    if (rel in (MANIFEST, CLAIM, LATEST, storage.LOCK_NAME) or rel.startswith(("runs/", CLAIM + ".", LATEST + "."))):
        return "kept"
    if rel.startswith(JOB_DIRS) or rel in ("README.md", "README.md.partial", MANIFEST + ".partial"):
        return "job"
    return "foreign"


def remove_unlisted(uri: str, listed: set[str], endpoint_url: str) -> None:
    """After the manifest: delete the job's own files at `uri` that it does not list (an old result's `merged/`, say)
    and warn about foreign ones. Nothing outside the job's namespace is ever deleted: the output may be a shared
    prefix, and `runs/` and `latest.json` of a version series stay."""
    objects = storage.list_objects(uri.rstrip("/") + "/" if storage.is_s3(uri) else uri, endpoint_url=endpoint_url)
    stale = [o for o in objects if o.relative not in listed and _kind(o.relative) == "job"]
    foreign = [o.relative for o in objects if o.relative not in listed and _kind(o.relative) == "foreign"]
    for obj in stale:
        storage.delete(obj.uri, endpoint_url=endpoint_url)
    if not storage.is_s3(uri):
        for folder in JOB_DIRS:  # directories the deletions emptied
            root = Path(uri, folder)
            if root.is_dir():
                for path in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
                    if not any(path.iterdir()):
                        path.rmdir()
    if stale:
        log.info("removed %d file(s) of an earlier result that this manifest does not list: %s", len(stale),
                 _names([o.relative for o in stale]))
    if foreign:
        log.warning("%s holds %d file(s) this job did not write, left as they are: %s. The output's %s lists the"
                    " files of the result", uri, len(foreign), _names(foreign), MANIFEST)


def _names(items: list[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _run_order(pointer: dict[str, Any]) -> tuple[float, str]:
    """How latest.json pointers compare: by the time their run started, then by run id."""
    run_id = str(pointer.get("run_id") or PurePosixPath(str(pointer.get("run", ""))).name)
    started = pointer.get("started_unix")
    if not isinstance(started, (int, float)):
        try:  # a pointer written before runs carried their start time: runs/<stamp>/
            started = float(calendar.timegm(time.strptime(run_id[:16], RUN_STAMP)))
        except ValueError:
            started = 0.0
    return float(started), run_id


def advance_latest(target: OutputTarget, manifest_uri: str, created_at: str, endpoint_url: str,
                   attempts: int = 20) -> None:
    """Point `<base>/latest.json` at this run, unless it already names a newer one: it only moves forward.

    Read with its ETag, compare, replace only if unchanged (S3 If-Match / If-None-Match, a lock locally); a
    concurrent update makes the replace fail, and the loop compares again."""
    latest_uri = storage.join(target.base_uri, LATEST)
    pointer = {"run": target.uri, "run_id": target.run_id, "started_at": _iso(target.started_at),
               "started_unix": target.started_at, "manifest": manifest_uri, "created_at": created_at}
    ours = _run_order(pointer)
    for _ in range(attempts):
        current = storage.read_versioned(latest_uri, endpoint_url=endpoint_url)
        if current is not None:
            try:
                theirs = _run_order(json.loads(current.text))
            except (ValueError, AttributeError):
                theirs = (float("-inf"), "")  # not a pointer of ours: replaced
            if theirs >= ours:
                log.info("%s names %s, which started after this run: left as it is", latest_uri, theirs[1])
                return
        try:
            storage.put_if(latest_uri, json.dumps(pointer, indent=2), etag=current.etag if current else None,
                           endpoint_url=endpoint_url)
        except storage.Conflict:
            time.sleep(random.uniform(0.05, 0.5))  # another run moved it meanwhile: compare again
            continue
        log.info("%s now names %s", latest_uri, target.uri)
        return
    raise StorageError(f"could not update {latest_uri}: it changed {attempts} times while this run tried to replace"
                       f" it. This run's result is complete at {target.uri}; point {LATEST} at it by hand if it is"
                       " the newest")
