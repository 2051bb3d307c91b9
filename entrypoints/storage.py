"""Object storage and local paths behind one small API: fetch inputs, publish outputs.

    python -m entrypoints.storage ls s3://bucket/prefix/      # list (handy to debug an endpoint)

`s3://` URIs go through boto3 (multipart transfers, adaptive retries with backoff, a custom endpoint
for S3-compatible stores); anything else is a local path. Downloads and local writes land in a `.partial`
name that is renamed when complete (and removed when the write fails), so an interrupted transfer is never
mistaken for a finished file. `fetch` mirrors a prefix exactly, reusing a file only when its size and S3
ETag match the listing. Conditional writes (`put_if`, `delete_if`: S3's If-None-Match/If-Match, a file lock
locally) let several jobs share one output safely. A full disk, a read-only or unwritable path is a
StorageError naming the path. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from entrypoints.errors import StorageError

log = logging.getLogger("qlora.storage")

# Multipart thresholds: 64 MiB parts keep a 13 GB shard set at ~200 parts and let 8 threads saturate
# an instance's network without holding more than ~512 MiB in flight.
MULTIPART_BYTES = 64 * 1024 * 1024
MAX_CONCURRENCY = 8
# Adaptive retry mode backs off exponentially and rate-limits itself on throttling; 10 attempts ride
# out a storage endpoint restart of about a minute.
MAX_ATTEMPTS = 10
# botocore's retries draw on a per-client quota that connection errors drain (10 units of 500 each) and only
# successes refill: after a couple of outages in one job it stops retrying at all. The whole-transfer loop
# below does not depend on it: 8 tries, 2, 4, 8, 16, 30, 30, 30 s apart, ride out about two minutes.
TRANSFER_ATTEMPTS = 8
TRANSFER_MAX_DELAY_SECONDS = 30.0
PROGRESS_MIN_BYTES = 32 * 1024 * 1024
# Beside a fetched directory `d`: what was downloaded into it (size, ETag, mtime per file), so that a rerun reuses a
# file only when the object it came from is unchanged. Outside `d` itself, so `d` holds exactly the listed objects.
FETCH_INDEX_FORMAT = "qlora-job/fetch-index/v1"
# Local conditional writes take an exclusive flock on this file in the object's directory.
LOCK_NAME = ".qlora.lock"
# Client errors that a retry cannot fix.
_FINAL_CODES = ("AccessDenied", "403", "NoSuchBucket", "NoSuchKey", "404", "NotFound", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "PreconditionFailed", "412", "KeyTooLongError")
# Local write failures that a retry cannot fix: mapped to a StorageError naming the path at once.
_LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                 errno.ENOTDIR)


class Conflict(Exception):
    """A conditional write or delete found the object other than expected (S3's 412 PreconditionFailed)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket: write s3://bucket/key")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto an s3:// URI or a local path."""
    if is_s3(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return str(Path(uri, *parts))


@lru_cache(maxsize=8)
def _client(endpoint_url: str):
    import boto3
    import botocore.session
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    core = botocore.session.get_session()
    # AWS_MAX_ATTEMPTS (or max_attempts in an AWS config profile) is botocore's own retry knob, but an explicit
    # max_attempts in the client Config silently overrides it: ours applies only when the user set none.
    retries = {"mode": "adaptive"}
    if core.get_config_variable("max_attempts") is None:
        retries["max_attempts"] = MAX_ATTEMPTS
    config = Config(
        retries=retries,
        connect_timeout=10,
        read_timeout=120,
        # Path-style addressing works with every S3-compatible store; AWS still accepts it.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    client = boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url or None, config=config)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_BYTES,
        multipart_chunksize=MULTIPART_BYTES,
        max_concurrency=MAX_CONCURRENCY,
    )
    return client, transfer


def _storage_error(exc: Exception, uri: str, action: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"access denied while trying to {action} {uri} ({code}): grant the job's role"
                                " s3:GetObject/s3:ListBucket on inputs and s3:PutObject on outputs, or fix the credentials")
        if code in ("NoSuchBucket",) or (action.startswith("access the bucket") and code in ("404", "NotFound")):
            return StorageError(f"bucket of {uri} does not exist: create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri} does not exist: check the URI (keys are case-sensitive)")
        if code in ("PreconditionFailed", "412"):
            return StorageError(f"{uri} changed while this job was reading it (its ETag no longer matches the"
                                " listing): rerun once whatever writes it has finished")
        if code == "KeyTooLongError":
            return StorageError(f"{uri} is too long for S3 (object keys are at most 1024 bytes): use a shorter prefix")
        return StorageError(f"could not {action} {uri}: {code or exc}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no AWS credentials found to {action} {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
                            " AWS_PROFILE, or run with an IAM role")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint to {action} {uri} after retrying ({exc}):"
                            " check QLORA_S3_ENDPOINT_URL / the network, then rerun")
    return StorageError(f"could not {action} {uri}: {type(exc).__name__}: {exc}")


def _retrying(fn, uri: str, action: str, attempts: int | None = None):
    """Retry a whole transfer (botocore retries single requests; this covers a connection dropped mid-stream).

    A user who set botocore's AWS_MAX_ATTEMPTS chose how persistent to be: the whole transfer is tried as
    many times, so one knob bounds how long an outage is waited out.
    """
    import botocore.session
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

    if attempts is None:
        attempts = botocore.session.get_session().get_config_variable("max_attempts") or TRANSFER_ATTEMPTS
    delay = 2.0
    for attempt in range(1, attempts + 1):
        try:
            try:
                return fn()
            except S3UploadFailedError as wrapped:  # boto3's transfer manager wraps the ClientError of an upload
                raise (wrapped.__context__ if isinstance(wrapped.__context__, ClientError) else OSError(str(wrapped))) from None
            except (RetriesExceededError, TransferRetriesExceededError) as wrapped:  # ... and a download's last network error
                raise OSError(f"{type(wrapped.last_exception).__name__}: {wrapped.last_exception}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _FINAL_CODES or attempt == attempts:
                raise _storage_error(exc, uri, action) from None
            log.warning("%s %s failed (%s), retrying in %.0fs (%d/%d)", action, uri, code, delay, attempt, attempts)
        except (BotoCoreError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS:
                raise  # the local disk, not the network: the caller names the path
            if attempt == attempts:
                raise _storage_error(exc, uri, action) from None
            log.warning("%s %s failed (%s), retrying in %.0fs (%d/%d)", action, uri, exc, delay, attempt, attempts)
        time.sleep(delay)
        delay = min(delay * 2, TRANSFER_MAX_DELAY_SECONDS)
    raise AssertionError("unreachable")


class _Progress:
    """Logs a transfer's progress every 10% (only for transfers big enough to be worth watching)."""

    def __init__(self, label: str, total_bytes: int):
        self.label, self.total, self.done, self.next_pct = label, total_bytes, 0, 10
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            pct = 100 * self.done // max(self.total, 1)
            if self.total >= PROGRESS_MIN_BYTES and pct >= self.next_pct:
                rate = self.done / max(time.monotonic() - self.start, 1e-6) / 2**20
                log.info("%s: %d%% of %.1f MiB (%.1f MiB/s)", self.label, pct, self.total / 2**20, rate)
                self.next_pct = pct - pct % 10 + 10


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    relative: str
    size: int
    etag: str = ""  # S3's ETag: changes whenever the object is written again; empty for local files


def list_objects(uri: str, *, endpoint_url: str = "") -> list[ObjectInfo]:
    """Every object below an s3:// prefix (or the one object the URI names), or files below a local dir."""
    if not is_s3(uri):
        root = Path(uri)
        if root.is_file():
            return [ObjectInfo(str(root), root.name, root.stat().st_size)]
        return [ObjectInfo(str(p), p.relative_to(root).as_posix(), p.stat().st_size)
                for p in sorted(root.rglob("*")) if p.is_file()]
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)

    def run() -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        prefix = key if (key.endswith("/") or not key) else key + "/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # "folder" placeholder objects made by consoles
                found.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Key"][len(prefix):], obj["Size"],
                                        obj.get("ETag", "")))
        if not found and key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - mapped to a StorageError below
                from botocore.exceptions import ClientError

                if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return []
                raise
            found.append(ObjectInfo(uri, PurePosixPath(key).name, head["ContentLength"], head.get("ETag", "")))
        return found

    return _retrying(run, uri, "list")


