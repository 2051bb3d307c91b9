"""Merge a LoRA adapter into its base model tensor by tensor, at constant memory, uploading as it goes.

    python -m entrypoints.merge --adapter s3://bucket/run/adapter --base s3://bucket/models/llama-2-7b \
        --output s3://bucket/run/merged [--merge-into nf4|fp4|original] [--max-shard-size 5GB]

peft's `merge_and_unload` needs the whole 16-bit model in memory (13.5 GB for 7B, 140 GB for 70B). Here
each base tensor is read on its own (plain reads at the offsets of the safetensors header, no mmap, so
the resident set never grows with the shard), the LoRA delta scale * B @ A is added in float32 a block of
rows at a time (on the GPU when there is one) and the result is written, in the base dtype, straight into
the output shard. Peak memory is about one tensor plus the adapter, whatever the model size. Every
output file is written to a temporary name and renamed when complete; `on_file_written(path)` is then
called so the caller can upload it while the next shard is merged. The index is written last: an output
without `model.safetensors.index.json` is incomplete.

`merge_into`: `original` adds the delta to the 16-bit base weights; `nf4`/`fp4` first round-trip every
weight that was 4-bit in training through bitsandbytes' quantize/dequantize, i.e. merge into the base
as the adapter saw it. See docs/MERGE.md for the measured difference and why the default is what
it is.

Every adapter key and shape is checked against the base's safetensors headers (or, for an s3:// base,
against its index and config) before any output is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import resource
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from entrypoints.errors import ConfigError, ModelError, OutputExistsError, run_guarded

log = logging.getLogger("qlora.merge")

MERGE_INTO_CHOICES = ("original", "nf4", "fp4")
# The base as the 4-bit training saw it: the merged model then computes what was trained and evaluated
# (measured in docs/MERGE.md, "Which base to merge into"). Adapters trained on a 16-bit base
# (QLORA_QUANTIZATION=none) must pass `original`.
DEFAULT_MERGE_INTO = "nf4"

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_PREFIX = "base_model.model."
# Copied from the adapter dir when it has a tokenizer (the job saves the tokenizer it trained with there),
# else from the base.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)
# float32 temporaries are limited to this many elements per block of rows (64 MiB): memory stays flat
# however wide the matrix, and blocks are still large enough for fast matmuls.
BLOCK_ELEMENTS = 16 * 1024 * 1024
# transformers' bnb 4-bit layers use bitsandbytes' default blocksize (Params4bit).
BNB_BLOCKSIZE = 64
HEADER_LIMIT_BYTES = 100 * 1024 * 1024

# LoraConfig fields that change what the adapter computes in ways this merge does not reproduce. A value
# other than these defaults is refused with a clear error instead of producing a wrong model.
UNSUPPORTED_ADAPTER_OPTIONS = {
    "fan_in_fan_out": False, "use_qalora": False, "layer_replication": None, "megatron_config": None,
    "trainable_token_indices": None, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "velora_config": None, "monteclora_config": None, "alora_invocation_tokens": None,
}
# Initialisations that rewrite the base weights (the adapter only works on that rewritten base).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _st_dtypes():
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }


# ---------------------------------------------------------------------------------------------- safetensors I/O


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a local safetensors file."""

    path: Path
    dtype: object  # torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, from its header alone (a few KB are read)."""
    dtypes = _st_dtypes()
    fix = f"re-download or re-save {path.name} (save_pretrained writes valid safetensors)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > HEADER_LIMIT_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelError(f"{path} is not a valid safetensors file ({exc}): {fix}") from None
    data_start = 8 + header_len
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = dtypes[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {key!r} has a malformed or unsupported header entry {entry!r}: {fix}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or data_start + end > size:
            raise ModelError(f"{path}: tensor {key!r} ({entry['dtype']} {list(shape)}) does not fit its byte range"
                             f" {begin}..{end} of a {size}-byte file (truncated download?): {fix}")
        tensors[key] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return tensors


def read_tensor(info: TensorInfo):
    """Read one tensor with plain file reads: nothing stays mapped, so resident memory is this tensor only."""
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.offset)
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ModelError(f"{info.path} ended early while reading a tensor: re-download the file")
            done += n
    return buf.view(info.dtype).reshape(info.shape)


