"""Builds the real image from ./Dockerfile with buildah and runs its checks and the demo inside it (slow).

    PYTHONPATH=$PWD python -m pytest -m slow tests/integration/test_container_build.py

Needs root, `buildah` and `debootstrap` (Debian packages) and the package index; takes 15-30 minutes and
about 40 GB of disk with buildah's vfs driver. Excluded from the default CI run (`-m "not slow"`); see
container/README.md for when it runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_image_builds_and_runs_the_job_as_uid_1000():
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("debootstrap"):
        pytest.skip("needs root and `apt-get install -y buildah debootstrap`")
    out = subprocess.run(["bash", str(REPO / "container" / "build-local.sh")], cwd=REPO, capture_output=True,
                         text=True, timeout=3 * 3600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "ok: gcc for Triton, no other build tool, no pip/apt cache, no build sources" in log
    assert "ok: Triton built /tmp/" in log
    assert "ok: read-only root, uid 1000 - Triton built /tmp/" in log
    assert "ok: loaded libbitsandbytes_cuda128.so" in log
    assert '"run_as": "1000:1000"' in log
    if importlib.util.find_spec("entrypoints.train"):
        assert "ok: the job ran as uid 1000" in log
    if importlib.util.find_spec("entrypoints.demo"):
        assert "== the demo, inside the image" in log
