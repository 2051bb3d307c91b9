"""Supply-chain and runtime safety: safetensors only, no remote code unless asked, non-root read-only pods.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_reliability_supply.py

The model checks use real model directories: a pickle-only one, and one whose config asks transformers to
import code shipped with the model (that code would drop a marker file if it ever ran). The Kubernetes
checks read the shipped kustomize manifests (infra/kubernetes); the launcher's generated manifests are
checked the same way in tests/integration/test_launch_kubernetes.py. The image's non-root user and the hashed lock file
are the container's own tests (tests/test_container*.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from entrypoints.config import FIELDS
from entrypoints.errors import ModelError
from entrypoints.modeling import check_model_dir

REPO = Path(__file__).resolve().parents[2]


def data_dir(tmp_path: Path) -> Path:
    """A data directory of its own: the job's base dir (and its outputs) may not lie inside the data."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text('{"text": "x"}\n')
    return folder


def test_safety_defaults():
    assert FIELDS["trust_remote_code"].default is False
    assert FIELDS["allow_pickle_weights"].default is False


def test_pickle_weights_refused_by_default_and_allowed_with_a_warning(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelError, match="pickle files can run arbitrary code"):
        check_model_dir(tmp_path, allow_pickle=False)
    with caplog.at_level(logging.WARNING, logger="qlora.model"):
        check_model_dir(tmp_path, allow_pickle=True)
    assert "loading PICKLE weights" in caplog.text


def _pod_specs(doc: dict) -> list[dict]:
    if doc.get("kind") == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc.get("kind") == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def test_shipped_kubernetes_manifests_run_non_root_on_a_read_only_root():
    pods = []
    for path in sorted((REPO / "infra" / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                pods += [(path.name, spec) for spec in _pod_specs(doc)]
    assert {name for name, _ in pods} >= {"job.yaml", "cronjob.yaml"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        mounts = set()
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            mounts |= {m["mountPath"] for m in container["volumeMounts"]}
        # The writable scratch the job needs on a read-only root: /opt/ml (data, model, checkpoints), /tmp.
        assert {"/opt/ml", "/tmp"} <= mounts, (name, mounts)
        assert pod["terminationGracePeriodSeconds"] >= 120, name  # time to save a checkpoint after SIGTERM
