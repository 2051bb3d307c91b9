"""The job's GPU fast path: the batch plan for this GPU, per-sample attention over packed rows, Liger and
torch.compile, partial gradient checkpointing.

Plain functions the job (entrypoints.trainer / entrypoints.modeling) and the benchmark both call, so the
benchmark measures the job's real path. What each lever gave, measured, is in docs/PERF.md; the memory model
and the plan itself are torch-free, in entrypoints/sizing.py (the launcher uses them too).

- `parallelism_for`: DDP or FSDP for this launch (sizing.choose_parallelism with this process's GPU memory).
- `plan_for`: sizing.plan_batch for this process's GPU (its memory, capped by max_gpu_memory_gib); refuses a budget
  that not even the smallest plan fits (exit 2) instead of starting and running out of memory.
- `patch_model`: per-sample (varlen) flash attention over packed rows, through PyTorch's own kernel.
- `liger_available` / `wants_compile` / `compile_layers`: Triton kernels, where a C compiler can build them.
- `partial_checkpointing_callback`: recompute only the layers the plan could not keep in memory.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from entrypoints.errors import ConfigError
from entrypoints.sizing import (
    EIGHT_BIT_OPTIMIZERS,
    GIB,
    BatchPlan,
    ModelShape,
    Parallelism,
    PlanSettings,
    choose_parallelism,
    memory_levels,
    plan_batch,
)

log = logging.getLogger("qlora.perf")

VARLEN_ATTENTION = "qlora_varlen"  # the name registered with transformers' AttentionInterface
__all__ = ["GIB", "BatchPlan", "Parallelism", "PlanSettings", "parallelism_for", "plan_for", "usable_gpu_bytes",
           "gpu_budget", "memory_choice", "plan_record", "patch_model", "liger_available",
           "wants_compile", "compile_layers", "partial_checkpointing_callback"]


def usable_gpu_bytes() -> int | None:
    """This process's share of the current GPU's memory (honours set_per_process_memory_fraction); None on CPU."""
    budget = gpu_budget()
    return budget[0] if budget else None


def gpu_budget() -> tuple[int, bool] | None:
    """(bytes, capped): this process's share of the current GPU's memory, and whether set_per_process_memory_fraction
    capped it below the whole GPU (max_gpu_memory_gib: the cap is the allocator's, the CUDA context lies outside it);
    None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device) if get_fraction else 1.0
    return int(total * min(fraction, 1.0)), fraction < 1.0


def plan_for(settings: PlanSettings, model_config: Any, stats: dict[str, Any], shards: int = 1) -> BatchPlan:
    """sizing.plan_batch for this process's GPU, a model's config and the job's data statistics (train_tokens,
    train_records and longest_record_tokens, the longest train or eval record after truncation); `shards`: the
    processes FSDP shards the model over (Parallelism.shards). Raises ConfigError (exit 2) when even the smallest
    plan does not fit: starting would only run out of memory."""
    records = max(int(stats.get("train_records") or 0), 1)
    mean_tokens = float(stats.get("train_tokens") or settings.max_seq_length * records) / records
    budget = gpu_budget()
    if budget is not None:
        settings = replace(settings, capped=budget[1])
    # Without a GPU there is no memory limit to plan for: one micro-batch per optimizer step.
    plan = plan_batch(settings, budget[0] if budget else 1 << 50, ModelShape.from_config(model_config), mean_tokens,
                      on_gpu=budget is not None, longest_sample_tokens=stats.get("longest_record_tokens"), shards=shards)
    if not plan.fits:
        raise ConfigError([does_not_fit_message(settings, plan, budget[0] if budget else 0)])
    log.info("memory plan: %s", memory_choice(plan))
    return plan


def memory_choice(plan: BatchPlan) -> str:
    """The plan's memory levers in words (for the log and the manifest)."""
    return (f"{plan.rows} row(s) of {plan.row_tokens} tokens x {plan.gradient_accumulation_steps} accumulation,"
            f" {plan.layers_without_checkpointing} layer(s) keep their activations, activation offload"
            f" {'on' if plan.activation_offload else 'off'}, optimizer {plan.optim or 'the default'}")


