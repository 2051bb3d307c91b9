"""Throughput, memory and MFU of the job's default path against the standard QLoRA recipe, side by side.

    python -m entrypoints.bench.throughput --shape 7b --runs baseline,default --out results.json
    python -m entrypoints.bench.throughput --shape tiny --device cpu --samples 24     # the CPU smoke test
    python -m entrypoints.bench.throughput --runs trl-best,unsloth --at-memory-of trl-best,unsloth --unsloth-path DIR

On the GPU it finds, one process: measures the bf16 matmul peak, writes a Llama-2-shaped checkpoint
with random bf16 weights (7b by default; 13b, 70b, or `tiny` for CPUs; with --prequantized, or by itself when
the 16-bit checkpoint would not fit the disk, in bitsandbytes 4-bit form: entrypoints/bench/prequantize.py),
generates a synthetic chat data
set (lengths: log-normal, median 250 tokens, sigma 1.0, clipped to [32, max length]; see PERF.md),
then trains one pass over the same samples with each run named in --runs:

- `baseline`: the recipe users copy (transformers + peft + bitsandbytes + TRL SFTTrainer; nf4, double
  quant, bf16 compute, LoRA r=16 alpha=16 all-linear, paged AdamW 32-bit, gradient checkpointing,
  batch 4 x 4 accumulation padded to the longest sample, no packing, max length 2048, sdpa), written
  out here independently of the job's code;
- `default`: the job's own path: entrypoints.modeling.load_model + entrypoints.trainer.build_trainer
  with the job's default settings (plus --set overrides);
- the levers in LEVERS: the job's path with one setting changed, for the table in PERF.md;
- the peers (entrypoints/bench/peers.py), each in a process of its own over the same samples: `trl-best` (TRL's own
  fastest options, checkpointing on; `trl-best-no-ckpt` off) and `unsloth` (skipped, "not installed", without it);
- `LEVER@GIB` (e.g. `default@5.6`): a lever capped at GIB; `LEVER@RUN`: capped at the peak reserved memory of RUN,
  run before it, with its tokens/s over RUN's as `vs_peer`; `--at-memory-of RUN` adds `default@RUN` after the runs.

Per run it prints and writes to --out: trained (non-padding) tokens per second, seconds per step, peak
GPU memory allocated and reserved, model-FLOPs utilisation (entrypoints.sizing.train_flops_per_token over
the measured peak), first and last losses, every run's tokens/s over the baseline's, and the seconds of the first
optimizer step (which holds the compilation) with whether a compile cache was loaded (`--set compile_cache=DIR`: a
store shared by runs, see entrypoints/compile_cache.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entrypoints import compile_cache, perf, sizing
from entrypoints.bench.peers import PEERS, recipe_model, versions

log = logging.getLogger("qlora.benchmark")

MEDIAN_TOKENS = 250
LENGTH_SIGMA = 1.0
MIN_TOKENS = 32
WARMUP_STEPS = 2  # optimizer steps left out of the steady-state rate (allocator growth, kernel autotuning)

# Lever name -> job settings changed from the default (and `varlen`: whether packed rows use varlen attention).
LEVERS: dict[str, dict[str, Any]] = {
    "default": {},
    # the job path with the fast path switched off, then its parts added back one by one
    "unpacked": {"packing": "false", "use_liger": "false", "torch_compile": "false", "optim": "paged_adamw_32bit"},
    "packed-sdpa": {"use_liger": "false", "torch_compile": "false", "optim": "paged_adamw_32bit", "varlen": False},
    "packed-varlen": {"use_liger": "false", "torch_compile": "false", "optim": "paged_adamw_32bit"},  # + varlen attention
    "no-liger": {"use_liger": "false", "torch_compile": "false"},  # neither Liger's kernels nor torch.compile
    # Liger's RMSNorm/SwiGLU/RoPE kernels in place of torch.compile (the default where no C compiler exists). Liger
    # patches transformers' Llama classes for the whole process: run it after every run that must not use it.
    "liger": {"torch_compile": "false"},
    "paged-adamw": {"optim": "paged_adamw_32bit"},  # default with the recipe's paged AdamW
    "alpha16": {"lora_alpha": "16"},  # default with the baseline's LoRA scale (loss comparison)
    "ckpt-all": {"gradient_checkpointing": "true"},  # every layer recomputed (the default before `auto`)
    "no-ckpt": {"gradient_checkpointing": "false"},  # no layer recomputed
    "ckpt-half": {"gradient_checkpointing": "true", "layers_without_checkpointing": 16},  # the first 16 layers kept
    "dropout0": {"lora_dropout": "0"},  # default without LoRA dropout (no dropped-out input copies)
    # the default with the GPU capped at the baseline's peak reserved memory of the same process
    "at-baseline-memory": {"max_gpu_memory_gib": "baseline"},
    "compile-layers": {"torch_compile": "true"},  # torch.compile asked for explicitly (the default where it can run)
    "tokens-16k": {"micro_batch_tokens": "16384"},  # default + 16k-token micro-batches
    # the small-memory plan's levers switched off: no activation offload, fused 32-bit AdamW (the plan before them)
    "no-savers": {"activation_offload": "false", "optim": "adamw_torch_fused"},
    "no-offload": {"activation_offload": "false"},  # 8-bit AdamW still allowed
    "tokens-4k": {"micro_batch_tokens": "4096"},
}


# ------------------------------------------------------------------------------------------- inputs
def write_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    """A word-level tokenizer over the model's vocabulary size (<unk>, <s>, </s>, then t3..tN): the data
    is made of token ids already, the trainer only needs pad/eos ids that exist in the vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.save_pretrained(model_dir)
    return tok


