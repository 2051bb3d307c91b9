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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from entrypoints import storage
from entrypoints.errors import ModelError, OutputExistsError, run_guarded
from entrypoints.merge.core import DEFAULT_MERGE_INTO, MERGE_INTO_CHOICES, merge_adapter
from entrypoints.merge.layout import INDEX_NAME, SINGLE_NAME
from entrypoints.outputs import OutputTarget, Publisher


def run_merge(adapter_uri: str, base_uri: str, output_uri: str, *, work_dir: Path, merge_into: str,
              double_quant: bool, max_shard_size: str | None, endpoint_url: str, overwrite: bool,
              device: str) -> dict:
    """The standalone job: resolve inputs -> check output -> merge (uploading each file) -> report."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_output(output_uri, endpoint_url, overwrite)
    for flag, uri in (("--adapter", adapter_uri), ("--base", base_uri)):
        _check_input(flag, uri, endpoint_url)
    adapter_dir = storage.fetch(adapter_uri, work_dir / "adapter", endpoint_url=endpoint_url)
    fetch_shard = release_shard = None
    if storage.is_s3(base_uri):
        remote = _RemoteBase.stage(base_uri, work_dir / "base", endpoint_url)
        base_dir, fetch_shard, release_shard = remote.dir, remote.fetch_shard, remote.release_shard
    else:
        base_dir = storage.fetch(base_uri, work_dir / "base", endpoint_url=endpoint_url)

    out_dir, publisher = Path(output_uri), None
    if storage.is_s3(output_uri):
        # Each file is uploaded while the next shard is merged and deleted once uploaded; the index comes last.
        out_dir = Path(tempfile.mkdtemp(prefix="merged-", dir=work_dir))
        target = OutputTarget(output_uri, output_uri, versioned=False, replaces_existing=False)
        publisher = Publisher(out_dir, target, endpoint_url, delete_uploaded=True)
    try:
        summary = merge_adapter(base_dir, Path(adapter_dir), out_dir, merge_into=merge_into,
                                on_file_written=publisher.submit if publisher else None, double_quant=double_quant,
                                max_shard_size=max_shard_size, device=device, overwrite=overwrite,
                                fetch_shard=fetch_shard, release_shard=release_shard)
    finally:
        if publisher is not None:
            publisher.close()
    if publisher is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
        summary["output"] = output_uri
        summary["uploaded"] = publisher.uploaded
    return summary


def _check_input(flag: str, uri: str, endpoint_url: str) -> None:
    """A missing adapter or base is a model error (exit 4: fix the argument), not a storage error (exit 5, which says
    a retry may help): an empty s3:// prefix is named as plainly as a missing local directory. An unreachable or
    forbidden bucket stays a storage error (raised by the listing)."""
    missing = not storage.list_objects(uri, endpoint_url=endpoint_url) if storage.is_s3(uri) else not Path(uri).exists()
    if missing:
        where = "nothing is stored under this prefix" if storage.is_s3(uri) else "no such directory"
        raise ModelError(f"{flag} {uri}: {where}; pass the directory (or s3:// prefix) that holds it")


def _check_output(output_uri: str, endpoint_url: str, overwrite: bool) -> None:
    """An s3:// output must be writable, and hold no merged model unless --overwrite."""
    if not storage.is_s3(output_uri):
        return  # merge_adapter checks a local output
    storage.check_bucket(output_uri, endpoint_url=endpoint_url)
    done = storage.read_text(storage.join(output_uri, INDEX_NAME), endpoint_url=endpoint_url)
    if done is not None and not overwrite:
        raise OutputExistsError(f"{output_uri} already holds a merged model ({INDEX_NAME}): choose another"
                                " output or pass --overwrite")


@dataclass
class _RemoteBase:
    """An s3:// base: its small files are downloaded at once, each weight shard just before it is merged (and
    deleted once it has been read)."""

    uri: str
    dir: Path
    shards: dict[str, storage.ObjectInfo]  # file name -> the listed object
    endpoint_url: str

    @classmethod
    def stage(cls, base_uri: str, base_dir: Path, endpoint_url: str) -> _RemoteBase:
        objects = storage.list_objects(base_uri, endpoint_url=endpoint_url)
        if not objects:
            raise ModelError(f"nothing found at {base_uri}: pass the prefix holding the base model's files")
        shards = {o.relative: o for o in objects if o.relative.endswith(".safetensors") and "/" not in o.relative}
        for obj in objects:
            if obj.relative not in shards and "/" not in obj.relative:
                storage.download_file(obj.uri, base_dir / obj.relative, size=obj.size, endpoint_url=endpoint_url)
        if not shards:
            pickles = [o.relative for o in objects if o.relative.endswith((".bin", ".pt"))]
            hint = f" (found pickle weights {pickles[:3]}: convert them to safetensors first)" if pickles else ""
            raise ModelError(f"{base_uri} has no *.safetensors{hint}")
        if SINGLE_NAME in shards and not (base_dir / INDEX_NAME).is_file():
            obj = shards[SINGLE_NAME]  # one file: its header is needed for the checks, fetch it now
            storage.download_file(obj.uri, base_dir / SINGLE_NAME, size=obj.size, endpoint_url=endpoint_url)
        return cls(base_uri, base_dir, shards, endpoint_url)

    def fetch_shard(self, name: str) -> Path:
        if name not in self.shards:
            raise ModelError(f"{INDEX_NAME} at {self.uri} lists {name}, which is not there: re-upload the base")
        obj = self.shards[name]
        return storage.download_file(obj.uri, self.dir / name, size=obj.size, endpoint_url=self.endpoint_url)

    @staticmethod
    def release_shard(path: Path) -> None:
        path.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entrypoints.merge", description=__doc__.split("\n\n")[1])
    p.add_argument("--adapter", required=True, help="adapter directory: s3:// prefix or local path")
    p.add_argument("--base", required=True, help="base model directory (safetensors: 16-bit, or bitsandbytes 4-bit,"
                                                 " whose stored weights are dequantized): s3:// prefix or local path")
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