def plan_record(plan: BatchPlan, optim: Any) -> dict[str, Any]:
    """The plan as the manifest records it, with the optimizer the trainer ran (`optim`: its name or enum)."""
    return {"rows": plan.rows, "row_tokens": plan.row_tokens, "micro_batch_tokens": plan.micro_batch_tokens,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "layers_without_checkpointing": plan.layers_without_checkpointing,
            "activation_offload": plan.activation_offload, "optim": str(getattr(optim, "value", optim)),
            "smallest_budget_gib": round(plan.smallest_budget_bytes / GIB, 2) or None, "reason": plan.reason}


def does_not_fit_message(settings: PlanSettings, plan: BatchPlan, budget_bytes: int) -> str:
    """Why the job refuses to start, naming the budget, the smallest that fits and what else would help."""
    from entrypoints.config import env_name

    need = math.ceil(plan.smallest_budget_bytes / GIB * 10) / 10
    offload, optim = memory_levels(settings)[-1]
    smallest = (f"one packed row of {plan.row_tokens} tokens, every decoder layer recomputed"
                + (" with its input offloaded to CPU memory" if offload else "")
                + (f", {optim} optimizer state" if optim else ""))
    levers = []
    if not offload and settings.gradient_checkpointing != "false":
        levers.append(f"{env_name('activation_offload')}=auto")
    if not optim and settings.optim not in EIGHT_BIT_OPTIMIZERS:
        levers.append(f"{env_name('optim')}=auto")
    if settings.gradient_checkpointing == "false":
        levers.append(f"{env_name('gradient_checkpointing')}=auto")
    also = f", allow the memory savers ({', '.join(levers)})" if levers else ""
    if settings.capped:
        where = (f"{env_name('max_gpu_memory_gib')}={budget_bytes / GIB:.4g} GiB is too small for this model: even"
                 f" the smallest batch plan ({smallest}) needs {need:.1f} GiB. Set {env_name('max_gpu_memory_gib')} to"
                 f" at least {need:.1f}")
    else:
        where = (f"this GPU's {budget_bytes / GIB:.1f} GiB are too small for this model: even the smallest batch plan"
                 f" ({smallest}) needs {need:.1f} GiB. Use a GPU with at least {need:.1f} GiB")
    return f"{where}{also}, or lower {env_name('max_seq_length')} (now {settings.max_seq_length})"


def parallelism_for(settings: PlanSettings, model_config: Any | None, processes: int) -> Parallelism:
    """How this launch's `processes` share the work (sizing.choose_parallelism on this process's GPU memory, capped
    by max_gpu_memory_gib); `model_config` None: a model the memory model does not describe (T5-class)."""
    try:
        shape = ModelShape.from_config(model_config) if model_config is not None else None
    except ValueError:
        shape = None
    return choose_parallelism(settings.parallelism, shape, settings, processes, usable_gpu_bytes())


# ------------------------------------------------------------------------------------------- trainer args
def fsdp_arguments(layer_classes: list[str]) -> dict[str, Any]:
    """TrainingArguments for FSDP-QLoRA through transformers' own FSDP support (accelerate's FSDP2 plugin).

    - FSDP2 (`fully_shard`; FSDP1 is deprecated in transformers 5): every parameter is its own DTensor, so there are
      no flat parameters and nothing like FSDP1's `use_orig_params` to set; accelerate shards the bitsandbytes
      4-bit weights because their storage dtype is the compute dtype (modeling.quantization_config).
    - auto-wrap: one unit per decoder layer (`layer_classes`: the model's `_no_split_modules`), gathered one at a
      time and resharded after its forward pass; the embedding and the LM head are units of their own.
    - activation checkpointing: the trainer's own (`gradient_checkpointing`, as the plan decides), not FSDP's
      `activation_checkpointing`, whose checkpoint wrapper renames every decoder layer's parameters
      (`_checkpoint_wrapped_module`): peft 0.21 then finds no LoRA weights in the state dict, and the adapter of
      every checkpoint is saved empty. A recomputed layer gathers its 4-bit weights once more in the backward pass.
    - FULL_STATE_DICT: a checkpoint's adapter is gathered to rank 0 and saved in the format of a single-GPU run's
      (the optimizer state likewise, by accelerate's save_fsdp_optimizer).
    """
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(layer_classes),
            "reshard_after_forward": True,
            "activation_checkpointing": False,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }


