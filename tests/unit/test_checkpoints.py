"""Which checkpoint a run may resume from: content fingerprints, the run fingerprint, remote restores.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_checkpoints.py
"""

from __future__ import annotations

import json
import os

import pytest

from entrypoints import checkpoints
from entrypoints.checkpoints import content_sha256, latest_complete, mark_complete, model_files, run_fingerprint
from entrypoints.errors import ConfigError


def test_content_sha256_follows_the_bytes_not_the_name_or_size(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    f = data / "train.jsonl"
    f.write_text('{"text": "aaaa"}\n')
    cache = tmp_path / "cache.json"
    first = content_sha256([f], data, cache)
    assert first == content_sha256([f], data, cache) == content_sha256([f], data)  # cached or not: the same
    stat = f.stat()
    f.write_text('{"text": "bbbb"}\n')  # same size, other content
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert content_sha256([f], data, cache) != first
    assert str(f.resolve()) in json.loads(cache.read_text())
    other = data / "sub" / "train.jsonl"  # the same bytes under another relative name are other data
    other.parent.mkdir()
    other.write_text('{"text": "bbbb"}\n')
    assert content_sha256([other], data) != content_sha256([f], data)


def test_model_files_leave_out_what_does_not_change_the_model(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "LICENSE.txt", ".gitattributes"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in model_files(tmp_path)] == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_checkpoint_of_other_content_or_batch_layout_is_refused(tmp_path):
    settings = {"lora_r": 8, "seed": 1, "max_steps": 10}
    mine = run_fingerprint(settings, {"data_sha256": "a" * 64, "model_sha256": "b" * 64, "eval_data_sha256": None},
                           {"rows": 2, "accumulation": 4, "processes": 1})
    assert "max_steps" not in mine and mine["batch_rows"] == 2 and "eval_data_sha256" not in mine
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    mark_complete(ckpt, 4, mine)
    assert latest_complete(tmp_path, mine) == ckpt
    for changed in ({"data_sha256": "c" * 64}, {"batch_processes": 2}, {"batch_rows": 1}):
        with pytest.raises(ConfigError, match=f"({next(iter(changed))}) differ"):
            latest_complete(tmp_path, {**mine, **changed})
    old = tmp_path / "old"
    (old / "checkpoint-2").mkdir(parents=True)
    mark_complete(old / "checkpoint-2", 2, None)  # written by a job that recorded no fingerprint
    with pytest.raises(ConfigError, match="records no settings fingerprint"):
        latest_complete(old, mine)


def test_resume_off_starts_over_in_place(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    mark_complete(tmp_path / "checkpoint-3", 3, {"x": 1})
    (tmp_path / "notes.txt").write_text("kept")
    checkpoints.clear_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


