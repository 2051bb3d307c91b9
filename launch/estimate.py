"""Pre-flight estimates: does the model fit the GPU, and roughly how long and how much will the run take.

    python -m launch.submit --instance g5.2xlarge --dry-run ...   # prints both before anything is sent

Everything here is an estimate from a formula, not a measurement; the printout says so.

GPU memory of one QLoRA training process (one per GPU: DDP keeps a full copy of the model per GPU):

    weights      = linear_params x bits/8  (nf4/fp4: 4 bits + 0.127 bit of double-quantized constants,
                   0.5 bit without double quant; `none`: 16 bits) + embedding and LM-head params x 2 bytes
    lora         = lora_params x 16 bytes  (fp32 weight, fp32 grad, two fp32 AdamW moments)
                   lora_params = r x (in + out) summed over the adapted linear layers
    activations  = with gradient checkpointing: one saved hidden state per layer,
                     b x s x hidden x 2 bytes x layers, plus one layer being recomputed,
                     b x s x (10 x hidden + 4 x intermediate) x 2 bytes
                   without it: the second term x layers
                   (b = micro_batch_size, s = max_seq_length; SDPA/flash attention keep no s x s scores)
    logits       = b x s x vocab x 10 bytes (bf16 logits, fp32 upcast for the loss, and its gradient)
    overhead     = 1.5 GiB (CUDA context, cuBLAS workspace, allocator) and x 1.1 for fragmentation

Throughput (tokens/s per GPU for a 7B Llama with QLoRA, bf16 compute) is a rough planning number per GPU
model, scaled by 7B / model size; real numbers depend on sequence length, packing and kernels. Only the H100
figure is anchored to a measurement of the job (docs/PERF.md); the others are estimates. Step tokens = micro_batch_size x gradient_accumulation_steps x
max_seq_length x GPUs (an upper bound: it assumes full, packed sequences).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from entrypoints.config import JobConfig
from launch.instances import GpuInstance

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by module name."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.linear_params + self.embedding_params + norms


# Published Llama 2 configurations (config.json of meta-llama/Llama-2-{7,13,70}b-hf).
LLAMA2 = {
    "7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
}

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


def model_shape(model: str) -> ModelShape | None:
    """The model's dimensions from a local config.json, or a known Llama 2 size in the name; else None."""
    config_file = Path(model) / "config.json"
    if not model.startswith("s3://") and config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
            heads = int(cfg["num_attention_heads"])
            return ModelShape(
                name=model,
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                vocab_size=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
    match = re.search(r"llama-?2.*?[-_](7|13|70)b", model.lower())
    return LLAMA2[match.group(1) + "b"] if match else None


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    total_gib: float
    lora_params: int


def lora_params(shape: ModelShape, cfg: JobConfig) -> int:
    targets = cfg.target_modules
    per_layer = 0
    for module, (n_in, n_out) in shape.linear_shapes().items():
        if targets == "all-linear" or module in targets:
            per_layer += cfg.lora_r * (n_in + n_out)
    return per_layer * shape.num_layers


def gpu_memory(shape: ModelShape, cfg: JobConfig) -> MemoryEstimate:
    if cfg.quantization == "none":
        bits = 16.0
    else:
        bits = 4.0 + (0.127 if cfg.double_quant else 0.5)
    weights = shape.linear_params * bits / 8 + shape.embedding_params * 2
    n_lora = lora_params(shape, cfg)
    lora = n_lora * 16
    b, s = cfg.micro_batch_size, cfg.max_seq_length
    one_layer = b * s * (10 * shape.hidden_size + 4 * shape.intermediate_size) * 2
    # `auto` fits the un-recomputed layers into whatever memory is left, so its minimum is the recomputing plan.
    if cfg.gradient_checkpointing != "false":
        activations = b * s * shape.hidden_size * 2 * shape.num_layers + one_layer
    else:
        activations = one_layer * shape.num_layers
    logits = b * s * shape.vocab_size * 10
    overhead = 1.5 * GIB
    total = (weights + lora + activations + logits + overhead) * 1.1
    return MemoryEstimate(weights / GIB, lora / GIB, activations / GIB, logits / GIB, overhead / GIB,
                          total / GIB, n_lora)


@dataclass(frozen=True)
class Fit:
    ok: bool  # False: refuse (unless the user overrides)
    warning: bool  # near the limit
    message: str


def check_fit(shape: ModelShape | None, cfg: JobConfig, instance: GpuInstance) -> Fit:
    if shape is None:
        return Fit(True, True, f"GPU memory check skipped: the size of {cfg.model!r} is unknown (known: Llama 2"
                               " 7B/13B/70B by name, or a local model directory with config.json)")
    est = gpu_memory(shape, cfg)
    have = instance.gpu_memory_gib
    detail = (f"{shape.name} ({shape.total_params / 1e9:.1f}B params), max_seq_length={cfg.max_seq_length},"
              f" micro_batch_size={cfg.micro_batch_size}: estimated {est.total_gib:.1f} GiB per GPU"
              f" (weights {est.weights_gib:.1f} + LoRA/optimizer {est.lora_gib:.1f} + activations"
              f" {est.activations_gib:.1f} + logits {est.logits_gib:.1f} + overhead {est.overhead_gib:.1f},"
              f" x1.1) vs {have} GiB on each {instance.gpu_model} of {instance.name}")
    if est.total_gib > have:
        fix = ("lower QLORA_MICRO_BATCH_SIZE (raise QLORA_GRADIENT_ACCUMULATION_STEPS to keep the batch) or"
               " QLORA_MAX_SEQ_LENGTH, or pick an instance with more GPU memory")
        return Fit(False, True, f"does not fit: {detail}; {fix}")
    if est.total_gib > 0.9 * have:
        return Fit(True, True, f"tight fit: {detail}; a long sample may run out of memory")
    return Fit(True, False, f"fits: {detail}")


@dataclass(frozen=True)
class CostEstimate:
    seconds: float | None
    usd: float | None
    message: str


def time_and_cost(shape: ModelShape | None, cfg: JobConfig, instance: GpuInstance, count: int,
                  dataset_tokens: int | None) -> CostEstimate:
    gpus = instance.gpu_count * count
    params_b = (shape.total_params / 1e9) if shape else 7.0
    per_gpu = TOKENS_PER_SECOND_7B.get(instance.gpu_model, 1000) * 7.0 / params_b
    step_tokens = cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_length * gpus
    if cfg.max_steps > 0:
        tokens = cfg.max_steps * step_tokens
        basis = f"max_steps={cfg.max_steps} x {step_tokens} tokens/step"
    elif dataset_tokens:
        tokens = dataset_tokens * cfg.num_epochs
        basis = f"{dataset_tokens} dataset tokens x {cfg.num_epochs:g} epoch(s)"
    else:
        return CostEstimate(None, None, "time/cost estimate needs QLORA_MAX_STEPS or --dataset-tokens N"
                                        f" (price: {instance.price_per_hour_usd * count:.2f} USD/hour for"
                                        f" {count} x {instance.name})")
    seconds = tokens / (per_gpu * gpus) + FIXED_OVERHEAD_SECONDS
    usd = seconds / 3600 * instance.price_per_hour_usd * count
    size = shape.name if shape else "a 7B model (size unknown)"
    message = (f"ESTIMATE: ~{seconds / 3600:.1f} h, ~{usd:.2f} USD on-demand ({basis}; ~{per_gpu:.0f} tokens/s"
               f" per {instance.gpu_model} for {size}; {gpus} GPU(s); +{FIXED_OVERHEAD_SECONDS // 60} min"
               f" fixed; {instance.price_per_hour_usd:.3f} USD/h EC2 list price each)")
    return CostEstimate(seconds, usd, message)
