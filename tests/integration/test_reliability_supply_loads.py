"""Supply-chain safety with real model loads: pickles next to safetensors, remote code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from entrypoints.config import parse_config
from entrypoints.demo.assets import tiny_llama2
from entrypoints.errors import ModelError
from entrypoints.modeling import check_model_dir, load_model, load_tokenizer

from ..unit.test_reliability_supply import data_dir


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
