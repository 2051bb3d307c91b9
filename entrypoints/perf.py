"""Speed and memory decisions of the training job: batch plan, packing, kernels, FLOPs accounting.

    python -m entrypoints.perf --shape 7b --gpu-mem-gib 24 --mean-tokens 410   # print the batch plan

Plain functions the job (entrypoints.train / entrypoints.modeling) and the benchmark both call, so the
benchmark measures the job's real path. What each lever gave, measured, is in docs/PERF.md.

- `plan_batch`: tokens per packed micro-batch and gradient accumulation, from the GPU's memory and the
  data's mean sample length, keeping the tokens per optimizer step of the unpacked recipe (so packing
  does not silently change the optimisation: same samples per step on average, fewer kernel launches).
- `sft_overrides`: the SFTConfig arguments that follow from the plan (BFD packing, padding-free, Liger).
- `patch_model`: per-sample (varlen) flash attention over packed rows, through PyTorch's own kernel.
- `train_flops_per_token` / `measure_bf16_peak_flops`: the model-FLOPs-utilisation accounting.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("qlora.perf")

GIB = 1024**3
VARLEN_ATTENTION = "qlora_varlen"  # the name registered with transformers' AttentionInterface

# Llama-2 shapes (config.json of meta-llama/Llama-2-{7,13,70}b-hf); `tiny` runs on a laptop CPU.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}


# ------------------------------------------------------------------------------------------- FLOPs
def matmul_params(shape: dict[str, int]) -> int:
    """Weights that take part in matmuls: q,k,v,o, gate/up/down per layer, and the LM head (not the embedding)."""
    d, ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff
    return layers * per_layer + d * shape["vocab_size"]


def lora_params(shape: dict[str, int], r: int) -> int:
    """LoRA A+B parameters on every linear layer of the blocks (all-linear; the LM head is not adapted)."""
    d, ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    return layers * per_layer


def mean_attended_keys(lengths: Sequence[int]) -> float:
    """Keys each token attends to on average under causal per-sample attention: sum n(n+1)/2 / sum n."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def train_flops_per_token(shape: dict[str, int], lora_r: int, attended_keys: float) -> float:
    """Model FLOPs of one trained token of QLoRA (recomputation by checkpointing is NOT counted).

    frozen 4-bit matmuls: forward 2N + gradient w.r.t. the input 2N (no weight gradient) = 4N
    LoRA adapters:        forward 2P + input gradient 2P + weight gradient 2P        = 6P
    attention (QK^T, AV): forward 2 x 2 x d x c per layer, backward twice that       = 12 L d c
    with N = matmul weights (LM head included), P = LoRA weights, c = mean attended keys per token.
    """
    n = matmul_params(shape)
    p = lora_params(shape, lora_r)
    return 4.0 * n + 6.0 * p + 12.0 * shape["num_hidden_layers"] * shape["hidden_size"] * attended_keys


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


# ------------------------------------------------------------------------------------------- batch plan
# Share of the GPU's memory the plan fills with its estimates; the rest absorbs allocator fragmentation
# (peak reserved was 1.5-2 GiB above peak allocated on 7B/13B) and estimate error.
MEMORY_SHARE = 0.80


@dataclass(frozen=True)
class BatchPlan:
    rows: int  # packed rows per micro-batch (per_device_train_batch_size)
    micro_batch_tokens: int  # rows * row_tokens: tokens per forward/backward pass
    gradient_accumulation_steps: int
    gradient_checkpointing: bool  # whether any decoder layer is recomputed in the backward pass
    layers_without_checkpointing: int  # decoder layers that keep their activations (the first ones)
    reason: str
    # Tokens per packed row: max_seq_length, or less when one optimizer step holds fewer tokens than that (never
    # less than the longest sample, so packing truncates nothing that max_seq_length keeps).
    row_tokens: int = 0


def weight_bytes(shape: dict[str, int], quantized: bool = True) -> float:
    """Resident bytes of the frozen model: nf4 + double-quantized constants (~4.13 bits) or bf16, and bf16 embeddings."""
    n = matmul_params(shape) - shape["hidden_size"] * shape["vocab_size"]
    bits = 4.13 if quantized else 16.0
    return n * bits / 8 + 2 * 2 * shape["hidden_size"] * shape["vocab_size"]


