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


def test_the_best_checkpoint_is_restored_with_the_newest_and_named_where_it_now_is(s3_env, tmp_path):
    """With periodic eval the result is the best evaluated checkpoint: a restore that brought only the newest made
    the resumed run publish its last adapter (the Trainer drops a best checkpoint whose saved path is missing)."""
    server, bucket = s3_env
    uri = f"s3://{bucket}/ckpt"
    elsewhere = "/opt/ml/checkpoints"  # where the first machine saved them
    for step in (1, 2, 3):
        local = tmp_path / "src" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "adapter_model.safetensors").write_bytes(b"x" * step)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                              "best_model_checkpoint": f"{elsewhere}/checkpoint-1"}))
        mark_complete(local, step, {"run": "mine"})
        checkpoints.mirror_to_uri(local, uri, server.endpoint)
    target = tmp_path / "ckpt"
    restored = checkpoints.restore_from_uri(uri, target, server.endpoint, {"run": "mine"})
    assert restored == target / "checkpoint-3"
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-1", "checkpoint-3"]  # not checkpoint-2
    assert latest_complete(target, {"run": "mine"}) == restored
    checkpoints.localize_best(restored)
    state = json.loads((restored / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(target / "checkpoint-1") and state["global_step"] == 3