def measure_bf16_peak_flops(device: Any = None, size: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul FLOP/s measured on this GPU now (median of `repeats` timed products on random data)."""
    import torch

    device = device or torch.device("cuda")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * size**3 / sorted(times)[len(times) // 2]


def wants_prequantized(choice: str, shape_name: str, model_dir: Path) -> bool:
    """`--prequantized`: `true`/`false`, or `auto`: the 4-bit form when the 16-bit checkpoint (plus 10%) would not fit
    the free disk where it is written (the 70B shape's 138 GB on the GPU machine's 64 GB disk)."""
    if choice != "auto":
        return choice == "true"
    import shutil

    need = 1.1 * sizing.checkpoint_bytes(sizing.SHAPES[shape_name])
    free = shutil.disk_usage(next(p for p in (model_dir, *model_dir.parents) if p.exists())).free
    return need > free


def build_checkpoint(shape_name: str, model_dir: Path, device: str, prequantized: bool = False) -> dict[str, Any]:
    """Write a Llama-2-shaped checkpoint with random bf16 weights (initialised on `device`) + tokenizer; with
    `prequantized`, in bitsandbytes 4-bit form instead (nf4, double quantization; entrypoints.bench.prequantize), which
    the job loads as stored."""
    if prequantized:
        from entrypoints.bench import prequantize

        return prequantize.build(shape_name, model_dir, device)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = sizing.SHAPES[shape_name]
    started = time.monotonic()
    config = LlamaConfig(**shape.llama_config(), max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="5GB")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    write_tokenizer(model_dir, shape.vocab_size)
    return {"shape": shape_name, "form": "bfloat16", "parameters": n_params,
            "checkpoint_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "build_seconds": round(time.monotonic() - started, 1)}


def sample_lengths(n: int, max_tokens: int, seed: int, fixed: int = 0) -> list[int]:
    """Log-normal lengths, median MEDIAN_TOKENS, sigma LENGTH_SIGMA, clipped to [MIN_TOKENS, max_tokens]."""
    if fixed:
        return [fixed] * n
    rng = random.Random(seed)
    return [int(min(max_tokens, max(MIN_TOKENS, round(rng.lognormvariate(math.log(MEDIAN_TOKENS), LENGTH_SIGMA)))))
            for _ in range(n)]


def synthetic_chat(n: int, vocab_size: int, max_tokens: int, seed: int = 0, fixed: int = 0) -> dict[str, list]:
    """Pre-tokenized chat samples: `input_ids` (BOS, a prompt, an answer ending in EOS) and `assistant_masks`
    (1 on the answer). Token ids follow a Zipf law (s=1.1) over the vocabulary, so the loss has something
    to learn (the unigram distribution) and the runs' losses can be compared."""
    rng = random.Random(seed + 1)
    ids = list(range(3, vocab_size))
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(ids))]
    rng.shuffle(ids)
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    out: dict[str, list] = {"input_ids": [], "assistant_masks": []}
    for length in sample_lengths(n, max_tokens, seed, fixed):
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        answer = length - 1 - prompt
        body = rng.choices(ids, cum_weights=cumulative, k=length - 2)
        out["input_ids"].append([1, *body, 2])
        out["assistant_masks"].append([0] * (1 + prompt) + [1] * answer)
    return out


