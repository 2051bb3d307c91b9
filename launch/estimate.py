"""Pre-flight estimates: does the model fit the GPU, and roughly how long and how much will the run take.

    python -m launch.submit --instance g5.2xlarge --dry-run ...   # prints both before anything is sent

GPU memory: the job's own memory model and batch plan (entrypoints/sizing.py), so the launcher's answer is the
plan the job will make on that GPU: the smallest plan the settings allow (`sizing.smallest_budget_bytes`: the frozen
weights, the LoRA weights with their AdamW state, in 8 bits when optim is auto, 1 GiB of CUDA context unless
max_gpu_memory_gib caps the allocator, and one packed row of max_seq_length with every layer recomputed and its
input offloaded to CPU memory, with the allocator's measured overhead; without packing micro_batch_size padded
samples) must fit one GPU or the cap (DDP keeps a full copy per GPU); the job refuses the same budget. With several
GPUs and `parallelism=auto` the job shards the model with FSDP when it does not fit one GPU
(sizing.choose_parallelism, the same decision the job makes): then the weights and LoRA state are divided among the
GPUs, plus the largest unit FSDP gathers, and the whole 4-bit model must still fit one GPU while it loads. When it
fits, the plan on that GPU is printed: DDP or FSDP and why, micro-batch tokens, accumulation, how many layers keep
their activations, and the memory savers it needs.

Throughput (tokens/s per GPU for a 7B Llama with QLoRA, bf16 compute) is a rough planning number per GPU
model, scaled by 7B / model size; real numbers depend on sequence length, packing and kernels. Only the H100
figure is anchored to a measurement of the job (docs/PERF.md); the others are estimates. Step tokens = micro_batch_size x gradient_accumulation_steps x
max_seq_length x GPUs (an upper bound: it assumes full, packed sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from entrypoints import sizing
from entrypoints.config import JobConfig
from entrypoints.sizing import GIB, ModelShape
from launch.instances import GpuInstance

# Planning throughput, tokens/s per GPU for a 7B model with QLoRA (see the module docstring).
TOKENS_PER_SECOND_7B = {
    "NVIDIA A10G": 1000,
    "NVIDIA L4": 700,
    "NVIDIA L40S": 2200,
    "NVIDIA A100 40GB": 3000,
    "NVIDIA A100 80GB": 3200,
    # Measured with the job's default path on the Llama-2-7B shape (docs/PERF.md): 8,303 tokens/s on an
    # H100 with every layer recomputed, 12,688 on an H200 with the activations kept (80 GB allows it).
    "NVIDIA H100": 11000,
}
# Image pull, model download and load, the merge and the upload: a rough fixed cost per run.
FIXED_OVERHEAD_SECONDS = 15 * 60
GB = 10**9
# Besides the model and the merge: checkpoints (LoRA and optimizer state), the data, caches, logs.
DISK_MARGIN_BYTES = 20 * GB


@dataclass(frozen=True)
class Fit:
    ok: bool  # False: refuse (unless the user overrides)
    warning: bool  # near the limit
    message: str


def check_fit(shape: ModelShape | None, cfg: JobConfig, instance: GpuInstance, instance_count: int = 1) -> Fit:
    if shape is None:
        return Fit(True, True, f"GPU memory check skipped: the size of {cfg.model!r} is unknown (known: Llama 2"
                               " 7B/13B/70B by name, a local model directory, or --model-config FILE)")
    gpu = float(instance.gpu_memory_gib)
    capped = 0 < cfg.max_gpu_memory_gib < gpu  # the job caps itself there too (its allocator, not the CUDA context)
    settings = replace(sizing.PlanSettings.of(cfg), capped=capped)
    have = (cfg.max_gpu_memory_gib if capped else gpu) * GIB
    # The job decides DDP or FSDP with the same function, from the same memory, for its torchrun processes.
    parallel = sizing.choose_parallelism(cfg.parallelism, shape, settings, instance.gpu_count * instance_count, have)
    shards = parallel.shards
    need = sizing.smallest_budget_bytes(shape, settings, shards=shards)
    offload, optim = sizing.memory_levels(settings)[-1] if settings.packing else (False, "")
    weights = sizing.weight_bytes(shape, settings.quantization, settings.double_quant) / shards
    lora = sizing.adamw_bytes_per_param(optim or settings.optim) * sizing.lora_params(
        shape, settings.lora_r, settings.lora_targets) / shards
    gathered = sizing.gathered_bytes(shape, settings) if shards > 1 else 0.0
    sharded = f" sharded over {shards} GPUs (FSDP), + {gathered / GIB:.1f} gathered at a time" if shards > 1 else ""
    smallest = ("one packed row of max_seq_length" if settings.packing else "micro_batch_size padded samples") + (
        ", every layer recomputed" + (" with its input offloaded to CPU memory" if offload else "")
        if settings.gradient_checkpointing != "false" else ", no layer recomputed") + (f", {optim}" if optim else "")
    budget = f"max_gpu_memory_gib={cfg.max_gpu_memory_gib:g}" if capped else f"{gpu:g} GiB"
    detail = (f"{shape.name} ({shape.total_params / 1e9:.1f}B params): at least {need / GIB:.1f} GiB per GPU (weights"
              f" {weights / GIB:.1f} + LoRA/optimizer {lora / GIB:.1f}{sharded}{'' if capped else ' + CUDA context 1.0'}"
              f" + the smallest micro-batch's activations with their allocator overhead: {smallest}) vs {budget} on"
              f" each {instance.gpu_model} of {instance.name}; parallelism: {parallel.mode} ({parallel.reason})")
    loading = sizing.load_bytes(shape, settings)
    if need > have or (shards > 1 and loading > have):
        fix = ("lower QLORA_MAX_SEQ_LENGTH (or QLORA_MICRO_BATCH_SIZE without packing), use a smaller model, or pick an"
               " instance with more GPU memory" + ("" if instance.gpu_count * instance_count > 1 else
                                                  " (or more GPUs: FSDP shards the model over them)")
               + (", or raise QLORA_MAX_GPU_MEMORY_GIB" if capped else ""))
        if shards > 1 and need <= have:
            fix = (f"the whole 4-bit model ({loading / GIB:.1f} GiB) is loaded on every GPU before FSDP shards it;"
                   " pick GPUs with more memory")
        return Fit(False, True, f"does not fit: {detail}; {fix}")
    if not settings.packing:
        return Fit(True, need > 0.9 * have, f"fits: {detail}")
    plan = sizing.plan_batch(settings, int(have), shape, float(cfg.max_seq_length) / 2, shards=shards)
    savers = [s for s, on in (("activation offload", plan.activation_offload), (plan.optim, bool(plan.optim))) if on]
    planned = (f"; the job's plan there (samples of ~{cfg.max_seq_length // 2} tokens): {plan.micro_batch_tokens}"
               f" tokens per micro-batch x {plan.gradient_accumulation_steps}, {plan.layers_without_checkpointing} of"
               f" {shape.num_hidden_layers} layers keep their activations"
               + (f", memory short: {' + '.join(savers)}" if savers else ""))
    if need > 0.9 * have:
        return Fit(True, True, f"tight fit: {detail}{planned}; a long sample may run out of memory")
    return Fit(True, False, f"fits: {detail}{planned}")


def disk_need_bytes(shape: ModelShape, merge: bool) -> int:
    """Scratch disk one run fills: the base model as downloaded (16-bit weights, or a pre-quantized checkpoint's 4-bit
    ones), and the merged model's 16-bit weights (written before they are uploaded), plus a margin (checkpoints,
    data, caches)."""
    weights = sizing.checkpoint_bytes(shape) + (sizing.merged_bytes(shape) if merge else 0)
    return int(weights * 1.1) + DISK_MARGIN_BYTES


def check_disk(shape: ModelShape | None, cfg: JobConfig, available_bytes: int, where: str) -> str | None:
    """A warning when the model (and its merge) will not fit the disk; None when it does or the size is unknown."""
    if shape is None:
        return None
    need = disk_need_bytes(shape, cfg.merge)
    if need <= available_bytes:
        return None
    merge = " + the merged model" if cfg.merge else ""
    weights = "its 4-bit weights" if shape.stored_4bit else "its 16-bit weights"
    return (f"WARNING: {shape.name} needs about {need / GB:.0f} GB of disk ({weights}{merge} + checkpoints,"
            f" data and caches) but {where} has {available_bytes / GB:.0f} GB: the job would stop with a full disk"
            " (exit 5)")


@dataclass(frozen=True)
class CostEstimate:
    seconds: float | None
    usd: float | None
    message: str


def time_and_cost(shape: ModelShape | None, cfg: JobConfig, instance: GpuInstance, count: int,
                  dataset_tokens: int | None, tokens_from: str = "--dataset-tokens") -> CostEstimate:
    """`tokens_from`: where `dataset_tokens` came from (the flag, or a sample of the data), for the basis line."""
    gpus = instance.gpu_count * count
    params_b = (shape.total_params / 1e9) if shape else 7.0
    per_gpu = TOKENS_PER_SECOND_7B.get(instance.gpu_model, 1000) * 7.0 / params_b
    step_tokens = cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_length * gpus
    if cfg.max_steps > 0:
        tokens = cfg.max_steps * step_tokens
        basis = (f"max_steps={cfg.max_steps} x {step_tokens} tokens/step, an UPPER BOUND: it counts every sample as"
                 f" {cfg.max_seq_length} tokens; with short samples the run is shorter")
    elif dataset_tokens:
        tokens = dataset_tokens * cfg.num_epochs
        basis = f"the data's {dataset_tokens} tokens ({tokens_from}) x {cfg.num_epochs:g} epoch(s)"
    else:
        return CostEstimate(None, None, "time/cost estimate needs QLORA_MAX_STEPS, --dataset-tokens N or data in S3"
                                        " that can be sampled"
                                        f" (price: {instance.price_per_hour_usd * count:.2f} USD/hour for"
                                        f" {count} x {instance.name})")
    seconds = tokens / (per_gpu * gpus) + FIXED_OVERHEAD_SECONDS
    usd = seconds / 3600 * instance.price_per_hour_usd * count
    size = shape.name if shape else "a 7B model (size unknown)"
    message = (f"ESTIMATE: ~{seconds / 3600:.1f} h, ~{usd:.2f} USD on-demand ({basis}; ~{per_gpu:.0f} tokens/s"
               f" per {instance.gpu_model} for {size}; {gpus} GPU(s); +{FIXED_OVERHEAD_SECONDS // 60} min"
               f" fixed; {instance.price_per_hour_usd:.3f} USD/h EC2 list price each)")
    return CostEstimate(seconds, usd, message)
