"""Small steps of the job (entrypoints/train.py): directory locks, the job's identity for output claims.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_job_steps.py
"""

from __future__ import annotations

import pytest

from entrypoints.config import JobConfig
from entrypoints.errors import ConfigError
from entrypoints.train import job_identity, lock_local_dirs, release_local_dirs


def test_one_lock_when_the_checkpoint_directory_is_the_work_directory(tmp_path):
    """QLORA_CHECKPOINT_DIR=<base>/work locked the same file twice and refused the job as "in use by another job"
    naming its own pid."""
    cfg = JobConfig(data="x", base_dir=str(tmp_path), checkpoint_dir=str(tmp_path / "work"))
    try:
        lock_local_dirs(cfg)
    finally:
        release_local_dirs()
    other = JobConfig(data="x", base_dir=str(tmp_path / "b"))
    lock_local_dirs(other)
    try:
        with pytest.raises(ConfigError, match="is in use by another job"):
            with open(tmp_path / "b" / "work" / ".qlora-job.lock", "a+") as held:
                import fcntl

                release_local_dirs()  # this process's own lock released ...
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ... and taken by "another job"
                lock_local_dirs(other)
    finally:
        release_local_dirs()


def test_the_job_identity_survives_a_restart_and_differs_between_jobs():
    cfg = JobConfig(data="x", checkpoint_uri="s3://b/ckpt/job-1")
    assert job_identity(cfg, {"TRAINING_JOB_NAME": "qlora-1"}) == "sagemaker-job:qlora-1"
    assert job_identity(cfg, {}) == "checkpoints:s3://b/ckpt/job-1"
    assert job_identity(JobConfig(data="x"), {}) == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_every_setting_and_exits_0(flag, capsys, tmp_path, monkeypatch):
    """`python -m entrypoints.train --help` was a configuration error ("--help needs a value")."""
    from entrypoints.config import FIELDS, cli_name, env_name
    from entrypoints.train import main

    monkeypatch.setenv("QLORA_BASE_DIR", str(tmp_path))
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m entrypoints.train")
    assert all(cli_name(n) in out and env_name(n) in out for n in FIELDS)
    assert not (tmp_path / "output" / "failure").exists()


def test_a_flag_that_is_not_a_setting_says_what_to_write(capsys, tmp_path, monkeypatch, restore_signals):
    from entrypoints.errors import EXIT_CONFIG
    from entrypoints.train import main

    monkeypatch.setenv("QLORA_BASE_DIR", str(tmp_path))
    assert main(["--data", "s3://b/d", "--no-merge", "--max-steps"]) == EXIT_CONFIG
    failure = (tmp_path / "output" / "failure").read_text()
    assert "--no-merge (write --merge false) is not a known setting" in failure
    assert "--max-steps needs a value, e.g. --max-steps 100" in failure
