"""Pre-quantized (bitsandbytes 4-bit) base models: loaded as stored, trained, merged by dequantizing; clear refusals.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_prequantized.py

The checkpoint is the tiny model saved by transformers after loading it in nf4 (the form of the published
`*-bnb-4bit` repositories; conftest's `tiny_model_nf4`). The job runs for real: against the S3 server once, in-process
for the refusals (which stop before training).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from entrypoints import bnb4bit, sizing, storage, train  # noqa: E402
from entrypoints.config import parse_config  # noqa: E402
from entrypoints.errors import EXIT_CONFIG, EXIT_MODEL  # noqa: E402

from ..jobrun import job_env, jsonl, run_job  # noqa: E402
from ..results import tensors_of  # noqa: E402
from .test_bad_input import _job_environment  # noqa: E402

RECORDS = [{"instruction": f"What is code {i}?", "input": "", "output": f"Code {i} is {i * 7 % 13}."} for i in range(24)]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
BF16_TOLERANCE = {"rtol": 2**-7, "atol": 1e-6}  # one bf16 rounding step


def dequantized_reference(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload on the pre-quantized base dequantized by transformers (float32): the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    four_bit = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": "cpu"})
    dequantized = four_bit.dequantize(dtype=torch.float32)
    return PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload().state_dict()


# ------------------------------------------------------------------------------------------- loading
def test_loaded_as_stored_in_the_jobs_form(tiny_model_nf4, tmp_path):
    """The stored 4-bit values are the model's (byte for byte: nothing is quantized again), kept in the compute dtype
    as the job keeps the weights it quantizes itself (FSDP shards them like any tensor), computing in the job's
    dtype; the settings are the checkpoint's."""
    from entrypoints.modeling import load_model, settings_for_checkpoint

    cfg = settings_for_checkpoint(parse_config({}, ["--model", str(tiny_model_nf4), "--data", "x.jsonl",
                                                    "--quantization", "nf4", "--base-dir", str(tmp_path)],
                                               check_paths=False), tiny_model_nf4)
    assert (cfg.quantization, cfg.double_quant) == ("nf4", True)
    model = load_model(tiny_model_nf4, cfg)
    stored = tensors_of(tiny_model_nf4)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 14
    for name, module in layers:
        weight = module.weight
        assert weight.dtype == torch.bfloat16 and weight.quant_storage == torch.bfloat16, name
        assert module.compute_dtype == torch.bfloat16
        assert torch.equal(weight.data.view(torch.uint8).reshape(-1), stored[f"{name}.weight"].reshape(-1)), name
        assert torch.equal(weight.quant_state.absmax, stored[f"{name}.weight.absmax"]), name
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_storage == torch.bfloat16