def activation_bytes_per_token(shape: dict[str, int], checkpointing: bool) -> float:
    """Peak activation bytes per token of a packed micro-batch with every layer recomputed (True) or none.

    With checkpointing about 0.55 MB per token on the Llama-2-7B shape, measured on an H100/H200 (the bf16
    input of every layer, one layer's activations during its recompute, the LM head and loss), scaled with
    layers x hidden size for other shapes; without it, that plus `layer_bytes_per_token` for every layer.
    """
    scale = shape["num_hidden_layers"] * shape["hidden_size"] / (32 * 4096)
    recomputed = 0.55e6 * scale
    if checkpointing:
        return recomputed
    return recomputed + shape["num_hidden_layers"] * layer_bytes_per_token(shape, lora_dropout=True)


def layer_bytes_per_token(shape: dict[str, int], lora_dropout: bool) -> float:
    """Extra activation bytes per token of one decoder layer that is not recomputed (QLoRA, Liger kernels).

    bf16 tensors kept for the backward pass: the normalised inputs, residuals and attention output (~7 x
    hidden), q/k/v (hidden + 2 x kv), the SwiGLU gate and up projections (2 x intermediate); with LoRA dropout,
    every adapted module also keeps its own dropped-out bf16 copy of its input (6 x hidden + intermediate).
    Plus 10% margin. Measured on 7B (H200, 2026-11-28, PERF.md; all 32 layers kept vs none at 6,144-token
    micro-batches): 118 KB per token and layer without dropout, 187 KB with; this gives 130 and 208 KB.
    """
    d, ff = shape["hidden_size"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    kept = 2.0 * (7 * d + 2 * kv + 2 * ff)
    if lora_dropout:
        kept += 2.0 * (6 * d + ff)
    return 1.10 * kept


def fixed_bytes(shape: dict[str, int], cfg: Any) -> float:
    """Memory that does not grow with the micro-batch: frozen weights, LoRA weights + AdamW state (fp32:
    weight, gradient, two moments = 16 bytes each), and 1 GiB for the CUDA context's share and workspaces."""
    return (weight_bytes(shape, cfg.quantization != "none") + 16.0 * lora_params(shape, cfg.lora_r)
            + 1.0 * GIB)


def plan_batch(cfg: Any, gpu_mem_bytes: int, shape: dict[str, int], mean_sample_tokens: float,
               on_gpu: bool = True, longest_sample_tokens: int | None = None) -> BatchPlan:
    """Pick the packed row length, rows per micro-batch, gradient accumulation and checkpointed layers.

    Tokens per optimizer step = micro_batch_size x gradient_accumulation_steps x mean sample length, i.e.
    the same number of samples per step as the unpacked recipe, so the learning dynamics stay the same.
    Packed rows are max_seq_length tokens long; when one step holds fewer tokens than that (small samples, small
    batches), a row is one step long instead, but never shorter than the longest sample (so that packing cuts
    nothing that max_seq_length keeps): a step is never larger than the documented size or than one sample.
    Tokens per micro-batch: `cfg.micro_batch_tokens` when set, else as many as fit in 80% of the GPU's
    memory after the weights with every layer recomputed, never above one step's tokens.
    Checkpointing: `true` recomputes every layer, `false` none; `auto` (on a GPU) then spends what is left of
    80% of the memory on layers that keep their activations, each costing `layer_bytes_per_token` x the
    micro-batch's tokens, and switches checkpointing off when all of them fit. Recomputation is a third of
    a layer's work, so every layer kept is ~1/3 of its backward saved (PERF.md).
    """
    seq = cfg.max_seq_length
    layers = shape["num_hidden_layers"]
    mode = {True: "true", False: "false"}.get(cfg.gradient_checkpointing, str(cfg.gradient_checkpointing))
    step_tokens = cfg.micro_batch_size * cfg.gradient_accumulation_steps * max(mean_sample_tokens, 1.0)
    longest = min(seq, max(1, longest_sample_tokens or seq))
    row = seq if step_tokens >= seq else min(seq, max(longest, math.ceil(step_tokens)))
    step_tokens = max(step_tokens, float(row))
    step_text = (f"one step is ~{int(step_tokens)} tokens ({cfg.micro_batch_size}x{cfg.gradient_accumulation_steps}"
                 f" samples of ~{mean_sample_tokens:.0f}{'' if row == seq else f', the longest {longest}'})")
    requested = int(getattr(cfg, "micro_batch_tokens", 0) or 0)
    fixed = fixed_bytes(shape, cfg)
    if requested:
        micro = max(row, requested)
        reason = f"micro_batch_tokens={requested} set; {step_text}"
    elif not on_gpu:
        micro = max(row, int(step_tokens))
        reason = f"no GPU memory to plan for: one step per micro-batch; {step_text}"
    else:
        budget = MEMORY_SHARE * gpu_mem_bytes - fixed
        fit = int(budget / activation_bytes_per_token(shape, mode != "false")) if budget > 0 else 0
        micro = max(row, min(fit, int(step_tokens)))
        reason = f"{fit} tokens fit in {MEMORY_SHARE:.0%} of {gpu_mem_bytes / GIB:.0f} GiB; {step_text}"
    if row < seq:
        reason += f"; packed rows of {row} tokens (one step is less than max_seq_length={seq})"
    rows = max(1, micro // row)
    tokens = rows * row
    accum = max(1, round(step_tokens / tokens))
    if mode == "false":
        kept = layers
    elif mode == "true" or not on_gpu:
        kept = 0
        if mode == "auto":
            reason += "; every layer recomputed"
    else:
        spare = MEMORY_SHARE * gpu_mem_bytes - fixed - tokens * activation_bytes_per_token(shape, True)
        per_layer = tokens * layer_bytes_per_token(shape, float(cfg.lora_dropout) > 0)
        kept = max(0, min(layers, int(spare // per_layer))) if spare > 0 else 0
        reason += (f"; {kept} of {layers} layers keep their activations ({per_layer / GIB:.2f} GiB each at"
                   f" {tokens} tokens, {max(spare, 0) / GIB:.1f} GiB spare in {MEMORY_SHARE:.0%})")
    return BatchPlan(rows, tokens, accum, kept < layers, kept, reason, row)


def shape_of(config: Any) -> dict[str, int]:
    """The SHAPES-style dict of a transformers config (any Llama-class model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {"hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
            "vocab_size": text.vocab_size}


def usable_gpu_bytes() -> int | None:
    """This process's share of the current GPU's memory (honours set_per_process_memory_fraction); None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device) if get_fraction else 1.0
    return int(total * min(fraction, 1.0))


def plan_for(cfg: Any, model_config: Any, stats: dict[str, Any]) -> BatchPlan:
    """plan_batch for a loaded model and the job's data statistics (train_tokens, train_records and
    longest_record_tokens, the longest train or eval record after truncation to max_seq_length)."""
    records = max(int(stats.get("train_records") or 0), 1)
    mean_tokens = float(stats.get("train_tokens") or cfg.max_seq_length * records) / records
    memory = usable_gpu_bytes()
    # Without a GPU there is no memory limit to plan for: one micro-batch per optimizer step.
    return plan_batch(cfg, memory if memory is not None else 1 << 50, shape_of(model_config), mean_tokens,
                      on_gpu=memory is not None, longest_sample_tokens=stats.get("longest_record_tokens"))


# ------------------------------------------------------------------------------------------- trainer args
def compiler_available() -> bool:
    """Triton (behind Liger's kernels and torch.compile's GPU code) compiles a small C launcher on first use."""
    return any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc)


def wants_compile(cfg: Any, cuda: bool) -> bool:
    """torch_compile is set, on CUDA, and Triton can build its launcher (the caller warns when it cannot)."""
    return bool(getattr(cfg, "torch_compile", False) and cuda and compiler_available())


def compile_layers(model: Any) -> int:
    """Regional compilation: every decoder layer compiled in place with dynamic shapes (packed micro-batches
    vary in length); identical layers share the compiled code, so it compiles once, in ~a minute for 7B."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            count += 1
    log.info("torch.compile: %d decoder layers compiled on first use", count)
    return count


def liger_available() -> bool:
    """Liger's kernels are Triton kernels, and Triton compiles a small C launcher on first use: without a C
    compiler (the job's image ships none) they would fail mid-run, so they are only used when one exists."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    if not compiler_available():
        log.warning("Liger kernels skipped: Triton needs a C compiler to build its launcher and none is installed")
        return False
    return True


def sft_overrides(cfg: Any, plan: BatchPlan | None, cuda: bool) -> dict[str, Any]:
    """SFTConfig keyword arguments of the fast path; empty when packing is off (the plain recipe)."""
    out: dict[str, Any] = {}
    if cuda and cfg.optim == "auto":
        # LoRA's optimizer state is small (~0.3 GB for 7B r=16): paging it buys nothing, and the fused
        # AdamW kernel was 8.7% faster end to end on the 7B shape (PERF.md).
        out["optim"] = "adamw_torch_fused"
    # Liger's Triton kernels cannot be traced by torch.compile, which fuses the same operations itself.
    if getattr(cfg, "use_liger", False) and cuda and not wants_compile(cfg, cuda) and liger_available():
        # RMSNorm, SwiGLU and RoPE kernels; TRL keeps its own fused LM head + cross-entropy.
        out["use_liger_kernel"] = True
    if cfg.packing and plan is not None:
        out.update({
            "packing": True,
            "packing_strategy": "bfd",  # best-fit decreasing: whole samples per row, truncated at max length
            "padding_free": True,  # rows are concatenated into one sequence with per-sample position ids
            # The packed row length: samples are cut at max_seq_length before this (prepare_data), and a row is
            # never shorter than the longest of them, so nothing more is cut here.
            "max_length": plan.row_tokens or cfg.max_seq_length,
            "per_device_train_batch_size": plan.rows,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "gradient_checkpointing": plan.gradient_checkpointing,
        })
    return out


# ------------------------------------------------------------------------------------------- attention
def _varlen_kwargs() -> dict[str, Any]:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.11
        return {"window_size": (-1, 0)}
    return {"is_causal": True}  # torch 2.10


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed sample: flash attention over cumulative sequence lengths.

    query/key/value: (1, heads, tokens, head_dim), samples delimited by TRL's padding-free `cu_seq_lens_q`.
    Returns (1, tokens, heads, head_dim) like transformers' kernels. Everything else (padded batches,
    generation with a KV cache) goes to transformers' SDPA path with the usual mask.
    """
    import torch
    import torch.nn.functional as F

    batch, heads, tokens, head_dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if batch != 1 or cu is None or key.shape[2] != tokens:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = int(kwargs.get("max_length_q") or int(cu.diff().max()))
    q = query[0].transpose(0, 1)  # (tokens, heads, head_dim)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if k.shape[1] != heads:  # grouped-query attention (70B): one key/value head per group of query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        extra = _varlen_kwargs()
        if "scale" in inspect.signature(varlen_attn).parameters:
            extra["scale"] = scaling
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **extra)
    else:  # the same function, sample by sample (tests on CPU)
        pieces = []
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
                pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1))
        out = torch.cat(pieces, dim=0)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    # The SDPA mask serves the calls that fall back to SDPA; packed calls ignore it.
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


def wants_varlen(cfg: Any, cuda: bool) -> bool:
    """Packed rows need per-sample attention. SDPA gets it through a dense block-diagonal mask (correct,
    but it computes every masked-out block); varlen flash attention skips them. CUDA only."""
    return bool(cfg.packing) and cuda and cfg.attn_implementation == "sdpa" and _has_varlen()


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def patch_model(model: Any, cfg: Any, cuda: bool) -> dict[str, Any]:
    """Switch a loaded model to the fast path's kernels; returns what was changed (for the logs)."""
    changed: dict[str, Any] = {}
    if wants_varlen(cfg, cuda):
        name = register_varlen_attention()
        model.config._attn_implementation = name  # read by every attention layer at call time
        changed["attn_implementation"] = name
    return changed


def partial_checkpointing_callback(layers_without: int):
    """A TrainerCallback that, once the trainer has switched checkpointing on, switches it off again on the
    first `layers_without` decoder layers: their activations stay in memory (no recompute), the rest are
    recomputed. Selective checkpointing for GPUs with memory to spare."""
    from transformers import TrainerCallback

    class PartialCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")
                      and type(m).__name__.endswith("DecoderLayer")]
            for layer in layers[:layers_without]:
                layer.gradient_checkpointing = False
            log.info("gradient checkpointing: %d of %d decoder layers keep their activations",
                     min(layers_without, len(layers)), len(layers))

    callback = PartialCheckpointing()
    callback.layers_without = layers_without
    return callback


def main(argv: Sequence[str] | None = None) -> int:
    from entrypoints.config import JobConfig

    parser = argparse.ArgumentParser(prog="python -m entrypoints.perf", description="Print the job's batch plan for a model shape and GPU memory.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--mean-tokens", type=float, default=410.0)
    args = parser.parse_args(argv)
    cfg = JobConfig(data="x")
    plan = plan_batch(cfg, int(args.gpu_mem_gib * GIB), SHAPES[args.shape], args.mean_tokens)
    print(json.dumps({**asdict(plan), "flops_per_token": train_flops_per_token(SHAPES[args.shape], cfg.lora_r,
                                                                                 math.sqrt(args.mean_tokens))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