def write_safetensors(path: Path, entries: list[tuple[str, object, tuple[int, ...]]],
                      produce: Callable[[str], object]) -> int:
    """Write a safetensors file whose tensors are produced one at a time, atomically (tmp + rename).

    The header is computed from the (key, dtype, shape) entries first, so no more than one tensor is ever
    held. Returns the number of bytes of tensor data.
    """
    names = {v: k for k, v in _st_dtypes().items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(dtype=_u8()).numpy()))
            del tensor
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def _u8():
    import torch

    return torch.uint8


# ---------------------------------------------------------------------------------------------- the adapter


@dataclass
class LoraDelta:
    """One adapted module: its delta is scale * B @ A (Linear) or scale * (B @ A).T (Embedding)."""

    module: str
    kind: str  # "linear" or "embedding"
    a: object
    b: object
    scale: float
    magnitude: object | None = None  # DoRA
    bias: object | None = None  # lora_B.bias (lora_bias=True)

    @property
    def out_shape(self) -> tuple[int, int]:
        if self.kind == "linear":
            return (self.b.shape[0], self.a.shape[1])
        return (self.a.shape[1], self.b.shape[0])


@dataclass
class Adapter:
    dir: Path
    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)  # base weight key -> delta
    bias_deltas: dict[str, LoraDelta] = field(default_factory=dict)  # base bias key -> delta with .bias
    replacements: dict[str, object] = field(default_factory=dict)  # base key -> full tensor (modules_to_save)

    def touches(self, key: str) -> bool:
        return key in self.deltas or key in self.bias_deltas or key in self.replacements


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read and check a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: pass the directory written by the adapter's save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc}): re-save the adapter") from None
    _check_adapter_config(config, config_path)
    if not weights_path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise ModelError(f"{adapter_dir} holds adapter_model.bin (pickle, which can run code when loaded):"
                             " re-save the adapter with save_pretrained(safe_serialization=True)")
        raise ModelError(f"{weights_path} is missing: pass the directory written by the adapter's save_pretrained")
    read_header(weights_path)  # a clear error for a truncated or corrupt file before the loader sees it
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelError(f"{weights_path} cannot be read ({exc}): re-download or re-save the adapter") from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter = Adapter(adapter_dir, config)
    suffixes = {
        ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias",
        ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
        ".lora_magnitude_vector": "M", ".lora_magnitude_vector.weight": "M",
    }
    for key, tensor in tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise ModelError(f"{weights_path}: key {key!r} does not start with {ADAPTER_PREFIX!r}; this is not a"
                             " peft adapter of a transformers model: re-save it with peft's save_pretrained")
        name = key[len(ADAPTER_PREFIX):]
        for suffix, role in suffixes.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            if "lora_" in name:
                raise ModelError(f"{weights_path}: key {key!r} is a LoRA tensor this merge does not know; only"
                                 " Linear and Embedding LoRA (optionally DoRA) adapters are supported")
            # Full tensors saved with the adapter (modules_to_save, trained biases, or the embedding copies
            # peft saves as `<module>.base_layer.weight`) replace the base's, as PeftModel.from_pretrained does.
            adapter.replacements[name.replace(".base_layer.", ".")] = tensor

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, p in sorted(parts.items()):
        if "A" in p or "B" in p:
            kind, a, b = "linear", p.get("A"), p.get("B")
        else:
            kind, a, b = "embedding", p.get("EA"), p.get("EB")
        if a is None or b is None:
            raise ModelError(f"{weights_path}: module {module!r} has only half of its LoRA pair"
                             f" ({', '.join(sorted(p))}): the file is incomplete, re-save the adapter")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ModelError(f"{weights_path}: module {module!r} has LoRA shapes A {list(a.shape)} and B"
                             f" {list(b.shape)}, which do not multiply (only 2-D Linear/Embedding LoRA is supported)")
        rank = a.shape[0]
        expected_rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r"))
        if expected_rank is not None and int(expected_rank) != rank:
            raise ModelError(f"{weights_path}: module {module!r} has rank {rank} but adapter_config.json says"
                             f" r={expected_rank}: the config and weights come from different adapters")
        alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        delta = LoraDelta(module, kind, a, b, scale, magnitude=p.get("M"), bias=p.get("B_bias"))
        if delta.magnitude is not None:
            if kind != "linear":
                raise ModelError(f"{weights_path}: DoRA on the embedding {module!r} is not supported: retrain with"
                                 " use_dora=False for embeddings, or merge with peft's merge_and_unload")
            if tuple(delta.magnitude.shape) != (b.shape[0],):
                raise ModelError(f"{weights_path}: DoRA magnitude of {module!r} has shape"
                                 f" {list(delta.magnitude.shape)}, expected [{b.shape[0]}]")
        if delta.bias is not None:
            adapter.bias_deltas[module + ".bias"] = delta
        adapter.deltas[module + ".weight"] = delta
    if not adapter.deltas and not adapter.replacements:
        raise ModelError(f"{weights_path} holds no LoRA weights: nothing to merge")
    return adapter