def test_settings_not_given_are_taken_from_the_checkpoint(tiny_model_nf4, tmp_path, caplog):
    """QLORA_QUANTIZATION and QLORA_DOUBLE_QUANT left at their defaults take the stored form (one log line); the
    other settings stay as they were, and where each came from too."""
    from entrypoints.modeling import settings_for_checkpoint

    config = json.loads((tiny_model_nf4 / "config.json").read_text())
    config["quantization_config"] |= {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = parse_config({"QLORA_LORA_R": "8"}, ["--model", str(tmp_path), "--data", "x.jsonl"], check_paths=False)
    with caplog.at_level("INFO", logger="qlora.model"):
        effective = settings_for_checkpoint(cfg, tmp_path)
    assert (effective.quantization, effective.double_quant, effective.lora_r) == ("fp4", False, 8)
    assert effective.source_of("lora_r") == "QLORA_LORA_R"
    assert "taken from the checkpoint: quantization=fp4, double_quant=false" in caplog.text


# ------------------------------------------------------------------------------------------- the job
def test_job_trains_and_merges_a_prequantized_base_from_s3(s3_env, tiny_model_nf4, tmp_path):
    server, bucket = s3_env
    storage.upload_tree(tiny_model_nf4, f"s3://{bucket}/models/tiny-bnb-4bit", endpoint_url=server.endpoint)
    data = jsonl(tmp_path / "train.jsonl", RECORDS)
    env = job_env(tmp_path, **server.env(), **{
        "QLORA_MODEL": f"s3://{bucket}/models/tiny-bnb-4bit", "QLORA_DATA": str(data),
        "QLORA_OUTPUT": f"s3://{bucket}/out/pq", "QLORA_S3_ENDPOINT_URL": server.endpoint,
        "QLORA_MAX_STEPS": "2", "QLORA_MICRO_BATCH_SIZE": "4", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
        "QLORA_EVAL_FRACTION": "0", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_REPORT_TO": "none",
        "QLORA_LEARNING_RATE": "1e-3", "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16",
    })
    result = run_job(env)
    assert result.code == 0, result.output[-4000:]
    assert "pre-quantized base (bitsandbytes nf4, double quantization on): its 4-bit weights are loaded as stored" \
        in result.output
    # transformers' warning when a quantization config is passed for a checkpoint that has one: nothing was passed.
    assert "already has a `quantization_config`" not in result.output

    out = storage.fetch(f"s3://{bucket}/out/pq/", tmp_path / "got", endpoint_url=server.endpoint)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["stored_quantization"] == {"quant_method": "bitsandbytes", "quant_type": "nf4",
                                                             "double_quant": True}
    assert manifest["base_model"]["name"] == f"s3://{bucket}/models/tiny-bnb-4bit"
    assert manifest["metrics"]["merge"]["weights_dequantized"] == 14
    card = (out / "README.md").read_text()
    assert "a pre-quantized checkpoint (bitsandbytes nf4, double quantization on)" in card
    assert "merged into the dequantized 4-bit weights" in card

    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "bfloat16"
    merged = tensors_of(out / "merged")
    assert not [k for k in merged if bnb4bit.QUANT_STATE in k or k.endswith(".absmax")]
    reference = dequantized_reference(tiny_model_nf4, out / "adapter")
    assert merged.keys() == reference.keys()
    for key, expected in reference.items():
        assert merged[key].dtype == torch.bfloat16, key
        torch.testing.assert_close(merged[key].float(), expected.to(torch.bfloat16).float(), **BF16_TOLERANCE,
                                   msg=lambda m, k=key: f"{k}: {m}")


# ------------------------------------------------------------------------------------------- refusals
def edited_copy(source: Path, target: Path, edit: Callable[[dict], None] | None = None,
                config: dict | None = None) -> str:
    """A copy of a checkpoint with the tensors of the shard holding q_proj edited, or its config.json updated."""
    shutil.copytree(source, target)
    if edit is not None:
        index_file = json.loads((target / "model.safetensors.index.json").read_text())
        index = index_file["weight_map"]
        shard = target / index[Q_PROJ]
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        edit(tensors)
        save_file(tensors, str(shard), metadata=metadata)
        index_file["weight_map"] = {k: v for k, v in index.items() if v != shard.name} | {k: shard.name for k in tensors}
        (target / "model.safetensors.index.json").write_text(json.dumps(index_file))
    if config is not None:
        (target / "config.json").write_text(json.dumps({**json.loads((target / "config.json").read_text()), **config}))
    return str(target)


def drop(*suffixes: str) -> Callable[[dict], None]:
    return lambda tensors: [tensors.pop(Q_PROJ + s) for s in suffixes]


def eight_bit(tiny_model: Path, target: Path) -> str:
    """A real bitsandbytes 8-bit checkpoint (LLM.int8, saved by transformers on the CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    model.save_pretrained(target)
    for item in tiny_model.glob("tokenizer*"):
        shutil.copy(item, target / item.name)
    return str(target)


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
# name -> (settings maker (nf4 checkpoint, tiny model, tmp) -> QLORA_* settings, exit code, phrases in the message)
REFUSALS = {
    "another 4-bit type given": (lambda pq, tiny, tmp: {"QLORA_QUANTIZATION": "fp4"}, EXIT_CONFIG,
                                 ("QLORA_QUANTIZATION=fp4", "stored pre-quantized (bitsandbytes nf4",
                                  "Remove QLORA_QUANTIZATION (or set it to nf4)")),
    "16-bit LoRA asked of a 4-bit checkpoint": (lambda pq, tiny, tmp: {"QLORA_QUANTIZATION": "none"}, EXIT_CONFIG,
                                                ("QLORA_QUANTIZATION=none", "no 16-bit weights to train plain LoRA on",
                                                 "point QLORA_MODEL at the 16-bit model")),
    "double quantization off given": (lambda pq, tiny, tmp: {"QLORA_DOUBLE_QUANT": "false"}, EXIT_CONFIG,
                                      ("QLORA_DOUBLE_QUANT=false", "double quantization on",
                                       "Remove QLORA_DOUBLE_QUANT (or set it to true)")),
    "8-bit checkpoint": (lambda pq, tiny, tmp: {"QLORA_MODEL": eight_bit(tiny, tmp / "tiny-8bit")}, EXIT_MODEL,
                         ("tiny-8bit/config.json", "bitsandbytes 8-bit (LLM.int8)", "*-bnb-4bit")),
    "GPTQ checkpoint": (lambda pq, tiny, tmp: {"QLORA_MODEL": edited_copy(
        tiny, tmp / "tiny-gptq", config={"quantization_config": GPTQ})}, EXIT_MODEL,
        ("tiny-gptq/config.json", "'gptq'", "point QLORA_MODEL at the 16-bit model")),
    "nested scales missing": (lambda pq, tiny, tmp: {"QLORA_MODEL": edited_copy(
        pq, tmp / "m", drop(".nested_absmax"))}, EXIT_MODEL, (Q_PROJ, ".nested_absmax missing", "Download or copy the whole model again")),
    "quantization state missing": (lambda pq, tiny, tmp: {"QLORA_MODEL": edited_copy(
        pq, tmp / "m", drop(".quant_state.bitsandbytes__nf4"))}, EXIT_MODEL,
        (f"{Q_PROJ}: its quantization state (quant_state.bitsandbytes__nf4) is missing", "Download or copy")),
    "packed values cut short": (lambda pq, tiny, tmp: {"QLORA_MODEL": edited_copy(
        pq, tmp / "m", lambda t: t.update({Q_PROJ: t[Q_PROJ][:100].clone()}))}, EXIT_MODEL,
        (Q_PROJ, "100 bytes of packed values for a [128, 128] weight", "Download or copy")),
    "packed values without their state": (lambda pq, tiny, tmp: {"QLORA_MODEL": edited_copy(
        pq, tmp / "m", drop(".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                            ".quant_state.bitsandbytes__nf4"))}, EXIT_MODEL,
        (f"{Q_PROJ}: its quantization state (quant_state.bitsandbytes__nf4) is missing", "Download or copy")),
}


def test_loader_refuses_what_transformers_lets_through(tiny_model_nf4, tmp_path):
    """Below the header check (for a caller that skips it): packed values without their state load as raw bytes in
    transformers, a state without its JSON part fails inside its conversion; both are model errors naming the weight."""
    from entrypoints.errors import ModelError
    from entrypoints.modeling import load_model

    cfg = parse_config({}, ["--model", str(tiny_model_nf4), "--data", "x.jsonl"], check_paths=False)
    raw = edited_copy(tiny_model_nf4, tmp_path / "raw", drop(".absmax", ".quant_map", ".nested_absmax",
                                                             ".nested_quant_map", ".quant_state.bitsandbytes__nf4"))
    with pytest.raises(ModelError, match=rf"missing from the checkpoint.*{Q_PROJ}\.quant_state"):
        load_model(Path(raw), cfg)
    no_state = edited_copy(tiny_model_nf4, tmp_path / "no-state", drop(".quant_state.bitsandbytes__nf4"))
    with pytest.raises(ModelError, match="could not rebuild the stored 4-bit weights.*download it again"):
        load_model(Path(no_state), cfg)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name, tiny_model_nf4, tiny_model, tmp_path, monkeypatch, capsys, restore_signals):
    make, code, phrases = REFUSALS[name]
    base = tmp_path / "opt-ml"
    settings = {"QLORA_MODEL": str(tiny_model_nf4), "QLORA_DATA": str(jsonl(tmp_path / "train.jsonl", RECORDS)),
                "QLORA_OUTPUT": str(tmp_path / "output"), "QLORA_BASE_DIR": str(base), "QLORA_REPORT_TO": "none",
                "QLORA_MAX_STEPS": "1", **make(tiny_model_nf4, tiny_model, tmp_path)}
    _job_environment(monkeypatch, settings)

    exit_code = train.main([])
    out = capsys.readouterr()
    assert exit_code == code, (out.out + out.err)[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert "Traceback" not in out.out + out.err
    for phrase in phrases:
        assert phrase in failure, (phrase, failure)
    assert not (tmp_path / "output" / "manifest.json").exists()  # nothing presented as a result


# ------------------------------------------------------------------------------------------- sizes
def test_sizing_knows_the_stored_form_and_its_size(tiny_model_nf4, tiny_model):
    shape = sizing.shape_of_model(str(tiny_model_nf4))
    assert shape.stored_4bit and shape.stored_double_quant and not sizing.shape_of_model(str(tiny_model)).stored_4bit
    on_disk = sum(p.stat().st_size for p in tiny_model_nf4.glob("*.safetensors"))
    assert sizing.checkpoint_bytes(shape) == pytest.approx(on_disk, rel=0.02)
    sixteen_bit = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert sizing.checkpoint_bytes(sizing.shape_of_model(str(tiny_model))) == pytest.approx(sixteen_bit, rel=0.01)
    # The merged model's size the job checks the disk for: the dequantized weights.
    assert bnb4bit.dequantized_bytes(tiny_model_nf4) == pytest.approx(sixteen_bit, rel=0.001)
