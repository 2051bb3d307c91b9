"""Model sizes and the memory model: parameters, bytes, FLOPs, and the batch plan that fits a GPU.

    python -m entrypoints.sizing --shape 7b --gpu-mem-gib 24 --mean-tokens 410   # print the batch plan
    python -m entrypoints.sizing --shape 13b --gpu-mem-gib 22 --gpus 2 --parallelism fsdp --mean-tokens 2048
    python -m entrypoints.sizing --shape 7b --gpu-mem-gib 5.6 --capped        # under max_gpu_memory_gib=5.6

One answer to "does it fit on this GPU, and how": the job plans its micro-batches with `plan_batch` (from the
GPU it runs on), and the launcher checks an instance with the same functions before anything is submitted
(`launch/estimate.py`). Torch-free. The per-token constants are measured on H100/H200 (docs/PERF.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from entrypoints.bnb4bit import stored_quantization
from entrypoints.errors import ModelError

GIB = 1024**3
# Share of the GPU's memory the plan fills with its estimates; the rest absorbs allocator fragmentation
# (peak reserved was 1.5-2 GiB above peak allocated on 7B/13B) and estimate error.
MEMORY_SHARE = 0.80
# The CUDA context's share and workspaces, counted in fixed_bytes. It lies outside PyTorch's allocator, so outside a
# max_gpu_memory_gib cap (set_per_process_memory_fraction limits the allocator only).
CONTEXT_BYTES = 1.0 * GIB
# The small end (every layer recomputed, a few GiB for activations): peak RESERVED memory above the fixed part was
# 1.46-1.64x the activation estimate on the 7B shape (H200, 2026-11-28/30, docs/PERF.md: 1, 2 and 3 rows of 2048
# tokens reserved 5.80, 7.64 and 8.81 GiB against 4.20 fixed); the plan counts 1.7x. Above ~12 GiB the 80% share
# is the tighter rule (fragmentation does not grow with the activations there: 2.5-3.1 GiB at 25-37 GiB of them).
SMALL_END_ACTIVATION_FACTOR = 1.7
# bitsandbytes' 8-bit AdamW (blockwise-quantized moments): the optimizer the plan switches to when memory is short
# and optim is `auto`.
SMALL_MEMORY_OPTIMIZER = "adamw_8bit"
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
# With activation offload, checkpointed layer inputs still on the GPU at once: TRL's forward stash of 5 (its default
# `max_fwd_stash_size`) and the one being brought back for the backward pass.
OFFLOAD_LAYERS_ON_GPU = 6
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The encoder-decoder architectures the job trains (seq2seq): T5's layout, whose linear layers are q, k, v, o in
# every attention block and wi (T5 v1.0) or wi_0 + wi_1 (v1.1, Flan-T5, mT5, umT5) and wo in every feed-forward.
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "umt5")


def is_encoder_decoder(config: Mapping[str, Any]) -> bool:
    """Whether a config.json (as a dict) describes an encoder-decoder model (T5, BART, ...) rather than a decoder."""
    return bool(config.get("is_encoder_decoder")) or config.get("model_type") in SEQ2SEQ_MODEL_TYPES


# ------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-class decoder (the fields of its config.json)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    # A checkpoint stored pre-quantized in bitsandbytes 4-bit (a `*-bnb-4bit` repository): its files hold the linear
    # layers in 4 bits (with double quantization or not), and it trains in the stored form whatever the settings say.
    stored_4bit: bool = False
    stored_double_quant: bool = True

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """From a transformers config or a config.json dict (a multimodal config's text part)."""
        if not isinstance(config, Mapping):
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        config = config.get("text_config", config) if isinstance(config.get("text_config"), Mapping) else config
        if is_encoder_decoder(config):
            raise ValueError(f"an encoder-decoder model (model_type {config.get('model_type')}): the memory estimate"
                             " and the batch plan are only available for Llama-class decoders")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if config.get(k) is None]
        if missing:
            raise ValueError(f"not the config of a Llama-class decoder: no {', '.join(missing)}")
        heads = int(config["num_attention_heads"])
        try:
            stored = stored_quantization(config)
        except ModelError:  # another quantization: the job refuses it (exit 4); its size is not this model's concern
            stored = None
        return cls(name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
                   int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"]),
                   heads, int(config.get("num_key_value_heads") or heads), int(config["vocab_size"]),
                   bool(config.get("tie_word_embeddings", False)), stored is not None,
                   stored.double_quant if stored else True)

    @property
    def kv_size(self) -> int:
        return self.hidden_size * self.num_key_value_heads // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by module name."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of the blocks' linear layers (what 4-bit quantization stores in 4 bits)."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def total_params(self) -> int:
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return self.linear_params + self.embedding_params + norms

    def llama_config(self) -> dict[str, Any]:
        """Keyword arguments of transformers' LlamaConfig for a model of this shape (the benchmarks build one)."""
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
                "tie_word_embeddings": self.tie_word_embeddings}