def export_text(data: dict[str, list], path: Path) -> None:
    """The samples as the job's `text` records: one word per token (the word-level tokenizer maps `t<id>` back
    to <id>); the job adds BOS/EOS itself, so they are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ids in data["input_ids"]:
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids[1:-1])}) + "\n")
    log.info("wrote %d text records to %s", len(data["input_ids"]), path)


def data_stats(data: dict[str, list], max_tokens: int) -> dict[str, Any]:
    lengths = sorted(min(len(x), max_tokens) for x in data["input_ids"])
    n = len(lengths)
    return {"records": n, "train_records": n, "train_tokens": sum(lengths),
            "median_tokens": lengths[n // 2], "p90_tokens": lengths[int(n * 0.9)], "max_tokens": lengths[-1],
            "mean_tokens": round(sum(lengths) / n, 1), "at_max_length": sum(x >= max_tokens for x in lengths),
            "mean_attended_keys": round(sizing.mean_attended_keys(lengths), 1)}


# ------------------------------------------------------------------------------------------- measuring
class Meter:
    """Counts non-padding tokens per micro-batch (wrapping the trainer's collator) and times optimizer steps."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.batch_tokens: list[int] = []
        self.batch_trained: list[int] = []
        self.step_end: list[float] = []
        self.start = 0.0

    def wrap(self, collator):
        def collate(examples):
            batch = collator(examples)
            if "attention_mask" in batch:
                self.batch_tokens.append(int(batch["attention_mask"].sum()))
            else:  # padding-free: one row, no padding
                self.batch_tokens.append(int(batch["input_ids"].numel()))
            self.batch_trained.append(int((batch["labels"] != -100).sum()))
            return batch
        return collate

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter._sync()
                meter.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                meter._sync()
                meter.step_end.append(time.perf_counter())

        return StepTimer()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _all_sum(value: float) -> float:
    """Sum over the ranks of a torchrun launch (the identity in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _per_rank(value: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.zeros(_world_size(), device="cuda", dtype=torch.float64)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return [round(float(x), 2) for x in t.tolist()]


def _layers_kept(trainer: Any) -> int:
    """Decoder layers that will keep their activations: all when checkpointing is off, else those the
    partial-checkpointing callback exempts (the plan's count)."""
    layers = sum(1 for m in trainer.model.modules() if type(m).__name__.endswith("DecoderLayer"))
    if not trainer.args.gradient_checkpointing:
        return layers
    kept = [cb.layers_without for cb in trainer.callback_handler.callbacks if hasattr(cb, "layers_without")]
    return min(layers, kept[0]) if kept else 0


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
                        "liger-kernel", "triton"))}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def _free(*objs) -> None:
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- runs
def baseline_trainer(model_dir: Path, dataset: Any, tokenizer: Any, out_dir: Path, cuda: bool, max_length: int,
                     seed: int):
    """The standard QLoRA SFT recipe, as users copy it from the QLoRA / TRL examples."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = recipe_model(model_dir, cuda)
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=4, num_train_epochs=1,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", gradient_checkpointing=True, bf16=cuda,
        use_cpu=not cuda, max_length=max_length, packing=False, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config), model


def job_config(model_dir: Path, work: Path, max_length: int, seed: int, settings: dict[str, Any]):
    """The job's JobConfig exactly as `train` would parse it (defaults + the given settings)."""
    from entrypoints.config import parse_config

    argv = ["--model", str(model_dir), "--data", str(work / "unused.jsonl"), "--base-dir", str(work / "opt-ml"),
            "--max-seq-length", str(max_length), "--seed", str(seed), "--logging-steps", "1",
            "--save-steps", "1000000", "--report-to", "none", "--num-sample-generations", "0",
            "--eval-fraction", "0", "--merge", "false"]
    for name, value in settings.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return parse_config({}, argv, check_paths=False)