def compiler_available() -> bool:
    """Triton (behind Liger's kernels and torch.compile's GPU code) compiles a small C launcher on first use."""
    return any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc)


def wants_compile(torch_compile: str, cuda: bool, partial_checkpointing: bool = False) -> bool:
    """torch_compile is `true`, or `auto` and the plan recomputes every decoder layer or none (with some layers kept
    and some recomputed, Liger's kernels were faster: docs/PERF.md), on CUDA, where Triton can build its launcher
    (for `true` the caller warns when it cannot)."""
    if torch_compile == "false" or (torch_compile == "auto" and partial_checkpointing):
        return False
    return cuda and compiler_available()


def compile_layers(model: Any, recomputed: Callable[[int], bool] = lambda index: False) -> int:
    """Regional compilation: every decoder layer compiled in place with dynamic shapes (packed micro-batches
    vary in length); identical layers share the compiled code, so it compiles once, in ~a minute for 7B.

    `recomputed(i)`: whether decoder layer i runs under gradient checkpointing. When any does, every layer is compiled
    block by block (its attention, MLP and norms) so that checkpoints stay outside the compiled code: Dynamo tracing a
    checkpoint around bitsandbytes' 4-bit autograd function crashed (torch 2.11, docs/PERF.md), and an eager
    checkpoint that replays compiled blocks is the combination PyTorch supports everywhere. A frame Dynamo still
    cannot compile runs uncompiled, with one warning line (`fall_back_to_eager`), never a crash."""
    fall_back_to_eager()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    # All layers one way: every compiled module shares the code object Dynamo caches under (Module._call_impl), and
    # whole layers mixed with blocks ran 2.3x slower than Liger on the 7B shape at 22 GiB (docs/PERF.md).
    by_blocks = any(recomputed(index) for index in range(len(layers)))
    for layer in layers:
        for module in (layer.children() if by_blocks else (layer,)):
            module.compile(dynamic=True)
    log.info("torch.compile: %d decoder layers compiled %s, on first use", len(layers),
             "block by block (attention, MLP, norms: some are recomputed)" if by_blocks else "whole")
    return len(layers)


class _EagerFallbackNotice(logging.Filter):
    """Dynamo's warning for a frame it could not compile (a traceback per frame) becomes one line, once."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.count += 1
        if self.count == 1:
            cause = record.exc_info[1] if record.exc_info else None
            while cause is not None and (inner := getattr(cause, "inner_exception", None) or cause.__cause__):
                cause = inner  # the backend's own error, not Dynamo's wrapper of it
            reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]}" if cause else \
                record.getMessage().strip().splitlines()[0][:300]
            log.warning("torch.compile could not compile part of the model (%s): that part runs uncompiled, "
                        "slower; set QLORA_TORCH_COMPILE=false to silence this", reason)
        return False


def fall_back_to_eager() -> None:
    """Dynamo's own fallback (`suppress_errors`): a frame that fails to compile runs eagerly instead of raising."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    target = logging.getLogger("torch._dynamo.convert_frame")
    for old in [f for f in target.filters if isinstance(f, _EagerFallbackNotice)]:
        target.removeFilter(old)
    target.addFilter(_EagerFallbackNotice())  # a fresh count: one line for each model compiled


def liger_available() -> bool:
    """Liger's kernels are Triton kernels, and Triton compiles a small C launcher on first use: without a C
    compiler (the job's image ships none) they would fail mid-run, so they are only used when one exists."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    if not compiler_available():
        log.warning("Liger kernels skipped: Triton needs a C compiler to build its launcher and none is installed")
        return False
    return True


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


def wants_varlen(packing: bool, attn_implementation: str, cuda: bool) -> bool:
    """Packed rows need per-sample attention. SDPA gets it through a dense block-diagonal mask (correct,
    but it computes every masked-out block); varlen flash attention skips them. CUDA only."""
    return packing and cuda and attn_implementation == "sdpa" and _has_varlen()


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def patch_model(model: Any, packing: bool, attn_implementation: str, cuda: bool) -> dict[str, Any]:
    """Switch a loaded model to the fast path's kernels; returns what was changed (for the logs)."""
    changed: dict[str, Any] = {}
    if wants_varlen(packing, attn_implementation, cuda):
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
