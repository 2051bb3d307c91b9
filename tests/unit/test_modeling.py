"""Model resolution: local directories, unsafe or incomplete model directories (Hub ids: tests/integration/test_hub.py)."""

import pytest

from entrypoints.config import parse_config
from entrypoints.errors import ModelError
from entrypoints.modeling import check_model_dir, resolve_model


def _cfg(tmp_path, **env):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return parse_config({"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), **env})


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
    with pytest.raises(ModelError, match="model.safetensors: not a valid safetensors file"):
        check_model_dir(d, allow_pickle=False)  # an empty (or cut) weight file is never loaded
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    check_model_dir(d, allow_pickle=False)


def test_a_truncated_or_unreadable_safetensors_file_is_a_model_error_naming_it(tmp_path):
    import torch
    from safetensors.torch import save_file

    from entrypoints.modeling import check_safetensors_file

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    check_safetensors_file(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"cut.safetensors: the file is truncated: [\d,]+ bytes where its header declares"):
        check_safetensors_file(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="junk.safetensors: not a valid safetensors file"):
        check_safetensors_file(junk)


def test_training_that_changed_nothing_or_diverged_is_not_published():
    """The last line of defence against publishing the base model as a result (every step at learning rate 0, no
    loss token) or a diverged one: LoRA's B matrices start at zero, so an unchanged adapter is all-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrypoints.config import JobConfig
    from entrypoints.errors import ConfigError
    from entrypoints.trainer import check_trained

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=100)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    cfg = JobConfig(data="x")
    with pytest.raises(ConfigError, match="training changed nothing: after 3 optimizer step"):
        check_trained(model, {"global_step": 3, "train_loss": 2.5}, cfg)
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        b[0, 0] = 0.01
    check_trained(model, {"global_step": 3, "train_loss": 2.5}, cfg)
    check_trained(model, {"global_step": 3, "train_loss": None}, cfg)  # resumed at the final step
    with pytest.raises(ConfigError, match="training diverged: the loss is nan"):
        check_trained(model, {"global_step": 3, "train_loss": float("nan")}, cfg)
    with torch.no_grad():
        b[0, 1] = float("inf")
    with pytest.raises(ConfigError, match="non-finite values"):
        check_trained(model, {"global_step": 3, "train_loss": 2.5}, cfg)