def job_trainer(model_dir: Path, dataset: Any, tokenizer: Any, stats: dict[str, Any], work: Path, max_length: int,
                seed: int, settings: dict[str, Any]):
    """The job's own path: modeling.load_model + trainer.build_trainer, as entrypoints.train.run calls them."""
    from entrypoints import modeling
    from entrypoints.checkpoints import StopFlag
    from entrypoints.dataset import TokenizedData
    from entrypoints.tracking import NullTracker
    from entrypoints.trainer import build_trainer

    settings = dict(settings)
    varlen = settings.pop("varlen", True)
    layers_without = int(settings.pop("layers_without_checkpointing", 0))
    cfg = job_config(model_dir, work, max_length, seed, settings)
    cfg = modeling.settings_for_checkpoint(cfg, model_dir)  # a pre-quantized checkpoint trains in its stored form
    modeling.cap_gpu_memory(cfg.max_gpu_memory_gib, _local_rank())
    model = modeling.load_model(model_dir, cfg, _local_rank())
    if not varlen:  # the lever: packed rows through SDPA's block-diagonal mask instead of per-sample attention
        model.config._attn_implementation = "sdpa"
    data = TokenizedData(dataset, None, [], dict(stats))
    settings = sizing.PlanSettings.of(cfg)
    parallel = perf.parallelism_for(settings, model.config, _world_size())
    plan = perf.plan_for(settings, model.config, data.stats, parallel.shards) if cfg.packing else None
    trainer = build_trainer(cfg, model, tokenizer, data, NullTracker(), StopFlag(), plan, {}, parallel=parallel)
    if layers_without:
        trainer.add_callback(perf.partial_checkpointing_callback(layers_without))
    return trainer, model, cfg, parallel


