"""Checkpoints restored from QLORA_CHECKPOINT_URI on the real S3 server: only this run's."""

from __future__ import annotations

import json

from entrypoints import checkpoints
from entrypoints.checkpoints import latest_complete, mark_complete


def test_only_a_remote_checkpoint_of_this_run_is_restored(s3_env, tmp_path):
    server, bucket = s3_env
    uri = f"s3://{bucket}/ckpt"
    for step, fingerprint in ((2, {"run": "mine"}), (4, {"run": "another"})):
        local = tmp_path / "src" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "adapter_model.safetensors").write_bytes(b"x" * step)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        mark_complete(local, step, fingerprint)
        checkpoints.mirror_to_uri(local, uri, server.endpoint)
    target = tmp_path / "ckpt"
    restored = checkpoints.restore_from_uri(uri, target, server.endpoint, {"run": "mine"})
    assert restored == target / "checkpoint-2"  # the newer checkpoint-4 belongs to another run
    assert latest_complete(target, {"run": "mine"}) == restored
    assert checkpoints.restore_from_uri(uri, tmp_path / "none", server.endpoint, {"run": "third"}) is None
