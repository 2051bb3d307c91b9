"""Merge a LoRA adapter into its base model, any mix of s3:// and local paths, uploading each file as it is written.

    python -m entrypoints.merge --adapter s3://bucket/run/adapter --base s3://bucket/models/llama-2-7b \
        --output s3://bucket/run/merged [--merge-into nf4|fp4|original] [--max-shard-size 5GB]

An s3:// base is fetched a shard at a time (each deleted once merged); an s3:// output is uploaded file by file
while the next shard is merged, each local copy deleted once uploaded, the index last. Exit codes follow
entrypoints/errors.py; a JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

from entrypoints.errors import ModelError, OutputExistsError, run_guarded
from entrypoints.merge.core import DEFAULT_MERGE_INTO, MERGE_INTO_CHOICES, merge_adapter
from entrypoints.merge.layout import INDEX_NAME, SINGLE_NAME


class _Uploader:
    """Uploads finished files in a background thread while the next shard is merged."""

    def __init__(self, out_dir: Path, output_uri: str, endpoint_url: str, delete_after: bool):
        self.out_dir, self.output_uri, self.endpoint_url = out_dir, output_uri, endpoint_url
        self.delete_after = delete_after
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.error: BaseException | None = None
        self.uploaded: list[str] = []
        self.thread = threading.Thread(target=self._run, name="merge-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from entrypoints import storage

        while (path := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread reports the first error
            try:
                rel = path.relative_to(self.out_dir).as_posix()
                storage.upload_file(path, storage.join(self.output_uri, rel), endpoint_url=self.endpoint_url)
                self.uploaded.append(rel)
                if self.delete_after:
                    path.unlink()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error = exc

    def put(self, path: Path) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(path)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_merge(adapter_uri: str, base_uri: str, output_uri: str, *, work_dir: Path, merge_into: str,
              double_quant: bool, max_shard_size: str | None, endpoint_url: str, overwrite: bool,
              device: str) -> dict:
    """The standalone job: resolve inputs -> check output -> merge (uploading each file) -> report."""
    from entrypoints import storage

    work_dir.mkdir(parents=True, exist_ok=True)
    if storage.is_s3(output_uri):
        storage.check_bucket(output_uri, endpoint_url=endpoint_url)
        done = storage.read_text(storage.join(output_uri, INDEX_NAME), endpoint_url=endpoint_url)
        if done is not None and not overwrite:
            raise OutputExistsError(f"{output_uri} already holds a merged model ({INDEX_NAME}): choose another"
                                    " output or pass --overwrite")
    for flag, uri in (("--adapter", adapter_uri), ("--base", base_uri)):
        if not storage.is_s3(uri) and not Path(uri).exists():  # a missing input is the model's problem, not storage's
            raise ModelError(f"{flag} {uri}: no such directory; pass the directory (or s3:// prefix) that holds it")
    adapter_dir = storage.fetch(adapter_uri, work_dir / "adapter", endpoint_url=endpoint_url)
    fetch_shard = release_shard = None
    if storage.is_s3(base_uri):
        # Small files now; each weight shard is downloaded just before it is merged and deleted after.
        base_dir = work_dir / "base"
        objects = storage.list_objects(base_uri, endpoint_url=endpoint_url)
        if not objects:
            raise ModelError(f"nothing found at {base_uri}: pass the prefix holding the base model's files")
        shard_uris = {o.relative: o for o in objects if o.relative.endswith(".safetensors") and "/" not in o.relative}
        for obj in objects:
            if obj.relative not in shard_uris and "/" not in obj.relative:
                storage.download_file(obj.uri, base_dir / obj.relative, size=obj.size, endpoint_url=endpoint_url)
        if not shard_uris:
            pickles = [o.relative for o in objects if o.relative.endswith((".bin", ".pt"))]
            hint = f" (found pickle weights {pickles[:3]}: convert them to safetensors first)" if pickles else ""
            raise ModelError(f"{base_uri} has no *.safetensors{hint}")
        if SINGLE_NAME in shard_uris and not (base_dir / INDEX_NAME).is_file():
            obj = shard_uris[SINGLE_NAME]  # one file: its header is needed for the checks, fetch it now
            storage.download_file(obj.uri, base_dir / SINGLE_NAME, size=obj.size, endpoint_url=endpoint_url)

        def fetch_shard(name: str) -> Path:
            if name not in shard_uris:
                raise ModelError(f"{INDEX_NAME} at {base_uri} lists {name}, which is not there: re-upload the base")
            obj = shard_uris[name]
            return storage.download_file(obj.uri, base_dir / name, size=obj.size, endpoint_url=endpoint_url)

        def release_shard(path: Path) -> None:
            path.unlink(missing_ok=True)
    else:
        base_dir = storage.fetch(base_uri, work_dir / "base", endpoint_url=endpoint_url)

    if storage.is_s3(output_uri):
        out_dir = Path(tempfile.mkdtemp(prefix="merged-", dir=work_dir))
        uploader = _Uploader(out_dir, output_uri, endpoint_url, delete_after=True)
        on_file_written = uploader.put
    else:
        out_dir, uploader, on_file_written = Path(output_uri), None, None
    try:
        summary = merge_adapter(base_dir, Path(adapter_dir), out_dir, merge_into=merge_into,
                                on_file_written=on_file_written, double_quant=double_quant,
                                max_shard_size=max_shard_size, device=device, overwrite=overwrite,
                                fetch_shard=fetch_shard, release_shard=release_shard)
    finally:
        if uploader is not None:
            uploader.close()
    if uploader is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
        summary["output"] = output_uri
        summary["uploaded"] = uploader.uploaded
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entrypoints.merge", description=__doc__.split("\n\n")[1])
    p.add_argument("--adapter", required=True, help="adapter directory: s3:// prefix or local path")
    p.add_argument("--base", required=True, help="16-bit base model directory (safetensors): s3:// prefix or local path")
    p.add_argument("--output", required=True, help="where the merged model goes: s3:// prefix or local directory")
    p.add_argument("--merge-into", default=DEFAULT_MERGE_INTO, choices=MERGE_INTO_CHOICES,
                   help=f"base the delta is added to (default {DEFAULT_MERGE_INTO}; see MERGE.md)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="the adapter was trained without double quantization (nf4/fp4 only)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default: the base's own shard layout")
    p.add_argument("--work-dir", default=None, help="scratch space for downloads (default: a temporary directory)")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("QLORA_S3_ENDPOINT_URL", ""),
                   help="S3-compatible endpoint (default: $QLORA_S3_ENDPOINT_URL, else AWS)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already at --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run() -> None:
        with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
            work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
            summary = run_merge(args.adapter, args.base, args.output, work_dir=work_dir,
                                merge_into=args.merge_into, double_quant=args.double_quant,
                                max_shard_size=args.max_shard_size, endpoint_url=args.s3_endpoint_url,
                                overwrite=args.overwrite, device=args.device)
        print(json.dumps(summary, indent=2))

    return run_guarded(run, lambda: None)