def run_one(name: str, model_dir: Path, data: dict[str, list], stats: dict[str, Any], tokenizer: Any, work: Path,
            args: argparse.Namespace, peak_flops: float | None, extra: dict[str, Any],
            baseline_reserved_gib: float | None = None) -> dict[str, Any]:
    import torch
    from datasets import Dataset

    from entrypoints.errors import JobError

    cuda = args.device == "cuda"
    dataset = Dataset.from_dict(data)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result: dict[str, Any] = {"run": name}
    try:
        if name == "baseline":
            trainer, model = baseline_trainer(model_dir, dataset, tokenizer, work / name, cuda, args.max_length,
                                              args.seed)
            result["settings"] = "r=16 alpha=16 all-linear, batch 4x4 padded, paged_adamw_32bit, ckpt, sdpa"
            lora_r = 16
        else:
            settings = {**LEVERS[name], **extra} if name in LEVERS else dict(extra)
            if settings.get("max_gpu_memory_gib") == "baseline":
                if not baseline_reserved_gib:
                    result["error"] = "needs a baseline run on the GPU before it, in the same process"
                    return result
                settings["max_gpu_memory_gib"] = str(baseline_reserved_gib)
            trainer, model, cfg, parallel = job_trainer(model_dir, dataset, tokenizer, stats, work / name,
                                                        args.max_length, args.seed, settings)
            targs, lora_r = trainer.args, cfg.lora_r
            result["settings"] = {k: v for k, v in settings.items()}
            result["plan"] = {"per_device_train_batch_size": targs.per_device_train_batch_size,
                              "gradient_accumulation_steps": targs.gradient_accumulation_steps,
                              "packing": targs.packing, "gradient_checkpointing": targs.gradient_checkpointing,
                              "use_liger_kernel": targs.use_liger_kernel, "optim": str(targs.optim),
                              "activation_offloading": bool(getattr(targs, "activation_offloading", False)),
                              "attn_implementation": model.config._attn_implementation,
                              "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
                              "layers_without_checkpointing": _layers_kept(trainer),
                              "max_gpu_memory_gib": cfg.max_gpu_memory_gib or None,
                              "parallelism": {"mode": parallel.mode, "reason": parallel.reason},
                              "fsdp": bool(trainer.is_fsdp_enabled)}
        result["load_seconds"] = round(time.monotonic() - started, 1)
        cache = compile_cache.of(trainer)
        result["compile_cache_loaded"] = bool(cache and cache.loaded)
        train_and_measure(trainer, result, cuda, lora_r, stats, args.shape, peak_flops,
                          profile=args.profile == name)
        if cache is not None:  # the job's setting, key, what was loaded and saved, torch's cache hits and misses
            result["compile_cache"] = cache.record()
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        if cuda:
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / sizing.GIB, 2)
    except JobError as exc:  # the job's own refusal (a budget not even its smallest plan fits): what a user sees
        result["error"] = f"refused ({exc.kind}, exit {exc.exit_code}): {exc}"
    finally:
        trainer = model = None
        _free(trainer, model)
        if cuda:  # a run's own cap (max_gpu_memory_gib) must not outlive it
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (args.mem_cap_gib * sizing.GIB / total)
                                                           if args.mem_cap_gib else 1.0))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def train_and_measure(trainer: Any, result: dict[str, Any], cuda: bool, lora_r: int, stats: dict[str, Any],
                      shape_name: str, peak_flops: float | None, profile: bool = False) -> dict[str, Any]:
    """Train one pass with the token counter and step timer, and add the measurements to `result` (also what the
    peers' processes run: entrypoints.bench.peers)."""
    import torch

    meter = Meter(cuda)
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.add_callback(meter.callback())
    if profile:
        trainer.add_callback(profiler_callback(result))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = len(meter.step_end)
    accum = trainer.args.gradient_accumulation_steps
    total_time = meter.step_end[-1] - meter.start
    total_tokens = sum(meter.batch_tokens)
    warm = min(WARMUP_STEPS, steps - 1) if steps > 1 else 0
    steady_time = meter.step_end[-1] - (meter.step_end[warm - 1] if warm else meter.start)
    steady_tokens = total_tokens - sum(meter.batch_tokens[: warm * accum])
    # Under torchrun every rank trains its share of the samples: the rate is the sum over ranks.
    steady_tokens = _all_sum(steady_tokens)
    total_tokens = int(_all_sum(total_tokens))
    tokens_per_second = steady_tokens / steady_time
    quarter = max(1, len(losses) // 4)
    result.update({
        "steps": steps, "micro_batches": len(meter.batch_tokens), "tokens": total_tokens,
        "trained_tokens": int(_all_sum(sum(meter.batch_trained))), "world_size": _world_size(),
        "tokens_per_second": round(tokens_per_second, 1),
        "tokens_per_second_all_steps": round(total_tokens / total_time, 1),
        "seconds_per_step": round(steady_time / max(steps - warm, 1), 3),
        "tokens_per_micro_batch": round(total_tokens / max(len(meter.batch_tokens), 1), 1),
        "train_seconds": round(total_time, 2),  # the same rounding as first_step_seconds (one step: equal)
        # The first optimizer step holds torch.compile's compilation (or its load from the compile cache), Liger's and
        # the optimizer's first kernel builds: apart from the steady-state rate above, which leaves out WARMUP_STEPS.
        "first_step_seconds": round(meter.step_end[0] - meter.start, 2) if steps else None,
        "loss_first": round(sum(losses[:quarter]) / quarter, 4) if losses else None,
        "loss_last": round(sum(losses[-quarter:]) / quarter, 4) if losses else None,
        "train_loss": round(float(out.training_loss), 4),
    })
    if cuda:  # this rank's GPU (rank 0 under torchrun), and every rank's when several
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / sizing.GIB, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / sizing.GIB, 2)
        if _world_size() > 1:
            result["peak_reserved_gib_per_rank"] = _per_rank(result["peak_reserved_gib"])
            result["peak_allocated_gib_per_rank"] = _per_rank(result["peak_allocated_gib"])
    if peak_flops:
        shape = sizing.SHAPES[shape_name]
        flops = sizing.train_flops_per_token(shape, lora_r, stats["mean_attended_keys"])
        peak_flops = peak_flops * _world_size()  # MFU against all the GPUs of the launch
        result["model_tflops_per_second"] = round(tokens_per_second * flops / 1e12, 1)
        result["mfu"] = round(tokens_per_second * flops / peak_flops, 4)
        result["mfu_4n"] = round(tokens_per_second * 4 * sizing.matmul_params(shape) / peak_flops, 4)
    return result


