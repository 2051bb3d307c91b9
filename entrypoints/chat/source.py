"""Finding a published result and getting the files a reader loads from it, each checked against the manifest.

    python -m entrypoints.chat --model s3://bucket/outputs/run1     # (this module is the chat's first step)

A result is named by its output (an s3:// prefix or a directory holding manifest.json), by the root of a version
series (its latest.json names the newest run), by a runs/<id>/ prefix, or by the adapter/ or merged/ folder of one of
those. Only the files the manifest lists are loaded: an S3 result's files are downloaded into a cache directory, a
local result's are read where they are, and the sha256 of every one is compared with the manifest before anything is
loaded. A directory with config.json or adapter_config.json and no manifest (a model saved by hand), or a Hub id, is
loaded as it is, unchecked, with a log line saying so. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from entrypoints import storage
from entrypoints.checkpoints import content_sha256, file_sha256s, model_files
from entrypoints.errors import ModelError
from entrypoints.modeling import HUB_ID
from entrypoints.outputs import LATEST, MANIFEST, MANIFEST_FORMAT

log = logging.getLogger("qlora.chat")

PARTS = ("merged", "adapter")  # the parts of a result a model can be loaded from, preferred first
# Files a plain (unpublished) model or adapter directory has at its root.
MODEL_MARKERS = ("config.json", "adapter_config.json")


@dataclass(frozen=True)
class Result:
    """A complete result: where it is, its manifest, and the files the manifest lists (path -> bytes, sha256)."""

    uri: str
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(repr=False)
    part_named: str = ""  # `adapter` or `merged` when the URI named that folder of the result

    @property
    def parts(self) -> list[str]:
        return [p for p in PARTS if any(path.startswith(p + "/") for path in self.files)]

    def describe(self) -> str:
        run = self.manifest.get("run") or {}
        name = (self.manifest.get("config") or {}).get("run_name") or ""
        return f"{self.uri} ({', '.join(filter(None, [name, run.get('id')])) or 'result'}, created {self.manifest.get('created_at', '?')})"


def _parent(uri: str) -> tuple[str, str]:
    """(parent, last component) of an s3:// URI or a local path."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        path = PurePosixPath(key.rstrip("/"))
        return (f"s3://{bucket}/{path.parent}" if str(path.parent) != "." else f"s3://{bucket}"), path.name
    path = Path(uri).absolute()
    return str(path.parent), path.name


def _root(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else str(Path(uri).absolute())


def find_result(uri: str, endpoint_url: str = "") -> Result | None:
    """The complete result `uri` names; None when it names a plain model directory or a Hub id (loaded unchecked).

    Raises ModelError naming what was found when `uri` holds neither (no manifest: an incomplete output, a run still
    writing, or the wrong prefix), StorageError (exit 5) when S3 cannot be read."""
    if not storage.is_s3(uri) and not Path(uri).exists():
        if HUB_ID.match(uri):
            return None
        raise ModelError(f"{uri}: no such file or directory. Name a job's output (an s3:// prefix or a directory with"
                         f" {MANIFEST}), a model directory, or a Hub id like org/name")
    root = _root(uri)
    candidates = [(root, "")]
    parent, last = _parent(root)
    if last in PARTS:
        candidates.append((parent, last))
    for where, part in candidates:
        text = storage.read_text(storage.join(where, MANIFEST), endpoint_url=endpoint_url)
        if text is not None:
            return parse_manifest(where, text, part)
        if part:
            continue
        latest = storage.read_text(storage.join(where, LATEST), endpoint_url=endpoint_url)
        if latest is not None:
            return _follow_latest(where, latest, endpoint_url)
    if not storage.is_s3(uri) and any((Path(uri) / name).is_file() for name in MODEL_MARKERS):
        return None
    found = [o.relative for o in storage.list_objects(root + "/" if storage.is_s3(root) else root,
                                                       endpoint_url=endpoint_url)][:8]
    what = f"it holds {', '.join(found)}{' ...' if len(found) == 8 else ''}" if found else "it is empty"
    raise ModelError(f"{uri} holds no {MANIFEST} (and no {LATEST}): {what}. A job's output is complete only once its"
                     f" manifest is written last; without one the run is still writing, failed, or this is not an"
                     f" output. Name the output's root (the prefix with {MANIFEST}), a runs/<id>/ prefix below a"
                     f" version series, or the series' root (with {LATEST})")


def is_result(uri: str, endpoint_url: str = "") -> bool:
    """Whether `uri` is the root of a result or of a version series (a manifest.json or a latest.json there)."""
    if not storage.is_s3(uri) and not Path(uri).is_dir():
        return False
    root = _root(uri)
    return any(storage.read_text(storage.join(root, name), endpoint_url=endpoint_url) is not None
               for name in (MANIFEST, LATEST))


def _follow_latest(series: str, text: str, endpoint_url: str) -> Result:
    where = storage.join(series, LATEST)
    try:
        pointer = json.loads(text)
        run_uri = str(pointer["run"])
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{where} is not a pointer written by the job (a JSON object with `run`): name a"
                         " runs/<id>/ prefix below it instead") from None
    manifest_uri = str(pointer.get("manifest") or storage.join(run_uri, MANIFEST))
    manifest = storage.read_text(manifest_uri, endpoint_url=endpoint_url)
    if manifest is None:
        raise ModelError(f"{where} names the run {run_uri}, but its {MANIFEST} ({manifest_uri}) does not exist: that"
                         " run's output was removed or is incomplete. Name another runs/<id>/ prefix")
    log.info("%s names the newest run: %s", where, run_uri)
    return parse_manifest(run_uri, manifest, "")