# ------------------------------------------------------------------------------------------- local disks
def free_bytes(path: Path) -> int:
    """Bytes still free for the job on the file system of `path` (or of its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return 0


def local_write_error(exc: OSError, path: Path, needed_bytes: int | None = None) -> StorageError:
    """A failed local write as one paragraph: the path, the cause and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = "the disk quota is used up" if exc.errno == errno.EDQUOT else "no space left on the device"
        needed = f", {needed_bytes} bytes needed" if needed_bytes is not None else ""
        return StorageError(f"{cause} while writing {path}: {free_bytes(path)} bytes free there{needed}. Free space"
                            " there or give the job a larger disk (SageMaker: VolumeSizeInGB; Kubernetes: a larger"
                            " volume or ephemeral-storage request), then rerun")
    if exc.errno == errno.EROFS:
        return StorageError(f"cannot write {path}: the file system is read-only. Mount it read-write, or choose"
                            " another location")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {path}: permission denied (uid {os.getuid()}). Give the job's user write"
                            " access there, or choose another location")
    if exc.errno == errno.ENAMETOOLONG:
        return StorageError(f"cannot write {path}: a name in the path, or the whole path, is too long for its file"
                            " system. Choose a shorter path")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"cannot write {path}: a part of the path is a file, not a directory. Choose another"
                            " location")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except NotADirectoryError:  # a part of the path is a file: nothing was written there
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _write_atomically(target: Path, write: Callable[[Path], None], needed_bytes: int, suffix: str = ".partial") -> None:
    """Write through `<name>.partial` and rename: the target appears only complete, and a failed write leaves nothing."""
    tmp = target.with_name(target.name + suffix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            raise local_write_error(exc, target, needed_bytes) from None
        raise


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` among the processes that take it (the file stays: removing a lock file races)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a")  # noqa: SIM115 - closed below; the lock lives with the open file
    except OSError as exc:
        raise local_write_error(exc, folder / LOCK_NAME) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


# ------------------------------------------------------------------------------------------- fetch
def fetch(uri: str, dest: Path, *, endpoint_url: str = "") -> Path:
    """Make `uri` available locally. Local paths are returned as they are; s3:// objects are downloaded.

    An s3:// URI naming one object becomes `dest/<name>`; a prefix becomes the directory `dest`. `dest` belongs to
    this function: afterwards it holds exactly the listed objects. A file already there is kept only when its size
    and the object's ETag match what was recorded when it was downloaded (a rerun after a failure resumes);
    everything else in `dest` (other files, changed ones, `.partial` leftovers) is removed first.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise StorageError(f"{uri} does not exist: check the path (inside a container, mount it first)")
        return path
    objects = list_objects(uri, endpoint_url=endpoint_url)
    if not objects:
        raise StorageError(f"nothing found at {uri}: the prefix is empty or the key does not exist")
    single = len(objects) == 1 and objects[0].uri == uri
    _mirror(uri, objects, dest, endpoint_url)
    return dest / objects[0].relative if single else dest


def _index_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.qlora-fetch.json")


def _read_index(path: Path) -> dict[str, dict]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = index.get("files") if isinstance(index, dict) and index.get("format") == FETCH_INDEX_FORMAT else None
    return files if isinstance(files, dict) else {}


def _write_index(path: Path, uri: str, files: dict[str, dict]) -> None:
    text = json.dumps({"format": FETCH_INDEX_FORMAT, "source": uri, "files": files}, indent=1)
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), len(text))


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _mirror(uri: str, objects: list[ObjectInfo], dest: Path, endpoint_url: str) -> None:
    wanted = {o.relative: o for o in objects}
    root = dest.resolve()
    for rel in wanted:
        if not (root / rel).resolve().is_relative_to(root):
            raise StorageError(f"{uri} holds the key {rel!r}, which would land outside {dest}: rename that object")
    index_path = _index_path(dest)
    recorded = _read_index(index_path)
    reused: dict[str, dict] = {}
    removed: list[str] = []
    changed: list[str] = []
    try:
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            dest.unlink()
        if dest.is_dir():
            for path in sorted(dest.rglob("*"), reverse=True):  # children before their directories
                rel = path.relative_to(dest).as_posix()
                if path.is_dir() and not path.is_symlink():
                    if not any(path.iterdir()):
                        path.rmdir()
                    continue
                obj, seen = wanted.get(rel), recorded.get(rel)
                st = path.lstat()
                if (obj is not None and seen is not None and obj.etag and path.is_file() and not path.is_symlink()
                        and st.st_size == obj.size == seen.get("size") and seen.get("etag") == obj.etag
                        and seen.get("mtime_ns") == st.st_mtime_ns):
                    reused[rel] = seen
                    continue
                path.unlink()
                (changed if obj is not None else removed).append(rel)
        # Written before any download: the index never vouches for a file that has been replaced since.
        _write_index(index_path, uri, reused)
    except OSError as exc:
        raise local_write_error(exc, dest) from None
    todo = [o for o in objects if o.relative not in reused]
    needed = sum(o.size for o in todo)
    free = free_bytes(dest)
    if needed > free:
        raise StorageError(f"not enough disk space to download {uri} to {dest}: {needed} bytes to download"
                           f" ({len(todo)} file(s)), {free} bytes free there. Free space or give the job a larger disk"
                           " (SageMaker: VolumeSizeInGB; Kubernetes: a larger volume or ephemeral-storage request),"
                           " then rerun")
    log.info("downloading %s to %s: %d file(s), %.1f MiB%s; reusing %d unchanged (same size and ETag)%s%s%s",
             uri, dest, len(todo), needed / 2**20, f" ({_names([o.relative for o in todo])})" if todo else "",
             len(reused), f" ({_names(sorted(reused))})" if reused else "",
             f"; {len(changed)} changed or unverified, replaced: {_names(changed)}" if changed else "",
             f"; removed {len(removed)} not in the listing: {_names(removed)}" if removed else "")
    for obj in todo:
        target = dest / obj.relative
        _download(obj.uri, target, size=obj.size, etag=obj.etag, endpoint_url=endpoint_url)
        reused[obj.relative] = {"size": obj.size, "etag": obj.etag, "mtime_ns": target.stat().st_mtime_ns}
        _write_index(index_path, uri, reused)


def download_file(uri: str, target: Path, *, size: int | None = None, endpoint_url: str = "") -> Path:
    """Download one object; a file already at `target` with the given size is kept (checkpoint restores resume)."""
    if target.is_file() and size is not None and target.stat().st_size == size:
        return target
    return _download(uri, target, size=size, etag="", endpoint_url=endpoint_url)


def _download(uri: str, target: Path, *, size: int | None, etag: str, endpoint_url: str) -> Path:
    bucket, key = split_s3(uri)
    client, transfer = _client(endpoint_url)
    tmp = target.with_name(target.name + ".partial")
    progress = _Progress(f"download {PurePosixPath(key).name}", size or 0)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _retrying(lambda: _get_object(client, transfer, bucket, key, tmp, size, etag, progress), uri, "download")
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(tmp)  # s3transfer removes its own temporary file when a transfer fails
        if isinstance(exc, OSError):
            raise local_write_error(exc, target, size) from None
        raise
    return target


def _get_object(client, transfer, bucket: str, key: str, path: Path, size: int | None, etag: str, progress) -> None:
    """Download to `path`. With the listing's ETag every GET carries If-Match, so the file holds exactly the version
    that was listed (an object replaced meanwhile fails with PreconditionFailed instead of mixing versions)."""
    if etag and size is not None and size < MULTIPART_BYTES:
        # One GET: s3transfer does not pass If-Match on a single-part download, so make the request here.
        body = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
        with open(path, "wb") as fh:
            for chunk in body.iter_chunks(1 << 20):
                fh.write(chunk)
                progress(len(chunk))
        return
    # boto3's download_file, with the listed size and ETag given to s3transfer: its ranged GETs then carry If-Match.
    from boto3.s3.transfer import create_transfer_manager
    from s3transfer.subscribers import BaseSubscriber

    class Listed(BaseSubscriber):
        def on_queued(self, future, **kwargs):
            if size is not None and etag and hasattr(future.meta, "provide_object_etag"):
                future.meta.provide_transfer_size(size)
                future.meta.provide_object_etag(etag)

        def on_progress(self, future, bytes_transferred, **kwargs):
            progress(bytes_transferred)

    with create_transfer_manager(client, transfer) as manager:
        manager.download(bucket, key, str(path), subscribers=[Listed()]).result()


# ------------------------------------------------------------------------------------------- writes
def upload_file(local: Path, uri: str, *, endpoint_url: str = "") -> None:
    """Upload (or copy, for a local destination) one file; the destination appears only when complete."""
    if not is_s3(uri):
        _write_atomically(Path(uri), lambda tmp: shutil.copyfile(local, tmp), local.stat().st_size)
        return
    bucket, key = split_s3(uri)
    client, transfer = _client(endpoint_url)
    size = local.stat().st_size
    progress = _Progress(f"upload {local.name}", size)
    # S3 makes an object visible only once its (multipart) upload completes, so no temp name is needed.
    _retrying(lambda: client.upload_file(str(local), bucket, key, Config=transfer, Callback=progress), uri, "upload")


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def iter_tree(local_dir: Path) -> Iterator[Path]:
    return (p for p in sorted(local_dir.rglob("*")) if p.is_file())


def upload_tree(local_dir: Path, uri: str, *, endpoint_url: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
    uploaded = []
    for path in iter_tree(local_dir):
        rel = path.relative_to(local_dir).as_posix()
        if rel in exclude:
            continue
        upload_file(path, join(uri, rel), endpoint_url=endpoint_url)
        uploaded.append(rel)
    return uploaded


def read_text(uri: str, *, endpoint_url: str = "") -> str | None:
    """The object's text, or None when it does not exist."""
    found = read_versioned(uri, endpoint_url=endpoint_url)
    return found.text if found else None


@dataclass(frozen=True)
class Versioned:
    text: str
    etag: str  # S3's ETag; locally the sha256 of the content


def read_versioned(uri: str, *, endpoint_url: str = "") -> Versioned | None:
    """The object's text and ETag (what put_if/delete_if compare against), or None when it does not exist."""
    found = _read(uri, endpoint_url, None)
    if found is None:
        return None
    data, etag = found
    return Versioned(data.decode("utf-8"), etag)


def read_bytes(uri: str, *, endpoint_url: str = "", attempts: int | None = None) -> bytes | None:
    """The object's bytes (one GET), or None when it does not exist; `attempts`: whole-request tries (_retrying)."""
    found = _read(uri, endpoint_url, attempts)
    return found[0] if found else None


def _read(uri: str, endpoint_url: str, attempts: int | None) -> tuple[bytes, str] | None:
    """(bytes, ETag; locally the sha256 of the content), or None when the object does not exist."""
    if not is_s3(uri):
        try:
            data = Path(uri).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None
        return data, hashlib.sha256(data).hexdigest()
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)
    from botocore.exceptions import ClientError

    def run() -> tuple[bytes, str] | None:
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return got["Body"].read(), got.get("ETag", "")

    return _retrying(run, uri, "read", attempts)


def write_text(uri: str, text: str, *, endpoint_url: str = "") -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint_url=endpoint_url)


def write_bytes(uri: str, data: bytes, *, endpoint_url: str = "", attempts: int | None = None,
                unique_partial: bool = False) -> None:
    """Write the whole object at once: one PUT on S3 (visible only complete), a temporary file renamed locally.
    `unique_partial`: the temporary file is named for this process, for a file several processes may write at once
    (the last rename wins, and no writer renames another's half-written file)."""
    if not is_s3(uri):
        _write_atomically(Path(uri), lambda tmp: tmp.write_bytes(data), len(data),
                          suffix=f".{os.getpid()}.partial" if unique_partial else ".partial")
        return
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)
    _retrying(lambda: client.put_object(Bucket=bucket, Key=key, Body=data), uri, "write", attempts)


def put_if(uri: str, text: str, *, etag: str | None, endpoint_url: str = "", attempts: int | None = None) -> str:
    """Write `text` only if the object is absent (`etag=None`) or still has `etag`; return the new ETag.

    Raises Conflict otherwise. S3: If-None-Match: * / If-Match. Locally: a hard link of a complete temporary file
    (atomic create, fails if the name exists), or a compare-and-replace under the directory's lock.
    """
    if not is_s3(uri):
        return _put_if_local(Path(uri), text, etag)
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)
    from botocore.exceptions import ClientError

    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

    def run() -> str | None:
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"), **condition).get("ETag", "")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return None
            raise

    written = _retrying(run, uri, "write", attempts)
    if written is None:
        # A retried request whose first try did succeed meets its own write: that is success, not a conflict.
        now = read_versioned(uri, endpoint_url=endpoint_url)
        if now is not None and now.text == text:
            return now.etag
        raise Conflict(uri)
    return written


def _put_if_local(target: Path, text: str, etag: str | None) -> str:
    data = text.encode("utf-8")
    if etag is None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
        except OSError as exc:
            raise local_write_error(exc, target, len(data)) from None
        tmp = Path(tmp_name)
        try:
            # mkstemp makes the file 0600; a manifest or latest.json must be as readable as the files it lists.
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, target)
        except FileExistsError:
            raise Conflict(str(target)) from None
        except OSError as exc:
            raise local_write_error(exc, target, len(data)) from None
        finally:
            _discard(tmp)
        return hashlib.sha256(data).hexdigest()
    with _locked(target.parent):
        now = read_versioned(str(target))
        if now is None or now.etag != etag:
            raise Conflict(str(target))
        _write_atomically(target, lambda tmp: tmp.write_bytes(data), len(data))
    return hashlib.sha256(data).hexdigest()


def delete_if(uri: str, etag: str, *, endpoint_url: str = "") -> None:
    """Delete the object only if it still has `etag` (a missing object counts as deleted); Conflict otherwise."""
    if not is_s3(uri):
        with _locked(Path(uri).parent):
            now = read_versioned(uri)
            if now is not None and now.etag != etag:
                raise Conflict(uri)
            Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)
    from botocore.exceptions import ClientError

    def run() -> bool:
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    if not _retrying(run, uri, "delete") and read_versioned(uri, endpoint_url=endpoint_url) is not None:
        raise Conflict(uri)


def delete(uri: str, *, endpoint_url: str = "") -> None:
    if not is_s3(uri):
        try:
            Path(uri).unlink(missing_ok=True)
        except OSError as exc:
            raise local_write_error(exc, Path(uri)) from None
        return
    bucket, key = split_s3(uri)
    client, _ = _client(endpoint_url)
    _retrying(lambda: client.delete_object(Bucket=bucket, Key=key), uri, "delete")


def check_bucket(uri: str, *, endpoint_url: str = "") -> None:
    """Fail early (before any GPU work) when the bucket of an s3:// URI is missing or not accessible."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    client, _ = _client(endpoint_url)
    _retrying(lambda: client.head_bucket(Bucket=bucket), f"s3://{bucket}", "access the bucket of", attempts=2)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "ls":
        print("usage: python -m entrypoints.storage ls URI", file=sys.stderr)
        return 2
    endpoint = os.environ.get("QLORA_S3_ENDPOINT_URL", "")
    for obj in list_objects(args[1], endpoint_url=endpoint):
        print(f"{obj.size:>14}  {obj.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