def _pattern_key(patterns: dict, module: str) -> str:
    if not patterns:
        return module
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), module)


def _check_adapter_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged here")
    problems = [f"{name}={config[name]!r}" for name, default in UNSUPPORTED_ADAPTER_OPTIONS.items()
                if config.get(name, default) not in (default, None, False, [], {})]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r} (it rewrote the base weights: merge into that rewritten base,"
                        " or convert the adapter with peft's path_initial_model_for_weight_conversion)")
    if config.get("ensure_weight_tying"):
        problems.append("ensure_weight_tying=True")
    if problems:
        raise ModelError(f"{path}: adapter options this merge does not support: {'; '.join(problems)}. Retrain"
                         " without them or merge with peft's merge_and_unload (which needs the whole model in memory)")


# ---------------------------------------------------------------------------------------------- the base model


@dataclass
class BaseModel:
    dir: Path
    config: dict
    shapes: dict[str, tuple[object, tuple[int, ...]]]  # key -> (dtype, shape)
    weight_map: dict[str, str]  # key -> shard file name, in file order
    tied: dict[str, str]  # absent tied key (lm_head.weight) -> the key it shares (model.embed_tokens.weight)
    quantized: set[str]  # weight keys transformers' bitsandbytes quantizer makes 4-bit
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # local shard -> header

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))


def _meta_model(base_dir: Path, config: dict):
    """The model's skeleton on the meta device (no memory): tied weights and Linear modules come from it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(base_dir))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, OSError, ImportError) as exc:
        raise ModelError(f"{base_dir / 'config.json'}: transformers cannot build this architecture ({exc}); only"
                         " transformers' own causal-LM architectures can be merged") from None


def _quantized_keys(model) -> set[str]:
    """The weights transformers' bnb quantizer turns 4-bit: plain nn.Linear minus its default skip list."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ()))
    return {f"{name}.weight" for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)}


def inspect_base(base_dir: Path, remote_files: list[str] | None = None) -> BaseModel:
    """Read the base's config and tensor layout. `remote_files`: shard names not downloaded yet (s3 base)."""
    import torch

    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: the base must be a transformers model directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc})") from None
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    # A GGUF conversion leaves its quantization_config behind but writes float tensors: that base is fine.
    if quant_method and quant_method != "gguf":
        raise ModelError(f"{config_path} has a {quant_method} quantization_config: the base is a pre-quantized checkpoint. Merge"
                         " into the 16-bit base model (the one the 4-bit model was made from)")
    index_path = base_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index_path} is not a valid safetensors index ({exc})") from None
    elif (base_dir / SINGLE_NAME).is_file() or (remote_files and SINGLE_NAME in remote_files):
        weight_map = None
    else:
        pickles = sorted(p.name for p in base_dir.glob("*.bin")) + sorted(p.name for p in base_dir.glob("*.pt"))
        if pickles:
            raise ModelError(f"{base_dir} holds pickle weights ({', '.join(pickles[:3])}) and no safetensors: pickle"
                             " can run code when loaded. Convert once with transformers (from_pretrained then"
                             " save_pretrained writes safetensors) and merge into that")
        raise ModelError(f"{base_dir} has no {SINGLE_NAME} or {INDEX_NAME}: pass the base model's directory")

    headers: dict[str, dict[str, TensorInfo]] = {}
    shapes: dict[str, tuple[object, tuple[int, ...]]] = {}
    meta = _meta_model(base_dir, config)
    remote = set(remote_files or ())
    if weight_map is None:
        weight_map = {key: SINGLE_NAME for key in _local_header(base_dir, SINGLE_NAME, headers)}
    for name in dict.fromkeys(weight_map.values()):
        if name in remote:
            continue
        header = _local_header(base_dir, name, headers)
        listed = {k for k, v in weight_map.items() if v == name}
        if set(header) != listed:
            extra = sorted(set(header) ^ listed)[:3]
            raise ModelError(f"{base_dir / name} and {INDEX_NAME} disagree about its tensors (e.g. {extra}):"
                             " re-download the base model")
        shapes.update({k: (t.dtype, t.shape) for k, t in header.items()})
    if remote:
        # Shards not downloaded yet: their shapes come from the architecture (checked again when each arrives).
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
        params = {**dict(meta.named_parameters()), **dict(meta.named_buffers())}
        for key, name in weight_map.items():
            if name in remote and key in params:
                shapes[key] = (dtype if params[key].is_floating_point() else params[key].dtype,
                               tuple(params[key].shape))
    tied = {target: source for target, source in (getattr(meta, "all_tied_weights_keys", None) or {}).items()
            if target not in weight_map and source in weight_map}
    return BaseModel(base_dir, config, shapes, weight_map, tied, _quantized_keys(meta), headers)


