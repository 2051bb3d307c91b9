"""Outputs on a local directory: manifest-last publishing, the manifest's file list, the model card.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_outputs.py
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from entrypoints import outputs, storage
from entrypoints.config import JobConfig
from entrypoints.errors import OutputExistsError, StorageError
from entrypoints.outputs import MANIFEST, OutputClaim, OutputTarget, Publisher, build_manifest, write_model_card


def _stage(tmp_path: Path, name: str = "stage") -> Path:
    stage = tmp_path / name
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (stage / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (stage / "merged").mkdir()
    (stage / "merged" / "model.safetensors").write_bytes(b"merged" * 100)
    return stage


def _publish(tmp_path: Path, stage: Path, output: Path, mode: str = "error") -> tuple[str, dict]:
    cfg = JobConfig(data="x", output=str(output), output_exists=mode, run_name="unit")
    claim = OutputClaim(str(output), mode)
    target = claim.acquire()
    try:
        publisher = Publisher(stage, target, "", claim)
        publisher.submit(stage / "adapter" / "adapter_model.safetensors")  # as the job does while it merges
        write_model_card(stage, cfg, {"eval_loss_after": 0.5, "global_step": 3}, [], has_merged=True)
        manifest = build_manifest(stage, cfg, {"metrics": {"global_step": 3}})
        return publisher.finish(manifest), manifest
    finally:
        claim.release()


def test_the_manifest_is_written_last_and_lists_every_file_with_its_sha256(tmp_path, monkeypatch):
    stage, output = _stage(tmp_path), tmp_path / "out"
    written: list[str] = []
    lock = threading.Lock()
    real_upload, real_put_if = storage.upload_file, storage.put_if

    def upload(local, uri, **kw):  # records the order, then does the real copy
        with lock:
            written.append(Path(uri).relative_to(output).as_posix())
        return real_upload(local, uri, **kw)

    def put_if(uri, text, **kw):
        if uri.endswith(MANIFEST):
            with lock:
                written.append(MANIFEST)
        return real_put_if(uri, text, **kw)

    monkeypatch.setattr(storage, "upload_file", upload)
    monkeypatch.setattr(storage, "put_if", put_if)
    manifest_uri, manifest = _publish(tmp_path, stage, output)
    assert manifest_uri == str(output / MANIFEST)
    assert written[-1] == MANIFEST and sorted(written[:-1]) == sorted(
        ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/model.safetensors"])
    on_disk = json.loads((output / MANIFEST).read_text())
    assert on_disk["complete"] is True and on_disk["format"] == outputs.MANIFEST_FORMAT and on_disk["run"]["id"]
    for entry in on_disk["files"]:
        data = (output / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    card = (output / "README.md").read_text()
    assert card.startswith("---\nbase_model: meta-llama/Llama-2-7b-hf") and "| eval_loss_after | 0.5000 |" in card
    assert "`merged/`" in card


def test_a_failed_upload_publishes_no_manifest(tmp_path, monkeypatch):
    stage, output = _stage(tmp_path), tmp_path / "out"
    real_upload = storage.upload_file

    def upload(local, uri, **kw):
        if uri.endswith("model.safetensors") and "merged" in uri:
            raise StorageError(f"could not upload {uri}: the test refuses it")
        return real_upload(local, uri, **kw)

    monkeypatch.setattr(storage, "upload_file", upload)
    with pytest.raises(StorageError, match="the test refuses it"):
        _publish(tmp_path, stage, output)
    assert not (output / MANIFEST).exists()  # a reader never takes the partial output for a result


def test_delete_uploaded_frees_each_file_once_uploaded_and_stops_at_a_failed_upload(tmp_path, monkeypatch):
    """The merge CLI's publisher: local disk holds only what is not uploaded yet, files arrive in the order they were
    submitted (the index last), close() writes no manifest, and a failed upload stops the next submit, since the files
    after it would never be uploaded nor deleted."""
    stage, output = tmp_path / "merged", tmp_path / "out"
    stage.mkdir()
    target = OutputTarget(str(output), str(output), versioned=False, replaces_existing=False)
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json"]
    publisher = Publisher(stage, target, "", delete_uploaded=True)
    for name in names:
        (stage / name).write_text(name)
        publisher.submit(stage / name)
    publisher.close()
    assert publisher.uploaded == names and not list(stage.iterdir())
    assert sorted(p.name for p in output.iterdir()) == sorted(names) and (output / names[1]).read_text() == names[1]

    def refuse(local, uri, **kw):
        raise StorageError(f"could not upload {uri}: the test refuses it")

    monkeypatch.setattr(storage, "upload_file", refuse)
    failing = Publisher(stage, target, "", delete_uploaded=True)
    (stage / "first").write_text("1")
    failing.submit(stage / "first")
    deadline = time.monotonic() + 10
    while not failing.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    (stage / "second").write_text("2")
    with pytest.raises(StorageError, match="the test refuses it"):
        failing.submit(stage / "second")
    with pytest.raises(StorageError, match="the test refuses it"):
        failing.close()
    assert (stage / "first").is_file() and failing.uploaded == [] and not (output / MANIFEST).exists()


def test_a_result_is_refused_then_replaced_leaving_exactly_the_new_files(tmp_path):
    output = tmp_path / "out"
    _publish(tmp_path, _stage(tmp_path), output)
    with pytest.raises(OutputExistsError, match="already holds a complete result"):
        _publish(tmp_path, _stage(tmp_path, "again"), output)
    smaller = tmp_path / "stage2"
    (smaller / "adapter").mkdir(parents=True)
    (smaller / "adapter" / "adapter_model.safetensors").write_bytes(b"new")
    (smaller / "adapter" / "adapter_config.json").write_text("{}")
    _publish(tmp_path, smaller, output, mode="overwrite")
    listed = {f["path"] for f in json.loads((output / MANIFEST).read_text())["files"]} | {MANIFEST}
    present = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert present == listed and not (output / "merged").exists()


def test_the_manifest_is_as_readable_as_the_files_it_lists(tmp_path):
    """A local manifest.json (and latest.json) came out 0600 (mkstemp's mode): a reader running as another user could
    see every file of the result but not the marker that says it is complete."""
    import os
    import stat

    output = tmp_path / "out"
    old = os.umask(0o022)
    try:
        _publish(tmp_path, _stage(tmp_path), output)
    finally:
        os.umask(old)
    assert stat.S_IMODE((output / MANIFEST).stat().st_mode) == 0o644
    assert stat.S_IMODE((output / "README.md").stat().st_mode) == 0o644
