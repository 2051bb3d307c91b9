"""The real training entrypoint end to end against a real S3 server, with a tiny Llama-2-shaped model.

Every output file is checked: adapter, merged model (its logits against base + adapter), model card,
manifest (written last, sha256 of every file), the W&B offline run, and the absence of secrets.
"""

import hashlib
import json

import pytest
import torch

from entrypoints import storage
from entrypoints.errors import EXIT_CONFIG, EXIT_OUTPUT_EXISTS

from ..jobrun import FAKE_HF_TOKEN, FAKE_WANDB_KEY, job_env, run_job
from ..wandb_records import summarize

RECORDS = [{"instruction": f"What is code {i}?", "input": "", "output": f"Code {i} is {i * 7 % 13}."} for i in range(24)]


@pytest.fixture
def s3_job(s3_env, tiny_model, tmp_path):
    server, bucket = s3_env
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    storage.upload_tree(tiny_model, f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    storage.upload_file(data, f"s3://{bucket}/data/train.jsonl", endpoint_url=server.endpoint)
    env = job_env(tmp_path, **server.env(), **{
        "QLORA_MODEL": f"s3://{bucket}/models/tiny", "QLORA_DATA": f"s3://{bucket}/data/train.jsonl",
        "QLORA_OUTPUT": f"s3://{bucket}/out/run1", "QLORA_S3_ENDPOINT_URL": server.endpoint,
        "QLORA_MAX_STEPS": "3", "QLORA_MICRO_BATCH_SIZE": "4", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
        "QLORA_EVAL_FRACTION": "0.25", "QLORA_NUM_SAMPLE_GENERATIONS": "2", "QLORA_MAX_NEW_TOKENS": "4",
        "QLORA_LOGGING_STEPS": "1", "QLORA_SAVE_STEPS": "2", "QLORA_LEARNING_RATE": "1e-3",
        "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16",
    })
    return server, bucket, env, tmp_path


def _download_output(server, uri, dest):
    return storage.fetch(uri.rstrip("/") + "/", dest, endpoint_url=server.endpoint)


def test_end_to_end_s3(s3_job):
    server, bucket, env, tmp = s3_job
    result = run_job(env)
    assert result.code == 0, result.output[-4000:]
    summary = result.summary
    assert summary["global_step"] == 3 and summary["eval_loss_before"] > 0 and summary["eval_loss_after"] > 0
    assert len(summary["samples"]) == 2

    out = _download_output(server, f"s3://{bucket}/out/run1", tmp / "got")
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    for required in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                     "merged/config.json", "merged/model.safetensors.index.json", "README.md"):
        assert required in listed, sorted(listed)
    for rel, meta in listed.items():
        data = (out / rel).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], rel
    assert manifest["complete"] is True and manifest["metrics"]["global_step"] == 3
    # This run's first optimizer step (where compilation happens on a GPU) apart from the steady steps after it.
    metrics = manifest["metrics"]
    assert metrics["first_step_seconds"] > 0 and metrics["steady_steps"] == 2 and metrics["steady_step_seconds"] > 0
    assert "compile_cache" not in metrics  # nothing compiles on a CPU, so there is no compile cache either
    assert (f"training: the first optimizer step took {metrics['first_step_seconds']:.1f} s, the 2 after it"
            f" {metrics['steady_step_seconds']:.3f} s each") in result.output
    assert manifest["data"]["format"] == "alpaca" and len(manifest["data"]["fingerprint_sha256"]) == 64
    assert manifest["versions"]["peft"] and manifest["config"]["lora_r"] == 8
    assert "config.json" not in [p for p in listed if p.startswith("adapter/")]
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())

    # The outputs name the base model by its source, as configured, never by the job's scratch copy of it
    # (<base_dir>/work/base-model), which no consumer has: adapter_config.json, the model card, the manifest.
    source = f"s3://{bucket}/models/tiny"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == source
    card = (out / "README.md").read_text()
    assert f"\nbase_model: {source}\n" in card and manifest["base_model"]["name"] == source
    scratch = str(tmp / "opt-ml")
    for rel in listed:
        if rel.endswith((".json", ".md", ".jinja", ".txt")):
            assert scratch not in (out / rel).read_text(), rel
    # The adapter's dtype and size, stated as they are: float32, as trained (LoRA's master weights).
    size = listed["adapter/adapter_model.safetensors"]["bytes"]
    assert manifest["metrics"]["adapter"]["dtype"] == "float32" and manifest["metrics"]["adapter"]["bytes"] == size
    assert f"Its weights are float32: {manifest['metrics']['adapter']['parameters']:,} parameters, {size:,} bytes" in card
    assert f"in float32, {size:,} bytes" in result.output

    # The merged model, loaded with transformers alone, equals the model as trained: the 4-bit (nf4, double
    # quantization) base with the adapter applied by peft.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.tensor([[1, 450, 775, 338, 29871, 29906, 29941, 29889]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(env_model_dir(tmp, server, bucket), dtype=torch.float32,
                                                quantization_config=quant, device_map={"": "cpu"})
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits, peft_model(ids).logits
    assert torch.allclose(a, b, atol=3e-2, rtol=0), (a - b).abs().max()

    # W&B offline run: config without secrets, the loss history and the samples table.
    runs = list(tmp.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run = summarize(runs[0])
    assert run["config"]["lora_r"] == 8 and run["config"]["data"] == f"s3://{bucket}/data/train.jsonl"
    losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    assert any("train/tokens_per_second" in h for h in run["history"])
    assert any("train/learning_rate" in h for h in run["history"])
    tables = [h for h in run["history"] if h.get("samples/_type") == "table-file"]
    assert len(tables) == 1 and tables[0]["samples/nrows"] == 2 and tables[0]["samples/ncols"] == 4
    table_file = next(runs[0].parent.glob("files/media/table/samples_*.table.json"))
    assert json.loads(table_file.read_text())["columns"] == ["prompt", "reference", "before", "after"]
    assert run["summary"]["eval_loss_after"] == pytest.approx(summary["eval_loss_after"])

    # No secret anywhere: logs, outputs, W&B files, checkpoints.
    for secret in (FAKE_HF_TOKEN, FAKE_WANDB_KEY):
        assert secret not in result.output
        for path in [*tmp.rglob("*")]:
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert secret.encode() not in path.read_bytes(), path


def env_model_dir(tmp, server, bucket):
    return storage.fetch(f"s3://{bucket}/models/tiny/", tmp / "base-copy", endpoint_url=server.endpoint)


def test_existing_output_refused_then_versioned(s3_job):
    server, bucket, env, tmp = s3_job
    storage.write_text(f"s3://{bucket}/out/run1/manifest.json", "{}", endpoint_url=server.endpoint)
    result = run_job(env)
    assert result.code == EXIT_OUTPUT_EXISTS, result.output[-3000:]
    assert "already holds a complete result" in result.output
    failure = tmp / "opt-ml" / "output" / "failure"
    assert failure.read_text().startswith("output exists:")


def test_config_error_exit_code_and_failure_file(tmp_path):
    env = job_env(tmp_path, QLORA_DATA=str(tmp_path / "nope.jsonl"), QLORA_MAX_STEPS="many", QLORA_LORA_RANK="8",
                  QLORA_COMPILE_CACHE="cache")
    result = run_job(env, timeout=120)
    assert result.code == EXIT_CONFIG
    assert "QLORA_MAX_STEPS='many'" in result.output and "QLORA_LORA_RANK is not a known setting" in result.output
    assert ("QLORA_COMPILE_CACHE='cache': expected auto, off, an absolute directory (e.g. /mnt/cache/torch-compile) or"
            " an s3:// prefix") in result.output
    assert "Traceback" not in result.output
    text = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert text.startswith("configuration error: 4 configuration problem(s)")


@pytest.mark.slow  # 21 s; resume to the same adapter runs by default in test_reliability_preemption and test_never_wrong
def test_resume_from_checkpoint(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    common = {"QLORA_MODEL": str(tiny_model), "QLORA_DATA": str(data), "QLORA_MICRO_BATCH_SIZE": "4",
              "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_EVAL_FRACTION": "0", "QLORA_SAVE_STEPS": "2",
              "QLORA_MERGE": "false", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_REPORT_TO": "none"}
    first = run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="2", QLORA_OUTPUT=str(tmp_path / "o1")))
    assert first.code == 0, first.output[-3000:]
    assert (tmp_path / "opt-ml" / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    second = run_job(job_env(tmp_path, **common, QLORA_MAX_STEPS="4", QLORA_OUTPUT=str(tmp_path / "o2")))
    assert second.code == 0, second.output[-3000:]
    assert second.summary["resumed_from"] == "checkpoint-2" and second.summary["global_step"] == 4
    assert (tmp_path / "o2" / "manifest.json").is_file() and not (tmp_path / "o2" / "merged").exists()


def test_packing_path_trains(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    result = run_job(job_env(tmp_path, QLORA_MODEL=str(tiny_model), QLORA_DATA=str(data), QLORA_PACKING="true",
                             QLORA_MAX_SEQ_LENGTH="128", QLORA_MAX_STEPS="2", QLORA_MICRO_BATCH_SIZE="2",
                             QLORA_GRADIENT_ACCUMULATION_STEPS="1", QLORA_EVAL_FRACTION="0", QLORA_MERGE="false",
                             QLORA_NUM_SAMPLE_GENERATIONS="0", QLORA_REPORT_TO="none", QLORA_OUTPUT=str(tmp_path / "o")))
    assert result.code == 0, result.output[-3000:]
    assert result.summary["global_step"] == 2 and result.summary["train_loss"] > 0
    # The manifest records how the run fitted its memory (on CPU: no GPU to plan for, nothing offloaded).
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    plan = manifest["metrics"]["batch_plan"]
    assert plan["activation_offload"] is False and plan["optim"] == "adamw_torch" and plan["row_tokens"] <= 128
    assert "no GPU memory to plan for" in plan["reason"]


def test_resume_refuses_checkpoint_of_other_settings(tmp_path):
    from entrypoints.checkpoints import latest_complete, mark_complete, settings_fingerprint
    from entrypoints.errors import ConfigError

    ckpt = tmp_path / "checkpoint-8"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    mark_complete(ckpt, 8, settings_fingerprint({"micro_batch_size": 8, "seed": 1}))
    (tmp_path / "checkpoint-10").mkdir()  # incomplete: ignored
    assert latest_complete(tmp_path, settings_fingerprint({"micro_batch_size": 8, "seed": 1})) == ckpt
    with pytest.raises(ConfigError, match="micro_batch_size differ"):
        latest_complete(tmp_path, settings_fingerprint({"micro_batch_size": 16, "seed": 1}))