def _local_header(base_dir: Path, name: str, headers: dict) -> dict[str, TensorInfo]:
    path = base_dir / name
    if not path.is_file():
        raise ModelError(f"{path} is missing (listed in {INDEX_NAME}): re-download the base model")
    headers[name] = read_header(path)
    return headers[name]


# ---------------------------------------------------------------------------------------------- checks and plan


def check_compatible(base: BaseModel, adapter: Adapter) -> None:
    """Every adapter tensor must name a base tensor of the right shape; all problems are reported at once."""
    problems = []
    where = adapter.dir / "adapter_model.safetensors"

    def base_shape(key: str):
        key = key if key in base.shapes else base.tied.get(key, key)
        return base.shapes.get(key, (None, None))

    for key, delta in adapter.deltas.items():
        dtype, shape = base_shape(key)
        if shape is None:
            problems.append(f"LoRA module {delta.module!r} has no weight {key!r} in the base")
        elif tuple(shape) != delta.out_shape:
            problems.append(f"LoRA module {delta.module!r} makes a {list(delta.out_shape)} delta but the base's {key!r}"
                            f" is {list(shape)}")
        elif not dtype.is_floating_point:
            problems.append(f"base weight {key!r} is {dtype}, not a floating-point weight (a pre-quantized base?"
                            " merge into the 16-bit base)")
    for key, delta in adapter.bias_deltas.items():
        _, shape = base_shape(key)
        if shape is None:
            problems.append(f"LoRA module {delta.module!r} has lora_B.bias but the base has no {key!r}")
        elif tuple(shape) != tuple(delta.bias.shape):
            problems.append(f"lora_B.bias of {delta.module!r} is {list(delta.bias.shape)}, base {key!r} is {list(shape)}")
    for key, tensor in adapter.replacements.items():
        _, shape = base_shape(key)
        if shape is None:
            problems.append(f"saved module tensor {key!r} (modules_to_save) has no counterpart in the base")
        elif tuple(shape) != tuple(tensor.shape):
            problems.append(f"saved module tensor {key!r} is {list(tensor.shape)} but the base's is {list(shape)}"
                            " (was the vocabulary resized? merge into the resized base)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ModelError(f"{where} does not fit the base model in {base.dir} ({len(problems)} problem(s)): {shown}."
                         f" The adapter was trained on {adapter.config.get('base_model_name_or_path') or 'another model'}:"
                         " pass that base model")


@dataclass
class OutputShard:
    name: str
    entries: list[tuple[str, object, tuple[int, ...]]]  # (key, dtype, shape)


