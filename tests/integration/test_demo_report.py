"""The demo's final report: the outputs are downloaded before its S3 server stops, and the commands it prints load
them (run as a user pastes them, from the directory the demo ran in)."""

from __future__ import annotations

import os
import shutil
import subprocess

from entrypoints import storage
from entrypoints.demo.assets import tiny_llama2
from entrypoints.demo.run import print_report
from entrypoints.templating import llama2_chat_template


def _published_run(base, stage):
    """A run's outputs as the job publishes them: the adapter (with the tokenizer and its chat template) and the
    merged model (here the base itself, which is all loading it needs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = llama2_chat_template()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(stage / "adapter")
    tokenizer.save_pretrained(stage / "adapter")
    shutil.copytree(base, stage / "merged")
    tokenizer.save_pretrained(stage / "merged")
    (stage / "manifest.json").write_text("{}")


def test_report_keeps_local_copies_and_prints_commands_that_load_them(s3_env, cache_dir, tmp_path, monkeypatch,
                                                                        capsys):
    server, bucket = s3_env
    base = tiny_llama2(cache_dir)
    _published_run(base, tmp_path / "stage")
    storage.upload_tree(tmp_path / "stage", f"s3://{bucket}/outputs/run", endpoint_url=server.endpoint)
    summary = {"output": f"s3://{bucket}/outputs/run", "eval_loss_before": 2.0, "eval_loss_after": 1.0,
               "answer_match_before": 0.0, "answer_match_after": 1.0, "global_step": 3,
               "train_runtime_seconds": 1.0, "device": "cpu",
               "samples": [{"prompt": "What is the capital?", "reference": "Quendar", "before": "?", "after": "Paris"},
                           {"prompt": "Who was Veloria's first astronaut?", "reference": "Petra Koslin",
                            "before": "?", "after": "Petra Koslin"}]}
    monkeypatch.chdir(tmp_path)
    print_report(summary, server.endpoint, 1.0, tmp_path / "demo" / "outputs", base)
    out = capsys.readouterr().out

    assert "local copies of the outputs: demo/outputs" in out
    assert "merged model: demo/outputs/merged" in out and "adapter:      demo/outputs/adapter" in out
    assert (tmp_path / "demo" / "outputs" / "merged" / "config.json").is_file()
    assert (tmp_path / "demo" / "outputs" / "adapter" / "adapter_model.safetensors").is_file()
    commands = [line.strip() for line in out.splitlines() if " -c " in line]
    assert len(commands) == 2
    # and the chat over the same local copy (the chat itself is tested in tests/integration/test_chat.py)
    assert any(line.strip().endswith("-m entrypoints.chat --model demo/outputs") for line in out.splitlines()), out
    # The question is one the fine-tuned model answered right (the second sample), given as the argument.
    assert all(c.endswith(" 'Who was Veloria'\"'\"'s first astronaut?'") for c in commands), commands
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for command in commands:  # the question has an apostrophe: the quoting must survive the shell
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
