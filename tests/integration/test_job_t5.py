"""The real training entrypoint on an encoder-decoder model: a tiny random Flan-T5-shaped model (gated feed-forward,
a head of its own) and instruction data on a real S3 server, trained as seq2seq with 4-bit LoRA.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_job_t5.py
"""

import json

import pytest
import torch

from entrypoints import storage
from entrypoints.errors import EXIT_CONFIG
from entrypoints.modeling import keep_cpu_weights_trainable

from ..jobrun import job_env, run_job
from ..t5_models import tiny_t5

RECORDS = [{"instruction": f"What is code {i}?", "input": "", "output": f"Code {i} is {i * 7 % 13}."} for i in range(24)]


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5") / "flan-t5-tiny", "v1.1")


def test_t5_end_to_end_s3_and_resume(s3_env, t5_model, tmp_path):
    server, bucket = s3_env
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    storage.upload_tree(t5_model, f"s3://{bucket}/models/t5", endpoint_url=server.endpoint)
    storage.upload_file(data, f"s3://{bucket}/data/train.jsonl", endpoint_url=server.endpoint)
    settings = {
        "QLORA_MODEL": f"s3://{bucket}/models/t5", "QLORA_DATA": f"s3://{bucket}/data/train.jsonl",
        "QLORA_OUTPUT": f"s3://{bucket}/out/run1", "QLORA_S3_ENDPOINT_URL": server.endpoint,
        "QLORA_MAX_STEPS": "4", "QLORA_MICRO_BATCH_SIZE": "4", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
        "QLORA_EVAL_FRACTION": "0.25", "QLORA_NUM_SAMPLE_GENERATIONS": "2", "QLORA_MAX_NEW_TOKENS": "4",
        "QLORA_LOGGING_STEPS": "1", "QLORA_SAVE_STEPS": "2", "QLORA_LEARNING_RATE": "1e-2",
        "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16", "QLORA_REPORT_TO": "none",
    }
    result = run_job(job_env(tmp_path, **server.env(), **settings))
    assert result.code == 0, result.output[-4000:]
    summary = result.summary
    assert "encoder-decoder model: trained as seq2seq" in result.output
    assert "ignored at their defaults: packing, chat_template, use_liger" in result.output
    assert summary["global_step"] == 4 and len(summary["samples"]) == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"] * 0.8, summary
    assert summary["merge"]["lora_modules_merged"] == 2 * (4 + 3) + 2 * (8 + 3)  # q k v o (+ cross) wi_0 wi_1 wo

    out = storage.fetch(f"s3://{bucket}/out/run1/", tmp_path / "got", endpoint_url=server.endpoint)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    for required in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                     "merged/config.json", "merged/model.safetensors", "merged/model.safetensors.index.json",
                     "README.md"):
        assert required in listed, sorted(listed)
    assert manifest["complete"] is True and manifest["config"]["packing"] is False  # the settings it trained with
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    card = (out / "README.md").read_text()
    assert "AutoModelForSeq2SeqLM.from_pretrained('merged')" in card and "## Prompt format" in card
    from safetensors.torch import load_file

    lora_b = [t for k, t in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # every adapted module was trained

    # The merged model loads with transformers alone, generates, and computes what the 4-bit base + adapter did.
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    enc = tokenizer(["What is code 3?", "What is code 11?"], return_tensors="pt", padding=True)
    decoder_ids = torch.tensor([[0, 70, 80, 90], [0, 71, 81, 91]])
    merged = AutoModelForSeq2SeqLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    generated = merged.generate(**enc, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > 1
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_model, dtype=torch.float32, quantization_config=quant,
                                                 device_map={"": "cpu"})
    keep_cpu_weights_trainable(base)  # as the job computes: bnb's CPU inference repacking is off
    trained = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        a = merged(**enc, decoder_input_ids=decoder_ids).logits
        b = trained(**enc, decoder_input_ids=decoder_ids).logits
        untrained = AutoModelForSeq2SeqLM.from_pretrained(t5_model, dtype=torch.float32)(
            **enc, decoder_input_ids=decoder_ids).logits
    assert torch.allclose(a, b, atol=3e-2, rtol=0), (a - b).abs().max()
    assert not torch.allclose(a, untrained, atol=0.5)

    # A rerun with one more step resumes from the last checkpoint of the first (same inputs and settings).
    more = {**settings, "QLORA_MAX_STEPS": "5", "QLORA_OUTPUT_EXISTS": "version", "QLORA_MERGE": "false",
            "QLORA_NUM_SAMPLE_GENERATIONS": "0"}
    again = run_job(job_env(tmp_path, **server.env(), **more))
    assert again.code == 0, again.output[-4000:]
    assert again.summary["resumed_from"] == "checkpoint-4" and again.summary["global_step"] == 5


def test_t5_refuses_a_given_setting_that_does_not_apply(t5_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]))
    result = run_job(job_env(tmp_path, QLORA_MODEL=str(t5_model), QLORA_DATA=str(data), QLORA_PACKING="true",
                             QLORA_OUTPUT=str(tmp_path / "out"), QLORA_REPORT_TO="none"), timeout=300)
    assert result.code == EXIT_CONFIG, result.output[-3000:]
    assert "QLORA_PACKING=true is not for encoder-decoder (T5-class) models" in result.output
    assert "set it to false" in result.output and "Traceback" not in result.output
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure.startswith("configuration error: 1 configuration problem(s)") and "QLORA_PACKING" in failure
    assert not (tmp_path / "out" / "manifest.json").exists()