def plan_output(base: BaseModel, adapter: Adapter, max_shard_bytes: int | None) -> tuple[list[OutputShard], list[str]]:
    """Output shards (the base's layout, or repacked to max_shard_bytes) and the tied keys that get untied.

    A tied weight (lm_head sharing embed_tokens) is written on its own when the adapter changes either
    side: the unmerged model computes embed_tokens and lm_head separately, so they differ after a merge.
    (peft's merge_and_unload keeps them tied and adds both deltas to the shared tensor, which changes the
    model's outputs.)
    """
    untie = [t for t, s in base.tied.items() if adapter.touches(t) or adapter.touches(s)]
    keys_by_file: dict[str, list[str]] = {}
    for key, name in base.weight_map.items():
        keys_by_file.setdefault(name, []).append(key)
    for target in untie:
        keys_by_file[base.weight_map[base.tied[target]]].append(target)

    def entry(key):
        dtype, shape = base.shapes[base.tied.get(key, key)] if key not in base.shapes else base.shapes[key]
        return (key, dtype, tuple(shape))

    keys_by_file = dict(sorted(keys_by_file.items()))  # shard files are numbered: write them in order
    if max_shard_bytes is None:
        return [OutputShard(name, [entry(k) for k in keys]) for name, keys in keys_by_file.items()], untie
    groups: list[list] = [[]]
    size = 0
    for keys in keys_by_file.values():
        for key in keys:
            e = entry(key)
            nbytes = math.prod(e[2]) * e[1].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += nbytes
    n = len(groups)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return [OutputShard(name, group) for name, group in zip(names, groups, strict=True)], untie


# ---------------------------------------------------------------------------------------------- the arithmetic


def roundtrip_4bit(weight, quant_type: str, double_quant: bool, device: str):
    """The weight as a bitsandbytes 4-bit layer computes with it: quantize, then dequantize (float32)."""
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.to(device=device, dtype=torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=BNB_BLOCKSIZE, compress_statistics=double_quant,
                                       quant_type=quant_type)
    del w
    return bnbf.dequantize_4bit(packed, state).to(dtype=torch.float32)


def apply_delta(weight, delta: LoraDelta, out_dtype, device: str):
    """weight + delta (and the DoRA rescaling), computed in float32 a block of rows at a time."""
    import torch

    rows, cols = weight.shape
    out = weight if weight.dtype == out_dtype and weight.device.type == "cpu" else torch.empty(
        (rows, cols), dtype=out_dtype)
    a = delta.a.to(device=device, dtype=torch.float32)
    b = delta.b.to(device=device, dtype=torch.float32)
    magnitude = None if delta.magnitude is None else delta.magnitude.to(device=device, dtype=torch.float32)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        block = weight[start:end].to(device=device, dtype=torch.float32)
        if delta.kind == "linear":
            block.addmm_(b[start:end], a, alpha=delta.scale)
        else:  # embedding: A is (r, num_embeddings), B is (embedding_dim, r); delta = (B @ A).T
            block.addmm_(a[:, start:end].T, b.T, alpha=delta.scale)
        if magnitude is not None:
            # DoRA: each output row is rescaled to its learned magnitude over the norm of the merged row.
            block *= (magnitude[start:end] / torch.linalg.norm(block, dim=1)).unsqueeze(1)
        out[start:end].copy_(block)
    return out


