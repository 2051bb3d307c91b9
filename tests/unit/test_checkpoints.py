"""Which checkpoint a run may resume from: content fingerprints, the run fingerprint, remote restores.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_checkpoints.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from entrypoints import checkpoints
from entrypoints.checkpoints import content_sha256, latest_complete, mark_complete, model_files, run_fingerprint
from entrypoints.errors import ConfigError


def complete(path, step: int, fingerprint, total: int | None = None):
    """A checkpoint as the Trainer leaves it (its state and adapter), marked complete."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(b"x" * step)
    mark_complete(path, step, fingerprint, total)
    return path


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
    ckpt = complete(tmp_path / "checkpoint-4", 4, mine)
    assert latest_complete(tmp_path, mine) == ckpt
    for changed in ({"data_sha256": "c" * 64}, {"batch_processes": 2}, {"batch_rows": 1}):
        with pytest.raises(ConfigError, match=f"({next(iter(changed))}) differ"):
            latest_complete(tmp_path, {**mine, **changed})
    old = tmp_path / "old"
    complete(old / "checkpoint-2", 2, None)  # written by a job that recorded no fingerprint
    with pytest.raises(ConfigError, match="records no settings fingerprint"):
        latest_complete(old, mine)


def test_resume_off_starts_over_in_place(tmp_path):
    complete(tmp_path / "checkpoint-3", 3, {"x": 1})
    (tmp_path / "notes.txt").write_text("kept")
    checkpoints.clear_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]




def test_a_marker_without_the_files_it_vouches_for_is_not_a_checkpoint(tmp_path):
    """A restore from QLORA_CHECKPOINT_URI interrupted after the marker arrived (S3 lists COMPLETE first) left a
    checkpoint every rerun failed on; it is incomplete, ignored and removed, and the older one is resumed."""
    older = complete(tmp_path / "checkpoint-2", 2, {"x": 1})
    partial = tmp_path / "checkpoint-4"
    partial.mkdir()
    mark_complete(partial, 4, {"x": 1})
    assert latest_complete(tmp_path, {"x": 1}) == older
    checkpoints.remove_incomplete(tmp_path)
    assert not partial.exists() and older.exists()
    assert checkpoints.checkpoint_total_steps(complete(tmp_path / "checkpoint-6", 6, {"x": 1}, total=10)) == 10


def test_a_swallowed_interrupt_is_raised_again_until_the_job_stops(tmp_path):
    """A SIGTERM that lands while datasets forks its worker pool raises inside logging's after-fork hook, which
    ignores exceptions: the job tokenized on, loaded, evaluated and trained for a minute. The flag signals again
    until the job acknowledges the stop."""
    import subprocess
    import sys
    import time

    script = tmp_path / "swallow.py"
    script.write_text(
        "import sys, time\n"
        "from entrypoints.checkpoints import StopFlag\n"
        "stop = StopFlag()\nstop.RESIGNAL_SECONDS = 0.3\nstop.install()\n"
        "try:\n    print('ready', flush=True)\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
        "    pass  # swallowed, as a library might\n"
        "print('swallowed', flush=True)\n"
        "try:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('raised again', flush=True)\n    sys.exit(75)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(15)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 75 and "swallowed" in out and "raised again" in out, out
    assert time.monotonic() - started < 10