# Llama 2 (config.json of meta-llama/Llama-2-{7,13,70}b-hf); `tiny` runs on a laptop CPU.
SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny (2 layers)", 64, 172, 2, 4, 4, 32000),
    "7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


def shape_of_model(model: str, config_file: Path | None = None) -> ModelShape | None:
    """The shape of `model` from a config.json (`config_file`, or the model's own when it is a local directory),
    else from a Llama 2 size in its name (stored in 4 bits when the name says `bnb-4bit`, the convention of the
    published pre-quantized repositories); None when neither tells."""
    candidates = [config_file] if config_file else []
    if not model.startswith("s3://"):
        candidates.append(Path(model) / "config.json")
    for path in candidates:
        if path is not None and path.is_file():
            return ModelShape.from_config(json.loads(path.read_text(encoding="utf-8")), name=model)
    match = re.search(r"llama-?2.*?[-_](7|13|70)b", model.lower())
    if not match:
        return None
    shape = SHAPES[match.group(1) + "b"]
    return replace(shape, stored_4bit=True) if "bnb-4bit" in model.lower() else shape


def lora_params(shape: ModelShape, r: int, targets: str | Sequence[str] = "all-linear") -> int:
    """LoRA A+B parameters: r x (in + out) for every adapted linear layer of the blocks (never the LM head)."""
    per_layer = sum(r * (n_in + n_out) for module, (n_in, n_out) in shape.linear_shapes().items()
                    if targets == "all-linear" or module in targets)
    return per_layer * shape.num_hidden_layers


# ------------------------------------------------------------------------------------------- FLOPs
def matmul_params(shape: ModelShape) -> int:
    """Weights that take part in matmuls: the blocks' linear layers and the LM head (not the embedding)."""
    return shape.linear_params + shape.hidden_size * shape.vocab_size


