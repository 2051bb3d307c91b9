"""The job's peers in the throughput benchmark, each trained in a process of its own over the benchmark's samples.

    python -m entrypoints.bench.peers trl-best --model-dir DIR --samples samples.jsonl --out result.json

The throughput benchmark (entrypoints/bench/throughput.py, runs `trl-best`, `trl-best-no-ckpt`, `unsloth`) starts
this module once per peer: Unsloth patches transformers for the whole process (it must be imported before
transformers), and Liger's kernels patch transformers' Llama classes, so no peer may share a process with the job's
runs. The samples come pre-tokenized from the benchmark (`input_ids`, `assistant_masks`: the same tokens the job's
runs train on). Both peers train LoRA r=16 alpha=32 dropout 0 on every linear layer of the 4-bit (nf4, double
quantization, bf16 compute) base with the job's default learning rate, schedule and clipping, in packed rows of
max length x `--rows` per micro-batch (the job's plan on a large GPU: 3 rows of 2048), one pass:

- `trl-best`: TRL's own fastest options: SFTTrainer with BFD packing and padding-free batches, Liger's kernels
  (CUDA), fused AdamW, gradient checkpointing on (`trl-best-no-ckpt`: off); SDPA attention (transformers builds
  the per-sample mask of padding-free rows; no flash-attention package is installed on the GPU machines).
- `unsloth`: Unsloth's FastLanguageModel (its 4-bit loading, its offloaded gradient checkpointing "unsloth",
  its compiled blocks) and its SFTTrainer in packed, padding-free mode with 8-bit AdamW. It trains on every token
  of a sample (its loss is not comparable with the others'); tokens/s and memory are.

It writes one JSON object: the benchmark's measurements (entrypoints.bench.throughput.train_and_measure), the
peer's settings and the versions it ran with; `skipped` when the peer is not installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PEERS = ("trl-best", "trl-best-no-ckpt", "unsloth")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def job_hyperparameters() -> dict[str, Any]:
    """The job's default learning rate, schedule, warm-up, clipping and LoRA scale (its JobConfig defaults), so the
    peers optimise what the job does."""
    from entrypoints.config import FIELDS

    return {name: FIELDS[name].default for name in ("learning_rate", "lr_scheduler", "warmup_ratio", "max_grad_norm",
                                                     "lora_r", "lora_alpha")}


def sft_args(run: str, out_dir: Path, cuda: bool, max_length: int, rows: int, seed: int, optim: str, liger: bool,
             checkpointing: bool) -> dict[str, Any]:
    hp = job_hyperparameters()
    return dict(
        output_dir=str(out_dir), run_name=run, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=hp["learning_rate"], lr_scheduler_type=hp["lr_scheduler"],
        warmup_steps=hp["warmup_ratio"], max_grad_norm=hp["max_grad_norm"], optim=optim,
        gradient_checkpointing=checkpointing, bf16=cuda, use_cpu=not cuda, max_length=max_length, packing=True,
        packing_strategy="bfd", padding_free=True, use_liger_kernel=liger, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )


def recipe_model(model_dir: Path, cuda: bool) -> Any:
    """The base model as the QLoRA / TRL examples load it (the baseline's and trl-best's): nf4 with double
    quantization, bf16 compute on CUDA (float32 on CPU), SDPA attention, on GPU 0, no KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    model.config.use_cache = False
    return model


def trl_best_trainer(model_dir: Path, dataset: Any, out_dir: Path, cuda: bool, max_length: int, rows: int, seed: int,
                     checkpointing: bool):
    import importlib.util

    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = recipe_model(model_dir, cuda)
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    args = SFTConfig(**sft_args("trl-best", out_dir, cuda, max_length, rows, seed,
                                "adamw_torch_fused" if cuda else "adamw_torch", liger, checkpointing))
    hp = job_hyperparameters()
    peft_config = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=0.0,
                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config)
    optim = getattr(args.optim, "value", args.optim)
    settings = (f"TRL SFTTrainer: BFD packing, padding-free, {rows} rows of {max_length}, Liger {liger}, {optim},"
                f" LoRA r={hp['lora_r']} alpha={hp['lora_alpha']} dropout 0, checkpointing {checkpointing}, sdpa")
    return trainer, settings, hp["lora_r"]


def unsloth_trainer(model_dir: Path, dataset: Any, out_dir: Path, cuda: bool, max_length: int, rows: int, seed: int):
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel  # imported first by main(), before transformers

    hp = job_hyperparameters()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=max_length,
                                                         load_in_4bit=True, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=0,
                                             target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=seed)
    args = SFTConfig(**sft_args("unsloth", out_dir, cuda, max_length, rows, seed, "adamw_8bit", False, True))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.remove_columns(["assistant_masks"]),
                         processing_class=tokenizer)
    settings = (f"Unsloth FastLanguageModel 4-bit, its offloaded checkpointing, packed padding-free, {rows} rows of"
                f" {max_length}, adamw_8bit, LoRA r={hp['lora_r']} alpha={hp['lora_alpha']} dropout 0, loss on every"
                " token")
    return trainer, settings, hp["lora_r"]


def read_samples(path: Path) -> dict[str, list]:
    data: dict[str, list] = {"input_ids": [], "assistant_masks": []}
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            data["input_ids"].append(record["input_ids"])
            data["assistant_masks"].append(record["assistant_masks"])
    return data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m entrypoints.bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("run", choices=PEERS)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--samples", required=True, help="JSON lines of input_ids + assistant_masks (the benchmark's)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", default="7b")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=3, help="packed rows per micro-batch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--peak-flops", type=float, default=0.0, help="the bf16 peak the benchmark measured (for MFU)")
    p.add_argument("--stats", default="{}", help="the benchmark's data statistics (JSON), for MFU")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    result: dict[str, Any] = {"run": args.run}
    if args.run == "unsloth":
        try:
            import unsloth  # noqa: F401 - before transformers, trl and peft: it patches them
        except ImportError as exc:
            result["skipped"] = f"not installed ({exc})"
            out.write_text(json.dumps(result))
            print(json.dumps(result), flush=True)
            return 0
    from datasets import Dataset

    from entrypoints.bench import throughput as bench

    cuda = args.device == "cuda"
    started = time.monotonic()
    dataset = Dataset.from_dict(read_samples(Path(args.samples)))
    work = out.parent / f"{args.run}-work"
    if args.run == "unsloth":
        trainer, settings, lora_r = unsloth_trainer(Path(args.model_dir), dataset, work, cuda, args.max_length,
                                                    args.rows, args.seed)
    else:
        trainer, settings, lora_r = trl_best_trainer(Path(args.model_dir), dataset, work, cuda, args.max_length,
                                                     args.rows, args.seed, args.run == "trl-best")
    result["settings"] = settings
    result["load_seconds"] = round(time.monotonic() - started, 1)
    try:
        bench.train_and_measure(trainer, result, cuda, lora_r, json.loads(args.stats), args.shape,
                                args.peak_flops or None)
    except Exception as exc:  # noqa: BLE001 - the benchmark records any failure of a peer as its result
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    result["versions"] = versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                                   "liger-kernel", "triton", "unsloth", "unsloth_zoo"))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