def profiler_callback(result: dict[str, Any], first_step: int = 3, steps: int = 2):
    """Profile optimizer steps [first_step, first_step + steps) with torch.profiler; print the kernels that took
    the most GPU time and keep the top of the table in the run's result (`profile`)."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.prof is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first_step + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                table = self.prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
                print(f"profile of steps {first_step}..{first_step + steps - 1}:\n{table}", flush=True)
                result["profile"] = table.splitlines()[:32]
                self.prof = None

    return Profile()


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """`ratio`: tokens/s over the baseline's (when a baseline ran); `vs_peer`: a job run capped at a peer's peak
    memory (`--at-memory-of`) over that peer's tokens/s."""
    base = next((r for r in runs if r["run"] == "baseline" and "tokens_per_second" in r), None)
    by_name = {r["run"]: r for r in runs}
    for r in runs:
        if base and "tokens_per_second" in r:
            r["ratio"] = round(r["tokens_per_second"] / base["tokens_per_second"], 2)
        peer = by_name.get(r.get("peer", ""))
        if peer and "tokens_per_second" in r and peer.get("tokens_per_second"):
            r["vs_peer"] = round(r["tokens_per_second"] / peer["tokens_per_second"], 2)


def print_table(report: dict[str, Any]) -> None:
    cols = ["run", "tokens_per_second", "ratio", "vs_peer", "peer_memory_gib", "seconds_per_step", "first_step_seconds",
            "peak_allocated_gib", "peak_reserved_gib", "mfu", "loss_first", "loss_last", "steps", "skipped", "error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in report["runs"]:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |", flush=True)


