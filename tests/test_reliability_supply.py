"""Supply-chain and runtime safety: safetensors only, no remote code unless asked, non-root read-only pods.

    PYTHONPATH=$PWD python -m pytest tests/test_reliability_supply.py

The model checks use real model directories: a pickle-only one, and one whose config asks transformers to
import code shipped with the model (that code would drop a marker file if it ever ran). The Kubernetes
checks read the shipped kustomize manifests (infra/kubernetes); the launcher's generated manifests are
checked the same way in tests/test_launch_kubernetes.py. The image's non-root user and the hashed lock file
are the container's own tests (tests/test_container*.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from entrypoints.config import FIELDS, parse_config
from entrypoints.demo.assets import tiny_llama2
from entrypoints.errors import ModelError
from entrypoints.modeling import check_model_dir, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.integration
def test_pickle_next_to_safetensors_is_never_loaded(tmp_path, cache_dir):
    """With safetensors present the loader is pinned to them (use_safetensors=True): a booby-trapped .bin
    beside them is not touched."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama2(cache_dir), model)
    marker = tmp_path / "pickle-ran"
    # A pickle that creates the marker file when unpickled.
    import pickle

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    cfg = parse_config({"QLORA_DATA": str(data_dir(tmp_path)), "QLORA_BASE_DIR": str(tmp_path / "opt-ml"),
                        "QLORA_QUANTIZATION": "none"})
    check_model_dir(model, cfg.allow_pickle_weights)
    load_model(model, cfg)
    assert not marker.exists()


@pytest.mark.integration
def test_remote_code_is_not_run_unless_allowed(tmp_path, cache_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama2(cache_dir), model)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel",
                          "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (model / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    cfg = parse_config({"QLORA_DATA": str(data_dir(tmp_path)), "QLORA_BASE_DIR": str(tmp_path / "opt-ml"),
                        "QLORA_QUANTIZATION": "none"})
    assert cfg.trust_remote_code is False
    try:
        load_tokenizer(model, cfg)
        load_model(model, cfg)
    except ModelError:
        pass  # refusing is fine; running the code is not
    assert not marker.exists()


def _pod_specs(doc: dict) -> list[dict]:
    if doc.get("kind") == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc.get("kind") == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def test_shipped_kubernetes_manifests_run_non_root_on_a_read_only_root():
    pods = []
    for path in sorted((REPO / "infra" / "kubernetes").glob("*.yaml")):
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