def mean_attended_keys(lengths: Sequence[int]) -> float:
    """Keys each token attends to on average under causal per-sample attention: sum n(n+1)/2 / sum n."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def train_flops_per_token(shape: ModelShape, lora_r: int, attended_keys: float) -> float:
    """Model FLOPs of one trained token of QLoRA (recomputation by checkpointing is NOT counted).

    frozen 4-bit matmuls: forward 2N + gradient w.r.t. the input 2N (no weight gradient) = 4N
    LoRA adapters:        forward 2P + input gradient 2P + weight gradient 2P        = 6P
    attention (QK^T, AV): forward 2 x 2 x d x c per layer, backward twice that       = 12 L d c
    with N = matmul weights (LM head included), P = LoRA weights (all-linear), c = mean attended keys per token.
    """
    n, p = matmul_params(shape), lora_params(shape, lora_r)
    return 4.0 * n + 6.0 * p + 12.0 * shape.num_hidden_layers * shape.hidden_size * attended_keys


# ------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class PlanSettings:
    """The settings the memory model and the batch plan read (a slice of the job's configuration)."""

    max_seq_length: int = 2048
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    micro_batch_tokens: int = 0
    gradient_checkpointing: str = "auto"  # auto, true, false
    packing: bool = True
    quantization: str = "nf4"
    double_quant: bool = True
    lora_r: int = 16
    lora_dropout: float = 0.0
    lora_targets: str | tuple[str, ...] = "all-linear"
    parallelism: str = "auto"  # auto, ddp, fsdp
    optim: str = "auto"  # `auto`: the plan may pick 8-bit AdamW when memory is short
    activation_offload: str = "auto"  # auto, true, false
    capped: bool = False  # max_gpu_memory_gib is set: the budget is the allocator's, the CUDA context lies outside

    @classmethod
    def of(cls, cfg: Any) -> PlanSettings:
        """From a JobConfig."""
        targets = cfg.target_modules
        return cls(cfg.max_seq_length, cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.micro_batch_tokens,
                   cfg.gradient_checkpointing, cfg.packing, cfg.quantization, cfg.double_quant, cfg.lora_r,
                   float(cfg.lora_dropout), targets if isinstance(targets, str) else tuple(targets), cfg.parallelism,
                   optim=cfg.optim, activation_offload=cfg.activation_offload, capped=bool(cfg.max_gpu_memory_gib))


def weight_bytes(shape: ModelShape, quantization: str = "nf4", double_quant: bool = True) -> float:
    """Resident bytes of the frozen model: the blocks' linear layers in 4 bits plus the quantization constants
    (0.127 bit per weight with double quantization, 0.5 without) or in bf16, and the embeddings and head in bf16.
    A pre-quantized checkpoint trains in its stored form, whatever `quantization` and `double_quant` say."""
    if shape.stored_4bit:
        quantization, double_quant = "nf4", shape.stored_double_quant
    bits = 16.0 if quantization == "none" else 4.0 + (0.127 if double_quant else 0.5)
    return shape.linear_params * bits / 8 + 2 * shape.embedding_params


def checkpoint_bytes(shape: ModelShape) -> float:
    """Bytes of the model's checkpoint files (a download, a copy on disk): 16-bit weights, or for a pre-quantized
    checkpoint its 4-bit linear layers with their quantization state (~3.5x smaller: 37 GB for Llama-2-70B)."""
    norms = 2 * (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    if shape.stored_4bit:
        return weight_bytes(shape) + norms
    return 2.0 * shape.total_params


def merged_bytes(shape: ModelShape) -> float:
    """Bytes of the merged model the job writes: 16-bit weights, whatever form the base is stored in."""
    return 2.0 * shape.total_params


def recomputed_bytes_per_token(shape: ModelShape) -> float:
    """Peak activation bytes per token of a packed micro-batch with every layer recomputed.

    0.55 MB per token on the Llama-2-7B shape, measured on an H100/H200 (the bf16 input of every layer, one layer's
    activations during its recompute, the LM head and loss over a 32,000-token vocabulary), scaled with layers x
    hidden size for other shapes; a larger vocabulary adds its logits (bf16, their fp32 upcast and gradient: about
    10 bytes per entry and token), e.g. ~1 MB per token for Llama 3's 128,256.
    """
    scale = shape.num_hidden_layers * shape.hidden_size / (32 * 4096)
    return 0.55e6 * scale + 10.0 * max(0, shape.vocab_size - 32000)


def layer_bytes_per_token(shape: ModelShape, lora_dropout: bool) -> float:
    """Extra activation bytes per token of one decoder layer that is not recomputed (QLoRA, Liger kernels).

    bf16 tensors kept for the backward pass: the normalised inputs, residuals and attention output (~7 x
    hidden), q/k/v (hidden + 2 x kv), the SwiGLU gate and up projections (2 x intermediate); with LoRA dropout,
    every adapted module also keeps its own dropped-out bf16 copy of its input (6 x hidden + intermediate).
    Plus 10% margin. Measured on 7B (H200, 2026-11-28, docs/PERF.md; all 32 layers kept vs none at 6,144-token
    micro-batches): 118 KB per token and layer without dropout, 187 KB with; this gives 130 and 208 KB.
    """
    d, ff, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    kept = 2.0 * (7 * d + 2 * kv + 2 * ff)
    if lora_dropout:
        kept += 2.0 * (6 * d + ff)
    return 1.10 * kept


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool, lora_dropout: bool = True) -> float:
    """Peak activation bytes per token with every layer recomputed (True) or none (counted with LoRA dropout's
    extra copies, the larger figure: without recomputation the whole budget rides on it)."""
    recomputed = recomputed_bytes_per_token(shape)
    return recomputed if checkpointing else recomputed + shape.num_hidden_layers * layer_bytes_per_token(
        shape, lora_dropout)


def gathered_bytes(shape: ModelShape, s: PlanSettings) -> float:
    """What FSDP holds unsharded at a time besides the shards: the largest unit it gathers (one decoder layer's 4-bit
    weights, or the bf16 embedding / LM head, each a unit of its own) twice over, the one computing and the next
    one prefetched."""
    bits = 16.0 if s.quantization == "none" else 4.0 + (0.127 if s.double_quant else 0.5)
    layer = shape.linear_params / shape.num_hidden_layers * bits / 8
    return 2.0 * max(layer, 2.0 * shape.vocab_size * shape.hidden_size)


def adamw_bytes_per_param(optim: str) -> float:
    """Bytes per LoRA parameter of the weight, its gradient and AdamW's two moments: 4 + 4 + 8 in fp32, 4 + 4 + 2
    with bitsandbytes' 8-bit moments (their blockwise scales add ~0.2%)."""
    return 10.0 if optim in EIGHT_BIT_OPTIMIZERS else 16.0


def fixed_bytes(shape: ModelShape, s: PlanSettings, shards: int = 1) -> float:
    """Memory that does not grow with the micro-batch: frozen weights, LoRA weights + AdamW state (fp32:
    weight, gradient, two moments = 16 bytes each; 10 with 8-bit moments), and 1 GiB for the CUDA context's share
    and workspaces. Sharded over `shards` GPUs (FSDP): the weights and LoRA state divided among them, plus
    `gathered_bytes`."""
    state = (weight_bytes(shape, s.quantization, s.double_quant)
             + adamw_bytes_per_param(s.optim) * lora_params(shape, s.lora_r, s.lora_targets))
    if shards <= 1:
        return state + CONTEXT_BYTES
    return state / shards + gathered_bytes(shape, s) + CONTEXT_BYTES


def offloaded_bytes_per_token(shape: ModelShape) -> float:
    """Peak activation bytes per token with every layer recomputed and the recomputed layers' inputs (the bf16
    hidden state each checkpoint saves, 2 x hidden bytes per token and layer) offloaded to CPU memory: all but the
    OFFLOAD_LAYERS_ON_GPU in flight leave the GPU; one layer's recompute, the LM head and loss stay. 0.34 MB per
    token on the Llama-2-7B shape, against 0.55 without offload."""
    offloaded = max(0, shape.num_hidden_layers - OFFLOAD_LAYERS_ON_GPU) * 2.0 * shape.hidden_size
    return recomputed_bytes_per_token(shape) - offloaded


def load_bytes(shape: ModelShape, s: PlanSettings) -> float:
    """GPU memory while the model loads: the whole 4-bit model on every GPU, sharded or not (accelerate's FSDP2
    shards a 4-bit model only after it is on the GPU: `fsdp2_prepare_model` keeps bitsandbytes weights off its
    meta-device loading), plus 1 GiB of CUDA context."""
    return weight_bytes(shape, s.quantization, s.double_quant) + 1.0 * GIB


def minimum_gpu_bytes(shape: ModelShape, s: PlanSettings, shards: int = 1) -> float:
    """The least GPU memory the job runs in, before the 80% share: the fixed part (sharded over `shards` GPUs with
    FSDP) plus its smallest micro-batch (one packed row of max_seq_length, or micro_batch_size padded samples
    without packing) with every layer recomputed (`auto`, `true`) or none (`false`)."""
    tokens = s.max_seq_length * (1 if s.packing else s.micro_batch_size)
    return fixed_bytes(shape, s, shards) + tokens * activation_bytes_per_token(shape, s.gradient_checkpointing != "false")


# ------------------------------------------------------------------------------------------- parallelism
@dataclass(frozen=True)
class Parallelism:
    """How the job's processes share the work: `single` (one process), `ddp` (a whole model per GPU) or `fsdp`
    (weights, LoRA and optimizer state sharded over every process), and why."""

    mode: str
    processes: int
    reason: str

    @property
    def shards(self) -> int:
        """Over how many GPUs the model's state is divided (1 unless FSDP)."""
        return self.processes if self.mode == "fsdp" else 1


def choose_parallelism(setting: str, shape: ModelShape | None, s: PlanSettings, processes: int,
                       gpu_mem_bytes: float | None) -> Parallelism:
    """The `parallelism` setting decided for `processes` processes on GPUs of `gpu_mem_bytes` each (None: no GPU).

    `auto`: DDP when the whole 4-bit model, its LoRA state and the smallest micro-batch fit in 80% of one GPU
    (`minimum_gpu_bytes`); else FSDP when they fit sharded over the processes and the whole 4-bit model fits one GPU
    while it loads (`load_bytes`); else DDP, which will not fit either (the launcher refuses such a job).
    """
    if processes <= 1:
        return Parallelism("single", 1, f"one process{' (parallelism=' + setting + ' applies to several)' if setting != 'auto' else ''}")
    if setting in ("ddp", "fsdp"):
        return Parallelism(setting, processes, f"parallelism={setting} set")
    if gpu_mem_bytes is None:
        return Parallelism("ddp", processes, "no GPU: FSDP needs CUDA GPUs")
    if shape is None:
        return Parallelism("ddp", processes, "the model's size is not known to the memory model")
    usable = MEMORY_SHARE * gpu_mem_bytes
    whole = minimum_gpu_bytes(shape, s)
    of = f"{usable / GIB:.1f} GiB usable ({MEMORY_SHARE:.0%} of {gpu_mem_bytes / GIB:.1f})"
    if whole <= usable:
        return Parallelism("ddp", processes, f"the model fits one GPU: at least {whole / GIB:.1f} GiB of {of}")
    sharded = minimum_gpu_bytes(shape, s, processes)
    loading = load_bytes(shape, s)
    if sharded <= usable and loading <= gpu_mem_bytes:
        return Parallelism("fsdp", processes, f"the model does not fit one GPU (at least {whole / GIB:.1f} GiB of"
                           f" {of}); sharded over {processes} GPUs it needs {sharded / GIB:.1f} GiB each")
    why = (f"sharded over {processes} GPUs it needs {sharded / GIB:.1f} GiB each" if sharded > usable else
           f"the whole 4-bit model ({loading / GIB:.1f} GiB with the CUDA context) must fit one GPU while it loads")
    return Parallelism("ddp", processes, f"the model fits neither one GPU (at least {whole / GIB:.1f} GiB of {of})"
                       f" nor sharded: {why}")


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
    # Memory short: the recomputed layers' inputs wait in CPU memory (TRL's activation offloading), and/or the
    # optimizer the plan picked for optim=auto ("": the job's default).
    activation_offload: bool = False
    optim: str = ""
    fits: bool = True  # False: even the smallest plan exceeds the budget (the job refuses to start)
    smallest_budget_bytes: float = 0.0  # the least budget the smallest plan of these settings needs (0: not planned)


def memory_levels(s: PlanSettings) -> list[tuple[bool, str]]:
    """(activation offload, optimizer) combinations the plan tries, in order: the first gives up nothing, offload
    costs transfers to CPU memory (overlapped on a side stream), 8-bit AdamW changes the numerics slightly. Offload
    needs recomputation (it moves the checkpointed layer inputs); `activation_offload` true/false forces it."""
    if s.gradient_checkpointing == "false" or s.activation_offload == "false":
        offload = [False]
    else:
        offload = [True] if s.activation_offload == "true" else [False, True]
    levels = [(o, "") for o in offload]
    if s.optim == "auto":
        levels.append((offload[-1], SMALL_MEMORY_OPTIMIZER))
    return levels


def _level_bytes(shape: ModelShape, s: PlanSettings, offload: bool, optim: str, shards: int = 1
                 ) -> tuple[float, float]:
    """Fixed bytes and activation bytes per token of one memory level."""
    fixed = fixed_bytes(shape, replace(s, optim=optim or s.optim), shards)
    per_token = (offloaded_bytes_per_token(shape) if offload
                 else activation_bytes_per_token(shape, s.gradient_checkpointing != "false"))
    return fixed, per_token


def fit_tokens(fixed: float, per_token: float, gpu_mem_bytes: float, capped: bool) -> int:
    """Micro-batch tokens that fit: the larger of two rules. The 80% share of the budget after the fixed part
    (MEMORY_SHARE), and the small-end rule: the allocator's budget (the cap, or the GPU less the CUDA context) after
    the fixed part, for SMALL_END_ACTIVATION_FACTOR x the activations (measured peak reserved at the small end)."""
    share = MEMORY_SHARE * gpu_mem_bytes - fixed
    allocator = gpu_mem_bytes - (0.0 if capped else CONTEXT_BYTES) - (fixed - CONTEXT_BYTES)
    return max(0, int(max(share, allocator / SMALL_END_ACTIVATION_FACTOR) / per_token))


def smallest_budget_bytes(shape: ModelShape, s: PlanSettings, tokens: int | None = None, shards: int = 1) -> float:
    """The least memory budget (GPU, or max_gpu_memory_gib when s.capped) in which the job runs `tokens` per
    micro-batch (default: its smallest micro-batch, one packed row of max_seq_length, or micro_batch_size padded
    samples without packing) with the most memory-saving plan its settings allow (fit_tokens' rules inverted)."""
    tokens = tokens or s.max_seq_length * (1 if s.packing else s.micro_batch_size)
    levels = memory_levels(s) if s.packing else [(False, "")]
    best = math.inf
    for offload, optim in levels:
        fixed, per_token = _level_bytes(shape, s, offload, optim, shards)
        share = (fixed + tokens * per_token) / MEMORY_SHARE
        small = (fixed - CONTEXT_BYTES + SMALL_END_ACTIVATION_FACTOR * tokens * per_token
                 + (0.0 if s.capped else CONTEXT_BYTES))
        best = min(best, share, small)
    return best


def plan_batch(s: PlanSettings, gpu_mem_bytes: int, shape: ModelShape, mean_sample_tokens: float,
               on_gpu: bool = True, longest_sample_tokens: int | None = None, shards: int = 1) -> BatchPlan:
    """Pick the packed row length, rows per micro-batch, gradient accumulation and checkpointed layers.

    Tokens per optimizer step = micro_batch_size x gradient_accumulation_steps x mean sample length, i.e.
    the same number of samples per step as the unpacked recipe, so the learning dynamics stay the same.
    Packed rows are max_seq_length tokens long; when one step holds fewer tokens than that (small samples, small
    batches), a row is one step long instead, but never shorter than the longest sample (so that packing cuts
    nothing that max_seq_length keeps): a step is never larger than the documented size or than one sample.
    Tokens per micro-batch: `micro_batch_tokens` when set, else as many as fit in 80% of the GPU's memory after
    the weights with every layer recomputed, never above one step's tokens.
    Checkpointing: `true` recomputes every layer, `false` none; `auto` (on a GPU) then spends what is left of
    80% of the memory on layers that keep their activations, each costing `layer_bytes_per_token` x the
    micro-batch's tokens, and switches checkpointing off when all of them fit. Recomputation is a third of
    a layer's work, so every layer kept is ~1/3 of its backward saved (docs/PERF.md).
    `shards` > 1 (FSDP): the weights and LoRA state take 1/shards of each GPU, plus what FSDP gathers (`fixed_bytes`).
    """
    seq = s.max_seq_length
    layers = shape.num_hidden_layers
    mode = s.gradient_checkpointing
    step_tokens = s.micro_batch_size * s.gradient_accumulation_steps * max(mean_sample_tokens, 1.0)
    longest = min(seq, max(1, longest_sample_tokens or seq))
    row = seq if step_tokens >= seq else min(seq, max(longest, math.ceil(step_tokens)))
    step_tokens = max(step_tokens, float(row))
    step_text = (f"one step is ~{int(step_tokens)} tokens ({s.micro_batch_size}x{s.gradient_accumulation_steps}"
                 f" samples of ~{mean_sample_tokens:.0f}{'' if row == seq else f', the longest {longest}'})")
    fixed = fixed_bytes(shape, s, shards)
    # Outside the auto-sized branch below: offload only when asked for (`true`), the default optimizer.
    offload, optim, fits, smallest = on_gpu and s.activation_offload == "true" and mode != "false", "", True, 0.0
    if s.micro_batch_tokens:
        # Never more than one step: a larger micro-batch would make every optimizer step larger than documented.
        micro = max(row, min(s.micro_batch_tokens, int(step_tokens)))
        capped = f", capped at one step's {int(step_tokens)}" if s.micro_batch_tokens > step_tokens else ""
        reason = f"micro_batch_tokens={s.micro_batch_tokens} set{capped}; {step_text}"
    elif not on_gpu:
        micro = max(row, int(step_tokens))
        reason = f"no GPU memory to plan for: one step per micro-batch; {step_text}"
    else:
        # The first memory level with the most rows (up to one step); when none holds one row, the job refuses.
        choices = []
        for level_offload, level_optim in memory_levels(s):
            level_fixed, per_token = _level_bytes(shape, s, level_offload, level_optim, shards)
            fit = fit_tokens(level_fixed, per_token, gpu_mem_bytes, s.capped)
            choices.append((min(fit, int(step_tokens)) // row, fit, level_offload, level_optim, level_fixed))
        best = max(c[0] for c in choices)
        rows_fit, fit, offload, optim, fixed = next(c for c in choices if c[0] == best) if best else choices[-1]
        micro = max(row, min(fit, int(step_tokens)))
        budget_text = f"{gpu_mem_bytes / GIB:.1f} GiB{' (max_gpu_memory_gib)' if s.capped else ''}"
        reason = f"{fit} tokens fit in {budget_text}; {step_text}"
        if offload or optim:
            plain = choices[0][1]
            reason += (f"; memory is short ({plain} tokens would fit without):"
                       + (" the recomputed layers' inputs are offloaded to CPU memory" if offload else "")
                       + (" and" if offload and optim else "")
                       + (f" {optim} keeps AdamW's state in 8 bits" if optim else ""))
        smallest = smallest_budget_bytes(shape, s, row, shards)
        fits = rows_fit >= 1
        if not fits:
            reason += f"; DOES NOT FIT: the smallest plan needs {smallest / GIB:.2f} GiB"
    if row < seq:
        reason += f"; packed rows of {row} tokens (one step is less than max_seq_length={seq})"
    rows = max(1, micro // row)
    tokens = rows * row
    accum = max(1, round(step_tokens / tokens))
    if mode == "false":
        kept = layers
    elif mode == "true" or not on_gpu or offload:
        kept = 0  # with offload every layer is recomputed: memory is short, and offload moves checkpointed inputs
        if mode == "auto":
            reason += "; every layer recomputed"
    else:
        spare = MEMORY_SHARE * gpu_mem_bytes - fixed - tokens * recomputed_bytes_per_token(shape)
        per_layer = tokens * layer_bytes_per_token(shape, s.lora_dropout > 0)
        kept = max(0, min(layers, int(spare // per_layer))) if spare > 0 else 0
        reason += (f"; {kept} of {layers} layers keep their activations ({per_layer / GIB:.2f} GiB each at"
                   f" {tokens} tokens, {max(spare, 0) / GIB:.1f} GiB spare in {MEMORY_SHARE:.0%})")
    if shards > 1:
        reason += f"; weights and LoRA state sharded over {shards} GPUs"
    return BatchPlan(rows, tokens, accum, kept < layers, kept, reason, row, offload, optim, fits, smallest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sizing",
                                     description="Print the job's batch plan for a model shape and GPU memory.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--mean-tokens", type=float, default=410.0)
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) of the job")
    parser.add_argument("--parallelism", choices=("auto", "ddp", "fsdp"), default="auto")
    parser.add_argument("--capped", action="store_true",
                        help="the memory is a max_gpu_memory_gib cap (the CUDA context lies outside it)")
    args = parser.parse_args(argv)
    shape, settings = SHAPES[args.shape], PlanSettings(parallelism=args.parallelism, capped=args.capped)
    memory = int(args.gpu_mem_gib * GIB)
    parallel = choose_parallelism(args.parallelism, shape, settings, args.gpus, memory)
    plan = plan_batch(settings, memory, shape, args.mean_tokens, shards=parallel.shards)
    print(json.dumps({**asdict(plan), "parallelism": asdict(parallel),
                      "minimum_gpu_gib": round(minimum_gpu_bytes(shape, settings, parallel.shards) / GIB, 2),
                      "flops_per_token": train_flops_per_token(shape, settings.lora_r, math.sqrt(args.mean_tokens))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