def _gib(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 else None


def run_name_problem(name: str, earlier: Sequence[str]) -> str | None:
    """Why a --runs name is not one (None when it is): baseline, a lever, a peer, LEVER@GIB (capped at GIB) or
    LEVER@RUN (capped at the peak of RUN, named earlier)."""
    lever, at, where = name.partition("@")
    if not at:
        if name == "baseline" or name in LEVERS or name in PEERS:
            return None
        return f"unknown run {name!r}; choose from baseline, {', '.join(LEVERS)}, {', '.join(PEERS)}"
    if lever not in LEVERS:
        return f"{name!r}: {lever!r} is not a lever of the job ({', '.join(LEVERS)})"
    if _gib(where) is None and where not in earlier:
        return f"{name!r}: {where!r} is neither a number of GiB nor a run named before it"
    return None


def peer_installed(name: str, unsloth_path: str) -> str | None:
    """None when the peer can run here, else why not (`not installed ...`), without importing it: Unsloth patches
    transformers on import, so only its own process may import it."""
    import importlib.machinery
    import importlib.util

    if name == "unsloth":
        places = ([unsloth_path] if unsloth_path else []) + sys.path
        if importlib.machinery.PathFinder.find_spec("unsloth", places) is None:
            return f"not installed (no unsloth module on {unsloth_path or 'sys.path'}; see docs/PERF.md)"
    elif importlib.util.find_spec("trl") is None:
        return "not installed (no trl)"
    return None


def run_peer(name: str, model_dir: Path, data: dict[str, list], stats: dict[str, Any], work: Path,
             args: argparse.Namespace, peak_flops: float | None) -> dict[str, Any]:
    """A peer (entrypoints.bench.peers) over the same samples, in its own process; its JSON result."""
    import subprocess

    why_not = peer_installed(name, args.unsloth_path)
    if why_not:
        return {"run": name, "skipped": why_not}
    samples = work / "samples.jsonl"
    if not samples.exists():
        with samples.open("w") as f:
            for ids, mask in zip(data["input_ids"], data["assistant_masks"], strict=True):
                f.write(json.dumps({"input_ids": ids, "assistant_masks": mask}) + "\n")
    out = work / f"{name}.json"
    env = dict(os.environ)
    if name == "unsloth":
        env.update(UNSLOTH_DISABLE_AUTO_UPDATES="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if args.unsloth_path:  # its wheel set (trl, datasets, bitsandbytes of its own) ahead of the job's
            env["PYTHONPATH"] = os.pathsep.join(p for p in (args.unsloth_path, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "entrypoints.bench.peers", name, "--model-dir", str(model_dir), "--samples",
               str(samples), "--out", str(out), "--device", args.device, "--shape", args.shape, "--max-length",
               str(args.max_length), "--rows", str(args.peer_rows), "--seed", str(args.seed), "--peak-flops",
               str(peak_flops or 0.0), "--stats", json.dumps(stats)]
    started = time.monotonic()
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0 or not out.exists():
        return {"run": name, "error": f"its process exited {done.returncode} (log above)",
                "wall_seconds": round(time.monotonic() - started, 1)}
    return {"compile_cache_loaded": False, **json.loads(out.read_text())}  # a peer loads no compile cache of the job


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m entrypoints.bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(sizing.SHAPES), default="7b")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--runs", default="baseline,default",
                   help=f"comma-separated: baseline, {', '.join(LEVERS)}; peers, each in its own process:"
                        f" {', '.join(PEERS)}; LEVER@GIB: a lever capped at GIB (max_gpu_memory_gib); LEVER@RUN: a"
                        " lever capped at the peak reserved memory of RUN, named before it")
    p.add_argument("--at-memory-of", default="", metavar="RUN[,RUN]",
                   help="after --runs, the job's default (with --set) again, capped at each named run's peak reserved"
                        " memory (max_gpu_memory_gib), as run `default@RUN` with its tokens/s over RUN's (vs_peer)")
    p.add_argument("--peer-rows", type=int, default=3, help="packed rows of --max-length per micro-batch of the peers")
    p.add_argument("--unsloth-path", default="", metavar="DIR",
                   help="a directory holding Unsloth's wheel set (pip install --target), put first on the unsloth"
                        " run's PYTHONPATH")
    p.add_argument("--samples", type=int, default=512, help="samples in the one pass each run makes")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--fixed-length", type=int, default=0, help="every sample this long (memory checks)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a job setting for every non-baseline run, e.g. --set micro_batch_tokens=4096")
    p.add_argument("--mem-cap-gib", type=float, default=0.0,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--model-dir", default="", help="reuse a checkpoint written before (else built in a temp dir)")
    p.add_argument("--prequantized", choices=("auto", "true", "false"), default="auto",
                   help="write the random checkpoint in bitsandbytes 4-bit form (nf4, double quantization), which the"
                        " job's path loads as stored; auto: when the 16-bit checkpoint would not fit the free disk")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--profile", default="", metavar="RUN", help="profile two steps of this run (torch.profiler)")
    p.add_argument("--export-jsonl", default="", metavar="PATH",
                   help="also write the synthetic samples as `text` records (words t3..tN of the checkpoint's"
                        " tokenizer) for a real job run over the same data; with --runs '' nothing is trained")
    p.add_argument("--out", default="", help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    extra = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"--set {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        extra[name.strip()] = value.strip()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    at_memory_of = [r.strip() for r in args.at_memory_of.split(",") if r.strip()]
    missing = [r for r in at_memory_of if r not in runs]
    if missing:
        print(f"--at-memory-of: {', '.join(missing)} not in --runs: name runs measured before (e.g. --runs"
              f" trl-best --at-memory-of trl-best)", file=sys.stderr)
        return 2
    runs += [f"default@{r}" for r in at_memory_of]
    problems = [problem for i, r in enumerate(runs) if (problem := run_name_problem(r, runs[:i]))]
    if problems:
        print("--runs: " + "; ".join(problems), file=sys.stderr)
        return 2
    peers_in_torchrun = [r for r in runs if r in PEERS]
    rank, world = int(os.environ.get("RANK", "0")), _world_size()
    if world > 1:
        if not args.model_dir or "baseline" in runs or peers_in_torchrun:
            print("under torchrun: pass --model-dir (a path all ranks share) and leave out the baseline run and the"
                  " peers", file=sys.stderr)
            return 2
        import torch.distributed as dist

        torch.cuda.set_device(_local_rank())
        dist.init_process_group("nccl")

    report: dict[str, Any] = {"gpu": _gpu_name(), "world_size": world, "date": datetime.date.today().isoformat(), "versions": _versions(),
                              "command": "python -m entrypoints.bench.throughput " + " ".join(argv or sys.argv[1:]),
                              "mem_cap_gib": args.mem_cap_gib or None, "runs": []}
    peak = measure_bf16_peak_flops() if args.device == "cuda" else None
    report["bf16_peak_tflops"] = round(peak / 1e12, 1) if peak else None

    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        work = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else work / "model"
        if rank == 0 and not (model_dir / "config.json").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            report["checkpoint"] = build_checkpoint(args.shape, model_dir, args.device,
                                                    wants_prequantized(args.prequantized, args.shape, model_dir))
            log.info("checkpoint: %s", json.dumps(report["checkpoint"]))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's checkpoint
        if args.mem_cap_gib and args.device == "cuda":  # after the checkpoint is written: it only caps training
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * sizing.GIB / total))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data = synthetic_chat(args.samples, sizing.SHAPES[args.shape].vocab_size, args.max_length, args.seed,
                              args.fixed_length)
        stats = data_stats(data, args.max_length)
        report["data"] = stats
        if args.export_jsonl and rank == 0:
            export_text(data, Path(args.export_jsonl))
        log.info("data: %s", json.dumps(stats))
        for name in runs:
            base = next((r for r in report["runs"] if r["run"] == "baseline" and "peak_reserved_gib" in r), None)
            lever, _, where = name.partition("@")
            if name in PEERS:
                result = run_peer(name, model_dir, data, stats, work, args, peak)
            elif where and _gib(where) is not None:  # LEVER@GIB: the lever capped at GIB
                result = run_one(name, model_dir, data, stats, tokenizer, work, args, peak,
                                 {**LEVERS[lever], **extra, "max_gpu_memory_gib": where})
            elif where:  # LEVER@RUN: the lever capped at RUN's peak reserved memory, compared with RUN
                peer = next(r for r in report["runs"] if r["run"] == where)
                memory = peer.get("peak_reserved_gib")
                if memory:
                    result = run_one(name, model_dir, data, stats, tokenizer, work, args, peak,
                                     {**LEVERS[lever], **extra, "max_gpu_memory_gib": str(memory)})
                else:
                    result = {"run": name, "error": f"{peer['run']} has no measured peak memory (a GPU run that"
                                                    " finished is needed)"}
                result.update(peer=peer["run"], peer_memory_gib=memory)
            else:
                result = run_one(name, model_dir, data, stats, tokenizer, work, args, peak, extra,
                                 base["peak_reserved_gib"] if base else None)
            report["runs"].append(result)
            add_ratios(report["runs"])
            log.info("result: %s", json.dumps(result))
            if args.out and rank == 0:
                Path(args.out).write_text(json.dumps(report, indent=2))
    if rank == 0:
        print_table(report)
        print("BENCHMARK_JSON " + json.dumps(report), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    # A peer that is not installed is skipped, not failed; a refused or failed run makes the exit 1.
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