# ---------------------------------------------------------------------------------------------- the merge


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    merge_into: str = DEFAULT_MERGE_INTO,
    on_file_written: Callable[[Path], None] | None = None,
    double_quant: bool = True,
    max_shard_size: int | str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    fetch_shard: Callable[[str], Path] | None = None,
    release_shard: Callable[[Path], None] | None = None,
) -> dict:
    """Merge the LoRA adapter in `adapter_dir` into the base model in `base_dir`, writing `out_dir`.

    merge_into: `original` (the 16-bit base) or `nf4`/`fp4` (the base as the 4-bit training saw it).
    double_quant: the training's bnb_4bit_use_double_quant (matters for nf4/fp4 only).
    max_shard_size: bytes or "5GB"; default: the base's own shard layout.
    device: `auto` uses the GPU for the arithmetic when there is one.
    fetch_shard / release_shard: for a base whose shards are not local yet (s3://): called with a shard's
    file name just before it is merged / with its local path once it has been read.
    Returns a summary (files written, tensors merged, seconds, peak resident memory of this process).
    """

    started = time.monotonic()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    for name, source in (("base model", base_dir), ("adapter", adapter_dir)):
        a, b = out_dir.resolve(), source.resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise ConfigError([f"the output {out_dir} and the {name} {source} overlap: writing the merged model there"
                               f" would delete or overwrite the {name} it is made from. Choose another output"])
    if merge_into not in MERGE_INTO_CHOICES:
        raise ModelError(f"merge_into={merge_into!r}: choose one of {', '.join(MERGE_INTO_CHOICES)}")
    device = _resolve_device(device)
    max_shard_bytes = None
    if max_shard_size is not None:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            max_shard_bytes = convert_file_size_to_int(max_shard_size)
        except ValueError:
            raise ConfigError([f"--max-shard-size {max_shard_size!r}: write bytes or a size like '5GB'"]) from None

    # 1. Everything is checked before anything is written.
    adapter = load_adapter(adapter_dir)
    remote = None
    if fetch_shard is not None:
        remote = [n for n in _listed_shards(base_dir) if not (base_dir / n).is_file()]
    base = inspect_base(base_dir, remote)
    check_compatible(base, adapter)
    shards, untied = plan_output(base, adapter, max_shard_bytes)
    quantized = base.quantized if merge_into != "original" else set()
    log.info("merging %d LoRA module(s) and %d saved tensor(s) into %s (%s base, %d shard(s), device %s)",
             len(adapter.deltas), len(adapter.replacements), base_dir, merge_into, len(shards), device)

    # 2. The output directory: refuse to mix with an earlier result.
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out_dir} is not empty: choose an empty output or pass --overwrite")
        for stale in [*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME]:
            stale.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def finished(path: Path) -> None:
        written.append(path)
        if on_file_written is not None:
            on_file_written(path)

    # 3. Small files first (config without quantization_config, generation config, tokenizer).
    config = dict(base.config)
    config.pop("quantization_config", None)
    if untied:
        config["tie_word_embeddings"] = False
    _atomic_write_bytes(out_dir / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    finished(out_dir / "config.json")
    tokenizer_source = adapter_dir if any((adapter_dir / n).is_file() for n in TOKENIZER_FILES[:4]) else base_dir
    for name in ("generation_config.json", *TOKENIZER_FILES):
        source = (tokenizer_source if name in TOKENIZER_FILES else base_dir) / name
        if source.is_file():
            _atomic_write_bytes(out_dir / name, source.read_bytes())
            finished(out_dir / name)

    # 4. The shards, one tensor at a time.
    counts = {"lora": 0, "replaced": 0, "requantized": 0}
    open_shards: dict[str, Path] = {}  # downloaded base shards still needed
    lock = threading.Lock()

    def base_info(key: str) -> TensorInfo:
        name = base.weight_map[key]
        with lock:
            if name in base.headers:
                return base.headers[name][key]
        if name not in base.headers:
            path = fetch_shard(name)  # type: ignore[misc]  # only remote shards lack a header
            header = read_header(path)
            listed = {k for k, v in base.weight_map.items() if v == name}
            if set(header) != listed or any(tuple(header[k].shape) != tuple(base.shapes[k][1]) for k in listed
                                            if k in base.shapes):
                raise ModelError(f"{name} of the base does not match {INDEX_NAME} and config.json: re-upload the base")
            with lock:
                base.headers[name] = header
                open_shards[name] = path
        return header[key]

    last_use = {base.weight_map[base.tied.get(e[0], e[0])]: i for i, s in enumerate(shards) for e in s.entries}
    # Reading the next base tensor overlaps the arithmetic and the writing of this one (file reads and
    # torch release the GIL); the queue holds one tensor, so at most three are in memory.
    order = [key for shard in shards for key, _, _ in shard.entries]
    reads: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand_over(item) -> None:
        while not stop.is_set():
            try:
                reads.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def reader() -> None:
        for key in order:
            if stop.is_set():
                return
            try:
                source_key = base.tied.get(key, key) if key not in base.weight_map else key
                hand_over((key, read_tensor(base_info(source_key)), None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by produce()
                hand_over((key, None, exc))
                return

    threading.Thread(target=reader, name="merge-read", daemon=True).start()

    def produce(key: str):
        read_key, tensor, error = reads.get()
        if error is not None:
            raise error
        if read_key != key:
            raise AssertionError(f"read {read_key} while writing {key}")
        if key in adapter.replacements:
            tensor = adapter.replacements[key].to(tensor.dtype).clone()
            counts["replaced"] += 1
        out_dtype = tensor.dtype
        if key in quantized and key not in adapter.replacements:
            tensor = roundtrip_4bit(tensor, merge_into, double_quant, device)
            counts["requantized"] += 1
        if key in adapter.deltas:
            tensor = apply_delta(tensor, adapter.deltas[key], out_dtype, device)
            counts["lora"] += 1
        if key in adapter.bias_deltas:
            d = adapter.bias_deltas[key]
            tensor = (tensor.float() + d.bias.float() * d.scale)
        return tensor.to(device="cpu", dtype=out_dtype)

    total_bytes = 0
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        path = out_dir / shard.name
        try:
            total_bytes += write_safetensors(path, shard.entries, produce)
        except BaseException:
            stop.set()  # the reader must not wait forever on a queue nobody reads
            raise
        weight_map.update({key: shard.name for key, _, _ in shard.entries})
        log.info("wrote %s (%d/%d)", shard.name, i + 1, len(shards))
        with lock:
            done = [(n, open_shards.pop(n)) for n in list(open_shards) if last_use.get(n, -1) <= i]
            for name, _ in done:
                del base.headers[name]
        for _, local in done:
            if release_shard is not None:
                release_shard(local)
        finished(path)

    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_bytes(out_dir / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    finished(out_dir / INDEX_NAME)
    summary = {
        "base": str(base_dir), "adapter": str(adapter_dir), "output": str(out_dir), "merge_into": merge_into,
        "device": device, "files": [p.name for p in written], "shards": len(shards), "total_bytes": total_bytes,
        "lora_modules_merged": counts["lora"], "tensors_replaced": counts["replaced"],
        "weights_requantized": counts["requantized"], "untied": untied,
        "seconds": round(time.monotonic() - started, 2), "peak_rss_bytes": _peak_rss_bytes(),
    }
    log.info("merge done: %d file(s), %.2f GB in %.1fs, peak RSS %.2f GB", len(written), total_bytes / 1e9,
             summary["seconds"], summary["peak_rss_bytes"] / 1e9)
    return summary


def _listed_shards(base_dir: Path) -> list[str]:
    index_path = base_dir / INDEX_NAME
    if index_path.is_file():
        try:
            return list(dict.fromkeys(json.loads(index_path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index_path} is not a valid safetensors index ({exc})") from None
    return [SINGLE_NAME]


# ---------------------------------------------------------------------------------------------- standalone CLI


class _Uploader:
    """Uploads finished files in a background thread while the next shard is merged."""

    def __init__(self, out_dir: Path, output_uri: str, endpoint_url: str, delete_after: bool):
        self.out_dir, self.output_uri, self.endpoint_url = out_dir, output_uri, endpoint_url
        self.delete_after = delete_after
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.error: BaseException | None = None
        self.uploaded: list[str] = []
        self.thread = threading.Thread(target=self._run, name="merge-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from entrypoints import storage

        while (path := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread reports the first error
            try:
                rel = path.relative_to(self.out_dir).as_posix()
                storage.upload_file(path, storage.join(self.output_uri, rel), endpoint_url=self.endpoint_url)
                self.uploaded.append(rel)
                if self.delete_after:
                    path.unlink()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error = exc

    def put(self, path: Path) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(path)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_merge(adapter_uri: str, base_uri: str, output_uri: str, *, work_dir: Path, merge_into: str,
              double_quant: bool, max_shard_size: str | None, endpoint_url: str, overwrite: bool,
              device: str) -> dict:
    """The standalone job: resolve inputs -> check output -> merge (uploading each file) -> report."""
    from entrypoints import storage

    work_dir.mkdir(parents=True, exist_ok=True)
    if storage.is_s3(output_uri):
        storage.check_bucket(output_uri, endpoint_url=endpoint_url)
        done = storage.read_text(storage.join(output_uri, INDEX_NAME), endpoint_url=endpoint_url)
        if done is not None and not overwrite:
            raise OutputExistsError(f"{output_uri} already holds a merged model ({INDEX_NAME}): choose another"
                                    " output or pass --overwrite")
    for flag, uri in (("--adapter", adapter_uri), ("--base", base_uri)):
        if not storage.is_s3(uri) and not Path(uri).exists():  # a missing input is the model's problem, not storage's
            raise ModelError(f"{flag} {uri}: no such directory; pass the directory (or s3:// prefix) that holds it")
    adapter_dir = storage.fetch(adapter_uri, work_dir / "adapter", endpoint_url=endpoint_url)
    fetch_shard = release_shard = None
    if storage.is_s3(base_uri):
        # Small files now; each weight shard is downloaded just before it is merged and deleted after.
        base_dir = work_dir / "base"
        objects = storage.list_objects(base_uri, endpoint_url=endpoint_url)
        if not objects:
            raise ModelError(f"nothing found at {base_uri}: pass the prefix holding the base model's files")
        shard_uris = {o.relative: o for o in objects if o.relative.endswith(".safetensors") and "/" not in o.relative}
        for obj in objects:
            if obj.relative not in shard_uris and "/" not in obj.relative:
                storage.download_file(obj.uri, base_dir / obj.relative, size=obj.size, endpoint_url=endpoint_url)
        if not shard_uris:
            pickles = [o.relative for o in objects if o.relative.endswith((".bin", ".pt"))]
            hint = f" (found pickle weights {pickles[:3]}: convert them to safetensors first)" if pickles else ""
            raise ModelError(f"{base_uri} has no *.safetensors{hint}")
        if SINGLE_NAME in shard_uris and not (base_dir / INDEX_NAME).is_file():
            obj = shard_uris[SINGLE_NAME]  # one file: its header is needed for the checks, fetch it now
            storage.download_file(obj.uri, base_dir / SINGLE_NAME, size=obj.size, endpoint_url=endpoint_url)

        def fetch_shard(name: str) -> Path:
            if name not in shard_uris:
                raise ModelError(f"{INDEX_NAME} at {base_uri} lists {name}, which is not there: re-upload the base")
            obj = shard_uris[name]
            return storage.download_file(obj.uri, base_dir / name, size=obj.size, endpoint_url=endpoint_url)

        def release_shard(path: Path) -> None:
            path.unlink(missing_ok=True)
    else:
        base_dir = storage.fetch(base_uri, work_dir / "base", endpoint_url=endpoint_url)

    if storage.is_s3(output_uri):
        out_dir = Path(tempfile.mkdtemp(prefix="merged-", dir=work_dir))
        uploader = _Uploader(out_dir, output_uri, endpoint_url, delete_after=True)
        on_file_written = uploader.put
    else:
        out_dir, uploader, on_file_written = Path(output_uri), None, None
    try:
        summary = merge_adapter(base_dir, Path(adapter_dir), out_dir, merge_into=merge_into,
                                on_file_written=on_file_written, double_quant=double_quant,
                                max_shard_size=max_shard_size, device=device, overwrite=overwrite,
                                fetch_shard=fetch_shard, release_shard=release_shard)
    finally:
        if uploader is not None:
            uploader.close()
    if uploader is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
        summary["output"] = output_uri
        summary["uploaded"] = uploader.uploaded
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entrypoints.merge", description=__doc__.split("\n\n")[1])
    p.add_argument("--adapter", required=True, help="adapter directory: s3:// prefix or local path")
    p.add_argument("--base", required=True, help="16-bit base model directory (safetensors): s3:// prefix or local path")
    p.add_argument("--output", required=True, help="where the merged model goes: s3:// prefix or local directory")
    p.add_argument("--merge-into", default=DEFAULT_MERGE_INTO, choices=MERGE_INTO_CHOICES,
                   help=f"base the delta is added to (default {DEFAULT_MERGE_INTO}; see MERGE.md)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="the adapter was trained without double quantization (nf4/fp4 only)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default: the base's own shard layout")
    p.add_argument("--work-dir", default=None, help="scratch space for downloads (default: a temporary directory)")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("QLORA_S3_ENDPOINT_URL", ""),
                   help="S3-compatible endpoint (default: $QLORA_S3_ENDPOINT_URL, else AWS)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already at --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run() -> None:
        with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
            work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
            summary = run_merge(args.adapter, args.base, args.output, work_dir=work_dir,
                                merge_into=args.merge_into, double_quant=args.double_quant,
                                max_shard_size=args.max_shard_size, endpoint_url=args.s3_endpoint_url,
                                overwrite=args.overwrite, device=args.device)
        print(json.dumps(summary, indent=2))

    return run_guarded(run, lambda: None)


if __name__ == "__main__":
    sys.exit(main())
