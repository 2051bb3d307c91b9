"""Job outputs made without training, for the chat and Hub tests: a model part and/or a real PEFT adapter, then the
model card and the manifest with the job's own writers (entrypoints.outputs), the manifest last."""

from __future__ import annotations

import json
import os
from pathlib import Path

from entrypoints import storage
from entrypoints.checkpoints import content_sha256, model_files
from entrypoints.config import JobConfig
from entrypoints.outputs import MANIFEST, build_manifest, write_model_card
from entrypoints.templating import llama2_chat_template


def link_model(source: Path, dest: Path) -> Path:
    """`dest` holding `source`'s files as symbolic links (a 270 MB model costs nothing to "copy")."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            os.symlink(path.resolve(), dest / path.name)
    return dest


def make_adapter(base_dir: Path, dest: Path, seed: int = 0) -> Path:
    """A LoRA adapter on `base_dir` with random, non-zero weights (so it changes the answers), saved as the job saves
    one: adapter files plus the tokenizer with the chat template used (Llama 2's for the Llama tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(dest, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = llama2_chat_template()
    tokenizer.save_pretrained(dest)
    return dest


def finish(stage: Path, cfg: JobConfig, base_dir: Path | None, run_id: str = "20261130T000000Z-abc123") -> dict:
    """Model card and manifest (with the base model's fingerprint, as the job records it) in `stage`."""
    has_merged = (stage / "merged").is_dir()
    write_model_card(stage, cfg, {"eval_loss_after": 1.25}, [], has_merged)
    fingerprint = content_sha256(model_files(base_dir), base_dir) if base_dir else None
    manifest = build_manifest(stage, cfg, {
        "base_model": {"source": cfg.model, "revision": cfg.model_revision, "fingerprint_sha256": fingerprint},
        "metrics": {"eval_loss_after": 1.25}, "samples": [],
        "run": {"id": run_id, "started_at": "2026-11-30T00:00:00Z", "started_unix": 1_795_996_800.0}})
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def upload(stage: Path, uri: str, endpoint: str) -> None:
    """Every file, then the manifest last (what the job's Publisher does)."""
    storage.upload_tree(stage, uri, endpoint_url=endpoint, exclude=(MANIFEST,))
    storage.upload_file(stage / MANIFEST, storage.join(uri, MANIFEST), endpoint_url=endpoint)


def tensors_of(model_dir: Path) -> dict:
    """Every tensor of every safetensors file in `model_dir`, by name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
