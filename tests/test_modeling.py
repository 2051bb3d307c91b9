"""Model resolution: local directories, Hub ids without a hub, unsafe or incomplete model directories."""

import pytest

from entrypoints.config import parse_config
from entrypoints.errors import ModelError
from entrypoints.modeling import check_model_dir, resolve_model


def _cfg(tmp_path, **env):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return parse_config({"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), **env})


def test_hub_id_without_hub_access_is_a_clear_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(tmp_path, QLORA_MODEL="meta-llama/Llama-2-7b-hf")
    with pytest.raises(ModelError, match="could not download meta-llama/Llama-2-7b-hf|not found on the Hub"):
        resolve_model(cfg, tmp_path / "work", hf_token=None)


def test_not_a_model_reference(tmp_path):
    with pytest.raises(ModelError, match="is not a local directory, an s3:// prefix or a Hub id"):
        resolve_model(_cfg(tmp_path, QLORA_MODEL="not a model"), tmp_path, hf_token=None)


def test_model_dir_checks(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        check_model_dir(d, allow_pickle=False)
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files"):
        check_model_dir(d, allow_pickle=False)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match="only pickle weights .* QLORA_ALLOW_PICKLE_WEIGHTS=true"):
        check_model_dir(d, allow_pickle=False)
    check_model_dir(d, allow_pickle=True)  # allowed explicitly (with a warning)
    (d / "model.safetensors").write_bytes(b"")
    check_model_dir(d, allow_pickle=False)