def parse_manifest(uri: str, text: str, part_named: str = "") -> Result:
    where = storage.join(uri, MANIFEST)
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{where} is not valid JSON ({exc}): the output is damaged; publish it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("complete") is not True:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelError(f"{where} is not a complete manifest of this job (format {found!r}, expected"
                         f" {MANIFEST_FORMAT!r} with complete=true)")
    files: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("files") or []:
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("bytes"), int)
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        rel = PurePosixPath(entry["path"]) if ok else None
        if rel is None or rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"{where}: the entry {entry!r} is not a file of the output (path, bytes, sha256)")
        files[entry["path"]] = entry
    return Result(_root(uri), manifest, files, part_named)


# ------------------------------------------------------------------------------------------- the files of a part
def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-job"


def part_files(result: Result, part: str) -> dict[str, dict[str, Any]]:
    files = {p: meta for p, meta in result.files.items() if p.startswith(part + "/")}
    if not files:
        raise ModelError(f"{result.uri} has no {part}/: its manifest lists {', '.join(result.parts) or 'no model'}"
                         f"{'' if result.parts else ' files'}")
    return files


def fetch_part(result: Result, part: str, cache_dir: Path, endpoint_url: str = "") -> Path:
    """A local directory holding exactly the files of `part` the manifest lists, each checked against its sha256."""
    return fetch_files(result, part_files(result, part), cache_dir, endpoint_url) / part


def fetch_files(result: Result, files: dict[str, dict[str, Any]], cache_dir: Path, endpoint_url: str = "") -> Path:
    """The directory below which `files` (paths relative to the result) are, checked against the manifest.

    A local result is read in place, and its folders must hold no file the manifest does not list (it would be
    loaded unchecked). An S3 result is downloaded below `cache_dir`, keyed by its manifest's hash (another run at the
    same prefix gets its own folder); a cached file is reused only when its sha256 still matches."""
    if not storage.is_s3(result.uri):
        root = Path(result.uri)
        for folder in sorted({PurePosixPath(p).parts[0] for p in files if "/" in p}):
            listed = {p for p in result.files if p.startswith(folder + "/")}
            extra = sorted(q for q in ((p.relative_to(root).as_posix()) for p in (root / folder).rglob("*")
                                       if p.is_file()) if q not in listed and not PurePosixPath(q).name.startswith("."))
            if extra:
                raise ModelError(f"{root / extra[0]} is not listed in {root / MANIFEST}{f' (nor {len(extra) - 1} more)' if len(extra) > 1 else ''}:"
                                 " it would be loaded unchecked. Remove what the job did not write from the output")
        verify(root, files, result.uri)
        log.info("%d file(s) of %s: sha256 as in the manifest", len(files), result.uri)
        return root
    key = hashlib.sha256(json.dumps(result.manifest, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir / "results" / key
    for rel, meta in files.items():
        storage.download_file(storage.join(result.uri, rel), root / rel, size=meta["bytes"], endpoint_url=endpoint_url)
    bad = verify(root, files, result.uri, raise_on_mismatch=False)
    for rel in bad:  # a cached copy that changed since: download it once more
        (root / rel).unlink()
        storage.download_file(storage.join(result.uri, rel), root / rel, size=files[rel]["bytes"],
                              endpoint_url=endpoint_url)
    if bad:
        verify(root, {rel: files[rel] for rel in bad}, result.uri)
    log.info("%d file(s) of %s in %s, sha256 as in the manifest", len(files), result.uri, root)
    return root


def verify(root: Path, files: dict[str, dict[str, Any]], uri: str, raise_on_mismatch: bool = True) -> list[str]:
    """Compare each file's size and sha256 with the manifest; the paths that differ (raised unless told not to)."""
    missing = [rel for rel in files if not (root / rel).is_file()]
    if missing:
        raise ModelError(f"{storage.join(uri, missing[0])} is listed in the manifest but missing"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the output is incomplete;"
                         " publish it again")
    digests = file_sha256s([root / rel for rel in files])
    bad = []
    for rel, meta in sorted(files.items()):
        size, digest = (root / rel).stat().st_size, digests[root / rel]
        if size == meta["bytes"] and digest == meta["sha256"]:
            continue
        bad.append(rel)
        if raise_on_mismatch:
            raise ModelError(f"{storage.join(uri, rel)} is not the file the manifest lists: {size:,} bytes with sha256"
                             f" {digest}, where {MANIFEST} says {meta['bytes']:,} bytes with sha256 {meta['sha256']}."
                             " It was changed or damaged after the run published it: nothing was loaded. Publish the"
                             " result again (or restore the file)")
    return bad


# ------------------------------------------------------------------------------------------- the base of an adapter
def check_base(base_dir: Path, result: Result | None, base_named: str) -> None:
    """An adapter from a result must meet the base model it was trained on: the sha256 fingerprint of the base's
    files (config, tokenizer, weights) recorded in the manifest must be the given base's."""
    if result is None:
        return
    recorded = (result.manifest.get("base_model") or {})
    expected = recorded.get("fingerprint_sha256")
    if not expected:
        log.warning("%s records no fingerprint of its base model: %s is used unchecked", result.uri, base_named)
        return
    got = content_sha256(model_files(base_dir), base_dir)
    if got != expected:
        raise ModelError(f"the base model {base_named} is not the one the adapter of {result.uri} was trained on: its"
                         f" files' fingerprint is {got}, where the manifest records {expected} for"
                         f" {recorded.get('source', '?')}. An adapter on another base gives wrong answers: give that"
                         " base with --model (the same files the run trained on)")
    log.info("base model %s: fingerprint matches the one the adapter was trained on", base_named)
