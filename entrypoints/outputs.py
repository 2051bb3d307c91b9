"""Outputs: where they go, the model card, the manifest, and publishing with the manifest written last.

A reader who finds `<output>/manifest.json` knows every file it lists is complete: files are uploaded
first (each atomically), the manifest last. Overwriting deletes the old manifest before anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from entrypoints import storage
from entrypoints.config import JobConfig
from entrypoints.errors import OutputExistsError

log = logging.getLogger("qlora.outputs")

MANIFEST = "manifest.json"
LATEST = "latest.json"
MANIFEST_FORMAT = "qlora-job/manifest/v1"
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "wandb", "qlora-job")


@dataclass(frozen=True)
class OutputTarget:
    uri: str  # where this run's files go
    base_uri: str  # the configured output (differs from uri in `version` mode)
    versioned: bool
    replaces_existing: bool


def plan_output(cfg: JobConfig, now: float | None = None) -> OutputTarget:
    """Decide where this run writes, before any training, so a conflict fails in seconds, not hours."""
    base = cfg.output_uri
    endpoint = cfg.s3_endpoint_url
    storage.check_bucket(base, endpoint_url=endpoint)
    if cfg.output_exists == "version":
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        return OutputTarget(storage.join(base, "runs", stamp), base, True, False)
    existing = storage.read_text(storage.join(base, MANIFEST), endpoint_url=endpoint)
    if existing is None:
        return OutputTarget(base, base, False, False)
    if cfg.output_exists == "error":
        raise OutputExistsError(f"{base} already holds a complete result ({MANIFEST} exists). Choose another"
                                " QLORA_OUTPUT, or set QLORA_OUTPUT_EXISTS=overwrite to replace it or"
                                " QLORA_OUTPUT_EXISTS=version to write runs/<timestamp>/ below it")
    return OutputTarget(base, base, False, True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path]) -> str:
    """A stable fingerprint of the training data: sha256 over (relative name, sha256) of every file."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(sha256_file(path).encode())
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
                     has_merged: bool) -> Path:
    lines = [
        "---",
        f"base_model: {cfg.model}",
        "library_name: peft",
        "tags: [qlora, lora, sft, trl]",
        "---",
        f"# {cfg.run_name or 'QLoRA fine-tune'}",
        "",
        f"A LoRA adapter (r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets `{cfg.lora_target_modules}`) trained with"
        f" QLoRA ({cfg.quantization}, double quantization {'on' if cfg.double_quant else 'off'}) on top of `{cfg.model}`.",
        "",
        "## Files",
        "- `adapter/`: the PEFT adapter and tokenizer (`PeftModel.from_pretrained(base, 'adapter')`).",
    ]
    if has_merged:
        lines.append("- `merged/`: the adapter merged into the 16-bit base, loadable with"
                     " `AutoModelForCausalLM.from_pretrained('merged')` alone.")
    lines += ["- `manifest.json`: every file with size and sha256, the settings, metrics and versions.", "",
              "## Metrics", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
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
    """Uploads finished files in a background thread while the job keeps working (e.g. merging the next shard)."""

    def __init__(self, stage: Path, target: OutputTarget, endpoint_url: str):
        self.stage, self.target, self.endpoint = stage, target, endpoint_url
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.errors: list[BaseException] = []
        self.submitted: set[str] = set()
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
            rel = path.relative_to(self.stage).as_posix()
            try:
                storage.upload_file(path, storage.join(self.target.uri, rel), endpoint_url=self.endpoint)
            except BaseException as exc:  # noqa: BLE001 - re-raised in finish()
                self.errors.append(exc)

    def submit(self, path: Path) -> None:
        self.submitted.add(path.relative_to(self.stage).as_posix())
        self.queue.put(path)

    def finish(self, manifest: dict[str, Any]) -> str:
        """Upload what is left, wait, then write the manifest (and the `latest` pointer in version mode)."""
        for path in storage.iter_tree(self.stage):
            rel = path.relative_to(self.stage).as_posix()
            if rel != MANIFEST and rel not in self.submitted:
                self.submit(path)
        self.queue.put(None)
        self.thread.join()
        if self.errors:
            raise self.errors[0]
        text = json.dumps(manifest, indent=2, sort_keys=False)
        (self.stage / MANIFEST).write_text(text, encoding="utf-8")
        manifest_uri = storage.join(self.target.uri, MANIFEST)
        storage.write_text(manifest_uri, text, endpoint_url=self.endpoint)
        if self.target.versioned:
            pointer = {"run": self.target.uri, "manifest": manifest_uri, "created_at": manifest["created_at"]}
            storage.write_text(storage.join(self.target.base_uri, LATEST), json.dumps(pointer, indent=2),
                               endpoint_url=self.endpoint)
        log.info("published %d file(s) to %s; manifest written last", len(manifest["files"]), self.target.uri)
        return manifest_uri
